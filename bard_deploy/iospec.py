"""The IO contract of the exported graphs, declared once: names, dtypes, symbolic shapes, and how feeds are built
and outputs read back.

Export, validation, calibration, the manifest, the decoding loop and every runtime backend go through this module;
a tensor name written as a literal anywhere else is a smell. KV names follow HF (`past_key_values.{i}.key|value`);
the decoder step returns only the new tokens' K/V as `new_key_values.{i}.key|value` (not `present.*`, which
elsewhere means past + new): the runtime owns the cache and commits them.

Symbolic dimensions are strings: a name ("batch", "seq", "past") or a sum of names ("past+seq"); `concrete`
evaluates them for given sizes (TensorRT optimisation profiles, dummy inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
ATTENTION_BIAS = "attention_bias"
DEEPSTACK_EMBEDS = "deepstack_embeds"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"     # the step positions whose logits are computed (transformers' name)
TOP_IDS, TOP_PROBS = "top_ids", "top_probs"   # the fused greedy head: arg-max and its probability, MASK suppressed
PIXEL_VALUES = "pixel_values"
# the vision graph's grid-derived inputs (transformers' precompute keys: interp_indices / interp_weights /
# position_ids; the last renamed so it never reads as the decoder's MRoPE positions)
INTERP_INDICES, INTERP_WEIGHTS, VISION_POSITION_IDS = "interp_indices", "interp_weights", "vision_position_ids"
IMAGE_EMBEDS = "image_embeds"

KV = list[tuple[torch.Tensor, torch.Tensor]]     # per layer (K, V), each (batch, kv_heads, len, head_dim)
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}     # a graph's float IO (fp16: GPU targets)
TORCH_DTYPES = {**FLOAT_DTYPES, "int64": torch.int64}


def past_key(i: int) -> str:
    """Input name of layer i's cached keys."""
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    """Input name of layer i's cached values."""
    return f"past_key_values.{i}.value"


def new_key(i: int) -> str:
    """Output name of layer i's keys for the step's own tokens."""
    return f"new_key_values.{i}.key"


def new_value(i: int) -> str:
    """Output name of layer i's values for the step's own tokens."""
    return f"new_key_values.{i}.value"


@lru_cache(maxsize=256)
def _positions(start: int, end: int, device: str) -> torch.Tensor:
    """arange(start, end) made once per range (a step's logits_to_keep; read-only)."""
    return torch.arange(start, end, device=device)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str                       # numpy / ONNX dtype name: "float32", "int64"
    shape: tuple[str | int, ...]     # symbolic dims are strings: "seq", "past+seq"


def concrete(shape: tuple[str | int, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape with every symbolic dimension evaluated: "past+seq" with {"past": 4, "seq": 2} is 6."""
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            try:
                out.append(sum(sizes[name] for name in d.split("+")))
            except KeyError as e:
                raise AssertionError(f"no size given for dimension {e} of {shape}") from None
    return tuple(out)


def table(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> dict:
    """The IO table as the manifest stores it: {"inputs": [[name, dtype, shape], ...], "outputs": [...]}."""
    return {"inputs": [[s.name, s.dtype, list(s.shape)] for s in inputs],
            "outputs": [[s.name, s.dtype, list(s.shape)] for s in outputs]}


class GraphIO:
    """What every graph's contract offers on top of its `inputs` and `outputs` specs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        """Input names in graph order."""
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Output names in graph order."""
        return [s.name for s in self.outputs]

    def table(self) -> dict:
        """The manifest's IO table of this graph."""
        return table(self.inputs, self.outputs)


@dataclass(frozen=True)
class Top:
    """What the fused greedy head returns per kept position: arg-max ids (B, K) and their probabilities."""

    ids: torch.Tensor
    probs: torch.Tensor

    def __getitem__(self, index) -> Top:
        return Top(self.ids[index], self.probs[index])


@dataclass(frozen=True)
class DecoderIO(GraphIO):
    """The decoder step's inputs and outputs for one model shape (one graph: prefill, denoise, commit+denoise)."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_deepstack: int
    float_dtype: str = "float32"     # embeddings, bias, K/V and logits: float32, or float16 for GPU targets
    fused_head: bool = False         # also the greedy head's outputs (TOP_IDS, TOP_PROBS): what greedy decoding reads

    @classmethod
    def for_config(cls, config, float_dtype: str = "float32", fused_head: bool = False) -> DecoderIO:
        """The contract of a ModelConfig's text decoder, with float IO in `float_dtype` (and the fused head)."""
        t = config.text
        assert float_dtype in FLOAT_DTYPES, float_dtype
        return cls(t.num_hidden_layers, t.hidden_size, t.num_key_value_heads, t.head_dim, t.vocab_size,
                   config.num_deepstack, float_dtype, fused_head)

    @cached_property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Inputs in graph order: embeddings, MRoPE positions, additive bias, past K/V, DeepStack features."""
        f = self.float_dtype
        specs = [
            TensorSpec(INPUTS_EMBEDS, f, ("batch", "seq", self.hidden_size)),
            TensorSpec(POSITION_IDS, "int64", (3, "batch", "seq")),
            TensorSpec(ATTENTION_BIAS, f, ("batch", 1, "seq", "past+seq")),
        ]
        for i in range(self.num_layers):
            for name in (past_key(i), past_value(i)):
                specs.append(TensorSpec(name, f, ("batch", self.num_kv_heads, "past", self.head_dim)))
        if self.num_deepstack:
            specs.append(TensorSpec(DEEPSTACK_EMBEDS, f,
                                    (self.num_deepstack, "batch", "seq", self.hidden_size)))
        # positions (indices into the step's tokens) whose logits the loop reads: prefill and a commit+denoise
        # step compute no logits for positions nobody reads (at 2B a logit row costs 0.6 GFLOP and 0.6 MB)
        specs.append(TensorSpec(LOGITS_TO_KEEP, "int64", ("keep",)))
        return tuple(specs)

    @cached_property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Outputs in graph order: logits of the kept positions (with the fused head: their arg-max and its
        probability), then the step tokens' K/V per layer."""
        specs = [TensorSpec(LOGITS, self.float_dtype, ("batch", "keep", self.vocab_size))]
        if self.fused_head:
            specs += [TensorSpec(TOP_IDS, "int64", ("batch", "keep")),
                      TensorSpec(TOP_PROBS, self.float_dtype, ("batch", "keep"))]
        for i in range(self.num_layers):
            for name in (new_key(i), new_value(i)):
                specs.append(TensorSpec(name, self.float_dtype, ("batch", self.num_kv_heads, "seq", self.head_dim)))
        return tuple(specs)

    @property
    def new_kv_names(self) -> list[str]:
        """The step tokens' K/V output names, layer by layer (key, value)."""
        return [name(i) for i in range(self.num_layers) for name in (new_key, new_value)]

    @property
    def past_names(self) -> list[str]:
        """The past K/V input names, layer by layer (key, value)."""
        return [name(i) for i in range(self.num_layers) for name in (past_key, past_value)]

    # ---- feeds and outputs ---------------------------------------------------------------------------------
    def feeds(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_bias: torch.Tensor,
              past: KV, deepstack: torch.Tensor | None = None, keep: int | None = None) -> dict[str, torch.Tensor]:
        """Named feeds of one step. inputs_embeds (B, T, hidden), position_ids (3, B, T), attention_bias
        (B, 1, T, P + T), past per layer (B, kv_heads, P, head_dim); deepstack (n_ds, B, T, hidden) or None
        (zeros: no image in this step); keep: logits for the last `keep` positions only (None: all T)."""
        assert len(past) == self.num_layers, (len(past), self.num_layers)
        f = {INPUTS_EMBEDS: inputs_embeds, POSITION_IDS: position_ids, ATTENTION_BIAS: attention_bias}
        for i, (k, v) in enumerate(past):
            f[past_key(i)], f[past_value(i)] = k, v
        if self.num_deepstack:
            f[DEEPSTACK_EMBEDS] = (deepstack if deepstack is not None
                                   else inputs_embeds.new_zeros(self.num_deepstack, *inputs_embeds.shape))
        T = inputs_embeds.shape[1]
        assert keep is None or 1 <= keep <= T, (keep, T)
        f[LOGITS_TO_KEEP] = _positions(T - (keep or T), T, str(inputs_embeds.device))
        return f

    def unpack_feeds(self, feeds: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, KV, torch.Tensor | None, torch.Tensor]:
        """Inverse of `feeds`: (inputs_embeds, position_ids, attention_bias, past, deepstack or None,
        logits_to_keep), the arguments of `BardVLM.step`."""
        past = [(feeds[past_key(i)], feeds[past_value(i)]) for i in range(self.num_layers)]
        return (feeds[INPUTS_EMBEDS], feeds[POSITION_IDS], feeds[ATTENTION_BIAS], past,
                feeds.get(DEEPSTACK_EMBEDS), feeds[LOGITS_TO_KEEP])

    def outputs_of(self, logits: torch.Tensor, new_kv: KV,
                   top: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Named outputs of one step from the model's (logits (B, K, V), new K/V per layer[, (top ids, top
        probs) (B, K) of the fused head])."""
        assert (top is not None) == self.fused_head, "the fused head's outputs go with a fused-head contract"
        out = {LOGITS: logits}
        if top is not None:
            out[TOP_IDS], out[TOP_PROBS] = top
        for i, (k, v) in enumerate(new_kv):
            out[new_key(i)], out[new_value(i)] = k, v
        return out

    def unpack_outputs(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, KV]:
        """Inverse of `outputs_of`: (logits, or `Top` when only the fused head's outputs were asked for; new K/V
        per layer)."""
        head = outputs[LOGITS] if LOGITS in outputs else Top(outputs[TOP_IDS], outputs[TOP_PROBS])
        return head, [(outputs[new_key(i)], outputs[new_value(i)]) for i in range(self.num_layers)]

    def output_shapes(self, feeds: dict[str, torch.Tensor], names: list[str] | None = None
                      ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of the outputs `names` (None: all) of a step on `feeds`: what an IO-bound backend
        allocates for the graph to write into."""
        x = feeds[INPUTS_EMBEDS]
        return self._output_shapes(x.shape[0], x.shape[1], feeds[LOGITS_TO_KEEP].shape[0],
                                   None if names is None else tuple(names))

    @lru_cache(maxsize=64)      # noqa: B019 (a handful of contracts live as long as their backends)
    def _output_shapes(self, batch: int, seq: int, keep: int, names: tuple[str, ...] | None
                       ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        sizes = {"batch": batch, "seq": seq, "keep": keep}
        return {s.name: (concrete(s.shape, sizes), TORCH_DTYPES[s.dtype])
                for s in self.outputs if names is None or s.name in names}

    def greedy_outputs(self) -> list[str]:
        """The outputs a greedy step asks a fused-head graph for: the head's arg-max and probability, the K/V
        (not the logits: B x K x vocab values nobody reads)."""
        assert self.fused_head
        return [n for n in self.output_names if n != LOGITS]

    def dummy_feeds(self, batch: int, seq: int, past: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """Random feeds of the given sizes (tracing the export, timing a step): small embeddings, positions
        continuing after the past, no masking, random past K/V, no DeepStack."""
        g, dt = torch.Generator().manual_seed(seed), FLOAT_DTYPES[self.float_dtype]
        kv_shape = concrete(self.inputs[3].shape if self.num_layers else (), {"batch": batch, "past": past})
        kv = [(torch.randn(kv_shape, generator=g).to(dt), torch.randn(kv_shape, generator=g).to(dt))
              for _ in range(self.num_layers)]
        return self.feeds((torch.randn(batch, seq, self.hidden_size, generator=g) * 0.02).to(dt),
                          (torch.arange(seq) + past).expand(3, batch, seq).contiguous(),
                          torch.zeros(batch, 1, seq, past + seq, dtype=dt), kv)


@dataclass(frozen=True)
class VisionIO(GraphIO):
    """The vision graph's inputs and outputs: the pixel patches of one image (any grid) -> merged image embeddings
    and the DeepStack features. What depends on the grid alone (the bilinear taps that resample the learned
    position table, the patches' (h, w) rotary positions) is computed outside the graph from the grid
    (`vision.grid_inputs`, transformers' own helpers) and fed in, so one graph serves every image size:
    `patches` = t*h*w, `tokens` = patches / merge^2."""

    patch_dim: int                   # C * temporal_patch * patch * patch
    hidden_size: int
    num_deepstack: int
    merge: int                       # spatial merge size (2: 4 patches per LM token)
    float_dtype: str = "float32"

    @classmethod
    def for_config(cls, config, float_dtype: str = "float32") -> VisionIO:
        """The contract of a ModelConfig's vision tower."""
        v = config.vision
        # transformers' Qwen3VLVisionConfig defaults for keys a config.json may leave out
        patch_dim = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 16) ** 2
        return cls(patch_dim, config.text.hidden_size, config.num_deepstack, config.spatial_merge_size, float_dtype)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The pixel patches (patches, patch_dim); per patch the 4 bilinear taps into the learned position table
        and their weights; per patch its (h, w) rotary position."""
        return (TensorSpec(PIXEL_VALUES, self.float_dtype, ("patches", self.patch_dim)),
                TensorSpec(INTERP_INDICES, "int64", ("patches", 4)),
                TensorSpec(INTERP_WEIGHTS, self.float_dtype, ("patches", 4)),
                TensorSpec(VISION_POSITION_IDS, "int64", ("patches", 2)))

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Image embeds (tokens, hidden) and DeepStack features (n_ds, tokens, hidden)."""
        return (TensorSpec(IMAGE_EMBEDS, self.float_dtype, ("tokens", self.hidden_size)),
                TensorSpec(DEEPSTACK_EMBEDS, self.float_dtype, (self.num_deepstack, "tokens", self.hidden_size)))

    def feeds(self, pixel_values: torch.Tensor, grid_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """Named feeds of one image: its patches and `vision.grid_inputs` of its grid (floats in the graph's
        dtype)."""
        dt = FLOAT_DTYPES[self.float_dtype]
        indices, weights, positions = grid_inputs
        return {PIXEL_VALUES: pixel_values.to(dt), INTERP_INDICES: indices, INTERP_WEIGHTS: weights.to(dt),
                VISION_POSITION_IDS: positions}

    def grid_of(self, feeds: dict[str, torch.Tensor]) -> list[int]:
        """The (t, h, w) patch grid of one image's feeds (its rotary positions span h x w; t = patches / (h w))."""
        pos = feeds[VISION_POSITION_IDS]
        h, w = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
        return [feeds[PIXEL_VALUES].shape[0] // (h * w), h, w]

    def outputs_of(self, image_embeds: torch.Tensor, deepstack: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named outputs from the tower's (image embeds, DeepStack features)."""
        return {IMAGE_EMBEDS: image_embeds, DEEPSTACK_EMBEDS: deepstack}

    def unpack_outputs(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `outputs_of`: (image embeds, DeepStack features)."""
        return outputs[IMAGE_EMBEDS], outputs[DEEPSTACK_EMBEDS]

"""The decoding loops: block-parallel denoising (BARD) and the AR baseline, over one KV buffer.

Both share the prompt batch, the prefill, the cached step and the statistics, so an AR vs BARD comparison
differs only in the per-step rule. The denoising loop is written once (`bard_blocks`, a generator of
finished blocks); `generate_bard` and the streaming API consume it. Backends are passed in, never imported.

BARD predicts token i at position i (no shift); the AR baseline reads the last position's logits as the next
token's distribution (the source model's habit).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from bard_deploy import iospec
from bard_deploy.config import ModelConfig
from bard_deploy.diffusion.mask import CLEAN, NOISY, PAD, PROMPT, Layout, prompt_layout, response_layout
from bard_deploy.errors import RuntimeInputError
from bard_deploy.runtimes.kv import KVCache
from bard_deploy.vision import merge_image_features, rope_index

# ---------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------


SCHEDULES = ("min", "even")
SPECULATIVE = (None, "source", "self")


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. Defaults exist here once; the CLI and the API take them from this class.

    threshold: commit every masked token whose confidence is >= threshold, in (0, 1]; None = static
      (exactly `min_commit` tokens per step, the most confident).
    max_steps: the most denoising steps per block (None = block_size); at the last one every remaining
      masked token is committed.
    edit_threshold: token revision for mix-noise models: a token committed earlier in the current block whose
      prediction changed with probability >= edit_threshold is replaced, at most `max_edits` per block and row.
    schedule: "min" (ours): at least `min_commit` tokens a step, every remaining one at the last step; "even"
      (the official Bard-VL `generate`): the block split as evenly as possible over `max_steps` steps (base =
      B // S, the first B % S steps one more) and at least that many committed per step, no forced last step.
    strict_threshold: commit above the threshold (`>`, the reference) instead of at or above it (`>=`, ours; at
      threshold 1.0 a saturated fp32 softmax commits under ours and never under the reference).
    suppress_mask: the MASK token is never a prediction (ours); False: raw confidences as the reference takes
      them (a MASK argmax can be committed, and is re-predicted at the next step).
    `DecodeOptions.reference(...)` sets the last three to the official `generate`'s behaviour.
    stop: up to 4 strings; the answer ends before the first one (finish reason "stop"); applied to the text by
      the Pipeline (the decode loop works on tokens).
    speculative: "source": lossless mode; the BARD model drafts a block (its usual denoising under the options
      above), the AR source checks the whole draft in one causal forward, and the longest prefix equal to the
      source's greedy choices is kept plus the source's own next token: the output is the source's greedy
      decode. "self": a dual-mode checkpoint verifies its own drafts in its causal mode (the output is its own
      greedy causal decode). Greedy only.
    """

    block_size: int | None = None          # None = the checkpoint's trained block size
    threshold: float | None = 0.9
    min_commit: int = 1
    max_steps: int | None = None
    max_new_tokens: int = 256
    edit_threshold: float | None = None
    max_edits: int = 4
    temperature: float = 0.0               # 0 = greedy
    top_k: int = 0                         # 0 = off
    top_p: float = 1.0                     # 1 = off
    seed: int | None = None
    allow_block_size_mismatch: bool = False
    schedule: str = "min"
    strict_threshold: bool = False
    suppress_mask: bool = True
    stop: tuple[str, ...] = ()
    speculative: str | None = None          # "source": the AR source verifies each drafted block (lossless)

    @classmethod
    def of(cls, options: dict) -> DecodeOptions:
        """DecodeOptions from keyword options; an unknown one is a RuntimeInputError naming it (and the known)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise RuntimeInputError(f"unknown decode option{'s' if len(unknown) > 1 else ''} "
                                    f"{', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})",
                                    unknown[0])
        stop = options.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
            raise RuntimeInputError(f"decode option stop={stop!r}: must be up to 4 non-empty strings", stop)
        return cls(**{**options, "stop": tuple(stop)})

    @classmethod
    def reference(cls, **options) -> DecodeOptions:
        """The official Bard-VL `generate`'s semantics (even schedule, strict threshold, raw confidences) with
        `options` for the rest (block_size, threshold, max_steps, ...)."""
        return cls(**{"schedule": "even", "strict_threshold": True, "suppress_mask": False, **options})

    def resolved(self, config: ModelConfig | None, ar: bool = False) -> DecodeOptions:
        """A validated copy with block_size and max_steps filled; a bad option raises RuntimeInputError."""
        def bad(name: str, value: object, why: str) -> RuntimeInputError:
            return RuntimeInputError(f"decode option {name}={value!r}: {why}", value)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise bad("max_new_tokens", self.max_new_tokens, "must be a positive integer")
        if not self.temperature >= 0:
            raise bad("temperature", self.temperature, "must be >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if ar:
            return self
        trained = config.bard.block_size if config is not None and config.bard is not None else None
        block = self.block_size if self.block_size is not None else trained
        if block is None:
            raise bad("block_size", None, "the checkpoint records no trained block size; pass one")
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise bad("block_size", block, "must be a positive integer")
        if config is not None and block > config.text.max_position_embeddings:
            raise bad("block_size", block, f"larger than the model's context ({config.text.max_position_embeddings})")
        if trained is not None and block != trained and not self.allow_block_size_mismatch:
            raise bad("block_size", block, f"the checkpoint was trained with block size {trained}; decoding with "
                                           "another one needs allow_block_size_mismatch (--allow-block-size-mismatch)")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise bad("threshold", self.threshold, "must be in (0, 1] (or None for a static schedule)")
        if not isinstance(self.min_commit, int) or self.min_commit < 1:
            raise bad("min_commit", self.min_commit, "must be an integer >= 1")
        steps = self.max_steps if self.max_steps is not None else block
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise bad("max_steps", steps, "must be an integer >= 1")
        if self.edit_threshold is not None and not 0 < self.edit_threshold <= 1:
            raise bad("edit_threshold", self.edit_threshold, "must be in (0, 1]")
        if self.edit_threshold is not None and config is not None and config.bard is not None:
            # measured (benchmarks/revision_ablation.py, B8 of the default): a mask-noise checkpoint rewrites 66 % of
            # the right tokens of a committed block at any edit threshold (exact match 95.5 -> 17.5 %); mix noise
            # under the reference's loss (keep weight 0) still 46-55 % (97.0 -> 55 %); with a keep loss 0.3-1.1 %
            if config.bard.noise == "mask":
                raise bad("edit_threshold", self.edit_threshold, "revises committed tokens, which this mask-noise "
                          "checkpoint was never trained to judge (it rewrites right ones): train with noise \"mix\"")
            if config.bard.noise == "mix" and config.bard.mix_keep_weight == 0:
                raise bad("edit_threshold", self.edit_threshold, "revises committed tokens, but this mix-noise "
                          "checkpoint was trained with mix_keep_weight 0 (every visible token is wrong to it: it "
                          "rewrites right ones): train with --mix-keep-weight > 0")
        if not isinstance(self.max_edits, int) or self.max_edits < 0:
            raise bad("max_edits", self.max_edits, "must be an integer >= 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"must be one of {', '.join(SCHEDULES)}")
        if self.speculative not in SPECULATIVE:
            raise bad("speculative", self.speculative, "must be 'source' or 'self' (or None)")
        if self.speculative == "self" and (config is None or config.bard is None or not config.bard.dual_mode):
            raise bad("speculative", self.speculative, "needs a dual-mode checkpoint (train --dual-mode): this one "
                                                       "does not decode causally")
        if self.speculative is not None and self.temperature > 0:
            raise bad("speculative", self.speculative, "verifies greedy choices: it needs temperature 0")
        return replace(self, block_size=block, max_steps=steps)

    def commits_at(self, step: int) -> int:
        """The fewest masked tokens committed at denoising step `step` of a block (resolved options): min_commit,
        or the even schedule's share of the block (base = B // S, the first B % S steps one more)."""
        if self.schedule == "min":
            return self.min_commit
        base, extra = divmod(self.block_size, self.max_steps)
        return base + (1 if step < extra else 0)


# ---------------------------------------------------------------------------------------------------
# Inputs and statistics
# ---------------------------------------------------------------------------------------------------


@dataclass
class PromptBatch:
    """Left-padded prompt ids (B, L), their mask (1 = real) and the images of all rows (row-major)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]], pixel_values: torch.Tensor | None = None,
                  image_grid_thw: torch.Tensor | None = None, pad_id: int = 0) -> PromptBatch:
        """Left-pad token id rows into one batch; an empty row is a RuntimeInputError."""
        if not rows or any(len(r) == 0 for r in rows):
            raise RuntimeInputError("every prompt needs at least one token", [len(r) for r in rows])
        L = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (L - len(r)) + list(r) for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return cls(ids, mask, pixel_values, image_grid_thw)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) real prompt lengths."""
        return self.attention_mask.sum(1)


@dataclass
class Stats:
    """Counted per generate call. tokens are counted up to and including each row's first EOS."""

    nfe: int = 0                                             # forwards, prefill included
    prefill_s: float = 0.0
    decode_s: float = 0.0
    vision_s: float = 0.0
    step_s: list[float] = field(default_factory=list)        # wall time of every decode forward
    backend_s: list[float] = field(default_factory=list)     # the backend's share of it (the graph run alone)
    steps_per_block: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)          # per row
    edits: int = 0
    image_tokens: int = 0                                    # the prompts' image + video tokens (all rows)
    # the official generate's count (BARD): every non-MASK token of the decoded blocks, post-EOS ones included
    reference_tokens: list[int] = field(default_factory=list)   # per row
    finish_reasons: list[str] = field(default_factory=list)    # per row: "eos", "length" (or "stop", Pipeline)
    # speculative: per round and live row, the draft tokens the verifier accepted; its forwards and both times
    accepted: list[int] = field(default_factory=list)
    verify_nfe: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def total_tokens(self) -> int:
        """Tokens of all rows (each up to and including its first EOS)."""
        return sum(self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward of the batch, prefill included (the AR baseline gets exactly 1.0:
        its prefill yields the first token)."""
        return self.total_tokens / len(self.tokens) / self.nfe if self.nfe and self.tokens else 0.0

    def reference_dict(self) -> dict | None:
        """The statistics in the official Bard-VL `generate`'s vocabulary (its `_build_generation_stats`): the
        denoising passes (no prefill; its clean passes are not counted, ours do not exist: a finished block's
        K/V come out of the next block's first step), the response tokens as it counts them (non-MASK, after
        EOS too) and its tokens per forward (those tokens per row over the denoising passes). None for AR."""
        if not self.steps_per_block or not self.reference_tokens:
            return None
        steps = sum(self.steps_per_block)
        tokens = sum(self.reference_tokens)
        return {"denoising_steps": steps, "steps_per_block": self.steps_per_block, "response_tokens": tokens,
                "tokens_per_forward": round(tokens / len(self.reference_tokens) / steps, 4) if steps else 0.0}

    def for_row(self, row: int, image_tokens: int) -> Stats:
        """This call's statistics as one row of it saw them: its own tokens, finish reason and image tokens; the
        forwards, steps and times are the call's (the row took part in every forward of its batch)."""
        one = lambda xs: xs[row:row + 1]                                    # noqa: E731
        return replace(self, step_s=list(self.step_s), backend_s=list(self.backend_s),
                       steps_per_block=list(self.steps_per_block), tokens=one(self.tokens),
                       accepted=list(self.accepted), reference_tokens=one(self.reference_tokens),
                       finish_reasons=one(self.finish_reasons),
                       image_tokens=image_tokens)

    def as_dict(self) -> dict:
        """The statistics as a JSON-able dict (step times left out); "reference": the same call counted as the
        official generate counts (`reference_dict`)."""
        return {"nfe": self.nfe, "tokens": self.tokens, "tokens_per_forward": round(self.tokens_per_forward, 4),
                "steps_per_block": self.steps_per_block, "mean_steps_per_block":
                    round(sum(self.steps_per_block) / len(self.steps_per_block), 3) if self.steps_per_block else 0.0,
                "edits": self.edits, "image_tokens": self.image_tokens, "prefill_s": round(self.prefill_s, 6),
                "vision_s": round(self.vision_s, 6), "finish_reasons": self.finish_reasons,
                **({"speculative": {"rounds": len(self.accepted), "mean_accepted":
                    round(sum(self.accepted) / len(self.accepted), 3), "verify_nfe": self.verify_nfe,
                    "draft_s": round(self.draft_s, 6), "verify_s": round(self.verify_s, 6)}}
                   if self.accepted else {}),
                "decode_s": round(self.decode_s, 6), "reference": self.reference_dict()}


@dataclass
class Generation:
    """What `generate` returns: token ids per row and the call's statistics."""

    token_ids: list[list[int]]   # per row, up to and including the first EOS, at most max_new_tokens
    stats: Stats


# ---------------------------------------------------------------------------------------------------
# Shared pieces: prefill, one cached step, the commit rule
# ---------------------------------------------------------------------------------------------------


class Session:
    """One request's state: the backend, the KV buffer and the per-row rope deltas and response starts.

    The KV buffer, the embeddings and the logits live on the backend's device; the layout vectors, positions
    and rope deltas are made on the CPU and sent along with each step (a few integers per token)."""

    def __init__(self, backend, batch: PromptBatch, max_new: int, prompt_attention: str,
                 prompt_block: int | None, stats: Stats, greedy: bool = False, capacity: int | None = None):
        B, P = batch.input_ids.shape
        t0 = time.perf_counter()
        x = backend.embed(batch.input_ids)
        self._prepare(backend, B, P, max_new, prompt_attention, stats, greedy, x.dtype, capacity)
        cfg: ModelConfig = backend.config
        self.start = batch.lengths                                       # (B,) index of the first new token
        ds = None
        if batch.pixel_values is not None:
            tv = time.perf_counter()
            feats, deepstack = backend.encode_images(batch.pixel_values, batch.image_grid_thw)
            stats.vision_s += time.perf_counter() - tv
            stats.image_tokens += feats.shape[0]
            x, ds = merge_image_features(x, batch.input_ids, cfg.image_token_id, feats, deepstack,
                                         cfg.video_token_id)
        pos, self.delta = rope_index(batch.input_ids, cfg.image_token_id, batch.image_grid_thw,
                                     cfg.spatial_merge_size, batch.attention_mask, cfg.video_token_id)
        self._delta_col = self.delta[:, None]                            # (B, 1): every text step adds it
        layout = prompt_layout(batch.attention_mask, prompt_block)
        self.last_logits = self._forward(x, pos, layout, ds, keep=1)[:, -1]          # (B, V): AR reads it
        self.cache.commit(self._new_kv, layout)
        stats.prefill_s += time.perf_counter() - t0

    def _prepare(self, backend, B: int, P: int, max_new: int, prompt_attention: str, stats: Stats,
                 greedy: bool, dtype: torch.dtype, capacity: int | None = None) -> None:
        """The state every session starts from: the backend's contract, the outputs a step asks for, an empty
        KV buffer for P + max_new tokens in `dtype` (the embeddings'; `capacity` columns when the cache holds
        PAD holes besides them: speculative batches)."""
        self.backend, self.stats, self.prompt_attention = backend, stats, prompt_attention
        # greedy decoding reads only the arg-max and its probability: a graph with the fused head returns just
        # those (B x K values instead of B x K x vocab logits); steps then return an iospec.Top
        fused = greedy and backend.io.fused_head and getattr(backend, "takes_outputs", False)
        self.outputs = backend.io.greedy_outputs() if fused else None      # None: every output, logits included
        self.device: torch.device = backend.device
        self.io: iospec.DecoderIO = backend.io
        cfg: ModelConfig = backend.config
        if P + max_new > cfg.text.max_position_embeddings:
            raise RuntimeInputError(f"prompt of {P} tokens + {max_new} new tokens exceeds the model's context of "
                                    f"{cfg.text.max_position_embeddings}", P + max_new)
        # a backend that wants the whole buffer (dense arrays, no per-step copy) gets it in chunks
        self.padded = getattr(backend, "padded_past", None)
        self._bias_memo: tuple[Layout, tuple, torch.Tensor] | None = None
        self._ds_zeros: dict[int, torch.Tensor] = {}
        # an IO-bound backend keeps one binding per request: only what changed is rebound between steps
        self._binding = backend.binding() if hasattr(backend, "binding") else None
        self.cache = KVCache(self.io.num_layers, B, self.io.num_kv_heads, capacity or P + max_new,
                             self.io.head_dim, dtype=dtype, device=self.device, chunk=self.padded)

    @classmethod
    def with_past(cls, backend, past: int, max_new: int, stats: Stats, batch: int = 1, greedy: bool = True,
                  seed: int = 0) -> Session:
        """A session whose cache already holds `past` prompt tokens of random K/V (no prefill run): the loop's
        own step at a long past without paying for that past's prefill (bench-step's loop timing and replay).
        Response tokens then start at index `past`; the rope deltas are 0."""
        self = cls.__new__(cls)
        dtype = backend.embed(torch.zeros(1, 1, dtype=torch.long)).dtype
        self._prepare(backend, batch, past, max_new, "causal", stats, greedy, dtype)
        g = torch.Generator().manual_seed(seed)
        shape = (batch, self.io.num_kv_heads, past, self.io.head_dim)
        kv = [(torch.randn(shape, generator=g).to(self.cache.k.dtype),
               torch.randn(shape, generator=g).to(self.cache.k.dtype)) for _ in range(self.io.num_layers)]
        self.cache.commit(kv, prompt_layout(torch.ones(batch, past, dtype=torch.long)))
        self.start = torch.full((batch,), past, dtype=torch.long)
        self.delta = torch.zeros(batch, dtype=torch.long)
        self._delta_col = self.delta[:, None]
        self.last_logits = None
        return self

    def _forward(self, x: torch.Tensor, pos: torch.Tensor, layout: Layout, ds: torch.Tensor | None,
                 keep: int | None = None) -> torch.Tensor:
        """One backend step over the cache + `x`; returns the logits of the last `keep` positions (None: all)
        and keeps the new K/V for `commit`."""
        padded = self.padded is not None and self.cache.length > 0      # an empty past is dense already
        past = self.cache.padded() if padded else self.cache.past()
        feeds = self.io.feeds(x, pos.to(self.device), self._bias(layout, padded), past, ds, keep)
        t0 = time.perf_counter()
        kw = {"binding": self._binding} if self._binding is not None else {}
        out = self.backend.step(feeds, self.outputs, **kw) if self.outputs else self.backend.step(feeds, **kw)
        if self.device.type == "cuda":                  # a step's time, not its launch time
            torch.cuda.synchronize(self.device)
        self._backend_s = time.perf_counter() - t0
        logits, self._new_kv = self.io.unpack_outputs(out)
        self.stats.nfe += 1
        return logits

    def _bias(self, layout: Layout, padded: bool) -> torch.Tensor:
        """The step's attention bias, on the device; the steps of a block after its first see the same queries
        (the same Layout object) over the same cache, and reuse the previous step's."""
        key = (self.cache.length, self.cache.capacity, padded)
        memo = self._bias_memo
        if memo is not None and memo[0] is layout and memo[1] == key:
            return memo[2]
        bias = self.cache.step_bias(layout, self.prompt_attention, padded).to(self.device)
        self._bias_memo = (layout, key, bias)
        return bias

    def step(self, tokens: torch.Tensor, layout: Layout, keep: int | None = None) -> torch.Tensor:
        """One cached decode forward over `tokens` (B, T) -> logits (B, K, V) of the last `keep` positions (None:
        all T). Response tokens are text, so all three MRoPE rows are index + delta. The new K/V wait in
        `_new_kv` until `commit`."""
        t0 = time.perf_counter()
        pos = (layout.index + self._delta_col).unsqueeze(0).expand(3, -1, -1)
        logits = self._forward(self.backend.embed(tokens), pos, layout, self._no_deepstack(tokens.shape), keep)
        self.stats.step_s.append(time.perf_counter() - t0)
        self.stats.backend_s.append(self._backend_s)
        return logits

    def _no_deepstack(self, shape: torch.Size) -> torch.Tensor | None:
        """Zero DeepStack features for a text step of (B, T) tokens (made once per T; None without DeepStack)."""
        if not self.io.num_deepstack:
            return None
        zeros = self._ds_zeros.get(shape[1])
        if zeros is None:
            dtype = self.cache.k.dtype
            zeros = self._ds_zeros[shape[1]] = torch.zeros(self.io.num_deepstack, *shape, self.io.hidden_size,
                                                           dtype=dtype, device=self.device)
        return zeros

    def commit(self, layout: Layout, n: int) -> None:
        """Write the first n tokens of the last step into the cache."""
        self.cache.commit(self._new_kv, layout, n)


def _generator(opts: DecodeOptions, device: torch.device) -> torch.Generator | None:
    """The sampling generator (seeded), on the device the logits are on (a seed's draws differ per device)."""
    return torch.Generator(device=device).manual_seed(opts.seed) if opts.seed is not None else None


def _sample(logits: torch.Tensor, opts: DecodeOptions, gen: torch.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits -> (token, its probability), greedy unless temperature > 0."""
    if opts.temperature == 0:
        probs = torch.softmax(logits.float(), dim=-1)
        conf, pred = probs.max(-1)
        return pred, conf
    logits = logits.float() / opts.temperature
    if opts.top_k:
        kth = logits.topk(min(opts.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= opts.top_p         # keep the smallest prefix >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    pred = torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])
    return pred, probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)


def predict(logits: torch.Tensor | iospec.Top, opts: DecodeOptions, mask_id: int | None,
            gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, its probability) per position: from logits (..., V) with the MASK token (when given) never
    a prediction, or straight from the fused head's outputs (greedy; it suppressed MASK in the graph)."""
    if isinstance(logits, iospec.Top):
        assert opts.temperature == 0, "the fused head serves greedy decoding only"
        return logits.ids, logits.probs.float()
    if mask_id is not None:
        logits = logits.clone()
        logits[..., mask_id] = float("-inf")
    return _sample(logits, opts, gen)


def denoise_step(logits: torch.Tensor | iospec.Top, canvas: torch.Tensor, masked: torch.Tensor,
                 edits_left: torch.Tensor, step: int, opts: DecodeOptions, mask_id: int,
                 gen: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """The per-step rule, shared by the cached runtime and the slow reference decoder.

    logits (B, T, V) of the canvas (or the fused head's `Top`), canvas (B, T), masked (B, T) = canvas == MASK,
    step: the block's denoising step (0-based; opts resolved). Returns the new canvas and the number of edits
    made (edits_left (B,) is decremented in place).
    """
    # (1) the MASK token is never a prediction (unless opts.suppress_mask is off); (2) prediction and confidence
    pred, conf = predict(logits, opts, mask_id if opts.suppress_mask else None, gen)
    # (3) commit: every masked token with conf >= threshold (> with strict_threshold), at least `commits_at(step)`
    #     per row (the most confident), and under the "min" schedule everything at the last allowed step.
    if opts.schedule == "min" and step == opts.max_steps - 1:
        commit = masked.clone()
    else:
        if opts.threshold is None:
            commit = torch.zeros_like(masked)
        else:
            commit = masked & ((conf > opts.threshold) if opts.strict_threshold else (conf >= opts.threshold))
        candidates = conf.masked_fill(~masked, -1.0)
        k_step = opts.commits_at(step)
        if k_step == 1:                 # the most confident masked token (argmax: the first of equals, as below)
            best = candidates.argmax(1, keepdim=True)
            commit.scatter_(1, best, masked.gather(1, best))
        elif k_step > 1:
            ranked = candidates.argsort(dim=1, descending=True, stable=True)
            k = masked.sum(1).clamp(max=k_step)                                        # (B,)
            top = torch.arange(masked.shape[1], device=masked.device)[None, :] < k[:, None]   # first k ranked
            commit |= torch.zeros_like(masked).scatter(1, ranked, top)
    new = torch.where(commit, pred, canvas)
    # (4) revision: tokens committed at earlier steps of this block whose prediction changed confidently
    n_edits = 0
    if opts.edit_threshold is not None:
        live = masked.any(1, keepdim=True)                  # rows still denoising this block
        cand = live & ~masked & (pred != canvas) & (conf >= opts.edit_threshold)
        ranked = conf.masked_fill(~cand, -1.0).argsort(dim=1, descending=True, stable=True)
        k = torch.minimum(cand.sum(1), edits_left)
        first_k = torch.arange(cand.shape[1], device=cand.device)[None, :] < k[:, None]
        edit = torch.zeros_like(cand).scatter(1, ranked, first_k)
        new = torch.where(edit, pred, new)
        edits_left -= edit.sum(1)
        n_edits = int(edit.sum())
    return new, n_edits


def finish_reason(row: list[int], eos_ids: Sequence[int]) -> str:
    """"eos" when a row ended with an EOS token, else "length" (it reached max_new_tokens)."""
    return "eos" if row and row[-1] in set(eos_ids) else "length"


def truncate_at_eos(rows: list[list[int]], eos_ids: set[int], max_new: int) -> list[list[int]]:
    """Each row cut to max_new tokens, then after its first EOS (kept)."""
    out = []
    for r in rows:
        r = r[:max_new]
        cut = next((i for i, t in enumerate(r) if t in eos_ids), None)
        out.append(r if cut is None else r[:cut + 1])
    return out


# ---------------------------------------------------------------------------------------------------
# BARD: block-parallel denoising
# ---------------------------------------------------------------------------------------------------


def bard_blocks(backend, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int],
                stats: Stats) -> Iterator[torch.Tensor]:
    """Yield each finished block (B, block_size) until every row has emitted EOS or max_new_tokens.

    Per block:
      1. the canvas starts as [MASK] * B (rows that already emitted EOS get EOS instead and take no part);
      2. up to max_steps forwards; the first also carries the previous, finished block as clean tokens, so
         its K/V come out of the same forward and are committed then (no extra clean pass);
      3. each step applies `denoise_step` (commit by confidence, optional revision);
      4. the block ends when no row has a MASK left.
    """
    cfg: ModelConfig = backend.config
    opts = opts.resolved(cfg)
    if cfg.bard is None:
        raise RuntimeInputError("this checkpoint has no 'bard' section (an AR model): decode it with ar=True",
                                "bard")
    B_sz, mask_id = opts.block_size, cfg.bard.mask_token_id
    n_blocks = -(-opts.max_new_tokens // B_sz)
    prompt_block = B_sz if cfg.bard.prompt_attention == "block" else None
    session = Session(backend, batch, n_blocks * B_sz, cfg.bard.prompt_attention, prompt_block, stats,
                      greedy=opts.temperature == 0 and opts.suppress_mask)     # the fused head suppresses MASK
    dev = session.device
    gen = _generator(opts, dev)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=dev)
    rows = batch.input_ids.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    pending: tuple[torch.Tensor, Layout] | None = None    # the finished block whose K/V are not cached yet
    t0 = time.perf_counter()
    for b in range(n_blocks):
        canvas = torch.full((rows, B_sz), mask_id, dtype=torch.long, device=dev)
        canvas[done] = int(eos[0]) if len(eos) else mask_id
        noisy = response_layout(rows, session.start + b * B_sz, b, B_sz, B_sz, NOISY)
        edits_left = torch.full((rows,), opts.max_edits, dtype=torch.long, device=dev)
        steps = 0
        for s in range(opts.max_steps):
            masked = canvas == mask_id
            if not masked.any():
                break
            if pending is not None:
                tokens, layout = torch.cat([pending[0], canvas], 1), Layout.cat([pending[1], noisy])
            else:
                tokens, layout = canvas, noisy
            logits = session.step(tokens, layout, keep=B_sz)            # the canvas only
            if pending is not None:
                session.commit(layout, B_sz)
                pending = None
            canvas, n_edits = denoise_step(logits, canvas, masked, edits_left, s, opts,
                                           mask_id, gen)
            stats.edits += n_edits
            steps += 1
        stats.steps_per_block.append(steps)
        yield canvas
        done |= torch.isin(canvas, eos).any(1)
        if bool(done.all()):
            break
        pending = (canvas, response_layout(rows, session.start + b * B_sz, b, B_sz, B_sz, CLEAN))
    stats.decode_s += time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# Lossless speculative decoding: BARD drafts, the AR source verifies
# ---------------------------------------------------------------------------------------------------


def _ragged(rows: list[list[int]], kind: int, block: int, start: torch.Tensor, pad_id: int
            ) -> tuple[torch.Tensor, Layout]:
    """Rows of different lengths as one left-padded step: (B, T) tokens and their layout (PAD columns first;
    row r's tokens at sequence indices start[r], start[r] + 1, ...)."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    kinds = torch.full((len(rows), T), PAD, dtype=torch.long)
    index = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            tokens[i, T - len(r):] = torch.tensor(r)
            kinds[i, T - len(r):] = kind
            index[i, T - len(r):] = start[i] + torch.arange(len(r))
    return tokens, Layout(kinds, torch.full((len(rows), T), block, dtype=torch.long), index)


def draft_block(session: Session, unseen: list[list[int]], length: torch.Tensor, r: int, opts: DecodeOptions,
                mask_id: int) -> torch.Tensor:
    """Round r's draft (B, block) on the CPU: the BARD model denoises a block of MASKs that follows each row's
    unseen clean tokens (they end with the source's latest token, at sequence index `length`); the first step
    carries those tokens as one clean block and commits their K/V (PAD columns where a row has fewer)."""
    B_sz, rows = opts.block_size, len(unseen)
    clean_tokens, clean = _ragged(unseen, CLEAN, 2 * r, length - torch.tensor([len(u) - 1 for u in unseen]),
                                  mask_id)
    noisy = response_layout(rows, length + 1, 2 * r + 1, B_sz, B_sz, NOISY)        # the draft follows
    canvas = torch.full((rows, B_sz), mask_id, dtype=torch.long, device=session.device)
    edits_left = torch.full((rows,), opts.max_edits, dtype=torch.long, device=session.device)
    carried, steps = True, 0
    for step in range(opts.max_steps):
        masked = canvas == mask_id
        if not masked.any():
            break
        if carried:
            tokens, layout = torch.cat([clean_tokens.to(session.device), canvas], 1), Layout.cat([clean, noisy])
        else:
            tokens, layout = canvas, noisy
        logits = session.step(tokens, layout, keep=B_sz)
        if carried:
            session.commit(layout, clean_tokens.shape[1])
            carried = False
        canvas, _ = denoise_step(logits, canvas, masked, edits_left, step, opts, mask_id, None)
        steps += 1
    session.stats.steps_per_block.append(steps)
    return canvas.cpu()


def speculative_rounds(draft, verifier, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int],
                       stats: Stats) -> Iterator[list[list[int]]]:
    """Lossless speculative decoding, source-verified: yield each round's new tokens per row (1 to block + 1
    of them) until every row has emitted EOS or max_new_tokens.

    Both models hold the same committed sequence; the source's latest token p is in neither cache yet. A round:
      1. draft: the BARD model denoises a block of MASKs after [its uncached clean tokens | p] (the first step
         carries them, as clean tokens, and commits their K/V);
      2. verify: one causal forward of the source over [p | draft]: its greedy choice after each position;
      3. keep the longest draft prefix equal to those choices (k tokens) and the source's own next token;
         the source commits the K/V of [p | kept prefix] only, the rest of the draft never enters its cache
         (in a batch, a row that kept fewer than another gets PAD columns there: never visible).
    Every token out is the source's greedy choice after exactly the tokens before it: the output is the source's
    greedy decode (up to ties that the verify forward's arithmetic breaks otherwise than a one-token step)."""
    cfg: ModelConfig = draft.config
    opts = opts.resolved(cfg)
    verifier_opts = opts.resolved(verifier.config, ar=True)
    causal = verifier.config.bard is None or verifier.config.bard.dual_mode         # an AR or dual-mode model
    if cfg.bard is None or not causal:
        raise RuntimeInputError("speculative decoding drafts with a BARD checkpoint and verifies with its AR source "
                                "(or, dual-mode, with itself)", "speculative")
    B_sz, mask_id = opts.block_size, cfg.bard.mask_token_id
    rows, max_new = batch.input_ids.shape[0], opts.max_new_tokens
    P = batch.input_ids.shape[1]
    capacity = P + max_new + 2 * (B_sz + 1) if rows == 1 else P + (max_new + 2) * (B_sz + 1)
    prompt_block = B_sz if cfg.bard.prompt_attention == "block" else None
    d_stats, v_stats = Stats(), Stats()
    dsess = Session(draft, batch, max_new + B_sz + 1, cfg.bard.prompt_attention, prompt_block, d_stats,
                    greedy=opts.suppress_mask, capacity=capacity)
    vsess = Session(verifier, batch, max_new + B_sz + 1, "causal", None, v_stats, greedy=True, capacity=capacity)
    eos = set(eos_ids)
    length = batch.lengths.clone()                     # (B,) each row's committed length (prompt + kept tokens)
    first, _ = predict(vsess.last_logits, verifier_opts, None, None)
    pending = first.tolist()                           # the source's latest token per row: in neither cache
    unseen: list[list[int]] = [[t] for t in pending]   # the draft model's uncached clean tokens (p included)
    out: list[list[int]] = [[t] for t in pending]
    done = [t in eos for t in pending]
    yield [[t] for t in pending]
    t0 = time.perf_counter()
    r = 0
    while not all(d or len(o) >= max_new for d, o in zip(done, out, strict=True)):
        # 1. draft a block after the unseen clean tokens
        td = time.perf_counter()
        canvas = draft_block(dsess, unseen, length, r, opts, mask_id)
        stats.draft_s += time.perf_counter() - td
        # 2. verify [p | draft] in one causal forward
        tv = time.perf_counter()
        tokens = torch.cat([torch.tensor(pending)[:, None], canvas], 1)
        layout = Layout(torch.full(tokens.shape, PROMPT), torch.zeros_like(tokens),
                        length[:, None] + torch.arange(1 + B_sz))
        choice, _ = predict(vsess.step(tokens.to(vsess.device), layout), verifier_opts, None, None)
        choice = choice.cpu()                                            # (B, 1 + B_sz): after each position
        stats.verify_s += time.perf_counter() - tv
        # 3. keep the agreeing prefix + the source's next token; commit [p | prefix] to the source
        agree = (canvas == choice[:, :B_sz]).long().cumprod(1).sum(1)   # (B,) k per row
        new_rows, kept = [], []
        for i in range(rows):
            k = int(agree[i])
            if done[i] or len(out[i]) >= max_new:
                new_rows.append([])
                kept.append(-1)                      # a finished row commits nothing (all PAD)
                continue
            tokens_i = canvas[i, :k].tolist() + [int(choice[i, k])]
            cut = next((j for j, t in enumerate(tokens_i) if t in eos), None)
            tokens_i = tokens_i if cut is None else tokens_i[:cut + 1]
            tokens_i = tokens_i[:max_new - len(out[i])]
            new_rows.append(tokens_i)
            kept.append(len(tokens_i) - 1)          # draft tokens to commit behind p (fewer when cut at EOS / max)
            stats.accepted.append(min(k, len(tokens_i)))
        width = 1 + max(kept)
        keep_kind = torch.where(torch.arange(width)[None, :] <= torch.tensor(kept)[:, None], PROMPT, PAD)
        vsess.commit(Layout(keep_kind, layout.block[:, :width], layout.index[:, :width]), width)
        for i in range(rows):
            if new_rows[i]:
                out[i] += new_rows[i]
                done[i] = done[i] or any(t in eos for t in new_rows[i])
                unseen[i] = new_rows[i]                       # kept drafts + the source's token, not in the draft
                pending[i] = new_rows[i][-1]
            else:
                unseen[i] = []
        length = length + torch.tensor([1 + kept[i] if new_rows[i] else 0 for i in range(rows)])
        stats.nfe, stats.verify_nfe = d_stats.nfe + v_stats.nfe, v_stats.nfe
        yield new_rows
        r += 1
    stats.decode_s += time.perf_counter() - t0
    stats.nfe = d_stats.nfe + v_stats.nfe
    stats.verify_nfe = v_stats.nfe
    stats.prefill_s += d_stats.prefill_s + v_stats.prefill_s
    stats.vision_s += d_stats.vision_s + v_stats.vision_s
    stats.image_tokens += d_stats.image_tokens
    stats.step_s += d_stats.step_s + v_stats.step_s
    stats.backend_s += d_stats.backend_s + v_stats.backend_s
    stats.steps_per_block += d_stats.steps_per_block


# ---------------------------------------------------------------------------------------------------
# The AR baseline: the source model, one token per forward
# ---------------------------------------------------------------------------------------------------


def ar_tokens(backend, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int],
              stats: Stats) -> Iterator[torch.Tensor]:
    """Greedy (or sampled) next-token decoding through the same session, cache and statistics:
    yields each step's tokens (B, 1) until every row has emitted EOS or max_new_tokens."""
    opts = opts.resolved(backend.config, ar=True)
    session = Session(backend, batch, opts.max_new_tokens, "causal", None, stats, greedy=opts.temperature == 0)
    gen = _generator(opts, session.device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=session.device)
    rows = batch.input_ids.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=session.device)
    logits = session.last_logits                                              # (B, V): predicts token 0
    # every step's layout: kind PROMPT, block 0, the next index (made once; each step takes a column)
    kind, block = torch.full((rows, 1), PROMPT), torch.zeros(rows, 1, dtype=torch.long)
    index = session.start[:, None] + torch.arange(opts.max_new_tokens)
    t0 = time.perf_counter()
    for j in range(opts.max_new_tokens):
        token, _ = predict(logits, opts, None, gen)                           # (B,)
        yield token[:, None]
        done |= torch.isin(token, eos)
        if bool(done.all()) or j == opts.max_new_tokens - 1:
            break
        layout = Layout(kind, block, index[:, j:j + 1])
        logits = session.step(token[:, None], layout, keep=1)[:, -1]
        session.commit(layout, 1)
    stats.decode_s += time.perf_counter() - t0


def row_chunks(backend, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int], stats: Stats,
               ar: bool = False, verifier=None) -> Iterator[list[list[int]]]:
    """Every mode's decoded chunks as each row's new tokens: a block (BARD), a token (AR), or a verified round
    (speculative, 1 to block + 1 tokens per row; `verifier`: the AR source's backend)."""
    if opts.speculative == "self" and not ar:
        yield from speculative_rounds(backend, backend, batch, opts, eos_ids, stats)
        return
    if opts.speculative is not None and not ar:
        if verifier is None:
            raise RuntimeInputError("speculative='source' needs the AR source to verify with: Pipeline.load(..., "
                                    "verifier=DIR) (--verifier DIR; a checkpoint finds the source it records)",
                                    "verifier")
        yield from speculative_rounds(backend, verifier, batch, opts, eos_ids, stats)
        return
    for chunk in (ar_tokens if ar else bard_blocks)(backend, batch, opts, eos_ids, stats):
        yield chunk.tolist()


def generate(backend, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int], ar: bool = False,
             verifier=None) -> Generation:
    """Decode a prompt batch with BARD (default; speculative with `verifier` when opts ask) or the AR baseline;
    token ids per row and statistics."""
    stats = Stats()
    rows: list[list[int]] = [[] for _ in range(batch.input_ids.shape[0])]
    for chunk in row_chunks(backend, batch, opts, eos_ids, stats, ar, verifier):
        for r, part in zip(rows, chunk, strict=True):
            r += part
    out = truncate_at_eos(rows, set(eos_ids), opts.max_new_tokens)
    stats.tokens = [len(r) for r in out]
    stats.finish_reasons = [finish_reason(r, eos_ids) for r in out]
    if not ar and opts.speculative is None:
        mask_id = backend.config.bard.mask_token_id
        stats.reference_tokens = [sum(1 for t in r if t != mask_id) for r in rows]
    return Generation(out, stats)


def generate_bard(backend, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int]) -> Generation:
    """`generate` with block-parallel denoising."""
    return generate(backend, batch, opts, eos_ids, ar=False)


def generate_ar(backend, batch: PromptBatch, opts: DecodeOptions, eos_ids: Sequence[int]) -> Generation:
    """`generate` with the AR baseline's next-token rule."""
    return generate(backend, batch, opts, eos_ids, ar=True)

"""Decoder steps of real denoising trajectories, for the export's validation, the INT8 calibration and its gate,
in bounded memory at any model size.

Every step of a trajectory (the prefill of a real image prompt, then canvases at every denoising step, from
all-MASK to almost clean, with and without a finished block in front) carries the whole past K/V: at 2B that is
~70 MB a step, so trajectories are never kept step by step with their past:

- `compare_live` runs a graph beside the reference backend on each step's feeds as they happen and keeps only the
  comparison (max abs diff per output, argmax agreement where the decoder is read): validation and the gate.
- `record_trajectories` keeps each step's own inputs and its past length, and the past K/V once per prompt (the
  longest one: the KV buffer is append-only, so every step's past is a prefix of it); `Trajectories.feeds`
  rebuilds the full feeds one step at a time for the static quantizer. Saved as a versioned safetensors file.
  With `outputs=True` it also keeps what each step returned: the export's validation records the PyTorch
  reference this way, frees the PyTorch weights, and only then loads the ONNX graph to replay the steps
  (the two models are never in memory together: at 2B each is 8.5 GB in fp32).

Each decodes through a new Pipeline over a wrapping backend: the caller's Pipeline is never modified (it may be
shared between threads). `record_vision` records the vision tower's (small) inputs and outputs per image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bard_deploy import iospec
from bard_deploy.errors import ExportError
from bard_deploy.manifest import sha256
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.runtimes.ort_backend import run
from bard_deploy.vision import grid_inputs

FORMAT_VERSION = 2

Record = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]      # (feeds, outputs) of one graph run


def prompt_of(conversation: list[dict]) -> list[dict]:
    """The turns to decode: all but a final assistant answer."""
    return conversation[:-1] if conversation and conversation[-1]["role"] == "assistant" else conversation


class _Wrapping:
    """A backend that delegates embedding and vision to `inner` and watches its decoder steps."""

    def __init__(self, inner):
        self.inner = inner
        self.config, self.io, self.device = inner.config, inner.io, inner.device

    def embed(self, input_ids):
        """The inner backend's embedding lookup."""
        return self.inner.embed(input_ids)

    def encode_images(self, pixel_values, grid_thw):
        """The inner backend's vision tower."""
        return self.inner.encode_images(pixel_values, grid_thw)


def _decode(pipe: Pipeline, backend, conversations: list[list[dict]], ar: bool, between=None, **options) -> None:
    """Decode each conversation's prompt alone through `backend` (calling `between()` after each one)."""
    watched = pipe.with_backend(backend)
    for conv in conversations:
        watched.generate_batch([prompt_of(conv)], ar=ar, **options)
        if between is not None:
            between()


# ---- live comparison ------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """What `compare_live` kept: the steps compared, the worst abs diff per output, argmax agreement."""

    steps: int = 0
    worst: dict[str, float] = field(default_factory=dict)
    agree: int = 0
    total: int = 0

    @property
    def top1(self) -> float:
        """Fraction of decision positions whose argmax equals the reference's."""
        return self.agree / max(self.total, 1)


def track_worst(worst: dict[str, float], got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                relative: bool = False) -> None:
    """Fold one run's max abs difference per output (`got` against `expected`) into `worst`, in place.
    `relative`: divided by max(1, the expected output's largest magnitude) (fp16, whose rounding step grows with
    the value: 0.03 at a logit of 32)."""
    for name, g in got.items():
        if not g.numel():
            worst[name] = max(worst.get(name, 0.0), 0.0)
            continue
        e = expected[name].detach().cpu()
        if not e.is_floating_point():          # ids (the fused head's arg-max): the fraction that differ
            worst[name] = max(worst.get(name, 0.0), float((g != e).float().mean()))
            continue
        e = e.float()
        diff = float((g.float() - e).abs().max())
        if relative:
            diff /= max(1.0, float(e.abs().max()))
        worst[name] = max(worst.get(name, 0.0), diff)


class _Shadow(_Wrapping):
    """Runs `inner` (the reference) and the session `sess` on the same feeds; keeps only the comparison."""

    def __init__(self, inner, sess, decision: int, outputs: list[str]):
        super().__init__(inner)
        self.sess, self.decision, self.outputs = sess, decision, outputs
        self.result = Comparison()

    def step(self, feeds):
        """The reference step (what decoding continues from), compared with the session's."""
        ref = self.inner.step(feeds)
        got = run(self.sess, self.outputs, feeds)
        r = self.result
        r.steps += 1
        track_worst(r.worst, got, ref)
        # Decision positions are the ones the decoder reads: the last `decision` of each step (AR: 1, the next
        # token; BARD: the block's canvas). BARD never reads prefill logits, so prefills (empty past) are skipped:
        # prompt positions would only measure noise in predictions nobody uses.
        if iospec.LOGITS in got and not (self.decision > 1 and feeds[iospec.past_key(0)].shape[2] == 0):
            a = got[iospec.LOGITS][:, -self.decision:].argmax(-1)
            b = ref[iospec.LOGITS][:, -self.decision:].detach().cpu().argmax(-1)
            r.agree += int((a == b).sum())
            r.total += b.numel()
        return ref


def compare_live(pipe: Pipeline, sess, conversations: list[list[dict]], decision: int, ar: bool = False,
                 outputs: list[str] | None = None, **options) -> Comparison:
    """Decode `conversations` through `pipe`'s backend and compare the onnxruntime session `sess` of the same step
    graph with it on every step (`outputs`: which outputs; default all); nothing is stored per step."""
    shadow = _Shadow(pipe.backend, sess, decision, outputs or [o.name for o in sess.get_outputs()])
    _decode(pipe, shadow, conversations, ar, **options)
    return shadow.result


# ---- lean trajectories ----------------------------------------------------------------------------------

@dataclass
class Trajectories:
    """Steps of several prompts: per step (prompt, past length, its feeds without the past); per prompt the
    longest past K/V (per layer K, V; every step's past is a prefix of it)."""

    steps: list[tuple[int, int, dict[str, torch.Tensor]]] = field(default_factory=list)
    pasts: list[list[torch.Tensor]] = field(default_factory=list)
    outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)    # per step, when recorded

    def __len__(self) -> int:
        return len(self.steps)

    def feeds(self) -> Iterator[dict[str, torch.Tensor]]:
        """The full feeds of every step, rebuilt one at a time (the past sliced out of its prompt's)."""
        for prompt, length, own in self.steps:
            past = self.pasts[prompt]
            full = dict(own)
            for i in range(len(past) // 2):
                full[iospec.past_key(i)] = past[2 * i][:, :, :length]
                full[iospec.past_value(i)] = past[2 * i + 1][:, :, :length]
            yield full

    def records(self) -> Iterator[Record]:
        """(full feeds, recorded outputs) of every step, one at a time (recorded with `outputs=True`)."""
        assert len(self.outputs) == len(self.steps), "these trajectories were recorded without their outputs"
        yield from zip(self.feeds(), self.outputs, strict=True)

    def save(self, path: str | Path, meta: dict) -> str:
        """Write a safetensors file (`step/<n>/<io name>`, `past/<prompt>/<layer tensor>`, the step table in the
        metadata); returns its sha256."""
        tensors = {f"step/{n:05d}/{name}": t.contiguous() for n, (_, _, own) in enumerate(self.steps)
                   for name, t in own.items()}
        tensors |= {f"past/{j:04d}/{i:03d}": t.contiguous() for j, past in enumerate(self.pasts)
                    for i, t in enumerate(past)}
        table = [[prompt, length] for prompt, length, _ in self.steps]
        save_file(tensors, str(path), metadata={"format_version": str(FORMAT_VERSION), "meta": json.dumps(meta),
                                                "steps": json.dumps(table)})
        return sha256(Path(path))

    @classmethod
    def load(cls, path: str | Path) -> Trajectories:
        """Read a file written by `save` (the inputs only: outputs are never saved)."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise ExportError(f"{path}: calibration format {meta.get('format_version')!r}, this version reads "
                                  f"{FORMAT_VERSION}", str(path))
            table = json.loads(meta["steps"])
            steps = [(prompt, length, {}) for prompt, length in table]
            pasts: dict[int, dict[int, torch.Tensor]] = {}
            for key in f.keys():
                kind, n, name = key.split("/", 2)
                if kind == "step":
                    steps[int(n)][2][name] = f.get_tensor(key)
                else:
                    pasts.setdefault(int(n), {})[int(name)] = f.get_tensor(key)
        return cls(steps, [[p[i] for i in sorted(p)] for _, p in sorted(pasts.items())])


class _Recorder(_Wrapping):
    """Keeps each step's own inputs and past length; the past itself only as views into the request's KV buffer,
    copied once when the prompt is done."""

    def __init__(self, inner, outputs: bool = False):
        super().__init__(inner)
        self.data = Trajectories()
        self.keep_outputs = outputs
        self._views: list[torch.Tensor] = []

    def step(self, feeds):
        """The inner step, recorded without its past."""
        past = self.io.past_names
        self.data.steps.append((len(self.data.pasts), feeds[past[0]].shape[2],
                                {k: v.cpu().clone() for k, v in feeds.items() if k not in past}))
        self._views = [feeds[name] for name in past]
        out = self.inner.step(feeds)
        if self.keep_outputs:
            self.data.outputs.append({k: v.detach().cpu().clone() for k, v in out.items()})
        return out

    def prompt_done(self) -> None:
        """Copy the prompt's longest past (the last step's) out of its KV buffer."""
        self.data.pasts.append([v.cpu().clone() for v in self._views])
        self._views = []


def record_trajectories(pipe: Pipeline, conversations: list[list[dict]], ar: bool = False, outputs: bool = False,
                        **options) -> Trajectories:
    """Decode the prompts of `conversations` one at a time through `pipe`'s backend, recording every step lean
    (`outputs`: with what each step returned, the reference a graph is validated against)."""
    rec = _Recorder(pipe.backend, outputs)
    _decode(pipe, rec, conversations, ar, between=rec.prompt_done, **options)
    return rec.data


def record_vision(pipe: Pipeline, conversations: list[list[dict]]) -> list[Record]:
    """(feeds, outputs) of the vision tower for every image of the prompts, one image per record."""
    records = []
    for conv in conversations:
        enc = pipe.encoder.encode(prompt_of(conv))
        if enc.pixel_values is None:
            continue
        records += vision_records(pipe, enc.pixel_values, enc.image_grid_thw)
    return records


def vision_records(pipe: Pipeline, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[Record]:
    """(feeds, outputs) of the vision tower (the pipeline's backend: transformers' forward on torch) for each
    image of one encoded prompt; the feeds as the vision graph takes them (`vision.grid_inputs`)."""
    vio = iospec.VisionIO.for_config(pipe.config)
    records, start = [], 0
    for grid in grid_thw:
        n = int(grid.prod())
        pixels = pixel_values[start:start + n]
        start += n
        embeds, deepstack = pipe.backend.encode_images(pixels, grid[None])
        records.append((vio.feeds(pixels, grid_inputs(pipe.config.vision, grid.tolist())),
                        {k: v.cpu() for k, v in vio.outputs_of(embeds, deepstack).items()}))
    return records

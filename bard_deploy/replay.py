"""Replaying decodes at a real shape: the decode loop's own step and commit, driven by a recorded commit trace.

A trained checkpoint of the real size is what we cannot make here, but its step costs depend only on the shape
(weights, T tokens, past length), and its speed-up over AR on how many forwards it needs. `bard-deploy bench`
records, per configuration and request, the tokens emitted and the steps each block took (`trace.json`);
`bard-deploy bench-step --replay` then runs the same sequence of steps through the loop (`Session.step` and
`commit` over the IO-bound KV buffer, the real attention bias) on a real-shape graph with random weights, after a
realistic prompt (a 640x480 photo and a question: 330 tokens by default), and times AR against BARD on the same
graph. It is a replay: the tokens are not decoded (their values do not change a step's cost), and the per-step
commit rule (`denoise_step`, well under a millisecond) is not run.

The step structure mirrors `decode.bard_blocks` / `decode.ar_tokens` / `decode.speculative_rounds`: BARD's first
step of every block after the first also carries the previous block as clean tokens (T = 2 x block, committing the
previous block), its other steps the canvas alone (T = block); AR steps one token and commits it; a speculative
round drafts the same way after the last round's kept tokens and verifies [token | draft] (T = block + 1).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from bard_deploy.diffusion.mask import CLEAN, NOISY, PROMPT, Layout, response_layout
from bard_deploy.errors import ConfigError
from bard_deploy.runtimes.decode import Session, Stats

# a 640x480 photo at Qwen3-VL's rule (sides to multiples of 32 = patch 16 x merge 2): 20 x 15 = 300 image
# tokens, + vision start / end, the chat template and a question of a dozen words
PHOTO_PROMPT_TOKENS = 330
AR = "AR baseline"


def trace_rows(summaries) -> list[dict]:
    """The commit trace of bench configurations (`bench.Summary` objects): per configuration its name, block
    size, threshold and per request the tokens emitted and the steps of every block."""
    return [{"name": s.name, "block_size": s.block_size, "threshold": s.threshold,
             "requests": [{"tokens": r.tokens, "steps_per_block": r.steps_per_block,
                           **({"accepted": r.accepted} if r.accepted else {})} for r in s.requests]}
            for s in summaries]


SPEC_PREFIX = "SPEC "
CAUSAL_PREFIX = "CAUSAL "      # bench --speculative self: a dual-mode checkpoint's own causal decode


def read_trace(path: Path, threshold: float | None) -> tuple[dict, dict, dict | None]:
    """(AR configuration, BARD configuration at `threshold` (None: the only BARD one), its speculative twin or
    None) of a trace.json; a ConfigError naming what is there otherwise. A trace of `bench --speculative self`
    gives the checkpoint's own causal decode (its CAUSAL configuration) as the AR side: what self mode must
    equal and beat (at a real shape its step costs what the source's AR step costs)."""
    try:
        configs = json.loads(Path(path).read_text())["configs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a bench trace ({type(e).__name__}: {e}); bard-deploy bench writes one "
                          "(trace.json beside bench.json)", str(path)) from e
    causal = [c for c in configs if c["name"].startswith(CAUSAL_PREFIX)]
    ar = causal if len(causal) == 1 else [c for c in configs if c["name"] == AR]
    at = [c for c in configs if c["name"] != AR and not c["name"].startswith(CAUSAL_PREFIX)
          and (threshold is None or c["threshold"] == threshold)]
    bard = [c for c in at if not c["name"].startswith(SPEC_PREFIX)]
    spec = [c for c in at if c["name"].startswith(SPEC_PREFIX)]
    have = ", ".join(f"{c['name']} block {c['block_size']} threshold {c['threshold']}" for c in configs
                     if c["name"] != AR and not c["name"].startswith(CAUSAL_PREFIX))
    if len(ar) != 1 or len(bard) != 1 or len(spec) > 1:
        raise ConfigError(f"{path}: need the AR baseline and exactly one BARD configuration at threshold "
                          f"{threshold}; it has: {have}", threshold)
    return ar[0], bard[0], spec[0] if spec else None


def _timed(session: Session, tokens: torch.Tensor, layout: Layout, keep: int, times: list[float]) -> None:
    t0 = time.perf_counter()
    session.step(tokens, layout, keep=keep)
    times.append(time.perf_counter() - t0)


def replay_ar(backend, prompt: int, tokens: int) -> list[float]:
    """Step times of one AR request emitting `tokens` tokens after a `prompt`-token past (its first token comes
    from the prefill, not replayed)."""
    session = Session.with_past(backend, prompt, max(tokens, 1), Stats())
    times: list[float] = []
    for j in range(tokens - 1):
        layout = Layout(torch.full((1, 1), PROMPT), torch.zeros(1, 1, dtype=torch.long), (session.start + j)[:, None])
        _timed(session, torch.zeros(1, 1, dtype=torch.long), layout, 1, times)
        session.commit(layout, 1)
    return times


def replay_bard(backend, prompt: int, block: int, steps_per_block: list[int]) -> list[float]:
    """Step times of one BARD request whose blocks took `steps_per_block` steps, after a `prompt`-token past."""
    session = Session.with_past(backend, prompt, block * len(steps_per_block), Stats())
    canvas = torch.zeros(1, block, dtype=torch.long)
    times: list[float] = []
    for b, steps in enumerate(steps_per_block):
        noisy = response_layout(1, session.start + b * block, b, block, block, NOISY)
        for s in range(steps):
            if s == 0 and b > 0:               # the previous block rides along as clean tokens and is committed
                clean = response_layout(1, session.start + (b - 1) * block, b - 1, block, block, CLEAN)
                layout = Layout.cat([clean, noisy])
                _timed(session, torch.cat([canvas, canvas], 1), layout, block, times)
                session.commit(layout, block)
            else:
                _timed(session, canvas, noisy, block, times)
    return times


def replay_speculative(backend, prompt: int, block: int, steps_per_round: list[int], accepted: list[int]
                       ) -> list[float]:
    """Step times of one speculative request (`decode.speculative_rounds`): two sessions over the same graph (the
    draft model and the source have one architecture), per round the draft's steps (the first carrying the last
    round's kept tokens and the source's token as clean tokens, then the canvas alone) and one verify step over
    [token | draft] committing [token | kept prefix]."""
    n = block * len(steps_per_round) + 2 * (block + 1)
    draft, verify = Session.with_past(backend, prompt, n, Stats()), Session.with_past(backend, prompt, n, Stats())
    canvas = torch.zeros(1, block, dtype=torch.long)
    times: list[float] = []
    length, unseen = int(draft.start[0]), 1                    # the source's token sits at `length`
    for r, (steps, kept) in enumerate(zip(steps_per_round, accepted, strict=True)):
        start = torch.tensor([length - unseen + 1])
        clean = response_layout(1, start, 2 * r, unseen, unseen, CLEAN)
        noisy = response_layout(1, torch.tensor([length + 1]), 2 * r + 1, block, block, NOISY)
        for s in range(steps):
            if s == 0:
                layout = Layout.cat([clean, noisy])
                _timed(draft, torch.zeros(1, unseen + block, dtype=torch.long), layout, block, times)
                draft.commit(layout, unseen)
            else:
                _timed(draft, canvas, noisy, block, times)
        layout = Layout(torch.full((1, 1 + block), PROMPT), torch.zeros(1, 1 + block, dtype=torch.long),
                        length + torch.arange(1 + block)[None])
        _timed(verify, torch.zeros(1, 1 + block, dtype=torch.long), layout, 1 + block, times)
        verify.commit(layout, 1 + kept)
        length, unseen = length + 1 + kept, 1 + kept
    return times


def replay(backend, ar: dict, bard: dict, prompt: int = PHOTO_PROMPT_TOKENS, requests: int | None = None,
           weight_bytes: float | None = None, spec: dict | None = None) -> dict:
    """AR against BARD on one backend: every traced request replayed (or the first `requests`), decode tokens/s
    of each side (tokens over the summed step times, as `bench` counts them), the speed-up, AR's achieved
    weight bandwidth (when `weight_bytes` per step is given)."""
    n = requests or len(bard["requests"])
    sides = {}
    for name, conf in (("ar", ar), ("bard", bard)) + ((("spec", spec),) if spec is not None else ()):
        reqs = conf["requests"][:n]
        times, tokens = [], 0
        for r in reqs:
            times += (replay_ar(backend, prompt, r["tokens"]) if name == "ar" else
                      replay_bard(backend, prompt, conf["block_size"], r["steps_per_block"]) if name == "bard" else
                      replay_speculative(backend, prompt, conf["block_size"], r["steps_per_block"],
                                         r.get("accepted", [])))
            tokens += r["tokens"]
        total = sum(times)
        sides[name] = {"requests": len(reqs), "tokens": tokens, "steps": len(times),
                       "tokens_per_step": round(tokens / max(len(times), 1), 3),
                       "step_ms_p50": round(1e3 * statistics.median(times), 2) if times else None,
                       "decode_tokens_per_s": round(tokens / total, 3) if total else 0.0}
    res = {"replay": True, "prompt_tokens": prompt, "block_size": bard["block_size"], "threshold": bard["threshold"],
           **sides,
           "speedup_decode_vs_ar": round(sides["bard"]["decode_tokens_per_s"] /
                                         max(sides["ar"]["decode_tokens_per_s"], 1e-12), 3)}
    if spec is not None:
        res["spec_speedup_decode_vs_ar"] = round(sides["spec"]["decode_tokens_per_s"] /
                                                 max(sides["ar"]["decode_tokens_per_s"], 1e-12), 3)
    if weight_bytes and sides["ar"]["step_ms_p50"]:
        res["ar_weight_GBps"] = round(weight_bytes / (sides["ar"]["step_ms_p50"] / 1e3) / 1e9, 1)
    return res

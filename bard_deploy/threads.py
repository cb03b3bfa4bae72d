"""One thread policy for decoding on a CPU: the backend gets the cores, the loop's host work gets one thread.

A decode step alternates between the backend (onnxruntime, TensorRT or torch running the graph) and the loop's
host work (embedding lookup, attention bias, softmax / arg-max over the logits, cache commits: small torch ops).
With onnxruntime, torch's and onnxruntime's pools each defaulted to every core, and on a 2-core machine they
competed: measured on the embedded default, B16 over AR went from 5x to 0.5x between runs at the defaults, and
4,224 against 150 tokens/s with each library on one thread. So:

- onnxruntime / TensorRT backends: the session gets `threads` intra-op threads (default: the cores this process
  may run on), torch gets 1 for the host work;
- torch backend: the backend *is* torch, so torch gets `threads` for both (they never run at the same time).

The default count follows the model's size: a step of a small model is made of ops too small to split, and a
second intra-op thread only adds its hand-offs (the embedded default, 5 MB of weights, on a 2-core EPYC:
onnxruntime on 1 thread decoded B16 1.3-2.0x and AR 0.85-1.8x faster than on 2, in 4 alternating runs), while a
2B step (GBs of weights per step) wants every core. So a backend gets one thread per WEIGHT_BYTES_PER_THREAD of
the weights a step reads, at least 1 and at most the available cores (measured at the two ends only; the
threshold between is a round guess). An explicit `threads` is used as given.

torch's thread count is process-wide: a Pipeline sets it when it starts decoding (`apply_host_threads`), so
pipelines of different policies in one process each decode with their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from bard_deploy.errors import RuntimeInputError


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


WEIGHT_BYTES_PER_THREAD = 64 * 2**20


@dataclass(frozen=True)
class Threads:
    """How many threads each side of a decode step uses."""

    backend: int     # onnxruntime intra-op threads, or torch's for the torch backend
    host: int        # torch's threads for the loop's host work

    @classmethod
    def policy(cls, backend: str, threads: int | None = None, weight_bytes: int | None = None) -> Threads:
        """The policy for a backend kind ("torch", "onnxruntime", "tensorrt") and a thread budget (None: one
        thread per WEIGHT_BYTES_PER_THREAD of `weight_bytes`, within 1 .. the available cores; no size given: the
        available cores)."""
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}", threads)
        cores = available_cores()
        by_size = cores if weight_bytes is None else max(1, min(cores, weight_bytes // WEIGHT_BYTES_PER_THREAD))
        n = threads or by_size
        return cls(n, n) if backend == "torch" else cls(n, 1)

    def as_dict(self) -> dict:
        """For bench headers: {"backend": n, "host": m}."""
        return {"backend": self.backend, "host": self.host}


def apply_host_threads(threads: Threads) -> None:
    """Give torch the policy's host threads (only when it has another count: changing it costs a pool rebuild)."""
    if torch.get_num_threads() != threads.host:
        torch.set_num_threads(threads.host)

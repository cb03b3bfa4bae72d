"""One thread policy for decoding on a CPU: the backend gets the cores, the loop's host work gets one thread.

A decode step alternates between the backend (onnxruntime, TensorRT or torch running the graph) and the loop's
host work (embedding lookup, attention bias, softmax / arg-max over the logits, cache commits: small torch ops).
With onnxruntime, torch's and onnxruntime's pools each defaulted to every core, and on a 2-core machine they
competed: measured on the embedded default, B16 over AR went from 5x to 0.5x between runs at the defaults, and
4,224 against 150 tokens/s with each library on one thread. So:

- onnxruntime / TensorRT backends: the session gets `threads` intra-op threads (default: the cores this process
  may run on), torch gets 1 for the host work;
- torch backend: the backend *is* torch, so torch gets `threads` for both (they never run at the same time).

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


@dataclass(frozen=True)
class Threads:
    """How many threads each side of a decode step uses."""

    backend: int     # onnxruntime intra-op threads, or torch's for the torch backend
    host: int        # torch's threads for the loop's host work

    @classmethod
    def policy(cls, backend: str, threads: int | None = None) -> Threads:
        """The policy for a backend kind ("torch", "onnxruntime", "tensorrt") and a thread budget (None: the
        available cores)."""
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise RuntimeInputError(f"threads must be a positive integer, got {threads!r}", threads)
        n = threads or available_cores()
        return cls(n, n) if backend == "torch" else cls(n, 1)

    def as_dict(self) -> dict:
        """For bench headers: {"backend": n, "host": m}."""
        return {"backend": self.backend, "host": self.host}


def apply_host_threads(threads: Threads) -> None:
    """Give torch the policy's host threads (only when it has another count: changing it costs a pool rebuild)."""
    if torch.get_num_threads() != threads.host:
        torch.set_num_threads(threads.host)

"""Where torch code runs and in which dtype: one rule for training, loading and the torch runtime backend."""

from __future__ import annotations

import os
import platform

import torch

from bard_deploy.errors import ConfigError


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows: results record the machine they came from,
    since another CPU rounds differently."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" = this process's CUDA device when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)", name) from e
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported", name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available on this machine", name)
    if device.type == "cuda" and device.index is None:             # plain "cuda": this process's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype name (fp32, bf16, fp16)."""
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}", name)
    return DTYPES[name]

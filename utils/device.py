"""Device, precision and seeds: parameters of every run, never literals in the code."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from utils.errors import UsageError

__all__ = ["PRECISIONS", "select_device", "autocast", "seed_everything"]

PRECISIONS = ("fp32", "fp16", "bf16")


def select_device(device: str | None = None, device_id: int = 0) -> torch.device:
    """``device`` as named (``cpu``, ``cuda:1``, ...), checked to exist; None: the accelerator
    (index ``device_id``) where there is one, else the CPU."""
    if device:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise UsageError(f"{device!r} is not a device (cpu, cuda, cuda:1, ...)",
                             option="device") from None
        backend = getattr(torch, parsed.type, None)
        if parsed.type != "cpu" and not (
                backend is not None and backend.is_available()
                and (parsed.index or 0) < getattr(backend, "device_count", lambda: 1)()):
            raise UsageError(f"{device}: this machine has no such device", option="device")
        return parsed
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator().type, device_id)
    if torch.cuda.is_available():
        return torch.device(device_id)  # an index alone names a CUDA device
    return torch.device("cpu")


def autocast(device: torch.device, precision: str | None):
    """fp16 autocast on an accelerator by default (as the paper), fp32 on the CPU."""
    precision = precision or ("fp32" if device.type == "cpu" else "fp16")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

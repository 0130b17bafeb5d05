"""Where and in what precision a worker computes: `training.device` and `training.autocast`.

The parameter server only ever sees float32 numpy vectors (`training.flat` copies them to the host),
so devices and precisions mix freely within one job: `device: auto` trains on CUDA on the workers
where torch sees a GPU and on the CPU elsewhere.

Autocast (`torch.autocast`) runs the forward pass, and so the activations the backward pass works
on, in bf16 or fp16; parameters, their gradients and optimizer state stay float32. bf16 has
float32's exponent range and needs nothing else. fp16's range is narrow, so small gradients would
underflow to zero: fp16 runs with dynamic loss scaling (`torch.amp.GradScaler`): the loss is
multiplied by S before the backward pass and the gradients divided by S after it; when a gradient
overflows, S halves and the step is redone (a pushed gradient) or skipped (a local optimizer step),
and S doubles again after 2000 clean steps. Everything here is checked when a trainer is built, so
a worker on the wrong machine fails at start with the reason, not mid-run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

Device = Literal["auto", "cpu", "cuda"]
Autocast = Literal["none", "bf16", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: Device) -> torch.device:
    """The torch device `training.device` names: `auto` is CUDA when torch sees a GPU, else the CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"training.device: cuda, but torch {torch.__version__} ({build}) sees no CUDA device here: "
                "install a CUDA build of torch on a machine with a GPU and its driver, or use device: auto"
            )
        return torch.device("cuda")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(f"training.device must be auto, cpu or cuda, got {requested!r}")


class Precision:
    """The autocast context of one trainer, and the fp16 loss scaler (None for none and bf16)."""

    def __init__(self, autocast: Autocast, device: torch.device, init_scale: float = 2.0**16) -> None:
        if autocast not in ("none", *_DTYPES):
            raise ValueError(f"training.autocast must be none, bf16 or fp16, got {autocast!r}")
        if autocast == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"training.autocast: bf16, but {torch.cuda.get_device_name(device)} has no bf16 support: "
                "use fp16 (it runs with loss scaling) or none"
            )
        self.name = autocast
        self.device = device
        self.dtype = _DTYPES.get(autocast)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale) if autocast == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the enclosed forward pass in the configured precision (a no-op for none)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

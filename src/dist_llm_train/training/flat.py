"""A model's parameters as one flat float32 vector plus a layout (name, shape, offset).

This is the contract between torch (workers) and numpy (parameter server): the PS never
sees a module, only the vector and the layout, and codecs and aggregation rules are plain
functions on 1-D arrays. Order is `model.named_parameters()` order (tied weights once),
offsets count elements, not bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from dist_llm_train.core.types import TensorSpec


def layout_of(model: nn.Module) -> list[TensorSpec]:
    layout, offset = [], 0
    for name, p in model.named_parameters():
        layout.append(TensorSpec(name=name, shape=tuple(p.shape), offset=offset))
        offset += p.numel()
    return layout


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _host_float32(vec: torch.Tensor) -> np.ndarray:
    """A fresh float32 numpy copy of `vec`, wherever it lives (the wire is float32 whatever the device)."""
    return vec.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def flatten_params(model: nn.Module) -> np.ndarray:
    """A fresh float32 copy of every parameter, concatenated in layout order."""
    with torch.no_grad():
        vec = parameters_to_vector(model.parameters())
    return _host_float32(vec)


def flatten_grads(model: nn.Module) -> np.ndarray:
    """Gradients in layout order as float32; a parameter without a gradient contributes zeros."""
    parts = [
        (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
        for p in model.parameters()
    ]
    return _host_float32(torch.cat(parts)) if parts else np.zeros(0, dtype=np.float32)


def load_flat_params(model: nn.Module, vec: np.ndarray) -> None:
    """Copy `vec` into the model's parameters. Checks everything first: on error nothing changes.

    Values are copied, never aliased, so the caller may reuse or mutate `vec` afterwards.
    """
    arr = np.asarray(vec)
    expected = num_params(model)
    if arr.ndim != 1 or arr.size != expected:
        raise ValueError(f"parameter vector has shape {arr.shape}; the model needs ({expected},)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"parameter vector must be floating point, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError("parameter vector contains NaN or Inf")
    src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    first = next(model.parameters(), None)
    if first is not None:
        src = src.to(first.device)  # one host-to-device copy, not one per tensor
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(src[offset : offset + n].view_as(p))
            offset += n

"""Server-side optimizers on flat float32 vectors.

Workers push gradients (or DiLoCo pseudo-gradients); the PS owns the optimizer so every
worker sees the same trajectory no matter who pushed. The formulas follow PyTorch's
`torch.optim.SGD` (dampening 0) and `torch.optim.Adam` (bias-corrected, no weight decay)
so results can be checked against them.

Arrays are never written in place: each `step` returns fresh arrays and replaces its state
arrays. That makes a parameter/optimizer snapshot a set of references that stay valid while
training continues, which is what pulls and checkpoints rely on.

Steps run block by block (`BLOCK` elements): every operation of the update is applied to one
block before moving on, so the intermediate results are still in the CPU cache when the next
operation reads them. For a 4 MB vector that takes an SGD step from ~0.58 to ~0.44 ms of CPU
(benchmarks/ps_throughput.py); each array is still read and written exactly once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np

from dist_llm_train.core.strategies.base import OptimizerSpec
from dist_llm_train.core.types import ErrorCode, PSError

Scalars = dict[str, float | int]
BLOCK = 1 << 16  # float32 elements (256 KiB): a block of each operand fits the 2 MiB L2 together


class ServerOptimizer(ABC):
    name: str

    @abstractmethod
    def step(self, params: np.ndarray, update: np.ndarray, lr_scale: float = 1.0) -> np.ndarray:
        """Return new parameters after one step on `update`; `lr_scale` scales the learning rate."""

    def step_region(self, params: np.ndarray, update: np.ndarray, region: slice, lr_scale: float = 1.0) -> np.ndarray:
        """New parameters after a step on `update`, which covers only `params[region]` (Streaming DiLoCo's
        fragments); the rest of the parameters and of the optimizer state stay as they are."""
        raise ValueError(f"the {self.name} optimizer cannot step one region of the parameters (use sgd)")

    @abstractmethod
    def state_dict(self) -> tuple[dict[str, np.ndarray], Scalars]:
        """Arrays and scalars that fully determine the next step (for checkpoints)."""

    @abstractmethod
    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: Scalars) -> None: ...


class SGD(ServerOptimizer):
    """buf = momentum * buf + g;  p -= lr * (g + momentum * buf if nesterov else buf)."""

    name = "sgd"

    def __init__(self, size: int, lr: float, momentum: float = 0.0, nesterov: bool = False) -> None:
        self.size, self.lr, self.momentum, self.nesterov = size, lr, momentum, nesterov
        self.buf: np.ndarray | None = None

    def step(self, params: np.ndarray, update: np.ndarray, lr_scale: float = 1.0) -> np.ndarray:
        lr = np.float32(self.lr * lr_scale)
        out = np.empty(params.shape[0], np.float32)
        if self.momentum == 0.0:
            for b in _blocks(out.shape[0]):
                _descend_into(out[b], params[b], lr, update[b])
            return out
        mom = np.float32(self.momentum)
        old, buf = self.buf, np.empty_like(out)
        look = np.empty(min(BLOCK, out.shape[0]), np.float32) if self.nesterov else None
        for b in _blocks(out.shape[0]):
            nb = buf[b]
            if old is None:
                nb[...] = update[b]
            else:
                np.multiply(old[b], mom, out=nb)
                nb += update[b]
            direction = nb
            if look is not None:  # g + mom * buf
                direction = np.multiply(nb, mom, out=look[: nb.shape[0]])
                direction += update[b]
            _descend_into(out[b], params[b], lr, direction)
        self.buf = buf
        return out

    def step_region(self, params: np.ndarray, update: np.ndarray, region: slice, lr_scale: float = 1.0) -> np.ndarray:
        # The region's own SGD on views of this one's state: the same arithmetic as `step`, so stepping
        # every region in turn equals one step on the whole vector (tested). Copies, never writes in place:
        # checkpoints hold references to the current arrays.
        n = region.stop - region.start
        if update.shape != (n,):
            raise ValueError(f"update has shape {update.shape}; region {region.start}:{region.stop} has {n} values")
        part = SGD(n, self.lr, self.momentum, self.nesterov)
        part.buf = None if self.buf is None else self.buf[region]
        stepped = part.step(params[region], update, lr_scale)
        if part.buf is not None:
            buf = np.zeros(self.size, np.float32) if self.buf is None else self.buf.copy()
            buf[region] = part.buf
            self.buf = buf
        out = np.array(params, dtype=np.float32, copy=True)
        out[region] = stepped
        return out

    def state_dict(self) -> tuple[dict[str, np.ndarray], Scalars]:
        return ({} if self.buf is None else {"momentum_buffer": self.buf}), {}

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: Scalars) -> None:
        buf = arrays.get("momentum_buffer")
        self.buf = None if buf is None else _checked(buf, self.size, "momentum_buffer")


class Adam(ServerOptimizer):
    """m, v moving averages of g and g^2; p -= lr * m_hat / (sqrt(v_hat) + eps)."""

    name = "adam"

    def __init__(
        self, size: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8
    ) -> None:
        self.size, self.lr, self.beta1, self.beta2, self.eps = size, lr, beta1, beta2, eps
        self.t = 0
        self.m: np.ndarray = np.zeros(size, np.float32)
        self.v: np.ndarray = np.zeros(size, np.float32)

    def step(self, params: np.ndarray, update: np.ndarray, lr_scale: float = 1.0) -> np.ndarray:
        self.t += 1
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        c1, c2 = np.float32(1) - b1, np.float32(1) - b2
        bc1 = 1.0 - self.beta1**self.t
        bc2 = np.float32(math.sqrt(1.0 - self.beta2**self.t))
        eps = np.float32(self.eps)
        step_size = np.float32(self.lr * lr_scale / bc1)
        out = np.empty(params.shape[0], np.float32)
        m, v = np.empty_like(out), np.empty_like(out)
        scratch = np.empty(min(BLOCK, out.shape[0]), np.float32)
        for b in _blocks(out.shape[0]):
            g, mb, vb = update[b], m[b], v[b]
            tmp = scratch[: g.shape[0]]
            np.multiply(self.m[b], b1, out=mb)  # m = b1 * m + (1 - b1) * g
            mb += np.multiply(g, c1, out=tmp)
            np.multiply(g, g, out=tmp)  # v = b2 * v + (1 - b2) * g * g
            tmp *= c2
            np.multiply(self.v[b], b2, out=vb)
            vb += tmp
            np.sqrt(vb, out=tmp)  # ratio = m / (sqrt(v) / sqrt(bc2) + eps)
            tmp /= bc2
            tmp += eps
            np.divide(mb, tmp, out=tmp)
            _descend_into(out[b], params[b], step_size, tmp)
        self.m, self.v = m, v
        return out

    def state_dict(self) -> tuple[dict[str, np.ndarray], Scalars]:
        return {"exp_avg": self.m, "exp_avg_sq": self.v}, {"step": self.t}

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: Scalars) -> None:
        self.m = _checked(arrays["exp_avg"], self.size, "exp_avg")
        self.v = _checked(arrays["exp_avg_sq"], self.size, "exp_avg_sq")
        self.t = int(scalars["step"])


def _blocks(n: int) -> Iterator[slice]:
    return (slice(start, start + BLOCK) for start in range(0, n, BLOCK))


def _descend_into(out: np.ndarray, params: np.ndarray, lr: np.float32, direction: np.ndarray) -> None:
    """out = params - lr * direction, with no temporary."""
    np.multiply(direction, -lr, out=out)
    out += params


def _checked(arr: np.ndarray, size: int, name: str) -> np.ndarray:
    if arr.shape != (size,):
        raise ValueError(f"optimizer state {name} has shape {arr.shape}, expected ({size},)")
    return np.asarray(arr, dtype=np.float32)


def make_optimizer(spec: OptimizerSpec, size: int) -> ServerOptimizer:
    """Build the job's optimizer. For Adam, `spec.momentum` is beta1."""
    if spec.name == "sgd":
        return SGD(size, spec.learning_rate, spec.momentum, spec.nesterov)
    if spec.name == "adam":
        return Adam(size, spec.learning_rate, spec.momentum, spec.adam_beta2, spec.adam_eps)
    raise PSError(ErrorCode.INVALID_ARGUMENT, f"unknown optimizer {spec.name!r} (sgd, adam)")

"""Random numbers keyed by what they are for, not by when they are drawn.

Every (parameter version, worker slot) pair gets its own fixed set of standard variates: one for the step's
compute time and, for each of the four messages of a training step, a jitter and a loss variate. A worker that
pulls version v always uses row `slot` of version v's table, whichever engine runs it and in whatever order
events happen; the control plane draws from streams keyed by (purpose, slot, incarnation). So a run is a pure
function of its seed, and the vectorised and per-event engines see the very same numbers.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from dist_llm_train.sim.config import ComputeModel

LEG_REQUEST, LEG_PULL, LEG_PUSH, LEG_REPLY = 0, 1, 2, 3
N_LEGS = 4
N_COLS = 1 + 2 * N_LEGS  # compute, jitter per leg, loss per leg
COL_COMPUTE = 0


def jitter_col(leg: int) -> int:
    return 1 + leg


def loss_col(leg: int) -> int:
    return 1 + N_LEGS + leg


_STREAM_ROUNDS = 1
_STREAM_CONTROL = 2


def generator(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=seed, spawn_key=key)))


def control_rng(seed: int, purpose: int, *key: int) -> np.random.Generator:
    return generator(seed, _STREAM_CONTROL, purpose, *key)


class VersionDraws:
    """(normals, uniforms) tables of shape (slots, N_COLS) per version, built on first use; a few kept."""

    def __init__(self, seed: int, slots: int, keep: int = 8) -> None:
        self.seed = seed
        self.slots = slots
        self.keep = keep
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def table(self, version: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._cache.get(version)
        if hit is not None:
            self._cache.move_to_end(version)
            return hit
        rng = generator(self.seed, _STREAM_ROUNDS, version)
        tables = (rng.standard_normal((self.slots, N_COLS)), rng.random((self.slots, N_COLS)))
        self._cache[version] = tables
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return tables

    def row(self, version: int, slot: int) -> tuple[list[float], list[float]]:
        z, u = self.table(version)
        return z[slot].tolist(), u[slot].tolist()


class ComputeTime:
    """Time behind one update = base sample × the slot's fixed factors.

    The base is one step (constant / exponential / lognormal with mean `mean_s`, or empirical: the sample at
    quantile u of the measured step times, i.e. a bootstrap of a real run), or for DiLoCo the sum of H local
    steps: H·mean, spread as a lognormal whose relative variance is one step's divided by H (the sum of H
    independent steps; exact in mean and variance, approximate in shape)."""

    def __init__(self, model: ComputeModel, factors: np.ndarray, steps: int = 1) -> None:
        self.model = model
        self.factors = factors
        self._factors = factors.tolist()
        self.steps = steps
        self.kind = model.kind
        self.sigma = model.sigma
        self._samples = np.sort(np.asarray(model.samples_s, dtype=np.float64))
        self._sample_list = self._samples.tolist()
        one_step = float(self._samples.mean()) if self.kind == "empirical" else model.mean_s
        self.mean = one_step * steps
        if steps > 1 and model.kind != "constant":
            if model.kind == "lognormal":
                rel_var = math.expm1(model.sigma**2)
            elif model.kind == "empirical":
                rel_var = float(self._samples.var()) / one_step**2
            else:
                rel_var = 1.0
            self.kind, self.sigma = "lognormal", math.sqrt(math.log1p(rel_var / steps))
        self._mu = math.log(self.mean) - self.sigma**2 / 2.0

    def base(self, z: np.ndarray, u: np.ndarray) -> np.ndarray:
        if self.kind == "constant":
            return np.full(np.shape(z), self.mean)
        if self.kind == "exponential":
            return -self.mean * np.log1p(-u)
        if self.kind == "empirical":
            idx = np.minimum((np.asarray(u) * self._samples.size).astype(np.intp), self._samples.size - 1)
            return self._samples[idx]
        return np.exp(self._mu + self.sigma * z)

    def base_1(self, z: float, u: float) -> float:
        if self.kind == "constant":
            return self.mean
        if self.kind == "exponential":
            return -self.mean * math.log1p(-u)
        if self.kind == "empirical":
            n = len(self._sample_list)
            return self._sample_list[min(int(u * n), n - 1)]
        return math.exp(self._mu + self.sigma * z)

    def sample(self, slots: np.ndarray, z: np.ndarray, u: np.ndarray) -> np.ndarray:
        return self.base(z, u) * self.factors[slots]

    def sample_1(self, slot: int, z: float, u: float) -> float:
        return self.base_1(z, u) * self._factors[slot]


def slot_factors(seed: int, capacity: int, model: ComputeModel, slowdown: np.ndarray) -> np.ndarray:
    """Each slot's fixed multiplier: the profile's compute_slowdown × a lognormal speed factor of mean 1."""
    s = model.speed_sigma
    if s == 0:
        return slowdown.astype(np.float64)
    speed = np.exp(control_rng(seed, 0).standard_normal(capacity) * s - s * s / 2.0)
    return slowdown * speed

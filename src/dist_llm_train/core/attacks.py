"""Byzantine attacks a chosen worker runs instead of sending its honest update (tests and experiments).

Each attack is a short class that only does its maths on flat float32 vectors. An attacker
knows what a real colluding worker could know: its own honest update and `samples` more
gradient estimates computed on its own shard (iid shards make them draws from the same
distribution as everyone's updates). The statistical attacks (ALIE, IPM) estimate the honest
mean and coordinate-wise standard deviation from those samples, as Baruch et al. (2019)
describe for attackers without access to the honest workers' messages.

* `sign_flip(scale)`: send -scale * g (Damaskinos et al. 2018; Karimireddy et al. 2021).
* `gaussian(sigma)`: send N(0, sigma^2) noise (Blanchard et al. 2017's Gaussian Byzantine worker).
* `alie(z)`: "A Little Is Enough" (Baruch et al., NeurIPS 2019): mu - z * sigma per coordinate,
  with z by default the paper's z_max for n workers and f attackers, small enough to stay
  inside the spread of honest updates, so distance- and rank-based rules let it through.
* `ipm(epsilon)`: inner-product manipulation (Xie et al., UAI 2019, "Fall of Empires"): -epsilon * mu,
  which makes the aggregate's inner product with the true gradient negative when enough of it
  gets through.
* `mimic(target)`: every attacker sends a copy of one honest worker's update (Karimireddy, He and Jaggi,
  ICLR 2022). On non-IID data this over-weights that worker's distribution while every message is a
  genuine honest update, so no distance or rank test can flag it. An attacker copies without reading
  anyone's messages: it trains on the target's shard with the target's batch stream, so at the same
  parameters its update is bit-identical to the target's. The target is the honest shard whose label
  distribution lies farthest from the global one (the training side picks it, `training.sharding`),
  unless `target` names a shard.
* `drift(z)`: a history-aware, time-coupled attack: mu + z * ||sigma|| * u with u a unit direction fixed
  at the attacker's first update (against the honest mean it saw then). Each message sits inside the
  honest spread (z <= 1: no farther from the mean than a typical honest update), but the bias points
  the same way every round, so a rule without memory lets a little through each round and the model
  drifts; centered clipping, whose centre carries over, is the rule built against it (Karimireddy,
  He and Jaggi, ICML 2021).

ALIE's z and IPM's epsilon are parameters (`training.attack.params`), so a grid can sweep them.

numpy only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


def _positive(name: str, value: Any) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def alie_z_max(n: int, f: int) -> float:
    """Baruch et al. (2019), eq. in §3: s = floor(n/2 + 1) - f workers must be 'won over';
    z_max = Phi^-1((n - s) / n). Needs 1 <= f < n."""
    if not 1 <= f < n:
        raise ValueError(f"ALIE needs 1 <= f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if p >= 1.0:  # more than half are attackers: any z works; cap at a large but finite value
        return 3.0
    return max(0.0, NormalDist().inv_cdf(p))


class Attack(ABC):
    """Turn an attacker's honest knowledge into the vector it sends."""

    name: ClassVar[str]
    params: ClassVar[frozenset[str]] = frozenset()
    samples: int = 1  # gradient estimates the attack needs (the own update included)
    needs_spread: ClassVar[bool] = False  # estimates the honest updates' spread, so one estimate is not enough

    @abstractmethod
    def craft(self, estimates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`estimates` has shape (samples, d); row 0 is the update the worker would honestly send."""

    def train_shards(self, own: Sequence[int], pick_target: Callable[[], int]) -> list[int]:
        """The data shards the attacker's trainer draws from: its own, unless the attack copies someone."""
        return list(own)


class SignFlip(Attack):
    name = "sign_flip"
    params = frozenset({"scale"})

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = _positive("sign_flip scale", scale)

    def craft(self, estimates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return (-self.scale * estimates[0]).astype(np.float32)


class Gaussian(Attack):
    name = "gaussian"
    params = frozenset({"sigma"})

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = _positive("gaussian sigma", sigma)

    def craft(self, estimates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(rng.normal(0.0, self.sigma, size=estimates.shape[1]), dtype=np.float32)


class ALIE(Attack):
    name = "alie"
    params = frozenset({"z", "samples"})
    needs_spread = True

    def __init__(
        self, z: float | None = None, samples: int = 4, n: int | None = None, f: int | None = None
    ) -> None:
        if z is None:
            if n is None or f is None:
                raise ValueError("alie needs z, or n and f to compute the paper's z_max")
            z = alie_z_max(n, f)
        if not (isinstance(z, int | float) and math.isfinite(z) and z >= 0):
            raise ValueError(f"alie z must be a finite number >= 0, got {z!r}")
        self.z = float(z)
        self.samples = _int_samples(samples)

    def craft(self, estimates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mu = estimates.mean(axis=0, dtype=np.float64)
        sd = estimates.std(axis=0, ddof=1, dtype=np.float64)
        return (mu - self.z * sd).astype(np.float32)


class IPM(Attack):
    name = "ipm"
    params = frozenset({"epsilon", "samples"})

    def __init__(self, epsilon: float = 0.5, samples: int = 4) -> None:
        self.epsilon = _positive("ipm epsilon", epsilon)
        self.samples = _int_samples(samples)

    def craft(self, estimates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return (-self.epsilon * estimates.mean(axis=0, dtype=np.float64)).astype(np.float32)


class Mimic(Attack):
    name = "mimic"
    params = frozenset({"target"})

    def __init__(self, target: int | None = None) -> None:
        ok = target is None or (
            isinstance(target, int | float) and not isinstance(target, bool) and target == int(target) and target >= 0
        )
        if not ok:
            raise ValueError(f"mimic target must be a shard index >= 0, got {target!r}")
        self.target = None if target is None else int(target)

    def train_shards(self, own: Sequence[int], pick_target: Callable[[], int]) -> list[int]:
        return [self.target if self.target is not None else pick_target()]

    def craft(self, estimates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return estimates[0].copy()  # computed on the target's data: the target's own update


class Drift(Attack):
    name = "drift"
    params = frozenset({"z", "samples"})
    needs_spread = True

    def __init__(self, z: float = 1.0, samples: int = 4) -> None:
        self.z = _positive("drift z", z)
        self.samples = _int_samples(samples)
        self.direction: np.ndarray | None = None  # fixed at the first update: the coupling over time

    def craft(self, estimates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mu = estimates.mean(axis=0, dtype=np.float64)
        sd = estimates.std(axis=0, ddof=1, dtype=np.float64)
        if self.direction is None or self.direction.shape != mu.shape:
            norm = float(np.linalg.norm(mu))
            self.direction = -mu / norm if norm > 0 else np.zeros_like(mu)
        return (mu + self.z * float(np.linalg.norm(sd)) * self.direction).astype(np.float32)


def _int_samples(value: Any) -> int:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == int(value)
    if not ok or not 2 <= int(value) <= 64:
        raise ValueError(f"attack samples must be an integer in [2, 64] (a std needs two), got {value!r}")
    return int(value)


ATTACKS: dict[str, type[Attack]] = {a.name: a for a in (SignFlip, Gaussian, ALIE, IPM, Mimic, Drift)}


class AttackConfig(BaseModel):
    """A Byzantine attack run by chosen workers, for experiments (`training.attack`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: Literal["sign_flip", "gaussian", "alie", "ipm", "mimic", "drift"] = Field(description="The attack")
    attackers: int = Field(0, ge=0, description="The workers holding the last K shards attack")
    workers: list[str] = Field(default_factory=list, description="Or these workers, by name")
    params: dict[str, float] = Field(default_factory=dict, description="The attack's parameters")

    @property
    def count(self) -> int:
        """How many workers attack (shard-chosen plus explicitly named)."""
        return self.attackers + len(self.workers)

    def build(self, num_workers: int) -> Attack:
        return get_attack(self.name, self.params, n=num_workers, f=self.count)


def get_attack(name: str, params: Mapping[str, float] | None = None, *, n: int = 0, f: int = 0) -> Attack:
    """The attack called `name`; `n` and `f` (workers, attackers) let ALIE derive its default z."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    cls = ATTACKS[name]
    given: dict[str, Any] = dict(params or {})
    unknown = sorted(set(given) - cls.params)
    if unknown:
        raise ValueError(f"attack {name!r} takes {sorted(cls.params) or 'no parameters'}, not {unknown}")
    if "samples" in given:
        given["samples"] = _int_samples(given["samples"])
    if cls is ALIE:
        return ALIE(z=given.get("z"), samples=given.get("samples", 4), n=n, f=f)
    return cls(**given)


def is_attacker(
    worker_name: str,
    shard_ids: Sequence[int],
    num_shards: int,
    attackers: int,
    attacker_workers: Sequence[str],
) -> bool:
    """Whether this worker attacks: it is named explicitly, or it holds one of the last `attackers` shards.

    Shard-based choice lets a job config say "2 attackers" without knowing worker names: in
    an embedded run worker i holds shard i, so these are the last K workers.
    """
    if worker_name and worker_name in attacker_workers:
        return True
    return attackers > 0 and any(s >= num_shards - attackers for s in shard_ids)


class Attacker:
    """A worker's attack state: the attack, its own reproducible RNG, a count of crafted updates."""

    def __init__(self, attack: Attack, seed: int) -> None:
        self.attack = attack
        self._rng = np.random.default_rng(seed)
        self.crafted = 0

    @property
    def samples(self) -> int:
        return self.attack.samples

    def craft(self, estimates: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        x = np.asarray(estimates, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"estimates must have shape (samples, d), got {x.shape}")
        out = self.attack.craft(x, self._rng)
        self.crafted += 1
        if not np.isfinite(out).all():
            raise FloatingPointError(f"{self.attack.name} produced a non-finite update")
        return out

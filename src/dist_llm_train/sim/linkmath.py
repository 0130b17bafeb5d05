"""The per-message delay model, twice: numpy for a whole round at once, `math` for one event at a time.

One-way time of a message = propagation (the profile's one-way delay + a jitter sample, never below zero)
+ serialisation (bytes / rate) + a retransmission penalty for lost packets:

* a short message (≤ 3 segments, so no three duplicate ACKs can trigger fast retransmit) waits for the
  retransmission timer: F failed attempts of its packet cost RTO·(2^F − 1), the exponential backoff, with
  F ~ Geometric(loss of the message) capped at the stack's retry limit;
* a bulk transfer of k segments loses F ~ Poisson(k·p/(1−p)) of them (the mean of the exact
  negative-binomial count); SACK-based fast recovery repairs each loss within one RTT, and losses in the same
  window share it, so the penalty is RTT·min(F, windows the transfer spans).

Both implementations consume the same pre-drawn variates (z ~ N(0,1), u ~ U(0,1)) so the vectorised sync
engine and the per-event engine compute identical times; a unit test holds the two to 1e-12.
"""

from __future__ import annotations

import math

import numpy as np

DIST_CODES = {"normal": 0, "uniform": 1, "pareto": 2, "paretonormal": 3}
SMALL_SEGMENTS = 3
POISSON_EXACT_MAX = 5.0  # up to this mean the loss count is drawn by inverse CDF, above by a normal
_POISSON_TERMS = 30
_PARETO_ALPHA = 3.0
_PARETO_MEAN = _PARETO_ALPHA / (_PARETO_ALPHA - 1)
_PARETO_STD = math.sqrt(_PARETO_ALPHA / ((_PARETO_ALPHA - 1) ** 2 * (_PARETO_ALPHA - 2)))
_U_FLOOR = 1e-300


# -- jitter -------------------------------------------------------------------------------------------------
def jitter_variate(dist: np.ndarray, z: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A zero-mean, unit-scale sample of netem's delay distribution (normal, uniform, pareto, paretonormal).

    netem's pareto tables are approximated by a standardised Pareto(α=3); paretonormal mixes 1/4 of it with
    3/4 normal, as netem's table does, rescaled to unit variance."""
    out = np.array(z, dtype=np.float64, copy=True)
    if np.any(dist != 0):
        uni = 2.0 * u - 1.0
        par = ((1.0 - u + _U_FLOOR) ** (-1.0 / _PARETO_ALPHA) - _PARETO_MEAN) / _PARETO_STD
        mix = (0.25 * par + 0.75 * z) / math.sqrt(0.25**2 + 0.75**2)
        out = np.where(dist == 1, uni, np.where(dist == 2, par, np.where(dist == 3, mix, out)))
    return out


def jitter_variate_1(dist: int, z: float, u: float) -> float:
    if dist == 0:
        return z
    if dist == 1:
        return 2.0 * u - 1.0
    par = ((1.0 - u + _U_FLOOR) ** (-1.0 / _PARETO_ALPHA) - _PARETO_MEAN) / _PARETO_STD
    if dist == 2:
        return par
    return (0.25 * par + 0.75 * z) / math.sqrt(0.25**2 + 0.75**2)


def propagation(
    delay: np.ndarray, jitter: np.ndarray, dist: np.ndarray, z: np.ndarray, u: np.ndarray
) -> np.ndarray:
    return np.maximum(0.0, delay + jitter * jitter_variate(dist, z, u))


def propagation_1(delay: float, jitter: float, dist: int, z: float, u: float) -> float:
    return max(0.0, delay + jitter * jitter_variate_1(dist, z, u))


# -- loss ---------------------------------------------------------------------------------------------------
def segments(nbytes: int, mss: int) -> int:
    return max(1, -(-nbytes // mss))


def small_penalty(loss_p: np.ndarray, k: int, rto: np.ndarray, u: np.ndarray, max_retries: int) -> np.ndarray:
    """RTO·(2^F − 1) with F ~ Geometric(1 − (1 − p)^k) failed attempts (inverse CDF of u)."""
    return SmallLoss(loss_p, k, rto, max_retries).penalty(u)


class SmallLoss:
    """`small_penalty` for fixed links and message, ready for many draws of u: what depends only on the
    link (the per-attempt loss and its logarithm) is worked out once, by the same operations."""

    def __init__(self, loss_p: np.ndarray, k: int, rto: np.ndarray, max_retries: int) -> None:
        p_msg = 1.0 - (1.0 - loss_p) ** k
        self.lossy = p_msg > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            self.log_p = np.log(np.where(self.lossy, p_msg, 0.5))
        self.rto, self.max_retries = rto, max_retries

    def penalty(self, u: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.floor(np.log(np.maximum(u, _U_FLOOR)) / self.log_p)
        f = np.where(self.lossy, np.minimum(f, self.max_retries), 0.0)
        return self.rto * (np.exp2(f) - 1.0)


def small_penalty_1(loss_p: float, k: int, rto: float, u: float, max_retries: int) -> float:
    p_msg = 1.0 - (1.0 - loss_p) ** k
    if p_msg <= 0:
        return 0.0
    f = min(math.floor(math.log(max(u, _U_FLOOR)) / math.log(p_msg)), max_retries)
    return rto * (2.0**f - 1.0)


def _poisson_inverse(lam: np.ndarray, u: np.ndarray) -> np.ndarray:
    pmf = np.exp(-lam)
    cdf = pmf.copy()
    count = np.zeros_like(lam)
    for j in range(1, _POISSON_TERMS + 1):
        below = cdf < u
        if not below.any():  # every sample found its count; later terms add nothing
            break
        count += below
        pmf = pmf * lam / j
        cdf = cdf + pmf
    return count


def _poisson_inverse_1(lam: float, u: float) -> float:
    pmf = math.exp(-lam)
    cdf = pmf
    count = 0.0
    for j in range(1, _POISSON_TERMS + 1):
        if cdf >= u:
            break
        count += 1.0
        pmf = pmf * lam / j
        cdf = cdf + pmf
    return count


def bulk_penalty(
    loss_p: np.ndarray, k: int, rtt: np.ndarray, transfer_s: np.ndarray, u: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """RTT·min(F, windows) with F ~ Poisson(k·p/(1−p)) lost segments; windows = ⌈transfer / RTT⌉ ≥ 1."""
    lam = k * loss_p / np.maximum(1.0 - loss_p, 1e-9)
    small = lam <= POISSON_EXACT_MAX
    f = np.maximum(0.0, np.floor(lam + np.sqrt(lam) * z + 0.5))
    if small.any():
        f[small] = _poisson_inverse(lam[small], u[small])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        windows = np.where(rtt > 0, np.maximum(1.0, np.ceil(transfer_s / np.where(rtt > 0, rtt, 1.0))), 1.0)
    return rtt * np.minimum(f, windows)


def _normal_count_1(lam: float, z: float) -> float:
    return max(0.0, math.floor(lam + math.sqrt(lam) * z + 0.5))


def bulk_penalty_1(loss_p: float, k: int, rtt: float, transfer_s: float, u: float, z: float) -> float:
    lam = k * loss_p / max(1.0 - loss_p, 1e-9)
    f = _poisson_inverse_1(lam, u) if lam <= POISSON_EXACT_MAX else _normal_count_1(lam, z)
    if rtt <= 0:
        return 0.0
    spans = transfer_s / rtt
    windows = max(1.0, math.ceil(spans)) if math.isfinite(spans) else math.inf
    return rtt * min(f, windows)


class BulkLoss:
    """`bulk_penalty` for fixed links and message, ready for many draws of (u, z).

    What depends only on the link and the transfer (the Poisson mean, which counts are drawn exactly, the
    windows the transfer spans, and the Poisson CDF's terms, computed once as far as a draw has needed them)
    is kept; a draw then costs a comparison per term. Same operations in the same order as `bulk_penalty`,
    so the same numbers."""

    def __init__(self, loss_p: np.ndarray, k: int, rtt: np.ndarray, transfer_s: np.ndarray) -> None:
        self.lam = k * loss_p / np.maximum(1.0 - loss_p, 1e-9)
        self.small = self.lam <= POISSON_EXACT_MAX
        self.any_small = bool(self.small.any())
        self.sqrt_lam = np.sqrt(self.lam)
        self._lam_small = self.lam[self.small]
        self._pmf = np.exp(-self._lam_small)
        self._cdfs = [self._pmf.copy()]  # the Poisson CDF at 0, 1, ... (what `_poisson_inverse` steps through)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            self.windows = np.where(
                rtt > 0, np.maximum(1.0, np.ceil(transfer_s / np.where(rtt > 0, rtt, 1.0))), 1.0
            )
        self.rtt = rtt

    def _count(self, u: np.ndarray) -> np.ndarray:
        """`_poisson_inverse(lam[small], u)`: how many of the CDF's terms lie below u."""
        cdfs = self._cdfs
        count = np.zeros_like(self._lam_small)
        for j in range(_POISSON_TERMS):
            if j == len(cdfs):
                self._pmf = self._pmf * self._lam_small / j
                cdfs.append(cdfs[-1] + self._pmf)
            below = cdfs[j] < u
            if not below.any():  # every sample found its count; later terms add nothing
                break
            count += below
        return count

    def penalty(self, u: np.ndarray, z: np.ndarray) -> np.ndarray:
        f = np.maximum(0.0, np.floor(self.lam + self.sqrt_lam * z + 0.5))
        if self.any_small:
            f[self.small] = self._count(u[self.small])
        return self.rtt * np.minimum(f, self.windows)


class LossModel:
    """`loss_penalty` for fixed links, message size and transfer time, ready for many draws of (u, z)."""

    def __init__(
        self,
        loss_p: np.ndarray,
        nbytes: int,
        mss: int,
        rtt: np.ndarray,
        rto: np.ndarray,
        transfer_s: np.ndarray,
        max_retries: int,
    ) -> None:
        k = segments(nbytes, mss)
        self._small = SmallLoss(loss_p, k, rto, max_retries) if k <= SMALL_SEGMENTS else None
        self._bulk = BulkLoss(loss_p, k, rtt, transfer_s) if k > SMALL_SEGMENTS else None

    def penalty(self, u: np.ndarray, z: np.ndarray) -> np.ndarray:
        if self._small is not None:
            return self._small.penalty(u)
        assert self._bulk is not None
        return self._bulk.penalty(u, z)


def loss_penalty(
    loss_p: np.ndarray,
    nbytes: int,
    mss: int,
    rtt: np.ndarray,
    rto: np.ndarray,
    transfer_s: np.ndarray,
    u: np.ndarray,
    z: np.ndarray,
    max_retries: int,
) -> np.ndarray:
    k = segments(nbytes, mss)
    if k <= SMALL_SEGMENTS:
        return small_penalty(loss_p, k, rto, u, max_retries)
    return bulk_penalty(loss_p, k, rtt, transfer_s, u, z)


def loss_penalty_1(
    loss_p: float,
    nbytes: int,
    mss: int,
    rtt: float,
    rto: float,
    transfer_s: float,
    u: float,
    z: float,
    max_retries: int,
) -> float:
    k = segments(nbytes, mss)
    if k <= SMALL_SEGMENTS:
        return small_penalty_1(loss_p, k, rto, u, max_retries)
    return bulk_penalty_1(loss_p, k, rtt, transfer_s, u, z)


def fifo_completion(starts: np.ndarray, service: np.ndarray, free_at: float) -> np.ndarray:
    """Completion times of jobs served one at a time in the given order: c_j = max(s_j, c_{j−1}) + d_j.

    Closed form c_j = T_j + max(free_at, max_{i≤j}(s_i − T_{i−1})) with T the running sum of service times,
    so a whole round's queue at the PS's egress is a cumulative sum and a running maximum."""
    if starts.size == 0:
        return starts.copy()
    total = np.cumsum(service)
    slack = np.maximum.accumulate(starts - (total - service))
    return total + np.maximum(free_at, slack)

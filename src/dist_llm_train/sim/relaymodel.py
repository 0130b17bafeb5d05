"""How long a message takes through the userspace relay (`netem/userspace/relay.py`), as one inverse-CDF lookup.

The embedded launcher shapes links with relays, and a relay does not treat a message like a kernel qdisc
does: it cuts the byte stream into pieces of ~5 ms at the link rate (`pacing.QUANTUM_S`), draws a delay for
every piece, stalls a piece whose modelled segments were lost (one RTT, or an RTO when fewer than three
segments follow it), and delivers pieces in order. The last byte of a message therefore arrives at

    T_end + M,    M = max_j (d_j + stall_j − τ_j)

where T_end is when its last piece leaves the bottleneck and piece j left τ_j earlier. Pieces are independent,
so M has a closed-form CDF, P(M ≤ m) = Π_j E[F_d(m + τ_j − stall_j)], with F_d the CDF of one piece's delay,
max(0, delay + jitter·J) for J the relay's standardised distribution (`netem.sampling.LinkSampler`: normal, uniform
±√3, Pareto(3) standardised, paretonormal as a ¼–¾ mixture). A table of M's quantiles per (path, size, node
group, schedule segment) is built on first use, and every message then costs one interpolation at a uniform
variate — the same arithmetic in numpy (a round at once) and in Python floats (one event), so both engines
agree to the last bit.

Compared with the kernel model (`linkmath`: one delay draw, plus one RTT per lost segment up to one per
window), this is what the relay does: jitter shows up as the running maximum of many draws, and a loss costs
only what its stall outlasts the rest of the message. Not modelled: delay correlation, Gilbert–Elliott loss
(its mean rate is used), the bucket's 5 ms burst credit.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from dist_llm_train.netem.userspace.relay import MAX_PIECE_BYTES, QUANTUM_S, RTO_FLOOR_S
from dist_llm_train.sim.network import Topology

Path = Literal["up", "down"]
LEVELS = 1025  # quantile levels per table; values between them are interpolated linearly
_GRID = 2048  # points of the CDF over the body of M's range
_TAIL_GRID = 256  # and over a heavy tail (pareto), geometrically spaced
_BODY_SIGMAS = 8.0
_SEGMENTS_BEHIND_FOR_FAST_RETRANSMIT = 3
_SQRT3 = math.sqrt(3.0)
_erf = np.frompyfunc(math.erf, 1, 1)


def standard_cdf(dist: int, x: np.ndarray) -> np.ndarray:
    """CDF of the relay's standardised delay variate J (mean 0, sd 1) for `linkmath.DIST_CODES` `dist`."""
    normal = 0.5 * (1.0 + np.asarray(_erf(x / math.sqrt(2.0)), dtype=np.float64))
    if dist == 0:
        return normal
    if dist == 1:
        return np.clip((x + _SQRT3) / (2.0 * _SQRT3), 0.0, 1.0)
    base = 1.5 + x * math.sqrt(0.75)  # Pareto(α = 3, x_m = 1), mean 1.5, sd √0.75
    with np.errstate(divide="ignore", invalid="ignore"):
        pareto = np.where(base >= 1.0, 1.0 - np.power(np.maximum(base, 1.0), -3.0), 0.0)
    return pareto if dist == 2 else 0.25 * pareto + 0.75 * normal


def _upper_sigmas(dist: int) -> float:
    """A J no sample exceeds in practice: 8 for normal, √3 for uniform, the 1 − 10⁻⁷ quantile for Pareto."""
    if dist == 0:
        return _BODY_SIGMAS
    if dist == 1:
        return _SQRT3
    return (1e7 ** (1.0 / 3.0) - 1.5) / math.sqrt(0.75)


def quantum_bytes(rate_bps: float, mss: int) -> int:
    """The relay's piece size (`pacing.LinkState.quantum`)."""
    if not math.isfinite(rate_bps):
        return MAX_PIECE_BYTES
    return int(min(max(rate_bps / 8 * QUANTUM_S, mss), MAX_PIECE_BYTES))


def delivery_quantiles(
    nbytes: int,
    delay: float,
    jitter: float,
    dist: int,
    loss: float,
    rate_bps: float,
    rtt: float,
    mss: int,
    levels: int = LEVELS,
) -> np.ndarray:
    """Quantiles of M (seconds after the last piece left the bottleneck) at `levels` evenly spaced levels."""
    rto = rtt + RTO_FLOOR_S
    pieces = list(_pieces(nbytes, rate_bps, loss, mss))
    if jitter <= 0:
        return _discrete_quantiles(max(0.0, delay), rtt, rto, pieces, levels)
    body_top = delay + jitter * min(_upper_sigmas(dist), _BODY_SIGMAS) + rto
    top = delay + jitter * _upper_sigmas(dist) + rto
    grid = np.linspace(0.0, body_top, _GRID)
    if top > body_top * 1.001:
        grid = np.unique(np.concatenate([grid, np.geomspace(body_top, top, _TAIL_GRID)]))

    def f_d(x: np.ndarray) -> np.ndarray:
        return np.where(x < 0.0, 0.0, standard_cdf(dist, (x - delay) / jitter))

    cdf = np.ones_like(grid)
    for tau, p_none, p_rtt, p_rto in pieces:
        if tau > top:
            break  # this piece and every earlier one arrive before the last piece can
        factor = p_none * f_d(grid + tau)
        if p_rtt > 0:
            factor = factor + p_rtt * f_d(grid + tau - rtt)
        if p_rto > 0:
            factor = factor + p_rto * f_d(grid + tau - rto)
        cdf *= factor
    cdf = np.maximum.accumulate(np.clip(cdf, 0.0, 1.0))
    return np.interp(np.linspace(0.0, 1.0, levels), cdf, grid)


def _pieces(nbytes: int, rate_bps: float, loss: float, mss: int) -> list[tuple[float, float, float, float]]:
    """Per piece, last first: (τ, P(no stall), P(stall one RTT), P(stall one RTO)), as the relay cuts and
    stalls a message that is queued in full (its backlog is everything behind the piece)."""
    q = quantum_bytes(rate_bps, mss)
    n = max(1, -(-nbytes // q))
    sizes = [q] * (n - 1) + [max(0, nbytes - q * (n - 1))]
    out: list[tuple[float, float, float, float]] = []
    after = 0  # bytes that leave after the piece
    for size in reversed(sizes):
        segs = max(1, -(-size // mss))
        at_rto = max(0, min(segs, _SEGMENTS_BEHIND_FOR_FAST_RETRANSMIT - after // mss))
        p_none = (1.0 - loss) ** segs
        p_rto = 1.0 - (1.0 - loss) ** at_rto
        tau = 8.0 * after / rate_bps if math.isfinite(rate_bps) else 0.0
        out.append((tau, p_none, max(0.0, 1.0 - p_none - p_rto), p_rto))
        after += size
    return out


def _discrete_quantiles(
    d: float, rtt: float, rto: float, pieces: list[tuple[float, float, float, float]], levels: int
) -> np.ndarray:
    """Without jitter M takes finitely many values: its exact CDF at each, and the generalised inverse."""
    values = np.unique([d] + [d + s - tau for tau, *_ in pieces for s in (rtt, rto) if d + s - tau > d])
    cdf = np.ones_like(values)
    for tau, p_none, p_rtt, p_rto in pieces:
        if tau > rto:
            break
        cdf *= p_none * (values >= d - tau) + p_rtt * (values >= d + rtt - tau) + p_rto * (values >= d + rto - tau)
    cdf = np.maximum.accumulate(cdf)
    idx = np.searchsorted(cdf, np.linspace(0.0, 1.0, levels) - 1e-12, side="left")
    return values[np.minimum(idx, values.size - 1)]


class RelayDelivery:
    """Per (path, message size, node group, schedule segment) quantile tables, built when first needed."""

    def __init__(self, topo: Topology, mss: int) -> None:
        self.topo, self.mss = topo, mss
        self._rows: dict[tuple[Path, int, int, int], int] = {}
        self._by_params: dict[tuple[float, ...], int] = {}
        self._tables = np.empty((0, LEVELS))
        self._table_list: list[list[float]] = []

    def _params(self, path: Path, g: int, seg: int) -> tuple[float, float, int, float, float, float]:
        t = self.topo
        table = t.up if path == "up" else t.down
        h = table.hops[g][seg]
        rate = h.rate if path == "up" else min(h.rate, float(t.ps_rate[seg]))
        return h.delay, h.jitter, h.dist, h.loss, rate, float(t.rtt[g, seg])

    def row(self, path: Path, nbytes: int, g: int, seg: int) -> int:
        key = (path, nbytes, g, seg)
        hit = self._rows.get(key)
        if hit is not None:
            return hit
        delay, jitter, dist, loss, rate, rtt = self._params(path, g, seg)
        pkey = (float(nbytes), delay, jitter, float(dist), loss, rate, rtt)
        idx = self._by_params.get(pkey)
        if idx is None:
            qs = delivery_quantiles(nbytes, delay, jitter, dist, loss, rate, rtt, self.mss)
            idx = len(self._table_list)
            self._table_list.append(qs.tolist())
            self._tables = np.vstack([self._tables, qs[None, :]])
            self._by_params[pkey] = idx
        self._rows[key] = idx
        return idx

    def extra(self, path: Path, nbytes: int, g: np.ndarray, seg: np.ndarray, u: np.ndarray) -> np.ndarray:
        """M for each message of a round: group `g`, segment `seg`, uniform variate `u`."""
        if g.size == 0:
            return np.zeros(0)
        pairs = np.unique(np.stack([g, seg]), axis=1)
        lookup = {(int(a), int(b)): self.row(path, nbytes, int(a), int(b)) for a, b in pairs.T}
        if len(lookup) == 1:
            rows = np.full(g.shape, next(iter(lookup.values())), dtype=np.intp)
        else:
            rows = np.array([lookup[(a, b)] for a, b in zip(g.tolist(), seg.tolist(), strict=True)])
        pos = u * (LEVELS - 1)
        i = np.minimum(pos.astype(np.intp), LEVELS - 2)
        lo = self._tables[rows, i]
        return lo + (pos - i) * (self._tables[rows, i + 1] - lo)

    def extra_1(self, path: Path, nbytes: int, g: int, seg: int, u: float) -> float:
        q = self._table_list[self.row(path, nbytes, g, seg)]
        pos = u * (LEVELS - 1)
        i = min(int(pos), LEVELS - 2)
        return q[i] + (pos - i) * (q[i + 1] - q[i])

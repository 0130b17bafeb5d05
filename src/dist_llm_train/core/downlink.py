"""Downlink compression: the PS sends each new version as a compressed delta, not the whole model.

Without it every pull carries the full float32 model, so a strategy that compresses its pushes
100x still pays full price on the way back. With `training.downlink` set to a lossy codec, the PS
keeps two vectors per job:

* θ — the master parameters the optimizer steps (what the job *is*);
* θ̂ — the *published* parameters: exactly what every worker holds.

When version v is published the PS encodes δ_v = θ_v − θ̂_{v−1} with the codec and sets
θ̂_v = θ̂_{v−1} + decode(e_v). Whatever the codec dropped stays in θ_v − θ̂_v and travels with
later deltas: error feedback on the server side, as in DoubleSqueeze (Tang et al., ICML 2019) and
the bidirectional compression of SparseLoCo-style DiLoCo (arXiv 2508.15706), so the gap between
θ and θ̂ stays bounded instead of growing.

A worker holding θ̂_h pulls version v: if the PS still has e_{h+1} … e_v (the last `history`
deltas) it receives those and adds them in order — the very float32 additions the PS made, so
its parameters equal θ̂_v bit for bit (tested); otherwise it receives θ̂_v in full. A lineage id
(`epoch`, drawn when the publisher starts) makes a restarted PS, whose versions after its
checkpoint are new ones, answer every old holder in full rather than with deltas that do not
apply to what they hold.

Workers compute on θ̂ (their copy), the PS applies their updates to θ; checkpoints hold θ and a
restarted publisher starts with θ̂ = θ.

A worker that built the job's initial parameters itself (every worker initialises the model from the job's
seed, and one of them created the job with its copy) does not need them sent: its first pull carries a
digest of what it holds (`params_digest`, BLAKE2b-128 of the float32 bytes), and when that equals the
digest of the publisher's origin — the parameters it started from — the PS answers with the deltas since
the origin instead of θ̂ in full (none at all before the first version). A digest that does not match (a
different seed, another platform's initialisation, a restarted publisher) gets θ̂ in full, as before.

Without a codec the publisher is lossless (θ̂ = θ) and a delta *replaces* the part of the vector a
version changed with its float32 values (codec name `replace`, meta `start`). Streaming DiLoCo uses
that: a version changes one fragment, so a worker one version behind pulls 1/P of the model.
numpy only: the PS imports this.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import deque
from dataclasses import dataclass

import numpy as np

from dist_llm_train.core.codecs import Codec, CodecConfig, Encoded, get_codec

DEFAULT_HISTORY = 16  # deltas kept: a worker up to this many versions behind still gets deltas
REPLACE = "replace"  # a lossless delta: float32 values for [start, start + len) of the vector
_F32 = np.dtype("<f4")
DIGEST_BYTES = 16  # BLAKE2b-128: a pull's claim of what it holds; collisions only ever hurt the claimant


def params_digest(params: np.ndarray) -> bytes:
    """The digest a pull sends for parameters its caller made itself (BLAKE2b-128 of the float32 bytes)."""
    flat = np.ascontiguousarray(params, dtype=_F32)
    return hashlib.blake2b(flat.data.cast("B"), digest_size=DIGEST_BYTES).digest()  # no copy


@dataclass(frozen=True)
class Delta:
    """One published version's compressed delta, as it travels (codec name + meta + payload)."""

    version: int  # the version this delta produces
    codec: str
    encoded: Encoded

    @property
    def nbytes(self) -> int:
        return self.encoded.nbytes


@dataclass(frozen=True)
class DeltaReply:
    """What a pull of a delta-capable holder receives: `deltas` take `base_version` to the job's version
    (the pull's own `version`; the lineage is the pull's `epoch`)."""

    base_version: int
    deltas: tuple[Delta, ...]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas)


def enabled(config: CodecConfig | None) -> bool:
    """Whether a downlink codec config asks for deltas (`none` means full pulls, as before)."""
    return config is not None and config.name != "none"


class DownlinkPublisher:
    """The PS side: keeps θ̂ and the last `history` deltas of one job. `codec` None: lossless replace deltas."""

    def __init__(
        self, codec: Codec | None, params: np.ndarray, version: int, history: int = DEFAULT_HISTORY
    ) -> None:
        if history < 1:
            raise ValueError(f"downlink history must be >= 1, got {history}")
        self.codec = codec
        self.epoch = secrets.randbits(63) or 1  # 0 means "holds nothing" on the wire
        self.published = np.array(params, dtype=np.float32, copy=True)
        self.published.flags.writeable = False
        self.version = version
        self._deltas: deque[Delta] = deque(maxlen=history)
        # The origin: what a worker that initialised the model itself holds, if it matches (module docstring).
        self.origin_version = version
        self.origin_digest = params_digest(self.published)

    def publish(self, params: np.ndarray, version: int, region: slice | None = None) -> None:
        """θ has reached `version`: encode its distance from θ̂ and advance θ̂ by what was sent.

        Lossless (no codec): θ̂ becomes θ and the delta carries θ[region] (all of θ without a region).
        `params` must not be written to afterwards (the PS's arrays never are)."""
        if version != self.version + 1:
            raise ValueError(f"downlink publishes versions in order: at {self.version}, got {version}")
        if self.codec is None:
            r = region if region is not None else slice(0, params.shape[0])
            enc = Encoded(np.ascontiguousarray(params[r], dtype=_F32).tobytes(), {"start": r.start})
            published = params
            name = REPLACE
        else:
            enc = self.codec.encode(params - self.published)
            published = self.published + self.codec.decode(enc, self.published.size)
            published.flags.writeable = False
            name = self.codec.name
        self.published = published
        self.version = version
        self._deltas.append(Delta(version, name, enc))

    def since(self, epoch: int, have_version: int) -> DeltaReply | None:
        """The deltas taking a holder of (epoch, have_version) to the current version; None: send θ̂ in full."""
        if epoch != self.epoch or have_version > self.version:
            return None
        behind = self.version - have_version
        if behind > len(self._deltas):
            return None
        deltas = tuple(self._deltas)[len(self._deltas) - behind :] if behind else ()
        return DeltaReply(have_version, deltas)

    def since_digest(self, digest: bytes) -> DeltaReply | None:
        """The deltas since the origin for a holder whose parameters have the origin's digest; None: in full."""
        if not hmac.compare_digest(digest, self.origin_digest):
            return None
        return self.since(self.epoch, self.origin_version)


def apply_deltas(params: np.ndarray, deltas: tuple[Delta, ...] | list[Delta]) -> np.ndarray:
    """The worker side: θ̂_h + decode(e_{h+1}) + … — the same float32 additions, in the same order, as the PS.

    `params` is not modified. ValueError for an unknown codec or a delta that does not decode to a
    finite vector of the model's size (decoding reads everything it needs from the delta's meta)."""
    out = np.array(params, dtype=np.float32, copy=True)
    for delta in deltas:
        if delta.codec == REPLACE:
            start, values = _replacement(delta.encoded, out.size)
            out[start : start + values.size] = values
        else:
            out = out + get_codec(delta.codec).decode(delta.encoded, out.size)
    return out


def _replacement(enc: Encoded, size: int) -> tuple[int, np.ndarray]:
    start = enc.meta.get("start")
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"a replace delta needs a non-negative integer start, got {start!r}")
    if len(enc.payload) % 4:
        raise ValueError(f"a replace delta's payload is {len(enc.payload)} bytes, not whole float32 values")
    values = np.frombuffer(enc.payload, dtype=_F32)
    if start + values.size > size:
        raise ValueError(f"a replace delta covers {start}:{start + values.size} of a {size}-element vector")
    if not np.isfinite(values).all():
        raise ValueError("a replace delta carries NaN or Inf")
    return start, values

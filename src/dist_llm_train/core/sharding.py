"""Sharded parameter servers: which contiguous slice of the flat vector each of P servers owns.

With P parameter-server shards, shard i holds `vec[bounds[i]:bounds[i + 1]]` and serves it as if it were the
whole vector: its own versions, optimizer state, update bound and checkpoints. The parameters are flat float32,
so a byte-balanced split is an element-balanced one. Inner bounds fall on multiples of `ALIGN` (4096) elements
when the vector has at least that many per shard, so compressed updates can be cut between their codecs' chunks;
slices then differ by at most 4096 elements (16 KiB), and by at most one element for smaller vectors. A tensor
may straddle two shards (each holds its piece, named `name[a:b]`).

What carries over from one server to P unchanged is every rule that works element by element: the mean and the
coordinate-wise rules (median, trimmed mean), SGD / Adam / Nesterov outer steps, per-element codecs. What does
not is any maths that needs the whole update at once; `check_shardable` refuses those jobs before anything
starts (see docs/architecture.md, "Sharded parameter servers"):

- krum, multi_krum, bulyan: they pick whole updates by their distances over all coordinates;
- centered clipping: its radius is an L2 norm over the whole update;
- bucketing and NNM: they mix whole updates chosen by (whole-vector) distance or a shuffle;
- central DP: its clip and its noise are calibrated to the whole update's L2 sensitivity;
- streaming_diloco: its fragments are regions of the whole vector that rotate with the version.

The PS's per-update L2 bound (`core.update_bound`) is the one whole-vector rule that is kept: each shard applies
it to its slice, with its own median of recent slice norms. An honest update is never near the bound, so this only
changes which part of an attacker's update is clipped.

numpy only. The client that talks to P shards is `paramserver.transport.sharded`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dist_llm_train.core.job import JobSpec
from dist_llm_train.core.types import TensorSpec

MAX_SHARDS = 64
# Inner bounds fall on multiples of this many elements when every shard gets at least one such unit: then the
# chunked codecs' payloads (int8 chunks of 1024, int4 / int2 of 128, SparseLoCo of 4096 by default) can be cut
# between chunks and each shard pushed its slice still compressed (`Codec.split`).
ALIGN = 4096
# Aggregation rules that need every coordinate of every update at once.
WHOLE_VECTOR_RULES = ("krum", "multi_krum", "bulyan", "centered_clipping")
WHOLE_VECTOR_WRAPPERS = {"bucket_size": "bucketing", "nnm_f": "nnm"}
WHOLE_VECTOR_STRATEGIES = ("streaming_diloco",)


@dataclass(frozen=True)
class ShardPlan:
    """P contiguous slices covering [0, num_params): `bounds` has P + 1 entries, from 0 to num_params."""

    bounds: tuple[int, ...]

    @classmethod
    def balanced(cls, num_params: int, shards: int) -> ShardPlan:
        if not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"parameter-server shards must be an integer in 1..{MAX_SHARDS}, got {shards!r}")
        if num_params < shards:
            raise ValueError(f"{num_params} parameters cannot be split over {shards} shards (one element each)")
        unit = ALIGN if num_params // ALIGN >= shards else 1
        base, extra = divmod(num_params // unit, shards)
        bounds = [0]
        for i in range(shards):
            bounds.append(bounds[-1] + unit * (base + (1 if i < extra else 0)))  # the first `extra` take one more
        bounds[-1] = num_params  # the elements short of a whole unit go to the last shard
        return cls(tuple(bounds))

    @property
    def shards(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_params(self) -> int:
        return self.bounds[-1]

    def size(self, shard: int) -> int:
        return self.bounds[shard + 1] - self.bounds[shard]

    def slices(self) -> list[slice]:
        return [slice(a, b) for a, b in zip(self.bounds, self.bounds[1:], strict=False)]

    def split(self, vec: np.ndarray) -> list[np.ndarray]:
        """The P slices of `vec` (views, no copy)."""
        flat = np.asarray(vec).reshape(-1)
        if flat.shape[0] != self.num_params:
            raise ValueError(f"vector has {flat.shape[0]} elements, the plan covers {self.num_params}")
        return [flat[s] for s in self.slices()]

    def join(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """One float32 vector from the P slices, in shard order."""
        if len(parts) != self.shards:
            raise ValueError(f"{len(parts)} slices for a plan of {self.shards} shards")
        for i, part in enumerate(parts):
            if np.asarray(part).reshape(-1).shape[0] != self.size(i):
                raise ValueError(f"shard {i} sent {np.asarray(part).size} elements, it owns {self.size(i)}")
        return np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1) for p in parts])

    def layout(self, full: Sequence[TensorSpec], shard: int) -> list[TensorSpec]:
        """Shard `shard`'s layout: the tensors (or pieces of them) inside its slice, offsets relative to it.

        A tensor cut by a slice boundary becomes a flat piece `name[a:b]` (a, b: element indices into the
        tensor). A slice no tensor touches (a gap in the layout) is named by its range, so the PS still gets a
        layout that covers something."""
        start, stop = self.bounds[shard], self.bounds[shard + 1]
        out: list[TensorSpec] = []
        for t in full:
            lo, hi = max(t.offset, start), min(t.offset + t.size, stop)
            if lo >= hi:
                continue
            if lo == t.offset and hi == t.offset + t.size:
                out.append(TensorSpec(t.name, tuple(t.shape), lo - start))
            else:
                out.append(TensorSpec(f"{t.name}[{lo - t.offset}:{hi - t.offset}]", (hi - lo,), lo - start))
        return out or [TensorSpec(f"flat[{start}:{stop}]", (stop - start,), 0)]


def check_shardable(spec: JobSpec, shards: int) -> None:
    """ValueError naming the setting when `spec`'s maths needs the whole vector on one server (see above)."""
    if shards == 1:
        return
    why = "its maths needs the whole update on one server; use --ps-shards 1 (or PS_SHARDS=1)"
    if spec.aggregation in WHOLE_VECTOR_RULES:
        raise ValueError(f"aggregation rule {spec.aggregation!r} cannot run on {shards} PS shards: {why}")
    for param, wrapper in WHOLE_VECTOR_WRAPPERS.items():
        if param in spec.aggregation_params:
            raise ValueError(f"aggregation wrapper {wrapper!r} cannot run on {shards} PS shards: {why}")
    if spec.privacy is not None:
        raise ValueError(f"central DP cannot run on {shards} PS shards: {why} (local DP works)")
    if spec.mode in WHOLE_VECTOR_STRATEGIES:
        raise ValueError(f"strategy {spec.mode!r} cannot run on {shards} PS shards: {why}")


"""Split a dataset into per-task shards, IID or label-skewed (non-IID).

The non-IID scheme is the standard federated-learning recipe (Hsu et al., 2019, "Measuring
the effects of non-identical data distribution"): for every label draw shard proportions
from Dirichlet(alpha) and split that label's items by them. Small alpha → each shard sees
few labels; large alpha → close to IID. Every item lands in exactly one shard and no shard
is empty, so every task has work.

numpy only.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ShardScheme = Literal["iid", "dirichlet"]

# Bounded redraws before falling back to a deterministic repair of empty shards.
_MAX_DIRICHLET_DRAWS = 100


def shard_indices(
    n_items: int,
    n_shards: int,
    scheme: ShardScheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Partition range(n_items) into `n_shards` non-empty, sorted int64 index arrays.

    `labels` (one integer per item) is required for `scheme="dirichlet"`.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if n_items < n_shards:
        raise ValueError(f"cannot split {n_items} items into {n_shards} non-empty shards")
    rng = np.random.default_rng(np.random.SeedSequence([seed, n_items, n_shards]))
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n_items), n_shards)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown sharding scheme {scheme!r}; choose 'iid' or 'dirichlet'")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a positive finite number, got {alpha}")
    if labels is None:
        raise ValueError("dirichlet sharding needs one label per item")
    labels = np.asarray(labels)
    if labels.shape != (n_items,):
        raise ValueError(f"labels must have shape ({n_items},), got {labels.shape}")
    return _dirichlet_split(labels, n_shards, alpha, rng)


def _dirichlet_split(labels: np.ndarray, n_shards: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    parts: list[list[np.ndarray]] = []
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts = [[] for _ in range(n_shards)]
        for items in by_class:
            props = rng.dirichlet(np.full(n_shards, alpha))
            cuts = (np.cumsum(props)[:-1] * len(items)).astype(np.int64)
            for shard, chunk in enumerate(np.split(items, cuts)):
                parts[shard].append(chunk)
        if all(sum(len(c) for c in p) > 0 for p in parts):
            break
    shards = [np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts]
    _fill_empty(shards)
    return [np.sort(s).astype(np.int64) for s in shards]


def _fill_empty(shards: list[np.ndarray]) -> None:
    """Give each still-empty shard one item taken from the currently largest shard."""
    for i, s in enumerate(shards):
        if len(s) == 0:
            donor = int(np.argmax([len(x) for x in shards]))
            shards[i], shards[donor] = shards[donor][-1:], shards[donor][:-1]


def label_skew(shards: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each shard's label distribution and the global one.

    0 means every shard has the global mix; values near 1 mean shards see disjoint labels.
    """
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    global_p = np.bincount(inverse, minlength=len(classes)) / len(labels)
    tvs = []
    for s in shards:
        p = np.bincount(inverse[s], minlength=len(classes)) / max(len(s), 1)
        tvs.append(0.5 * np.abs(p - global_p).sum())
    return float(np.mean(tvs))


def most_skewed_shard(shards: list[np.ndarray], labels: np.ndarray, candidates: range | list[int]) -> int:
    """Among `candidates`, the shard whose label distribution lies farthest (total variation) from the global one.

    The mimic attack copies this worker: on non-IID data its updates sit farthest from the honest mean, so
    duplicating them skews the aggregate most (a data-side stand-in for Karimireddy et al.'s choice along the
    honest updates' top principal direction, which would need every honest message). Ties: the lowest index."""
    pool = [int(c) for c in candidates]
    if not pool:
        raise ValueError("no candidate shard to pick from")
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    global_p = np.bincount(inverse, minlength=len(classes)) / len(labels)

    def distance(i: int) -> float:
        p = np.bincount(inverse[shards[i]], minlength=len(classes)) / max(len(shards[i]), 1)
        return float(0.5 * np.abs(p - global_p).sum())

    return max(pool, key=lambda i: (distance(i), -i))

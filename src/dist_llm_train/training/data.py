"""Datasets of fixed-length token sequences, their shards, and per-worker batch streams.

Every process (controller, PS, each worker, the launcher's evaluator) rebuilds the same
dataset from the `training` config alone: nothing is shipped over the network, so the
dataset must be a pure function of the config and its seed.

numpy only: importing this module must not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from dist_llm_train.config import TrainingConfig, resolve_data_path
from dist_llm_train.training.corpora import MAX_MARKOV_VOCAB, CharCorpus, HigherOrderMarkovCorpus, MarkovCorpus
from dist_llm_train.training.sharding import ShardScheme, label_skew, most_skewed_shard, shard_indices

__all__ = [
    "MAX_MARKOV_VOCAB",
    "BatchIterator",
    "CharCorpus",
    "HigherOrderMarkovCorpus",
    "MarkovCorpus",
    "TokenDataset",
    "dominant_tokens",
    "label_skew",
    "make_dataset",
    "shard_indices",
]

# Fraction of a text corpus kept for held-out evaluation (the tail, so windows never overlap).
TEXT_EVAL_FRACTION = 0.1


def dominant_tokens(seqs: np.ndarray, vocab_size: int) -> np.ndarray:
    """Most frequent token of each row (ties → smallest id): the label used for non-IID sharding.

    It is the natural "class" of a sequence from a peaked Markov chain (which state the
    chain lingers in), so label skew becomes real content skew between shards.
    """
    n, length = seqs.shape
    out = np.empty(n, dtype=np.int64)
    rows_per_chunk = max(1, (1 << 22) // vocab_size)
    for start in range(0, n, rows_per_chunk):
        chunk = seqs[start : start + rows_per_chunk].astype(np.int64)
        ids = chunk + (np.arange(len(chunk)) * vocab_size)[:, None]
        counts = np.bincount(ids.ravel(), minlength=len(chunk) * vocab_size).reshape(len(chunk), vocab_size)
        out[start : start + len(chunk)] = counts.argmax(axis=1)
    return out


@dataclass
class TokenDataset:
    """Training and held-out sequences of `seq_length + 1` tokens (inputs + shifted targets).

    `loss_floor` is the exact minimum next-token cross-entropy in nats when known (Markov
    corpora), else None. `reference` holds named statistics that are *not* floors (for
    markov-hard, the entropy rate, which the floor exceeds by the short-context positions).
    """

    train: np.ndarray  # (num_samples, seq_length + 1) int32
    heldout: np.ndarray  # (num_eval, seq_length + 1) int32
    vocab_size: int
    loss_floor: float | None
    labels: np.ndarray  # (num_samples,) int64, used by dirichlet sharding
    sharding: ShardScheme = "iid"
    dirichlet_alpha: float = 0.5
    seed: int = 0
    default_num_shards: int = 1
    reference: dict[str, float] = field(default_factory=dict)
    _shard_cache: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def seq_length(self) -> int:
        return int(self.train.shape[1] - 1)

    def shards(self, num_shards: int | None = None) -> list[np.ndarray]:
        """Index arrays into `train`, one per shard (task). Cached: sharding is deterministic."""
        n = self.default_num_shards if num_shards is None else num_shards
        if n not in self._shard_cache:
            self._shard_cache[n] = shard_indices(
                len(self.train), n, self.sharding, self.dirichlet_alpha, self.seed, labels=self.labels
            )
        return self._shard_cache[n]

    def mimic_target(self, num_shards: int, attackers: int) -> int:
        """The honest shard a mimic attacker copies: of the first `num_shards - attackers` shards (the last K
        are the attackers'), the one whose label mix is farthest from the global one."""
        honest = range(max(1, num_shards - attackers))
        return most_skewed_shard(self.shards(num_shards), self.labels, honest)

    def heldout_batches(self, batch_size: int, num_batches: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The first `num_batches` held-out batches, always the same ones, as (x, y) int64."""
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}")
        if batch_size * num_batches > len(self.heldout):
            raise ValueError(
                f"{num_batches} batches of {batch_size} need {batch_size * num_batches} held-out sequences; "
                f"the dataset has {len(self.heldout)}"
            )
        for b in range(num_batches):
            seqs = self.heldout[b * batch_size : (b + 1) * batch_size].astype(np.int64)
            yield seqs[:, :-1], seqs[:, 1:]


def make_dataset(cfg: TrainingConfig) -> TokenDataset:
    """Build the dataset a training config describes, deterministically from `cfg.seed`."""
    num_eval = cfg.eval_batches * cfg.batch_size
    length = cfg.seq_length + 1
    train_rng, eval_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([cfg.seed, 7]).spawn(2))
    if cfg.data == "markov":
        corpus = MarkovCorpus(cfg.vocab_size, cfg.seed, cfg.markov_concentration)
        train = corpus.sample_sequences(cfg.num_samples, length, train_rng)
        heldout = corpus.sample_sequences(num_eval, length, eval_rng)
        vocab_size, floor = corpus.vocab_size, corpus.entropy_rate_nats()
        reference: dict[str, float] = {}
    elif cfg.data == "markov-hard":
        hard = HigherOrderMarkovCorpus(cfg.vocab_size, cfg.markov_order, cfg.seed, cfg.markov_concentration)
        train = hard.sample_sequences(cfg.num_samples, length, train_rng)
        heldout = hard.sample_sequences(num_eval, length, eval_rng)
        # The floor of a loss averaged over seq_length targets: the entropy rate, raised by the first
        # order - 1 targets, which are predicted from less than a full context (see loss_floor_nats).
        vocab_size, floor = hard.vocab_size, hard.loss_floor_nats(cfg.seq_length)
        reference = {"entropy_rate_nats": hard.entropy_rate_nats()}
    else:
        if not cfg.text_path:
            raise ValueError("data: text needs text_path")
        text = CharCorpus.from_file(resolve_data_path(cfg.text_path))  # checked again here: symlinks may move
        split = int(len(text.tokens) * (1 - TEXT_EVAL_FRACTION))
        train = _windows(text.tokens[:split], cfg.num_samples, length, train_rng, "training")
        heldout = _windows(text.tokens[split:], num_eval, length, eval_rng, "held-out")
        vocab_size, floor = text.vocab_size, None
        reference = {
            "unigram_entropy_nats": text.reference_unigram_entropy_nats(),
            "bigram_entropy_nats": text.reference_bigram_entropy_nats(),
        }
    return TokenDataset(
        train=train,
        heldout=heldout,
        vocab_size=vocab_size,
        loss_floor=floor,
        labels=dominant_tokens(train, vocab_size),
        sharding=cfg.sharding,
        dirichlet_alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        default_num_shards=cfg.num_workers,
        reference=reference,
    )


def _windows(tokens: np.ndarray, count: int, length: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """`count` windows of `length` tokens at random starts (overlap allowed, as in nanoGPT)."""
    if len(tokens) < length:
        raise ValueError(
            f"the {what} part of the text has {len(tokens)} characters; need at least {length} (seq_length + 1)"
        )
    starts = rng.integers(0, len(tokens) - length + 1, size=count)
    return tokens[starts[:, None] + np.arange(length)].astype(np.int32)


class BatchIterator:
    """Endless, deterministic (x, y) batches drawn from a set of shards.

    Each pass over the owned items is a fresh permutation; batches run across pass
    boundaries so every batch is full. The stream is a function of (seed, owned shards):
    a worker that takes over a dead worker's shard calls `add_shards` and continues from a
    new stream over the union.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        shard_ids: Sequence[int],
        batch_size: int,
        seed: int,
        num_shards: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_shards = dataset.default_num_shards if num_shards is None else num_shards
        self._shards = dataset.shards(self.num_shards)
        self._owned: tuple[int, ...] = ()
        self._generation = 0
        self._reset(self._checked(shard_ids, allow_empty=False))

    @property
    def shard_ids(self) -> tuple[int, ...]:
        return self._owned

    @property
    def num_items(self) -> int:
        return len(self._pool)

    def add_shards(self, shard_ids: Sequence[int]) -> None:
        """Also draw from these shards from now on (already-owned ids are ignored)."""
        new = self._checked(shard_ids, allow_empty=True)
        if set(new) - set(self._owned):
            self._generation += 1
            self._reset(tuple(sorted(set(self._owned) | set(new))))

    def _checked(self, shard_ids: Sequence[int], allow_empty: bool) -> tuple[int, ...]:
        ids = tuple(sorted({int(i) for i in shard_ids}))
        if not ids and not allow_empty:
            raise ValueError("a batch iterator needs at least one shard")
        bad = [i for i in ids if not 0 <= i < self.num_shards]
        if bad:
            raise ValueError(f"shard ids {bad} out of range for {self.num_shards} shards")
        return ids

    def _reset(self, owned: tuple[int, ...]) -> None:
        self._owned = owned
        self._pool = np.concatenate([self._shards[i] for i in owned])
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._generation, *owned]))
        self._perm = self._rng.permutation(self._pool)
        self._pos = 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        taken: list[np.ndarray] = []
        need = self.batch_size
        while need > 0:  # bounded: each pass yields >= 1 item, so <= batch_size passes
            if self._pos >= len(self._perm):
                self._perm, self._pos = self._rng.permutation(self._pool), 0
            chunk = self._perm[self._pos : self._pos + need]
            self._pos += len(chunk)
            need -= len(chunk)
            taken.append(chunk)
        seqs = self.dataset.train[np.concatenate(taken)].astype(np.int64)
        return seqs[:, :-1], seqs[:, 1:]

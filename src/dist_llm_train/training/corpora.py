"""Token sources with known (or honestly unknown) statistics.

A synthetic first-order Markov chain is the default corpus because its entropy rate is
computable exactly: that is the lowest next-token cross-entropy any model can reach, so
a training run can be judged against a real floor instead of "the loss went down".
A character-level text corpus is offered for realism; its floor is unknown, and the
empirical unigram/bigram entropies it reports are *references*, not floors.

numpy only: the parameter server and controller import this package and stay torch-free.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Above this the dense V x V transition matrix stops being a "tiny synthetic corpus".
MAX_MARKOV_VOCAB = 4096


def _entropy_nats(p: np.ndarray) -> float:
    """Shannon entropy of a probability vector, 0·log 0 taken as 0."""
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


class MarkovCorpus:
    """A seeded random first-order Markov chain over `vocab_size` tokens.

    Rows of the transition matrix are drawn from Dirichlet(concentration): a small
    concentration gives peaked, predictable rows (low floor), a large one near-uniform
    rows (floor close to ln V). Each row is then mixed with the uniform distribution by
    `ergodic_mix` so every transition has positive probability: the chain is irreducible
    and aperiodic, its stationary distribution is unique and sampled sequences are
    stationary from their first token, which makes the entropy rate the exact floor.
    """

    def __init__(self, vocab_size: int, seed: int, concentration: float = 0.3, ergodic_mix: float = 0.01) -> None:
        if not 2 <= vocab_size <= MAX_MARKOV_VOCAB:
            raise ValueError(f"vocab_size must be in [2, {MAX_MARKOV_VOCAB}] for a Markov corpus, got {vocab_size}")
        if not (np.isfinite(concentration) and concentration > 0):
            raise ValueError(f"concentration must be a positive finite number, got {concentration}")
        if not 0 < ergodic_mix <= 1:
            raise ValueError(f"ergodic_mix must be in (0, 1], got {ergodic_mix}")
        self.vocab_size = vocab_size
        self.seed = seed
        self.concentration = concentration
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D61726B]))
        rows = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)
        self.transition = (1.0 - ergodic_mix) * rows + ergodic_mix / vocab_size
        self.transition /= self.transition.sum(axis=1, keepdims=True)
        self.stationary = self._solve_stationary(self.transition)
        cdf = np.cumsum(self.transition, axis=1)
        cdf[:, -1] = 1.0  # guard against rounding leaving the last bucket unreachable
        self._cdf = cdf
        self._cdf_rows = [row.tolist() for row in cdf]
        self._stationary_cdf = np.cumsum(self.stationary)
        self._stationary_cdf[-1] = 1.0

    @staticmethod
    def _solve_stationary(p: np.ndarray) -> np.ndarray:
        """pi with pi P = pi, sum(pi) = 1: (P^T - I) pi = 0 with one equation replaced by the sum."""
        v = p.shape[0]
        a = p.T - np.eye(v)
        a[-1, :] = 1.0
        b = np.zeros(v)
        b[-1] = 1.0
        pi = np.linalg.solve(a, b)
        pi = np.clip(pi, 0.0, None)
        return pi / pi.sum()

    def entropy_rate_nats(self) -> float:
        """H = sum_i pi_i H(P_i): the minimum expected next-token cross-entropy, in nats."""
        row_entropy = -(self.transition * np.log(self.transition)).sum(axis=1)
        return float(self.stationary @ row_entropy)

    def sample(self, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """One stationary chain of `num_tokens` tokens (int64)."""
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        u = rng.random(num_tokens)
        out = np.empty(num_tokens, dtype=np.int64)
        state = int(np.searchsorted(self._stationary_cdf, u[0], side="right"))
        out[0] = state
        rows = self._cdf_rows
        for t in range(1, num_tokens):
            state = bisect.bisect_right(rows[state], u[t])
            out[t] = state
        return out

    def sample_sequences(self, num_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """`num_sequences` independent stationary chains of `length` tokens, shape (N, length), int32.

        Vectorised across sequences: one searchsorted per time step over a flattened CDF in
        which row i is shifted by i, so all rows sit in one sorted array.
        """
        if num_sequences < 1 or length < 1:
            raise ValueError(f"need num_sequences >= 1 and length >= 1, got {num_sequences}, {length}")
        v = self.vocab_size
        flat = (self._cdf + np.arange(v)[:, None]).ravel()
        out = np.empty((num_sequences, length), dtype=np.int32)
        state = np.searchsorted(self._stationary_cdf, rng.random(num_sequences), side="right")
        out[:, 0] = state
        for t in range(1, length):
            pos = np.searchsorted(flat, state + rng.random(num_sequences), side="right")
            state = np.minimum(pos - state * v, v - 1)
            out[:, t] = state
        return out


@dataclass(frozen=True)
class CharCorpus:
    """Character-level tokens of a text, vocabulary = its sorted distinct characters.

    `loss_floor` is None because the true entropy of natural text is unknown. The
    plug-in unigram and bigram entropies are exposed as `reference_*` values only: a
    model can legitimately beat both (it sees longer contexts).
    """

    vocab: tuple[str, ...]
    tokens: np.ndarray  # int32, one per character
    loss_floor: None = None

    @classmethod
    def from_text(cls, text: str) -> CharCorpus:
        if len(text) < 2:
            raise ValueError(f"text must have at least 2 characters, got {len(text)}")
        vocab = tuple(sorted(set(text)))
        index = {ch: i for i, ch in enumerate(vocab)}
        tokens = np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))
        return cls(vocab=vocab, tokens=tokens)

    @classmethod
    def from_file(cls, path: str | Path) -> CharCorpus:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"text corpus not found: {p}")
        return cls.from_text(p.read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise ValueError(f"characters not in vocabulary: {missing[:10]!r}")
        return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))

    def decode(self, tokens: np.ndarray) -> str:
        return "".join(self.vocab[int(t)] for t in tokens)

    def reference_unigram_entropy_nats(self) -> float:
        """Plug-in entropy of the character frequencies (a reference, not a floor)."""
        counts = np.bincount(self.tokens, minlength=self.vocab_size).astype(np.float64)
        return _entropy_nats(counts / counts.sum())

    def reference_bigram_entropy_nats(self) -> float:
        """Plug-in conditional entropy H(next | current) of the text (a reference, not a floor)."""
        v = self.vocab_size
        pair_ids = self.tokens[:-1].astype(np.int64) * v + self.tokens[1:]
        joint = np.bincount(pair_ids, minlength=v * v).astype(np.float64).reshape(v, v)
        joint /= joint.sum()
        return _entropy_nats(joint.ravel()) - _entropy_nats(joint.sum(axis=1))

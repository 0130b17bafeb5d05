"""Token sources with known (or honestly unknown) statistics.

A synthetic first-order Markov chain is the default corpus because its entropy rate is
computable exactly: that is the lowest next-token cross-entropy any model can reach, so
a training run can be judged against a real floor instead of "the loss went down".
A sparse higher-order chain (`HigherOrderMarkovCorpus`) is the harder task: many more
contexts to learn, so it is hungry for samples, and its floor is just as exact.
A character-level text corpus is offered for realism; its floor is unknown, and the
empirical unigram/bigram entropies it reports are *references*, not floors.

numpy only: the parameter server and controller import this package and stay torch-free.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_llm_train.config import MAX_TRANSITION_ENTRIES

# Above this the dense V x V transition matrix stops being a "tiny synthetic corpus".
MAX_MARKOV_VOCAB = 4096


def _entropy_nats(p: np.ndarray) -> float:
    """Shannon entropy of a probability vector, 0·log 0 taken as 0."""
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def _ergodic_rows(
    rng: np.random.Generator, rows: int, vocab_size: int, concentration: float, ergodic_mix: float
) -> np.ndarray:
    """`rows` next-token distributions: Dirichlet(concentration) draws mixed with `ergodic_mix` of uniform, so
    every transition has positive probability (the chain is irreducible and aperiodic)."""
    if not (np.isfinite(concentration) and concentration > 0):
        raise ValueError(f"concentration must be a positive finite number, got {concentration}")
    if not 0 < ergodic_mix <= 1:
        raise ValueError(f"ergodic_mix must be in (0, 1], got {ergodic_mix}")
    drawn = rng.dirichlet(np.full(vocab_size, concentration), size=rows)
    if not np.isfinite(drawn).all():
        raise ValueError(f"concentration {concentration} is too small to draw Dirichlet rows in float64")
    mixed = (1.0 - ergodic_mix) * drawn + ergodic_mix / vocab_size
    mixed /= mixed.sum(axis=1, keepdims=True)
    return mixed


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
        self.vocab_size = vocab_size
        self.seed = seed
        self.concentration = concentration
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D61726B]))
        self.transition = _ergodic_rows(rng, vocab_size, vocab_size, concentration, ergodic_mix)
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


class HigherOrderMarkovCorpus:
    """A seeded random order-k Markov chain over `vocab_size` tokens whose rows are sparse.

    The next token depends on the last k tokens, its *context*: one of C = V^k, numbered
    c = x_{t-k+1}·V^{k-1} + … + x_t (oldest token most significant), so the context after
    token x is (c mod V^{k-1})·V + x. Each context's row is drawn from a symmetric
    Dirichlet(concentration): well below 1, a row puts almost all its mass on a few tokens,
    different ones for every context. Nothing is shared between contexts, so a model must
    see each of the C contexts often enough to learn its row: the task is hungry for samples,
    which is what makes more data-parallel workers worth their bytes.

    As in `MarkovCorpus`, every row is mixed with the uniform distribution (`ergodic_mix`), so
    every transition has positive probability: the chain on contexts is irreducible (any
    context reaches any other in k steps) and aperiodic, and has exactly one stationary
    distribution π. Sequences start from π (their first k tokens are a context drawn from
    it), so every window of a sample is stationary.

    The entropy rate is then exact: by the Markov property H(X_t | X_<t) = H(X_t | context),
    and under π that is H = Σ_c π(c) H(P_c), a finite sum. π is the fixed point of one step
    of the chain on contexts, π'(r·V + x) = Σ_a π(a·V^{k-1} + r) P(x | a·V^{k-1} + r), found
    by power iteration until an iteration moves π by less than `STATIONARY_TOL` in L1 (a few
    ulps; the residual is kept in `stationary_residual`). An error δ in π moves H by at most
    δ·ln V, so H is exact to ~1e-12 nats. The first k−1 positions of a sequence see fewer than
    k tokens, so their best loss is higher; `loss_floor_nats` accounts for them exactly.
    """

    STATIONARY_TOL = 1e-14
    MAX_POWER_ITERATIONS = 100_000

    def __init__(
        self, vocab_size: int, order: int, seed: int, concentration: float = 0.1, ergodic_mix: float = 0.01
    ) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if vocab_size ** (order + 1) > MAX_TRANSITION_ENTRIES:
            raise ValueError(
                f"vocab_size {vocab_size} at order {order} needs a {vocab_size}^{order} x {vocab_size} transition "
                f"table ({vocab_size ** (order + 1):,} entries); at most {MAX_TRANSITION_ENTRIES:,} are allowed"
            )
        self.vocab_size = vocab_size
        self.order = order
        self.seed = seed
        self.concentration = concentration
        self.num_contexts = vocab_size**order
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4D61726B, order]))
        self.transition = _ergodic_rows(rng, self.num_contexts, vocab_size, concentration, ergodic_mix)
        self.stationary = self._solve_stationary()
        self.stationary_residual = float(np.abs(self.step(self.stationary) - self.stationary).sum())
        cdf = np.cumsum(self.transition, axis=1)
        cdf[:, -1] = 1.0  # guard against rounding leaving the last bucket unreachable
        # Row c shifted by c: all rows in one sorted array, so one searchsorted serves every sequence.
        self._flat_cdf = (cdf + np.arange(self.num_contexts)[:, None]).ravel()
        self._stationary_cdf = np.cumsum(self.stationary)
        self._stationary_cdf[-1] = 1.0

    def step(self, pi: np.ndarray) -> np.ndarray:
        """One step of the chain on contexts: the context distribution after one more token."""
        v = self.vocab_size
        by_oldest = pi.reshape(v, self.num_contexts // v)  # [oldest token a, rest r]
        per_rest = self.transition.reshape(v, self.num_contexts // v, v)
        return np.einsum("ar,arx->rx", by_oldest, per_rest).ravel()

    def _solve_stationary(self) -> np.ndarray:
        pi = np.full(self.num_contexts, 1.0 / self.num_contexts)
        for _ in range(self.MAX_POWER_ITERATIONS):  # bounded; random sparse chains mix in tens of steps
            nxt = self.step(pi)
            nxt /= nxt.sum()
            moved = float(np.abs(nxt - pi).sum())
            pi = nxt
            if moved < self.STATIONARY_TOL:
                return pi
        raise RuntimeError(
            f"power iteration did not converge in {self.MAX_POWER_ITERATIONS} steps (last L1 move {moved:.2e}); "
            "raise ergodic_mix"
        )

    def entropy_rate_nats(self) -> float:
        """H = Σ_c π(c) H(P_c): the lowest expected next-token cross-entropy given the whole past, in nats."""
        row_entropy = -(self.transition * np.log(self.transition)).sum(axis=1)
        return float(self.stationary @ row_entropy)

    def prefix_entropies_nats(self) -> list[float]:
        """[H(X_1 | X_0), …, H(X_{k-1} | X_0..X_{k-2})]: the best losses with less than a full context.

        The first m tokens of a stationary sequence are distributed as π summed over its last
        k − m tokens, so H(X_m | X_<m) = H(X_0..X_m) − H(X_0..X_{m-1}) is exact too."""
        k, v = self.order, self.vocab_size
        joint = self.stationary.reshape((v,) * k)
        block = [_entropy_nats(joint.sum(axis=tuple(range(m, k))).ravel()) for m in range(1, k)] + [
            _entropy_nats(self.stationary)
        ]
        return [block[m] - block[m - 1] for m in range(1, k)]

    def loss_floor_nats(self, seq_length: int) -> float:
        """The lowest mean cross-entropy over the `seq_length` targets of a stationary sequence.

        Target t (0-based) is predicted from t + 1 tokens: positions t ≥ k − 1 see a full
        context and cost the entropy rate; the first k − 1 cost `prefix_entropies_nats`."""
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        short = self.prefix_entropies_nats()[:seq_length]
        return (sum(short) + (seq_length - len(short)) * self.entropy_rate_nats()) / seq_length

    def target_nll_nats(self, seqs: np.ndarray) -> np.ndarray:
        """-log P(x_{t+1} | x_0..x_t) under the true chain for every target of `seqs` (N, L): shape (N, L-1).

        Its mean over held-out sequences estimates the floor with the held-out set's own noise,
        so `eval loss - mean` is the excess with that noise paired away."""
        if seqs.ndim != 2 or seqs.shape[1] < 2:
            raise ValueError(f"seqs must be (N, L) with L >= 2, got shape {seqs.shape}")
        if seqs.size and not (seqs.min() >= 0 and seqs.max() < self.vocab_size):
            raise ValueError(f"tokens must be in [0, {self.vocab_size})")
        x = seqs.astype(np.int64)
        k, v = self.order, self.vocab_size
        joint = self.stationary.reshape((v,) * k)
        prefix = [joint.sum(axis=tuple(range(m, k))) for m in range(1, k + 1)]  # laws of the first m tokens
        out = np.empty((x.shape[0], x.shape[1] - 1))
        for t in range(x.shape[1] - 1):
            if t >= k - 1:
                ctx = np.zeros(x.shape[0], dtype=np.int64)
                for j in range(k):
                    ctx = ctx * v + x[:, t - k + 1 + j]
                out[:, t] = -np.log(self.transition[ctx, x[:, t + 1]])
            else:  # fewer than k tokens known: P(x_0..x_{t+1}) / P(x_0..x_t) from the stationary law
                known = tuple(x[:, j] for j in range(t + 2))
                out[:, t] = -np.log(prefix[t + 1][known] / prefix[t][known[:-1]])
        return out

    def sample_sequences(self, num_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """`num_sequences` independent stationary sequences of `length` tokens, shape (N, length), int32."""
        if num_sequences < 1 or length < 1:
            raise ValueError(f"need num_sequences >= 1 and length >= 1, got {num_sequences}, {length}")
        v, k, contexts = self.vocab_size, self.order, self.num_contexts
        state = np.minimum(np.searchsorted(self._stationary_cdf, rng.random(num_sequences), side="right"), contexts - 1)
        out = np.empty((num_sequences, max(length, k)), dtype=np.int32)
        for j in range(k):  # the starting context's tokens, oldest first
            out[:, j] = (state // v ** (k - 1 - j)) % v
        for t in range(k, length):
            pos = np.searchsorted(self._flat_cdf, state + rng.random(num_sequences), side="right")
            token = np.minimum(pos - state * v, v - 1)
            out[:, t] = token
            state = (state % (contexts // v)) * v + token
        return out[:, :length]


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

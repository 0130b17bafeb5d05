"""The markov-hard task: a sparse order-k Markov corpus, its exact floor, its config and its dataset.

The entropy rate and the floor are checked against references computed another way: the stationary
distribution from a dense linear solve over the V^k context states (not the corpus's power iteration),
and conditional entropies from the exact joint law of short sequences, enumerated sequence by sequence.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dist_llm_train.config import MAX_TRANSITION_ENTRIES, Config, ConfigError, TrainingConfig, parse_config
from dist_llm_train.training.corpora import HigherOrderMarkovCorpus
from dist_llm_train.training.data import make_dataset


def dense_stationary(c: HigherOrderMarkovCorpus) -> np.ndarray:
    """π of the chain on contexts from its explicit C x C matrix: (Q^T - I) π = 0 with Σ π = 1."""
    v, k = c.vocab_size, c.order
    q = np.zeros((c.num_contexts, c.num_contexts))
    for ctx in range(c.num_contexts):
        for x in range(v):
            q[ctx, (ctx % v ** (k - 1)) * v + x] += c.transition[ctx, x]
    a = q.T - np.eye(c.num_contexts)
    a[-1, :] = 1.0
    b = np.zeros(c.num_contexts)
    b[-1] = 1.0
    return np.linalg.solve(a, b)


def joint_law(c: HigherOrderMarkovCorpus, pi: np.ndarray, length: int) -> dict[tuple[int, ...], float]:
    """P(x_0 .. x_{length-1}) of a stationary sequence, every sequence enumerated (length >= order)."""
    v, k = c.vocab_size, c.order
    law = {}
    for seq in itertools.product(range(v), repeat=length):
        ctx = sum(t * v ** (k - 1 - j) for j, t in enumerate(seq[:k]))
        p = pi[ctx]
        for x in seq[k:]:
            p *= c.transition[ctx, x]
            ctx = (ctx % v ** (k - 1)) * v + x
        law[seq] = p
    return law


def entropy(law: dict[tuple[int, ...], float], prefix: int) -> float:
    """H of the first `prefix` tokens under `law`."""
    marginal: dict[tuple[int, ...], float] = {}
    for seq, p in law.items():
        marginal[seq[:prefix]] = marginal.get(seq[:prefix], 0.0) + p
    return -sum(p * np.log(p) for p in marginal.values() if p > 0)


# ---- the corpus ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("v", "k"), [(3, 2), (4, 3), (5, 1)])
def test_stationary_matches_a_dense_linear_solve(v: int, k: int) -> None:
    c = HigherOrderMarkovCorpus(v, k, seed=4, concentration=0.2)
    assert np.allclose(c.transition.sum(axis=1), 1.0) and (c.transition > 0).all()
    np.testing.assert_allclose(c.stationary, dense_stationary(c), rtol=0, atol=1e-13)
    assert c.stationary_residual < 1e-13


@pytest.mark.parametrize(("v", "k"), [(3, 2), (3, 3)])
def test_entropy_rate_and_floor_equal_brute_force_conditional_entropies(v: int, k: int) -> None:
    c = HigherOrderMarkovCorpus(v, k, seed=1, concentration=0.3)
    length = k + 3
    law = joint_law(c, dense_stationary(c), length)
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
    h = [entropy(law, m) for m in range(length + 1)]  # h[m] = H(X_0 .. X_{m-1})
    conditional = [h[m + 1] - h[m] for m in range(1, length)]  # H(X_m | X_<m), m = 1 .. length-1
    rate = c.entropy_rate_nats()
    for m in range(k, length):  # a full context: the rate, whatever more of the past is known
        assert conditional[m - 1] == pytest.approx(rate, abs=1e-12)
    np.testing.assert_allclose(c.prefix_entropies_nats(), conditional[: k - 1], rtol=0, atol=1e-12)
    seq_length = length - 1  # targets x_1 .. x_{length-1}
    assert c.loss_floor_nats(seq_length) == pytest.approx(np.mean(conditional), abs=1e-12)
    assert c.loss_floor_nats(seq_length) > rate  # short contexts cost more


def test_samples_follow_the_transition_table() -> None:
    c = HigherOrderMarkovCorpus(4, 2, seed=2, concentration=0.5)
    seqs = c.sample_sequences(12_000, 20, np.random.default_rng(0))
    assert seqs.shape == (12_000, 20) and seqs.dtype == np.int32 and seqs.min() >= 0 and seqs.max() < 4
    ctx = seqs[:, :-2].astype(np.int64) * 4 + seqs[:, 1:-1]
    counts = np.zeros((16, 4))
    np.add.at(counts, (ctx.ravel(), seqs[:, 2:].ravel()), 1)
    expected = counts.sum(axis=1, keepdims=True) * c.transition
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = 16 * 3
    assert chi2 < dof + 6 * np.sqrt(2 * dof)  # a wrong context update or row lookup is off by thousands
    start = np.bincount(seqs[:, 0].astype(np.int64) * 4 + seqs[:, 1], minlength=16) / len(seqs)
    assert np.abs(start - c.stationary).max() < 0.015  # every sequence starts in the stationary law
    later = np.bincount(ctx[:, -1], minlength=16) / len(seqs)
    assert np.abs(later - c.stationary).max() < 0.015  # and stays in it


@pytest.mark.parametrize("k", [2, 3])
def test_mean_nll_of_samples_is_the_rate_and_the_floor(k: int) -> None:
    c = HigherOrderMarkovCorpus(6, k, seed=3, concentration=0.2)
    seqs = c.sample_sequences(4000, 20, np.random.default_rng(1))
    nll = c.target_nll_nats(seqs)
    assert nll.shape == (4000, 19)
    full = nll[:, k - 1 :]  # targets with a whole context
    se = full.mean(axis=1).std() / np.sqrt(len(seqs))  # sequences are independent
    assert abs(full.mean() - c.entropy_rate_nats()) < 5 * se
    se = nll.mean(axis=1).std() / np.sqrt(len(seqs))
    assert abs(nll.mean() - c.loss_floor_nats(19)) < 5 * se
    for t, h in enumerate(c.prefix_entropies_nats()):  # and each short-context position its own entropy
        assert abs(nll[:, t].mean() - h) < 5 * nll[:, t].std() / np.sqrt(len(seqs))
    with pytest.raises(ValueError, match="tokens"):
        c.target_nll_nats(np.full((2, 3), 6))


def test_sparse_rows_make_a_low_floor_and_seeds_differ() -> None:
    sparse = HigherOrderMarkovCorpus(32, 2, seed=0, concentration=0.05)
    flat = HigherOrderMarkovCorpus(32, 2, seed=0, concentration=50.0)
    assert 0 < sparse.entropy_rate_nats() < 0.7 * np.log(32) < flat.entropy_rate_nats() < np.log(32)
    assert not np.array_equal(sparse.transition, HigherOrderMarkovCorpus(32, 2, seed=1, concentration=0.05).transition)
    again = HigherOrderMarkovCorpus(32, 2, seed=0, concentration=0.05)
    assert np.array_equal(sparse.transition, again.transition)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(vocab_size=1), "vocab_size"),
        (dict(order=0), "order"),
        (dict(vocab_size=300, order=3), "transition table"),
        (dict(concentration=0.0), "concentration"),
        (dict(concentration=float("nan")), "concentration"),
        (dict(ergodic_mix=0.0), "ergodic_mix"),
    ],
)
def test_corpus_rejects_bad_parameters(kwargs: dict[str, float], match: str) -> None:
    args: dict[str, float] = dict(vocab_size=8, order=2, seed=0, concentration=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        HigherOrderMarkovCorpus(**args)  # type: ignore[arg-type]


def test_floor_needs_a_positive_length() -> None:
    with pytest.raises(ValueError, match="seq_length"):
        HigherOrderMarkovCorpus(4, 2, seed=0).loss_floor_nats(0)


# ---- config and dataset ----------------------------------------------------------------------------


def hard_cfg(**kw: object) -> TrainingConfig:
    base: dict[str, object] = dict(
        data="markov-hard", vocab_size=12, markov_order=2, markov_concentration=0.1,
        seq_length=16, num_samples=500, batch_size=8, eval_batches=4, num_workers=2,
    )
    base.update(kw)
    return TrainingConfig.model_validate(base)


def test_config_parses_markov_hard_and_keeps_the_default_task() -> None:
    cfg = parse_config({"training": {"data": "markov-hard", "markov_order": 3, "vocab_size": 20}})
    assert cfg.training.data == "markov-hard" and cfg.training.markov_order == 3
    default = parse_config({})
    assert default.training.data == "markov" and default.training.vocab_size == 16


@pytest.mark.parametrize(
    ("training", "match"),
    [
        ({"data": "markov-hard", "markov_order": 1}, "markov_order"),
        ({"data": "markov-hard", "markov_order": 5}, "markov_order"),
        ({"data": "markov-hard", "vocab_size": 4096, "markov_order": 2}, "transition table"),
        ({"data": "markov-harder"}, "data"),
    ],
)
def test_config_refuses_bad_markov_hard_knobs(training: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"training": training})


def test_config_limit_is_the_corpus_limit() -> None:
    v = int(round(MAX_TRANSITION_ENTRIES ** (1 / 3)))  # v^3 == the limit: order 2 just fits
    assert v**3 == MAX_TRANSITION_ENTRIES
    hard_cfg(vocab_size=v)
    with pytest.raises(ValueError, match="transition table"):
        hard_cfg(vocab_size=v + 1)


def test_dataset_shapes_floor_and_determinism() -> None:
    cfg = hard_cfg()
    a, b = make_dataset(cfg), make_dataset(cfg)
    assert a.train.shape == (500, 17) and a.heldout.shape == (4 * 8, 17)
    assert a.vocab_size == 12 and a.train.max() < 12 and a.train.dtype == np.int32
    corpus = HigherOrderMarkovCorpus(12, 2, seed=0, concentration=0.1)
    assert a.loss_floor == corpus.loss_floor_nats(16)
    assert a.reference == {"entropy_rate_nats": corpus.entropy_rate_nats()}
    assert a.loss_floor > corpus.entropy_rate_nats()
    assert np.array_equal(a.train, b.train) and np.array_equal(a.heldout, b.heldout)
    assert not np.array_equal(a.train, make_dataset(hard_cfg(seed=1)).train)


# ---- collaboration matters (a small instance of examples/markov_hard.yaml) ------------------------


def small_task(workers: int, steps: int = 300) -> Config:
    return Config.model_validate({
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "ngram_order": 2},
        "training": {"data": "markov-hard", "vocab_size": 32, "markov_concentration": 0.02, "seq_length": 32,
                     "batch_size": 8, "learning_rate": 0.05, "num_workers": workers, "steps": steps,
                     "num_samples": 4 * steps * 8, "eval_batches": 64},
    })


@pytest.mark.slow  # ~10 s: 1,024 contexts, 4 x 300 + 300 worker steps through the real parameter store
def test_four_sync_workers_learn_what_one_cannot_in_the_same_steps() -> None:
    from dist_llm_train.sim.numerics import simulate_training

    excess = {}
    for workers in (4, 1):
        cfg = small_task(workers)
        result, sources = simulate_training(cfg)
        trainer = sources[0].trainer
        floor = trainer.dataset.loss_floor
        assert floor is not None
        excess[workers] = trainer.evaluate(result.params, cfg.training.eval_batches) - floor
    assert -0.02 < excess[4] < 0.06  # near the exact floor, and not below it beyond held-out noise
    assert excess[1] > 1.5 * excess[4]  # measured 2.8x: a quarter of the samples leaves contexts unlearned

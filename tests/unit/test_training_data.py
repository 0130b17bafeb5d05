"""Corpora, datasets, sharding and batch streams (dist_llm_train.training.data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_llm_train.config import TrainingConfig
from dist_llm_train.training.data import (
    BatchIterator,
    CharCorpus,
    MarkovCorpus,
    dominant_tokens,
    label_skew,
    make_dataset,
    shard_indices,
)

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def small_cfg(**kw: object) -> TrainingConfig:
    base: dict[str, object] = dict(vocab_size=8, seq_length=16, num_samples=600, batch_size=8, num_workers=3)
    base.update(kw)
    return TrainingConfig.model_validate(base)


# ---- Markov corpus -------------------------------------------------------------------------------


def test_markov_rows_are_distributions_and_stationary_is_fixed_point() -> None:
    c = MarkovCorpus(12, seed=3, concentration=0.3)
    assert np.allclose(c.transition.sum(axis=1), 1.0)
    assert (c.transition > 0).all()  # ergodic mix: every transition possible
    assert np.isclose(c.stationary.sum(), 1.0)
    assert np.allclose(c.stationary @ c.transition, c.stationary, atol=1e-12)


def test_entropy_rate_matches_monte_carlo_estimate() -> None:
    c = MarkovCorpus(8, seed=1, concentration=0.3)
    seq = c.sample(200_000, np.random.default_rng(5))
    nll = -np.log(c.transition[seq[:-1], seq[1:]])
    # Standard error of the mean (transitions are weakly correlated; 5 SE is generous).
    se = nll.std() / np.sqrt(len(nll))
    assert abs(nll.mean() - c.entropy_rate_nats()) < max(5 * se, 0.01)


def test_entropy_rate_tracks_concentration_and_is_below_log_v() -> None:
    peaked = MarkovCorpus(16, seed=0, concentration=0.1).entropy_rate_nats()
    flat = MarkovCorpus(16, seed=0, concentration=100.0).entropy_rate_nats()
    assert 0 < peaked < flat < np.log(16)
    assert flat > 0.95 * np.log(16)


def test_sequence_sampler_matches_chain_statistics() -> None:
    c = MarkovCorpus(6, seed=2, concentration=0.5)
    seqs = c.sample_sequences(20_000, 4, np.random.default_rng(0))
    assert seqs.shape == (20_000, 4) and seqs.min() >= 0 and seqs.max() < 6
    first = np.bincount(seqs[:, 0], minlength=6) / len(seqs)
    assert np.abs(first - c.stationary).max() < 0.02  # sequences start in the stationary distribution
    pairs = np.zeros((6, 6))
    np.add.at(pairs, (seqs[:, :-1].ravel(), seqs[:, 1:].ravel()), 1)
    empirical = pairs / pairs.sum(axis=1, keepdims=True)
    assert np.abs(empirical - c.transition).max() < 0.05


@pytest.mark.parametrize(
    "kwargs", [dict(vocab_size=1), dict(vocab_size=100_000), dict(concentration=0.0), dict(concentration=-1.0)]
)
def test_markov_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = dict(vocab_size=8, seed=0, concentration=0.3)
    args.update(kwargs)
    with pytest.raises(ValueError):
        MarkovCorpus(**args)  # type: ignore[arg-type]


# ---- Char corpus ---------------------------------------------------------------------------------


def test_char_corpus_roundtrip_and_reference_entropies(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    c = CharCorpus.from_file(path)
    assert c.loss_floor is None
    assert c.decode(c.tokens) == TEXT
    assert c.vocab_size == len(set(TEXT))
    uni, bi = c.reference_unigram_entropy_nats(), c.reference_bigram_entropy_nats()
    assert 0 < bi < uni < np.log(c.vocab_size)
    with pytest.raises(ValueError, match="not in vocabulary"):
        c.encode("Z")


def test_char_corpus_bad_input() -> None:
    with pytest.raises(ValueError):
        CharCorpus.from_text("a")
    with pytest.raises(ValueError, match="not found"):
        CharCorpus.from_file("/nonexistent/corpus.txt")


# ---- Datasets ------------------------------------------------------------------------------------


def test_make_dataset_markov_shapes_floor_and_determinism() -> None:
    cfg = small_cfg()
    a, b = make_dataset(cfg), make_dataset(cfg)
    assert a.train.shape == (600, 17) and a.heldout.shape == (cfg.eval_batches * 8, 17)
    assert a.loss_floor == pytest.approx(MarkovCorpus(8, 0, cfg.markov_concentration).entropy_rate_nats())
    assert np.array_equal(a.train, b.train) and np.array_equal(a.heldout, b.heldout)
    other = make_dataset(small_cfg(seed=1))
    assert not np.array_equal(a.train, other.train)


def test_make_dataset_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path))  # text files are read from the data directory only
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    ds = make_dataset(small_cfg(data="text", text_path=str(path)))
    assert ds.loss_floor is None
    assert set(ds.reference) == {"unigram_entropy_nats", "bigram_entropy_nats"}
    assert ds.vocab_size == len(set(TEXT)) and ds.train.max() < ds.vocab_size
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij", encoding="utf-8")
    with pytest.raises(ValueError, match="seq_length"):
        make_dataset(small_cfg(data="text", text_path=str(short)))


def test_heldout_batches_are_fixed_and_bounded() -> None:
    ds = make_dataset(small_cfg())
    first = [x.copy() for x, _ in ds.heldout_batches(8, 2)]
    again = [x for x, _ in ds.heldout_batches(8, 2)]
    assert all(np.array_equal(p, q) for p, q in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="held-out"):
        list(ds.heldout_batches(8, 1000))


# ---- Sharding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("n_shards", [1, 3, 7])
def test_shards_cover_every_item_exactly_once(scheme: str, n_shards: int) -> None:
    labels = np.random.default_rng(0).integers(0, 5, size=500)
    shards = shard_indices(500, n_shards, scheme, alpha=0.1, seed=4, labels=labels)  # type: ignore[arg-type]
    assert len(shards) == n_shards and all(len(s) > 0 for s in shards)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(500))


def test_dirichlet_no_empty_shard_even_when_shards_equal_items() -> None:
    labels = np.zeros(10, dtype=np.int64)
    shards = shard_indices(10, 10, "dirichlet", alpha=0.01, seed=0, labels=labels)
    assert sorted(len(s) for s in shards) == [1] * 10


def test_dirichlet_small_alpha_is_measurably_skewed() -> None:
    labels = np.random.default_rng(1).integers(0, 8, size=4000)
    iid = shard_indices(4000, 4, "iid", seed=0)
    skewed = shard_indices(4000, 4, "dirichlet", alpha=0.05, seed=0, labels=labels)
    near_iid = shard_indices(4000, 4, "dirichlet", alpha=1000.0, seed=0, labels=labels)
    assert label_skew(iid, labels) < 0.05
    assert label_skew(near_iid, labels) < 0.05
    assert label_skew(skewed, labels) > 0.4


def test_dataset_dirichlet_shards_use_dominant_token_labels() -> None:
    ds = make_dataset(small_cfg(sharding="dirichlet", dirichlet_alpha=0.05, num_samples=2000))
    assert np.array_equal(ds.labels, dominant_tokens(ds.train, ds.vocab_size))
    assert label_skew(ds.shards(4), ds.labels) > label_skew(shard_indices(2000, 4, "iid"), ds.labels) + 0.2


def test_dominant_tokens_breaks_ties_to_smallest() -> None:
    seqs = np.array([[3, 3, 1, 1], [0, 2, 2, 2]])
    assert dominant_tokens(seqs, 4).tolist() == [1, 2]


def test_sharding_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        shard_indices(3, 4)
    with pytest.raises(ValueError, match="label"):
        shard_indices(10, 2, "dirichlet")
    with pytest.raises(ValueError, match="alpha"):
        shard_indices(10, 2, "dirichlet", alpha=0.0, labels=np.zeros(10))
    with pytest.raises(ValueError, match="scheme"):
        shard_indices(10, 2, "round-robin")  # type: ignore[arg-type]


# ---- Batch iterator ------------------------------------------------------------------------------


def test_batches_deterministic_shifted_and_from_owned_shards() -> None:
    ds = make_dataset(small_cfg())
    a = BatchIterator(ds, [1], batch_size=8, seed=0)
    b = BatchIterator(ds, [1], batch_size=8, seed=0)
    owned = {tuple(r) for r in ds.train[ds.shards()[1]].tolist()}
    for _ in range(60):  # > one pass over the 200-item shard: exercises the wrap-around
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.dtype == np.int64 and xa.shape == (8, 16) and ya.shape == (8, 16)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])
        for x, y in zip(xa, ya, strict=True):
            assert (*x.tolist(), int(y[-1])) in owned
    c = BatchIterator(ds, [1], batch_size=8, seed=1)
    assert not np.array_equal(next(c)[0], next(BatchIterator(ds, [1], batch_size=8, seed=0))[0])


def test_batches_each_pass_visits_every_item_once() -> None:
    ds = make_dataset(small_cfg(num_samples=64, num_workers=2))
    it = BatchIterator(ds, [0, 1], batch_size=16, seed=3)
    seen = np.concatenate([next(it)[0] for _ in range(4)])
    assert len({tuple(r) for r in seen.tolist()}) == len({tuple(r) for r in ds.train[:, :-1].tolist()})


def test_batch_larger_than_pool_cycles() -> None:
    ds = make_dataset(small_cfg(num_samples=6, num_workers=3))
    x, _ = next(BatchIterator(ds, [0], batch_size=7, seed=0))
    assert x.shape == (7, 16)


def test_add_shards_extends_pool_and_validates() -> None:
    ds = make_dataset(small_cfg())
    it = BatchIterator(ds, [0], batch_size=8, seed=0)
    assert it.num_items == len(ds.shards()[0])
    with pytest.raises(ValueError, match="out of range"):
        it.add_shards([1, 5])
    assert it.shard_ids == (0,)  # failed call changed nothing
    it.add_shards([2, 0])
    assert it.shard_ids == (0, 2)
    assert it.num_items == len(ds.shards()[0]) + len(ds.shards()[2])
    with pytest.raises(ValueError, match="at least one shard"):
        BatchIterator(ds, [], batch_size=8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(ds, [0], batch_size=0, seed=0)


def test_numpy_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import dist_llm_train.core.codecs, dist_llm_train.core.aggregation, dist_llm_train.training.data\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_most_skewed_shard_is_the_farthest_label_mix_among_candidates() -> None:
    from dist_llm_train.training.sharding import most_skewed_shard

    labels = np.array([0] * 50 + [1] * 50)
    shards = [np.arange(0, 100, 2), np.arange(1, 100, 2), np.arange(0, 40), np.arange(40, 60)]
    # TV distances from (0.5, 0.5): 0, 0, 0.5 (all label 0), 0 (half and half)
    assert most_skewed_shard(shards, labels, range(4)) == 2
    assert most_skewed_shard(shards, labels, [0, 1, 3]) == 0  # ties: the lowest index
    with pytest.raises(ValueError, match="no candidate"):
        most_skewed_shard(shards, labels, [])

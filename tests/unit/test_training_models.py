"""Models, flat parameter vectors and the local trainer (torch side of dist_llm_train.training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dist_llm_train.config import ModelConfig, TrainingConfig
from dist_llm_train.training.data import BatchIterator, TokenDataset, make_dataset
from dist_llm_train.training.flat import flatten_grads, flatten_params, layout_of, load_flat_params
from dist_llm_train.training.models import GPT, build_model, lm_loss
from dist_llm_train.training.trainer import LocalTrainer

GPT_CFG = ModelConfig.model_validate(dict(name="gpt", n_layer=2, n_head=2, n_embd=32))
LSTM_CFG = ModelConfig.model_validate(dict(name="lstm", n_layer=2, n_embd=32, hidden_size=64))
NGRAM_CFG = ModelConfig.model_validate(dict(name="gpt", n_layer=1, n_head=2, n_embd=32, ngram_order=2))
TRAINED_CFGS = [pytest.param(GPT_CFG, id="gpt"), pytest.param(LSTM_CFG, id="lstm")]
MODEL_CFGS = [*TRAINED_CFGS, pytest.param(NGRAM_CFG, id="ngram")]


def train_cfg(**kw: object) -> TrainingConfig:
    base: dict[str, object] = dict(
        vocab_size=16, seq_length=32, num_samples=2000, batch_size=16, num_workers=2, eval_batches=16, seed=0
    )
    base.update(kw)
    return TrainingConfig.model_validate(base)


@pytest.fixture(scope="module")
def dataset() -> TokenDataset:
    return make_dataset(train_cfg())


# ---- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", MODEL_CFGS)
def test_build_is_deterministic_and_leaves_global_rng_alone(cfg: ModelConfig) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = flatten_params(build_model(cfg, 16, 32, seed=7))
    assert torch.equal(torch.rand(3), expected)
    assert np.array_equal(a, flatten_params(build_model(cfg, 16, 32, seed=7)))
    assert not np.array_equal(a, flatten_params(build_model(cfg, 16, 32, seed=8)))


@pytest.mark.parametrize("cfg", MODEL_CFGS)
def test_logits_shape_causality_and_initial_loss(cfg: ModelConfig) -> None:
    model = build_model(cfg, 16, 32, seed=0).eval()
    x = torch.randint(0, 16, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        x2 = x.clone()
        x2[:, 20] = (x2[:, 20] + 1) % 16
        logits2 = model(x2)
        loss = lm_loss(model, x, torch.roll(x, -1, dims=1)).item()
    assert logits.shape == (3, 32, 16)
    assert torch.allclose(logits[:, :20], logits2[:, :20])  # the past cannot see the future
    assert not torch.allclose(logits[:, 20:], logits2[:, 20:])
    assert abs(loss - math.log(16)) < 0.15  # small init: near-uniform predictions


def test_gpt_ties_embedding_and_head_and_limits_length() -> None:
    model = build_model(GPT_CFG, 16, 8, seed=0)
    assert isinstance(model, GPT)
    assert model.lm_head.weight is model.wte.weight
    names = [s.name for s in layout_of(model)]
    assert "wte.weight" in names and "lm_head.weight" not in names
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros((1, 9), dtype=torch.long))
    with pytest.raises(ValueError):
        lm_loss(model, torch.zeros((1, 4), dtype=torch.long), torch.zeros((1, 5), dtype=torch.long))


def test_ngram_logits_look_up_each_positions_last_n_tokens() -> None:
    model = build_model(NGRAM_CFG, 16, 8, seed=0)
    assert isinstance(model, GPT) and model.ngram is not None
    table = model.ngram.table.weight
    assert table.shape == (17 * 17, 16)  # (V + 1)^2 rows of V logits: the padding token 16 starts a sequence
    assert not table.any()  # zero at initialisation: the network's predictions are unchanged
    x = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        before = model(x)
        table.normal_()
        after = model(x)
    rows = [16 * 17 + 3, 3 * 17 + 5, 5 * 17 + 7]  # (pad, 3), (3, 5), (5, 7)
    assert torch.allclose(after - before, table[rows], atol=1e-6)
    without = NGRAM_CFG.model_copy(update={"ngram_order": 0})
    plain = [n for n, _ in build_model(without, 16, 8, seed=0).named_parameters()]
    assert [n for n, _ in model.named_parameters()] == [*plain, "ngram.table.weight"]  # the plain layout, + one


def test_ngram_order_is_validated() -> None:
    bigram = build_model(ModelConfig.model_validate(dict(name="gpt", n_embd=8, n_head=1, ngram_order=1)), 16, 8, 0)
    assert isinstance(bigram, GPT) and bigram.ngram is not None and bigram.ngram.table.weight.shape == (17, 16)
    with pytest.raises(ValueError, match="GPT option"):
        ModelConfig.model_validate(dict(name="lstm", ngram_order=2))
    with pytest.raises(ValueError, match="ngram_order"):
        ModelConfig.model_validate(dict(name="gpt", ngram_order=5))
    with pytest.raises(ValueError, match="parameters"):
        build_model(ModelConfig.model_validate(dict(name="gpt", n_embd=8, n_head=1, ngram_order=4)), 64, 8, seed=0)


# ---- flat vectors --------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", MODEL_CFGS)
def test_layout_is_contiguous_in_named_parameters_order(cfg: ModelConfig) -> None:
    model = build_model(cfg, 16, 32, seed=0)
    layout, vec = layout_of(model), flatten_params(model)
    assert [s.name for s in layout] == [n for n, _ in model.named_parameters()]
    assert layout[0].offset == 0
    for prev, nxt in zip(layout, layout[1:], strict=False):
        assert nxt.offset == prev.offset + prev.size
    assert layout[-1].offset + layout[-1].size == vec.size and vec.dtype == np.float32
    params = dict(model.named_parameters())
    for spec in layout:
        chunk = vec[spec.offset : spec.offset + spec.size].reshape(spec.shape)
        assert np.array_equal(chunk, params[spec.name].detach().numpy())


@pytest.mark.parametrize("cfg", MODEL_CFGS)
def test_flat_roundtrip_reproduces_outputs_and_copies(cfg: ModelConfig) -> None:
    src, dst = build_model(cfg, 16, 32, seed=1).eval(), build_model(cfg, 16, 32, seed=2).eval()
    vec = flatten_params(src)
    load_flat_params(dst, vec)
    assert np.array_equal(flatten_params(dst), vec)
    x = torch.randint(0, 16, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    vec[:] = 0.0  # the model holds a copy, not a view of the caller's array
    assert not np.array_equal(flatten_params(dst), vec)


def test_load_rejects_bad_vectors_without_changing_the_model() -> None:
    model = build_model(GPT_CFG, 16, 32, seed=0)
    before = flatten_params(model)
    nan = before.copy()
    nan[-1] = np.nan
    for bad, msg in [
        (before[:-1], "shape"),
        (before.reshape(1, -1), "shape"),
        (nan, "NaN"),
        (before.astype(np.int32), "floating"),
    ]:
        with pytest.raises(ValueError, match=msg):
            load_flat_params(model, bad)
    assert np.array_equal(flatten_params(model), before)


def test_flatten_grads_matches_autograd_and_zero_fills() -> None:
    model = build_model(GPT_CFG, 16, 32, seed=0)
    assert not flatten_grads(model).any()  # no backward yet: zeros, right length
    assert flatten_grads(model).size == flatten_params(model).size
    x = torch.randint(0, 16, (2, 32), generator=torch.Generator().manual_seed(2))
    lm_loss(model, x, torch.roll(x, -1, dims=1)).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).numpy()
    assert np.array_equal(flatten_grads(model), expected)


# ---- trainer -------------------------------------------------------------------------------------


def test_trainers_are_deterministic_per_seed_and_shard(dataset: TokenDataset) -> None:
    a = LocalTrainer(GPT_CFG, train_cfg(), dataset, [0])
    b = LocalTrainer(GPT_CFG, train_cfg(), dataset, [0])
    c = LocalTrainer(GPT_CFG, train_cfg(), dataset, [1])
    assert np.array_equal(a.params(), c.params())  # every worker starts from the same init
    ga, la, na = a.compute_gradient()
    gb, lb, _ = b.compute_gradient()
    gc, _, _ = c.compute_gradient()
    assert na == 16 and la == lb and np.array_equal(ga, gb)
    assert not np.array_equal(ga, gc)


def test_gradient_is_a_descent_direction_and_clipped(dataset: TokenDataset) -> None:
    tr = LocalTrainer(GPT_CFG, train_cfg(gradient_clip_norm=0.05), dataset, [0])
    w = tr.params()
    g, loss, _ = tr.compute_gradient()
    assert np.linalg.norm(g) <= 0.05 * (1 + 1e-4)
    x, y = next(BatchIterator(dataset, [0], 16, seed=0))  # the same first batch
    stepped = build_model(GPT_CFG, 16, 32, seed=0)
    load_flat_params(stepped, w - 0.5 * g / np.linalg.norm(g))
    with torch.no_grad():
        assert lm_loss(stepped, torch.from_numpy(x), torch.from_numpy(y)).item() < loss
    unclipped, _, _ = LocalTrainer(GPT_CFG, train_cfg(gradient_clip_norm=0), dataset, [0]).compute_gradient()
    assert np.linalg.norm(unclipped) > 0.05


def test_local_steps_returns_params_delta(dataset: TokenDataset) -> None:
    tr = LocalTrainer(GPT_CFG, train_cfg(), dataset, [0])
    before = tr.params()
    delta, mean_loss, samples = tr.local_steps(3, lr=1e-2)
    assert samples == 48 and math.isfinite(mean_loss)
    assert np.abs(delta).max() > 0
    assert np.allclose(tr.params(), before - delta, atol=1e-6)
    for bad_h, bad_lr in [(0, 1e-2), (2.5, 1e-2), (1, 0.0), (1, float("nan"))]:
        with pytest.raises(ValueError):
            tr.local_steps(bad_h, bad_lr)  # type: ignore[arg-type]


def test_local_steps_scale_lr_by_parameter_name_prefix(dataset: TokenDataset) -> None:
    plain = LocalTrainer(NGRAM_CFG, train_cfg(), dataset, [0])
    scaled = LocalTrainer(NGRAM_CFG, train_cfg(), dataset, [0])
    table = slice(-17 * 17 * 16, None)  # the n-gram rows are registered last: (V+1)^2 rows of V logits
    plain_delta, _, _ = plain.local_steps(1, 1e-2)
    scaled_delta, _, _ = scaled.local_steps(1, 1e-2, {"ngram": 3.0, "ngram.table.weight": 4.0, "wpe": 0.5})
    # Adam's first step moves every coordinate with a gradient by lr (sign of the gradient): the factor shows.
    moved = np.abs(plain_delta[table]) > 1e-6
    assert moved.any()
    assert np.allclose(scaled_delta[table][moved], 4.0 * plain_delta[table][moved], rtol=1e-3)  # longest prefix
    wpe = next(spec for spec in layout_of(scaled.model) if spec.name == "wpe.weight")
    seg = slice(wpe.offset, wpe.offset + int(np.prod(wpe.shape)))
    assert np.allclose(scaled_delta[seg], 0.5 * plain_delta[seg], atol=1e-7)
    unscaled = np.ones(plain_delta.size, dtype=bool)
    unscaled[table] = unscaled[seg] = False
    assert np.array_equal(scaled_delta[unscaled], plain_delta[unscaled])  # factor 1: the very same steps
    fresh = LocalTrainer(NGRAM_CFG, train_cfg(), dataset, [0])
    with pytest.raises(ValueError, match="match no parameter"):
        fresh.local_steps(1, 1e-2, {"ngram": 2.0, "decoder.": 2.0})


def test_evaluate_leaves_trainer_params_alone(dataset: TokenDataset) -> None:
    tr = LocalTrainer(GPT_CFG, train_cfg(), dataset, [0])
    own = tr.params()
    other = flatten_params(build_model(GPT_CFG, 16, 32, seed=99))
    e_other = tr.evaluate(other, 4)
    assert np.array_equal(tr.params(), own)
    tr.set_params(other)
    assert tr.evaluate(None, 4) == pytest.approx(e_other, rel=1e-6)
    with pytest.raises(ValueError, match="held-out"):
        tr.evaluate(None, 10_000)


def test_add_shards_extends_training_pool(dataset: TokenDataset) -> None:
    tr = LocalTrainer(GPT_CFG, train_cfg(), dataset, [0], num_shards=4)
    tr.add_shards([3])
    assert tr.shard_ids == (0, 3)
    with pytest.raises(ValueError, match="out of range"):
        tr.add_shards([4])


def _adam_on_flat(tr: LocalTrainer, steps: int, lr: float) -> np.ndarray:
    """The loop a sync PS runs: pull params, worker gradient, numpy Adam on the flat vector."""
    w = tr.params()
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        tr.set_params(w)
        g, _, _ = tr.compute_gradient()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    return w


@pytest.mark.parametrize("cfg", TRAINED_CFGS)
def test_training_on_markov_corpus_reaches_the_entropy_floor(cfg: ModelConfig, dataset: TokenDataset) -> None:
    floor = dataset.loss_floor
    assert floor is not None
    tr = LocalTrainer(cfg, train_cfg(), dataset, [0, 1])
    initial = tr.evaluate(None, 16)
    assert abs(initial - math.log(16)) < 0.15
    final = tr.evaluate(_adam_on_flat(tr, 300, 3e-3), 16)
    assert final < 1.10 * floor
    assert final > floor - 0.05  # held-out CE cannot beat the true floor beyond sampling noise


def test_diloco_local_steps_also_converge(dataset: TokenDataset) -> None:
    tr = LocalTrainer(GPT_CFG, train_cfg(), dataset, [0])
    w = tr.params()
    for _ in range(6):  # outer SGD with lr 1 on the pseudo-gradient == plain local training
        tr.set_params(w)
        delta, _, _ = tr.local_steps(50, 3e-3)
        w = w - delta
    assert dataset.loss_floor is not None
    assert tr.evaluate(w, 16) < 1.10 * dataset.loss_floor

"""`training.device` and `training.autocast` (training.device): where a worker computes and in what precision.

Run on CPU: `auto` resolves to the CPU when torch sees no GPU (and to CUDA when it does, checked by telling
torch it has one); an explicit `cuda` without a GPU stops the trainer at construction with the reason;
bf16 and fp16 autocast train with finite losses while every vector the PS sees stays float32; fp16's loss
scaler recomputes a gradient that overflowed at a smaller scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dist_llm_train.config import ModelConfig, TrainingConfig
from dist_llm_train.training.data import TokenDataset, make_dataset
from dist_llm_train.training.device import Precision, resolve_device
from dist_llm_train.training.trainer import LocalTrainer

MODEL = ModelConfig.model_validate({"n_layer": 1, "n_head": 2, "n_embd": 32})


def train_cfg(**kw: object) -> TrainingConfig:
    base: dict[str, object] = {
        "vocab_size": 16, "seq_length": 16, "num_samples": 500, "batch_size": 8, "eval_batches": 4, "seed": 0
    }
    return TrainingConfig.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def dataset() -> TokenDataset:
    return make_dataset(train_cfg())


def trainer(dataset: TokenDataset, **kw: object) -> LocalTrainer:
    return LocalTrainer(MODEL, train_cfg(**kw), dataset, [0], num_shards=1)


def test_auto_picks_cuda_only_when_torch_sees_it(monkeypatch: pytest.MonkeyPatch, dataset: TokenDataset) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert trainer(dataset).device == torch.device("cpu")  # the default is auto
    assert next(trainer(dataset).model.parameters()).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_explicit_cuda_without_a_gpu_fails_at_construction(
    monkeypatch: pytest.MonkeyPatch, dataset: TokenDataset
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"training.device: cuda.*sees no CUDA device.*device: auto"):
        trainer(dataset, device="cuda")


def test_bad_names_are_refused() -> None:
    with pytest.raises(ValidationError):
        train_cfg(device="gpu")
    with pytest.raises(ValidationError):
        train_cfg(autocast="fp8")
    with pytest.raises(ValueError, match="training.device"):
        resolve_device("tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="training.autocast"):
        Precision("int8", torch.device("cpu"))  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_on_cpu_trains_with_float32_vectors(dataset: TokenDataset, precision: str) -> None:
    t = trainer(dataset, autocast=precision)
    assert (t.precision.scaler is not None) == (precision == "fp16")  # only fp16 needs loss scaling
    initial = t.evaluate(None, 4)
    params = t.params()
    losses = []
    for _ in range(8):  # a few SGD steps on pushed gradients, as a PS would take them
        grad, loss, samples = t.compute_gradient()
        assert grad.dtype == np.float32 and grad.shape == params.shape and np.isfinite(grad).all()
        assert np.isfinite(loss) and samples == 8
        losses.append(loss)
        params = params - 0.5 * grad
        t.set_params(params)
    assert t.params().dtype == np.float32
    assert t.evaluate(None, 4) < initial  # it learns
    delta, loss, samples = t.local_steps(3, 0.01)  # DiLoCo's inner AdamW steps, through the scaler for fp16
    assert delta.dtype == np.float32 and np.isfinite(delta).all() and np.abs(delta).sum() > 0
    assert np.isfinite(loss) and samples == 24


def test_an_fp16_gradient_that_overflows_is_recomputed_at_a_smaller_scale(dataset: TokenDataset) -> None:
    reference = trainer(dataset)  # float32, same weights and batches
    t = trainer(dataset, autocast="fp16")
    # The loss gradient at the logits is ~scale / (B*T) = 2^30 / 128: far past fp16's 65504, so it overflows.
    t.precision = Precision("fp16", t.device, init_scale=2.0**30)
    grad, _, _ = t.compute_gradient()
    scaler = t.precision.scaler
    assert scaler is not None and scaler.get_scale() < 2.0**30 / 8  # halved at least three times
    want, _, _ = reference.compute_gradient()
    assert np.isfinite(grad).all()
    cosine = float(grad @ want / (np.linalg.norm(grad) * np.linalg.norm(want)))
    assert cosine > 0.999, cosine  # the same batch's gradient, only rounded through fp16

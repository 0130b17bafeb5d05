"""One worker's local numerics: gradients for the PS, or H local AdamW steps for DiLoCo.

The trainer owns a model, a batch stream over its shards and (for local steps) an inner
optimizer; everything that crosses the network is a flat float32 numpy vector. It does no
I/O, so the worker loop, the launcher's evaluator and the tests drive it alike. The model
lives on `training.device` and trains in `training.autocast`'s precision (both resolved by the
`training.device` module); held-out losses are measured in float32, so precisions compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dist_llm_train.config import ModelConfig, TrainingConfig
from dist_llm_train.training.data import BatchIterator, TokenDataset
from dist_llm_train.training.device import Precision, resolve_device
from dist_llm_train.training.flat import flatten_grads, flatten_params, load_flat_params, num_params
from dist_llm_train.training.models import build_model, lm_loss

# fp16: a gradient that overflows is recomputed at half the loss scale; 24 halvings take the initial 2^16 below 1.
MAX_OVERFLOW_RETRIES = 24


def _derived_seed(seed: int, shard_ids: Sequence[int]) -> int:
    return int(np.random.SeedSequence([seed, *sorted(shard_ids)]).generate_state(1)[0])


class LocalTrainer:
    """Local training state of one worker.

    The initial weights depend only on `training_cfg.seed`, so every worker (and the PS's
    InitJob) starts from the same vector. Batches and dropout depend on (seed, shard ids),
    so workers differ from each other but each is reproducible. Dropout draws from torch's
    global RNG, which is seeded here: a process is expected to own one trainer. A device or
    precision this machine cannot provide is a ValueError here (see `training.device`).
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        training_cfg: TrainingConfig,
        dataset: TokenDataset,
        shard_ids: Sequence[int],
        num_shards: int | None = None,
        inner_weight_decay: float = 0.0,
    ) -> None:
        torch.set_num_threads(1)  # many worker processes share two cores
        self.model_cfg = model_cfg
        self.training_cfg = training_cfg
        self.dataset = dataset
        self.batch_size = training_cfg.batch_size
        self.clip_norm = training_cfg.gradient_clip_norm
        self.inner_weight_decay = inner_weight_decay
        self.device = resolve_device(training_cfg.device)
        self.precision = Precision(training_cfg.autocast, self.device)
        model = build_model(model_cfg, dataset.vocab_size, dataset.seq_length, training_cfg.seed)
        self.model = model.to(self.device)
        self.batches = BatchIterator(dataset, shard_ids, self.batch_size, training_cfg.seed, num_shards)
        torch.manual_seed(_derived_seed(training_cfg.seed, self.batches.shard_ids))
        self._inner_opt: torch.optim.AdamW | None = None
        # GradScaler unscales an optimizer's parameters; a pushed gradient has no optimizer, so this one only
        # names them for it and is never stepped (fp16 only).
        self._unscaled: torch.optim.Optimizer | None = None
        self._eval_model: torch.nn.Module | None = None

    @property
    def learning_rate(self) -> float:
        return self.training_cfg.learning_rate

    @property
    def shard_ids(self) -> tuple[int, ...]:
        return self.batches.shard_ids

    @property
    def num_params(self) -> int:
        return num_params(self.model)

    def params(self) -> np.ndarray:
        return flatten_params(self.model)

    def set_params(self, vec: np.ndarray) -> None:
        load_flat_params(self.model, vec)

    def add_shards(self, shard_ids: Sequence[int]) -> None:
        """Also train on these shards (a dead worker's tasks reassigned here)."""
        self.batches.add_shards(shard_ids)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.batches)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def _loss_and_backward(
        self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer | None
    ) -> tuple[float, bool]:
        """The batch's loss, with its gradients in `.grad` (unscaled and clipped); False when fp16 overflowed
        (the gradients are then unusable and the loss scale has been lowered)."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss = lm_loss(self.model, x, y)
        value = float(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value}; the parameters have diverged")
        scaler = self.precision.scaler
        if scaler is None:
            loss.backward()
            if self.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            return value, True
        assert optimizer is not None  # fp16: the scaler unscales this optimizer's parameters
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm or math.inf)
        return value, bool(torch.isfinite(norm))

    def compute_gradient(self) -> tuple[np.ndarray, float, int]:
        """Gradient of the mean loss on one batch at the current params (clipped if configured)."""
        x, y = self._next_batch()
        scaler = self.precision.scaler
        if scaler is None:
            loss, _ = self._loss_and_backward(x, y, None)
            return flatten_grads(self.model), loss, self.batch_size
        if self._unscaled is None:
            self._unscaled = torch.optim.SGD(self.model.parameters(), lr=0.0)
        for _ in range(MAX_OVERFLOW_RETRIES):
            loss, finite = self._loss_and_backward(x, y, self._unscaled)
            scaler.update()  # halves the scale after an overflow, grows it after a run of clean steps
            if finite:
                return flatten_grads(self.model), loss, self.batch_size
        raise FloatingPointError(f"fp16 gradients overflowed at every loss scale down to {scaler.get_scale()}")

    def local_steps(
        self, h: int, lr: float, lr_scale: Mapping[str, float] | None = None
    ) -> tuple[np.ndarray, float, int]:
        """Run H AdamW steps from the current params; return (params_before - params_after, mean loss, samples).

        The returned delta is DiLoCo's pseudo-gradient. The inner optimizer's moments persist
        across calls (as in DiLoCo), while the params are reset by `set_params` each round.
        `lr_scale` multiplies lr for parameters whose name starts with one of its prefixes (the
        longest matching prefix wins); it is fixed by the first call, which builds the optimizer.
        """
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise ValueError(f"h (local steps) must be an int >= 1, got {h!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if self._inner_opt is None:
            self._inner_opt = torch.optim.AdamW(
                self._lr_groups(lr_scale or {}), lr=lr, weight_decay=self.inner_weight_decay
            )
        for group in self._inner_opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        before = flatten_params(self.model)
        losses = []
        scaler = self.precision.scaler
        for _ in range(h):
            x, y = self._next_batch()
            loss, _ = self._loss_and_backward(x, y, self._inner_opt)
            losses.append(loss)
            if scaler is None:
                self._inner_opt.step()
            else:
                scaler.step(self._inner_opt)  # skipped when the gradients overflowed
                scaler.update()
        delta = before - flatten_params(self.model)
        return delta, float(np.mean(losses)), h * self.batch_size

    def _lr_groups(self, lr_scale: Mapping[str, float]) -> list[dict[str, Any]]:
        """The model's parameters as optimizer groups, one per learning-rate multiplier."""
        unused = set(lr_scale)
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            matches = [prefix for prefix in lr_scale if name.startswith(prefix)]
            unused.difference_update(matches)
            factor = lr_scale[max(matches, key=len)] if matches else 1.0
            groups.setdefault(factor, []).append(param)
        if unused:
            names = ", ".join(name for name, _ in self.model.named_parameters())
            raise ValueError(f"inner_lr_scale prefixes {sorted(unused)} match no parameter of the model ({names})")
        return [{"params": params, "lr_scale": factor} for factor, params in groups.items()]

    @torch.no_grad()
    def evaluate(self, vec: np.ndarray | None, batches: int) -> float:
        """Mean next-token cross-entropy (nats) of `vec` on the first `batches` held-out batches.

        Runs on a private copy of the model, so the trainer's own params are untouched;
        `vec=None` evaluates the current params.
        """
        if self._eval_model is None:
            self._eval_model = build_model(
                self.model_cfg, self.dataset.vocab_size, self.dataset.seq_length, self.training_cfg.seed
            ).to(self.device)
        model = self._eval_model
        load_flat_params(model, flatten_params(self.model) if vec is None else vec)
        model.eval()
        total = 0.0
        for x, y in self.dataset.heldout_batches(self.batch_size, batches):
            xs, ys = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
            total += float(lm_loss(model, xs, ys).item())  # float32: comparable across precisions
        return total / batches

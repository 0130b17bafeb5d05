"""One worker's local numerics: gradients for the PS, or H local AdamW steps for DiLoCo.

The trainer owns a model, a batch stream over its shards and (for local steps) an inner
optimizer; everything that crosses the network is a flat float32 numpy vector. It does no
I/O, so the worker loop, the launcher's evaluator and the tests drive it alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dist_llm_train.config import ModelConfig, TrainingConfig
from dist_llm_train.training.data import BatchIterator, TokenDataset
from dist_llm_train.training.flat import flatten_grads, flatten_params, load_flat_params, num_params
from dist_llm_train.training.models import build_model, lm_loss


def _derived_seed(seed: int, shard_ids: Sequence[int]) -> int:
    return int(np.random.SeedSequence([seed, *sorted(shard_ids)]).generate_state(1)[0])


class LocalTrainer:
    """Local training state of one worker.

    The initial weights depend only on `training_cfg.seed`, so every worker (and the PS's
    InitJob) starts from the same vector. Batches and dropout depend on (seed, shard ids),
    so workers differ from each other but each is reproducible. Dropout draws from torch's
    global RNG, which is seeded here: a process is expected to own one trainer.
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
        self.model = build_model(model_cfg, dataset.vocab_size, dataset.seq_length, training_cfg.seed)
        self.batches = BatchIterator(dataset, shard_ids, self.batch_size, training_cfg.seed, num_shards)
        torch.manual_seed(_derived_seed(training_cfg.seed, self.batches.shard_ids))
        self._inner_opt: torch.optim.AdamW | None = None
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

    def _loss_and_backward(self) -> float:
        x, y = next(self.batches)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = lm_loss(self.model, torch.from_numpy(x), torch.from_numpy(y))
        value = float(loss.item())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value}; the parameters have diverged")
        loss.backward()
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        return value

    def compute_gradient(self) -> tuple[np.ndarray, float, int]:
        """Gradient of the mean loss on one batch at the current params (clipped if configured)."""
        loss = self._loss_and_backward()
        return flatten_grads(self.model), loss, self.batch_size

    def local_steps(self, h: int, lr: float) -> tuple[np.ndarray, float, int]:
        """Run H AdamW steps from the current params; return (params_before - params_after, mean loss, samples).

        The returned delta is DiLoCo's pseudo-gradient. The inner optimizer's moments persist
        across calls (as in DiLoCo), while the params are reset by `set_params` each round.
        """
        if not isinstance(h, int) or isinstance(h, bool) or h < 1:
            raise ValueError(f"h (local steps) must be an int >= 1, got {h!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if self._inner_opt is None:
            self._inner_opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=self.inner_weight_decay)
        for group in self._inner_opt.param_groups:
            group["lr"] = lr
        before = flatten_params(self.model)
        losses = []
        for _ in range(h):
            losses.append(self._loss_and_backward())
            self._inner_opt.step()
        delta = before - flatten_params(self.model)
        return delta, float(np.mean(losses)), h * self.batch_size

    @torch.no_grad()
    def evaluate(self, vec: np.ndarray | None, batches: int) -> float:
        """Mean next-token cross-entropy (nats) of `vec` on the first `batches` held-out batches.

        Runs on a private copy of the model, so the trainer's own params are untouched;
        `vec=None` evaluates the current params.
        """
        if self._eval_model is None:
            self._eval_model = build_model(
                self.model_cfg, self.dataset.vocab_size, self.dataset.seq_length, self.training_cfg.seed
            )
        model = self._eval_model
        load_flat_params(model, flatten_params(self.model) if vec is None else vec)
        model.eval()
        total = 0.0
        for x, y in self.dataset.heldout_batches(self.batch_size, batches):
            total += float(lm_loss(model, torch.from_numpy(x), torch.from_numpy(y)).item())
        return total / batches

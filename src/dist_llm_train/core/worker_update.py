"""What one worker sends each step: its strategy's honest update, then attack, local DP and the codec.

Every strategy's update goes through the same pipeline on the worker:

    strategy.compute(trainer) -> (attack, if this worker is a configured attacker)
                              -> (local DP: clip + Gaussian noise) -> codec with error feedback

Built once per job from the job's sub-configs (`config.TrainingConfig.worker_update` does that).
numpy only: the trainer is reached through the `core.strategies.Trainer` protocol.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dist_llm_train.core.attacks import AttackConfig, Attacker, is_attacker
from dist_llm_train.core.codecs import Codec, CodecConfig, Encoded, ErrorFeedback
from dist_llm_train.core.privacy import DPSettings, LocalDP
from dist_llm_train.core.strategies import Strategy, Trainer


@dataclass
class Update:
    vec: np.ndarray
    kind: str  # the strategy's update kind: "gradient" | "pseudo_gradient"
    loss: float
    samples: int
    slot: int = 0  # the part of the parameters it covers (Streaming DiLoCo's fragment); error feedback's key


def derived_seed(base: int, worker_name: str, shard_ids: Sequence[int]) -> int:
    """A per-worker seed: the same worker on the same shards always draws the same stream."""
    seq = np.random.SeedSequence([base, zlib.crc32(worker_name.encode()), *sorted(shard_ids)])
    return int(seq.generate_state(1)[0])


class WorkerUpdate:
    """One worker's update pipeline for one job."""

    def __init__(
        self,
        strategy: Strategy,
        codec: CodecConfig,
        *,
        num_workers: int,
        seed: int,
        attack: AttackConfig | None = None,
        privacy: DPSettings | None = None,
        worker_name: str = "",
        shard_ids: Sequence[int] = (),
        num_shards: int = 1,
        dp_seed: int | None = None,
        momentum: float = 0.0,
    ) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"worker momentum must be in [0, 1), got {momentum!r}")
        self.strategy = strategy
        # Worker momentum (Karimireddy et al., ICML 2021): send m <- (1 - b)·g + b·m instead of g. Averaging
        # over ~1/(1 - b) steps shrinks the honest updates' spread, so centered clipping's radius can be small.
        self.momentum = float(momentum)
        self._momentum_buf: np.ndarray | None = None
        self.codec: Codec = codec.build()
        # One residual per slot: a fragment's dropped mass belongs to that fragment's next sync.
        self.feedback: dict[int, ErrorFeedback] | None = {} if codec.uses_error_feedback else None
        self.attacker: Attacker | None = None
        if attack is not None and is_attacker(worker_name, shard_ids, num_shards, attack.attackers, attack.workers):
            self.attacker = Attacker(attack.build(num_workers), derived_seed(seed, worker_name, shard_ids))
        # An attacker ignores the protocol, privacy included; central DP happens on the PS. A real worker
        # passes no `dp_seed`, so noise comes from OS entropy: a restarted worker must never replay the
        # noise of earlier releases. Tests and in-process simulations pass one to make a run repeatable;
        # each worker then draws from its own stream, derived like the attacker's.
        local = privacy is not None and privacy.mode == "local" and self.attacker is None
        noise_seed = None if dp_seed is None else derived_seed(dp_seed, worker_name, shard_ids)
        self.dp = LocalDP(privacy, noise_seed) if local and privacy is not None else None
        self._pulled = False  # `after_pull` has run once

    def train_shards(self, own: Sequence[int], pick_target: Callable[[], int]) -> list[int]:
        """The shards this worker's trainer draws from: its own, or, for an attack that copies another worker
        (mimic), that worker's; `pick_target` chooses one when the attack does not name it."""
        if self.attacker is None:
            return list(own)
        return self.attacker.attack.train_shards(own, pick_target)

    @property
    def kind(self) -> str:
        return self.strategy.update_kind

    def compute(self, trainer: Trainer) -> Update:
        """The update to push, computed at the trainer's current parameters."""
        honest = self.strategy.compute(trainer)
        vec = honest.vec
        if self.momentum > 0 and self.attacker is None:
            buf = self._momentum_buf
            if buf is None or buf.shape != vec.shape:  # the first update is the first gradient: no zero-start bias
                buf = vec.astype(np.float64)
            else:
                buf = (1 - self.momentum) * vec + self.momentum * buf
            self._momentum_buf = buf
            vec = buf.astype(np.float32)
        if self.attacker is not None:
            # More draws of the honest update on the attacker's own data, for attacks that estimate the
            # honest spread; a strategy whose update is not one batch's gradient offers only its own.
            estimates = [vec]
            if self.strategy.update_kind == "gradient":
                estimates += [trainer.compute_gradient()[0] for _ in range(self.attacker.samples - 1)]
            vec = self.attacker.craft(np.stack(estimates))
        elif self.dp is not None:
            vec = self.dp.privatize(vec)
        return Update(np.asarray(vec, dtype=np.float32), self.kind, honest.loss, honest.samples, honest.slot)

    def encode(self, vec: np.ndarray, slot: int = 0) -> Encoded:
        if self.feedback is None:
            return self.codec.encode(vec)
        feedback = self.feedback.get(slot)
        if feedback is None:
            feedback = self.feedback[slot] = ErrorFeedback(self.codec, self.strategy.error_feedback_decay)
        return feedback.compress(vec)

    def receive(self, trainer: Trainer, params: np.ndarray, version: int) -> None:
        """A pull arrived: the strategy decides what it does to the trainer's parameters."""
        self.strategy.receive(trainer, params, version)

    @property
    def overlap_steps(self) -> int:
        return self.strategy.overlap_steps

    def overlap(self, trainer: Trainer) -> tuple[float, int]:
        return self.strategy.overlap(trainer)

    def after_pull(self, trainer: Trainer, params: np.ndarray, version: int) -> Update:
        """For in-process drivers (the simulator, reference loops): what the worker loop does from one pull to
        the next update, in its order — the overlap steps of the sync just done (none before the first
        pull), the pulled parameters received, the next update computed."""
        if self._pulled and self.overlap_steps > 0:
            self.overlap(trainer)
        self._pulled = True
        self.receive(trainer, params, version)
        return self.compute(trainer)

    def next_min_version(self, version: int) -> int:
        return self.strategy.next_min_version(version)

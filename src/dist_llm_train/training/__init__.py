"""The torch side: models, corpora and sharding, and the local trainer a worker (or the simulator) runs.

`models` (GPT, LSTM), `corpora` / `data` / `sharding` (seeded Markov and char corpora, IID or Dirichlet
shards), `trainer.LocalTrainer` (gradients and local steps; satisfies `core.strategies.Trainer`), `flat`
(model <-> flat float32 vector + layout). Strategies, codecs, aggregation and DP are numpy and live in `core`.
"""

__all__ = ["corpora", "data", "flat", "models", "sharding", "trainer"]

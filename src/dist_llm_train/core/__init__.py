"""The numpy-only core both the parameter server and the torch side build on; no I/O, no torch.

- `types`: transport-neutral wire types (push header and result, tensor layout, job stats, errors);
- `job`: `JobSpec`, a job as the PS sees it, and its wire form;
- `strategies`: the training strategies, one object each, and their registry;
- `codecs`, `aggregation`, `privacy`, `attacks`: the update codecs (with error feedback), the
  aggregation rules, differential privacy (and its accountant), the Byzantine attacks;
- `worker_update`: a worker's pipeline from its strategy's update to the bytes it pushes;
- `availability`: availability traces of transient workers (sessions, validation) and their seeded generators.
"""

__all__ = [
    "aggregation",
    "attacks",
    "availability",
    "codecs",
    "job",
    "privacy",
    "strategies",
    "types",
    "worker_update",
]

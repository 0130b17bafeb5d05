"""A worker: the asyncio agent (register, heartbeat, assignments, telemetry) and the training-loop thread.

`agent` (the agent), `training_loop` (pull, compute with the job's `core.worker_update` pipeline, push),
`controller_api` (the agent's `AsyncControllerClient` with per-class DSCP marks), `links` (shaped-link
reports), `metrics`.
"""

__all__ = ["agent", "controller_api", "links", "metrics", "training_loop"]

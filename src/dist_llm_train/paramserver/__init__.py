"""The parameter server: numpy only, never torch.

`job` (request checks, one job's rules, `ParameterStore`), `optim` (server optimizers), `numerics` (payload
to a safe vector), `checkpoint`, `metrics`, `server` / `background` (the process), and `transport/`
(gRPC and ZMQ servers and clients over the same store).
"""

__all__ = ["background", "checkpoint", "job", "metrics", "numerics", "optim", "server", "transport"]

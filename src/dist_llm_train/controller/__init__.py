"""The controller: workers, jobs → tasks, schedulers, failure detection, /status and /metrics.

`app.create_app` builds the FastAPI app, `server.serve` runs it under uvicorn. State lives
in SQLite (`store`), decisions in `service` and `schedulers/`, the background loop in
`failure`, and the parameter server is told about job membership through `membership`.
The controller never imports torch.

What the package exports is the client side: `ControllerClient` / `AsyncControllerClient`
(`client`) with the errors they raise. Importing it needs httpx and pydantic only, not
FastAPI, so a worker image can talk to the controller without the server's dependencies.
"""

from dist_llm_train.controller.client import AsyncControllerClient, ControllerClient, ControllerUnavailable, Retry
from dist_llm_train.controller.errors import BadInput, Conflict, ControllerError, NotFound, Unauthorized, UnknownWorker

__all__ = [
    "AsyncControllerClient",
    "BadInput",
    "Conflict",
    "ControllerClient",
    "ControllerError",
    "ControllerUnavailable",
    "NotFound",
    "Retry",
    "Unauthorized",
    "UnknownWorker",
]

"""The controller: workers, jobs → tasks, schedulers, failure detection, /status and /metrics.

`app.create_app` builds the FastAPI app, `server.serve` runs it under uvicorn. State lives
in SQLite (`store`), decisions in `service` and `schedulers/`, the background loop in
`failure`, and the parameter server is told about job membership through `membership`.
The controller never imports torch.
"""

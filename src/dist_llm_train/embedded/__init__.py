"""Embedded mode: every service as a local process on loopback, driven by `dist-llm-train run`.

`launcher.EmbeddedRun` starts and follows a run, `processes` starts and stops the children, `supervision`
restarts a dead parameter server or controller, `report` writes the run folder (config, metrics CSV, JSON +
markdown summary, plots), `availability` kills and restarts workers as an availability trace says,
`basic_demo` is `demo-basic`.
"""

__all__ = ["availability", "basic_demo", "launcher", "processes", "report", "supervision"]

"""Embedded mode: every service as a local process on loopback, driven by `dist-llm-train run`.

`launcher.EmbeddedRun` starts and follows a run, `processes` supervises the children, `report` writes the
run folder (config, metrics CSV, JSON + markdown summary, plots), `basic_demo` is `demo-basic`.
"""

__all__ = ["basic_demo", "launcher", "processes", "report"]

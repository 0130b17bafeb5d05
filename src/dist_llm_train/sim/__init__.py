"""The one simulator: training runs on a virtual clock, from real numerics at a few workers to 100k workers.

Real numerics: `numerics.simulate_training` trains the real model with the real strategies against the
real `ParameterStore`. Infrastructure only (no maths, thousands of workers):
`runner.simulate(SimConfig)` runs one; `request.run_request` resolves files and flags into one and writes its
report (what `dist-llm-train simulate` calls); `experiment.run_cell` is the `run-experiments --backend sim`
hook. See docs/simulation.md.
"""

__all__ = ["numerics", "request", "runner"]

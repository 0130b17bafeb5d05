"""Discrete-event simulation of training runs with thousands of virtual workers.

`runner.simulate(SimConfig)` runs one; `request.run_request` resolves files and flags into one and writes its
report (what `dist-llm-train simulate` calls); `experiment.run_cell` is the `run-experiments --backend sim`
hook. See docs/simulation.md.
"""

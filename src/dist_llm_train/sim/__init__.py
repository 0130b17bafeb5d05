"""Discrete-event simulation of training runs with thousands of virtual workers.

`runner.simulate(SimConfig)` runs one; `cli.simulate` is the `dist-llm-train simulate` command;
`experiment.run_cell` is the `run-experiments --backend sim` hook. See docs/simulation.md.
"""

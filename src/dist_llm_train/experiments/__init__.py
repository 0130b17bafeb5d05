"""Experiment grids: one base config, a few axes, every cell run on a backend and reported side by side.

`grid` (the grid file and its cells), `runner` (resumable runs), `backends` (embedded processes or the
simulator), `store`, `metrics`, `report`, `figures` / `plots`, `physics` (the link-physics bound), `machine`.
See docs/experiments.md.
"""

__all__ = ["backends", "figures", "grid", "machine", "metrics", "physics", "plots", "report", "runner", "store"]

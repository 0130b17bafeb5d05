"""dist-llm-train: a lab for training language models across bad networks.

Packages (docs/architecture.md has the map and the layers): `core` (numpy-only maths, wire types and the
training strategies), `config`, `training` (the torch side), `netem` (link shaping), `paramserver`,
`controller`, `worker`, `embedded` (`dist-llm-train run`), `experiments`, `sim`, `cli`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

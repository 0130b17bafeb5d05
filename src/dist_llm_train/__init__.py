"""dist-llm-train: a lab for training language models across bad networks."""

__version__ = "0.1.0"

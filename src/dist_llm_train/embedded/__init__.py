"""Embedded mode: every service as a local process on loopback, driven by `dist-llm-train run`."""

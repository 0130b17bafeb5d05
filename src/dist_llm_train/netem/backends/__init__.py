"""Shaping backends; importing this package registers every backend in `base.REGISTRY`."""

from dist_llm_train.netem.backends import (
    kernel_fallback,  # noqa: F401
    tc_netem,  # noqa: F401
    userspace,  # noqa: F401
)

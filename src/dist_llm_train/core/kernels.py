"""The codecs' native inner loops (`_kernels.c`), or None where they cannot run.

`setup.py` compiles `_kernels.c` into a plain shared library next to this file when the install has a C
compiler (optional: without one the install still succeeds). This module loads it with ctypes, which
releases the GIL for every call, and checks the CPU can run it (x86-64 with AVX2 and F16C). `NATIVE` is the
loaded library or None; codecs.py uses it when it is there and its numpy path otherwise, and both give the
same bytes (tests/unit/test_kernels.py). `DLT_NATIVE_KERNELS=0` in the environment turns the native path off
(to compare the two, or to rule it out).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_SIZE = ctypes.c_size_t
_PTR = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "dlt_cpu_ok": (ctypes.c_int, []),
    "dlt_f32_to_f16": (ctypes.c_int64, [_PTR, _PTR, _SIZE]),
    "dlt_f16_to_f32": (ctypes.c_int, [_PTR, _PTR, _SIZE]),
    "dlt_int8_encode": (ctypes.c_int, [_PTR, _SIZE, _SIZE, _PTR, _PTR]),
    "dlt_int8_decode": (None, [_PTR, _PTR, _SIZE, _SIZE, _PTR]),
    "dlt_lowbit_encode": (ctypes.c_int, [_PTR, _SIZE, _SIZE, ctypes.c_int, _PTR, _PTR]),
    "dlt_lowbit_decode": (ctypes.c_int, [_PTR, _PTR, _SIZE, _SIZE, ctypes.c_int, _PTR]),
    "dlt_at_least": (ctypes.c_int64, [_PTR, _SIZE, ctypes.c_float, _PTR, ctypes.c_int64]),
    "dlt_sparse_encode": (ctypes.c_int, [_PTR, _SIZE, _SIZE, _SIZE, ctypes.c_int, ctypes.c_int] + [_PTR] * 7),
    "dlt_sparse_decode": (ctypes.c_int, [_PTR, _PTR, _PTR, _SIZE, _SIZE, _SIZE, ctypes.c_int, ctypes.c_int, _PTR,
                                         _PTR]),
}


def library_path() -> Path | None:
    """The compiled `_kernels` shared library beside this file, if the install built one."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_kernels{suffix}"
        if candidate.is_file():
            return candidate
    return None


def enabled_by_environment() -> bool:
    return os.environ.get("DLT_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def load() -> ctypes.CDLL | None:
    """The library with its signatures declared, or None (not built, turned off, or this CPU cannot run it)."""
    if not enabled_by_environment():
        return None
    path = library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as err:  # a stale or foreign build: the numpy path still works
        log.warning("codec kernels at %s not usable (%s); using numpy", path, err)
        return None
    return lib if lib.dlt_cpu_ok() else None


def address(arr: np.ndarray) -> int:
    """The address of a contiguous array's first element, for a kernel argument."""
    assert arr.flags.c_contiguous, "kernels take contiguous arrays"
    return int(arr.ctypes.data)


NATIVE = load()

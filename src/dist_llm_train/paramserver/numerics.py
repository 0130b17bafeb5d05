"""Received bytes to a safe vector: decode a pushed update with the job's codec, and check it.

The codecs live in `dist_llm_train.core.codecs` (numpy only, so the PS stays torch-free);
this module adapts them to the store's contract: bad input raises
`PSError(INVALID_ARGUMENT)`, and a decoded update is a finite flat float32 vector of exactly
the job's length. The `none` codec keeps a zero-copy fast path here because it is the bulk
of PS ingest: the registry's generic decode copies the payload twice before checking it.
The transports keep that path copy-free by handing over aligned views of what they received
(ZMQ frames as they are, gRPC's unary push with padding; see `wire.encode_push_request`).
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from dist_llm_train.core.codecs import all_finite, get_codec
from dist_llm_train.core.types import ErrorCode, PSError

# all_finite: core's, re-exported for job and checkpoint
__all__ = [
    "all_finite",
    "decode_update",
    "hugepage_malloc_active",
    "keep_freed_vectors",
    "unpack_meta",
    "with_hugepage_malloc",
]

Buffer = bytes | bytearray | memoryview


def unpack_meta(meta: bytes) -> dict[str, Any]:
    """A push's `codec_meta` bytes as the codec's meta dict; PSError(INVALID_ARGUMENT) when they are not one."""
    if not meta:
        return {}
    try:
        out = msgpack.unpackb(meta, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"codec_meta is not valid msgpack: {err}") from None
    if out is None:
        return {}
    if not isinstance(out, dict):
        raise PSError(ErrorCode.INVALID_ARGUMENT, "codec_meta must be a msgpack map")
    return out


def _decode(codec: str, meta: dict[str, Any], payload: Buffer, size: int) -> np.ndarray:
    if codec == "none":  # raw little-endian float32: a view, no copy
        if len(payload) != 4 * size:
            raise ValueError(f"none payload is {len(payload)} bytes; a vector of {size} needs {4 * size}")
        vec = np.frombuffer(payload, dtype="<f4")
        # A payload at an odd offset in a receive buffer gives a misaligned view, on which BLAS
        # refuses to work and every later pass runs numpy's slow unaligned loops: one copy is cheaper.
        vec = vec if vec.flags.aligned else vec.copy()
        if not all_finite(vec):
            raise ValueError("update contains NaN or Inf")
        return vec
    # The codec reads the received buffer in place, and refuses a payload that decodes to NaN or Inf itself.
    return get_codec(codec).decode_payload(payload, meta, size)


def decode_update(codec: str, meta: bytes, payload: Buffer, size: int) -> np.ndarray:
    """Decode one pushed payload into a finite float32 vector of `size` elements.

    The result may be a read-only view of `payload`; callers must not write to it.
    """
    meta_dict = unpack_meta(meta)
    try:
        vec = _decode(codec, meta_dict, payload, size)
    except (ValueError, TypeError, KeyError) as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"cannot decode {codec!r} update: {err}") from None
    vec = np.asarray(vec, dtype=np.float32).reshape(-1)
    if vec.shape[0] != size:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"update has {vec.shape[0]} elements, job has {size}")
    return vec


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)


def keep_freed_vectors() -> bool:
    """Make glibc's malloc keep freed parameter-sized blocks for reuse (process-wide, idempotent).

    Every applied push allocates a fresh parameter vector (see `optim`) and drops the received
    buffer. With glibc's defaults such multi-MB blocks are given back to the kernel when freed
    (unmapped, or the heap trimmed) and the next one faults every 4 KiB page back in: the
    gRPC server measured 600-2000 page faults and up to 2 ms per 4 MB push that way. Keeping
    blocks up to 32 MiB in the heap (and never trimming it) removes that; the price is that the
    process keeps its peak heap. Vectors over 32 MiB are still mapped per allocation. Returns
    False, changing nothing, where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok)


_HUGETLB = "glibc.malloc.hugetlb"


def with_hugepage_malloc(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with glibc's `malloc.hugetlb=1` tunable added, for a process to be started with it (glibc reads
    tunables once, at start-up; an explicit `glibc.malloc.hugetlb` setting already in `env` is kept).

    With it malloc asks for transparent huge pages (madvise) on the blocks it maps, and the transports' receive
    buffers for big updates are such blocks: libzmq and gRPC allocate each received message, and a block over
    the 32 MiB mmap threshold (`keep_freed_vectors`) is mapped afresh every time, one page fault per 4 KiB.
    With 2 MiB pages the PS took 64 MB pushes 1.8-2.1x faster over gRPC and 1.4-1.7x over ZMQ (two side-by-side
    runs of benchmarks/ps_throughput.py with `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` and without; 4 MB pushes:
    no difference beyond noise). Other C libraries ignore the variable."""
    out = dict(env)
    current = out.get("GLIBC_TUNABLES", "")
    if f"{_HUGETLB}=" not in current:
        out["GLIBC_TUNABLES"] = f"{current}:{_HUGETLB}=1" if current else f"{_HUGETLB}=1"
    return out


def hugepage_malloc_active() -> bool:
    """True when this process was started with a `glibc.malloc.hugetlb` tunable (on, or explicitly off)."""
    return f"{_HUGETLB}=" in os.environ.get("GLIBC_TUNABLES", "")

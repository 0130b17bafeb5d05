"""The codecs' native kernels (core/_kernels.c) against the numpy path they replace.

The two must give the same payload bytes for the same vector and the same float32 bits for the same payload
(a worker built without a compiler talks to a PS built with one), and refuse the same bad input. Vectors are
chosen where exactness is at stake: every finite half and the midpoints between them, subnormals, signed
zeros, all-zero and tiny chunks, magnitudes near float32's max and beyond float16's, ragged lengths that
leave tails for the scalar loops, and NaN / Inf at every kind of position.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dist_llm_train.core import codecs, kernels
from dist_llm_train.core.codecs import Encoded, get_codec

CASES: list[tuple[str, dict[str, Any]]] = [
    ("fp16", {}),
    ("int8", {"chunk": 1024}),
    ("int8", {"chunk": 7}),
    ("int8", {"chunk": 1}),
    ("int4", {"chunk": 128}),
    ("int4", {"chunk": 5}),
    ("int2", {"chunk": 128}),
    ("int2", {"chunk": 3}),
    ("topk", {"ratio": 0.01, "index": "delta"}),
    ("topk", {"ratio": 0.1, "index": "int32"}),
    ("sparseloco", {"ratio": 0.01, "chunk": 4096, "bits": 2}),
    ("sparseloco", {"ratio": 0.03, "chunk": 1024, "bits": 4}),
    ("sparseloco", {"ratio": 0.25, "chunk": 8, "bits": 8}),
    ("sparseloco", {"ratio": 0.5, "chunk": 2, "bits": 2}),
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items())}" for name, params in CASES]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


needs_native = pytest.mark.skipif(kernels.NATIVE is None, reason="native codec kernels not built or turned off")


@pytest.fixture
def numpy_path() -> Iterator[None]:
    saved = codecs.NATIVE
    codecs.NATIVE = None
    try:
        yield
    finally:
        codecs.NATIVE = saved


def both(fn: Any) -> tuple[Any, Any]:
    """fn() with the native kernels, then with numpy: each a value or the ValueError it raised."""
    results = []
    saved = codecs.NATIVE
    for native in (saved, None):
        codecs.NATIVE = native
        try:
            results.append(fn())
        except ValueError as err:
            results.append(err)
        finally:
            codecs.NATIVE = saved
    return results[0], results[1]


def assert_same_encoding(name: str, params: dict[str, Any], vec: np.ndarray) -> None:
    codec = get_codec(name, **params)
    native, reference = both(lambda: codec.encode(vec))
    if isinstance(reference, ValueError):
        assert isinstance(native, ValueError), f"numpy refused ({reference}); native encoded"
        return
    assert isinstance(native, Encoded), f"native refused ({native}); numpy encoded"
    assert native.meta == reference.meta
    assert native.payload == reference.payload
    decoded = both(lambda: codec.decode(reference, vec.size))
    if isinstance(decoded[1], ValueError):  # e.g. int8 of values near float32's max: its scale check refuses
        assert isinstance(decoded[0], ValueError), f"numpy refused to decode ({decoded[1]}); native decoded"
        return
    assert decoded[0].dtype == decoded[1].dtype == np.float32
    assert np.array_equal(decoded[0].view(np.uint32), decoded[1].view(np.uint32))  # bit for bit, -0.0 too


def hard_vector(size: int, seed: int) -> np.ndarray:
    """Gaussian values with the hard cases scattered in: zeros of both signs, an all-zero stretch, subnormals,
    exact ties of the roundings, values beyond float16's range and near float32's."""
    rng = np.random.default_rng(seed)
    vec = rng.normal(0, 0.01, size).astype(np.float32)
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 1.2e-38, 2**-25, 3 * 2**-26, 65504, 65520, -7e4, 1e38,
                         -3.4e38, 0.5, 1.5, -2.5], np.float32)
    where = rng.choice(size, size=min(size, 64), replace=False)
    vec[where] = rng.choice(specials, size=where.size)
    if size >= 3000:
        vec[1000:2100] = 0.0  # whole zero chunks for every chunk size above
        vec[2500:2600] = 1e-40  # a run of subnormals: subnormal scales
    return vec


def test_kernels_are_built_where_they_can_run() -> None:
    """`make install` compiles them (setup.py, optional=True): on x86-64 with a C compiler and a CPU with AVX2
    and F16C they must be there, or every native test here would silently skip."""
    can = platform.machine() in ("x86_64", "AMD64") and {"avx2", "f16c"} <= _cpu_flags()
    if not (can and (shutil.which("cc") or shutil.which("gcc"))):
        pytest.skip("this machine cannot build or run the kernels: the numpy path serves")
    if not kernels.enabled_by_environment():
        pytest.skip("DLT_NATIVE_KERNELS turns them off in this environment")
    assert kernels.library_path() is not None, "the install did not compile core/_kernels.c (see setup.py)"
    assert kernels.NATIVE is not None


@needs_native
def test_the_environment_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLT_NATIVE_KERNELS", "0")
    assert kernels.load() is None
    monkeypatch.setenv("DLT_NATIVE_KERNELS", "1")
    assert kernels.load() is not None


@needs_native
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("size", [1, 7, 8, 15, 16, 17, 129, 4095, 4096, 5003, 70_001])
def test_same_bytes_and_bits_on_hard_vectors(name: str, params: dict[str, Any], size: int) -> None:
    assert_same_encoding(name, params, hard_vector(size, seed=size))


@needs_native
def test_fp16_every_finite_half_and_every_midpoint() -> None:
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    values = np.unique(halves[np.isfinite(halves)].astype(np.float64))
    mids = (values[1:] + values[:-1]) / 2
    points = np.concatenate([values, mids]).astype(np.float32)
    vec = np.concatenate([points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(-np.inf))])
    assert_same_encoding("fp16", {}, vec)


@needs_native
@settings(max_examples=150, deadline=None)
@given(
    case=st.sampled_from(CASES),
    vec=hnp.arrays(np.float32, st.integers(1, 6000),
                   elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)),
)
def test_same_bytes_and_bits_on_any_finite_vector(case: tuple[str, dict[str, Any]], vec: np.ndarray) -> None:
    assert_same_encoding(case[0], case[1], vec)


@needs_native
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("position", [0, 5, 9, 4999, 5002])
def test_nan_and_inf_are_refused_at_any_position(name: str, params: dict[str, Any], bad: float, position: int) -> None:
    vec = hard_vector(5003, seed=1)
    vec[position] = bad
    native, reference = both(lambda: get_codec(name, **params).encode(vec))
    assert isinstance(native, ValueError) and isinstance(reference, ValueError)


@needs_native
@pytest.mark.parametrize("code", [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFFFF])
@pytest.mark.parametrize("position", [0, 8, 1002])
def test_fp16_decode_refuses_inf_and_nan_codes(code: int, position: int) -> None:
    half = np.zeros(1003, np.uint16)
    half[position] = code
    native, reference = both(lambda: get_codec("fp16").decode(Encoded(half.tobytes(), {"saturated": 0}), half.size))
    assert isinstance(native, ValueError) and isinstance(reference, ValueError)


@needs_native
@pytest.mark.parametrize("position", [0, 15, 16, 999])
def test_int4_decode_refuses_the_code_that_names_no_level(position: int) -> None:
    codec = get_codec("int4", chunk=128)
    vec = hard_vector(1000, seed=3)
    payload = bytearray(codec.encode(vec).payload)
    n_chunks = -(-vec.size // 128)
    byte = 4 * n_chunks + position // 2
    payload[byte] &= 0xF0 if position % 2 == 0 else 0x0F  # that element's code is now 0
    native, reference = both(lambda: codec.decode(Encoded(bytes(payload), {"chunk": 128}), vec.size))
    assert isinstance(native, ValueError) and isinstance(reference, ValueError)


@needs_native
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_decodes_a_received_buffer_at_an_unaligned_address(name: str, params: dict[str, Any]) -> None:
    """Transports hand the PS memoryviews into their frames, at any offset: the kernels read unaligned."""
    codec = get_codec(name, **params)
    vec = np.clip(hard_vector(5003, seed=4), -1e30, 1e30)  # int8's decoder refuses scales near float32's max
    enc = codec.encode(vec)
    frame = bytearray(b"\x01" + enc.payload)
    native, reference = both(lambda: codec.decode_payload(memoryview(frame)[1:], enc.meta, vec.size))
    assert np.array_equal(native.view(np.uint32), reference.view(np.uint32))


@needs_native
def test_top_k_candidate_scan_overflowing_its_first_guess() -> None:
    """A threshold that lets through more than the room first allotted: the scan counts past it and the
    second call, with room for all, returns every candidate."""
    vec = np.ones(10_000, np.float32)
    vec[::3] = 2.0
    got = codecs._at_least(vec, 1.0, expect=16)
    assert np.array_equal(got, np.arange(10_000))
    assert np.array_equal(codecs._at_least(vec, 1.5, expect=16), np.arange(0, 10_000, 3))


@needs_native
@pytest.mark.parametrize("ratio", [0.01, 0.05])
def test_sparseloco_selection_when_its_sampled_threshold_is_too_high(ratio: float) -> None:
    """The native selection estimates each chunk's threshold from every 16th element: put the largest values
    exactly there and the estimate lets through fewer than k, so the chunk is searched whole; ties everywhere
    else decide by position. Same bytes as numpy either way."""
    vec = np.full(3 * 4096 + 1000, 1e-3, np.float32)
    vec[::16] = np.linspace(1.0, 2.0, vec[::16].size, dtype=np.float32)
    vec[5::97] = 0.5
    assert_same_encoding("sparseloco", {"ratio": ratio, "chunk": 4096, "bits": 4}, vec)
    assert_same_encoding("sparseloco", {"ratio": ratio, "chunk": 4096, "bits": 2}, -vec)


@needs_native
def test_sparseloco_residual_of_a_bad_payload_leaves_out_as_it_was() -> None:
    """The kernel checks the streams before it copies `sent` into `out` and subtracts, as numpy checks first."""
    codec = get_codec("sparseloco", ratio=0.25, chunk=8, bits=4)
    sent = hard_vector(1000, seed=5)
    enc = codec.encode(sent)
    n_chunks = -(-sent.size // 8)
    bad = bytearray(enc.payload)
    bad[4 * n_chunks] &= 0xF0  # the first kept value's 4-bit code is now 0, which names no level
    for native in (codecs.NATIVE, None):
        out = np.full(sent.size, 7.0, np.float32)
        saved, codecs.NATIVE = codecs.NATIVE, native
        try:
            with pytest.raises(ValueError, match="code 0"):
                codec.residual(sent, Encoded(bytes(bad), enc.meta), out)
        finally:
            codecs.NATIVE = saved
        assert (out == 7.0).all()
    native, reference = both(lambda: codec.residual(sent, enc))
    assert np.array_equal(native.view(np.uint32), reference.view(np.uint32))


@needs_native
def test_kernels_run_on_several_threads_at_once() -> None:
    """ctypes releases the GIL for each call and the kernels keep no state: the PS decodes on several
    threads, and each must get its own exact answer."""
    from concurrent.futures import ThreadPoolExecutor

    codec = get_codec("int4", chunk=128)
    vectors = [hard_vector(200_003, seed=s) for s in range(4)]
    encoded = [codec.encode(v) for v in vectors]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda e: codec.decode(e, 200_003), encoded * 3))
    saved = codecs.NATIVE
    codecs.NATIVE = None
    try:
        expected = [codec.decode(e, 200_003) for e in encoded]
    finally:
        codecs.NATIVE = saved
    for i, out in enumerate(outs):
        assert np.array_equal(out.view(np.uint32), expected[i % 4].view(np.uint32))

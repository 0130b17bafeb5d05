"""Codec throughput: encode + decode of each codec vs numpy memcpy of the same bytes, in one run.

For a float32 vector of `--size` elements (default 1M = 4 MB), each row times one encode
followed by one decode (what one update costs the worker plus the PS) and reports raw MB/s
(the vector's 4·d bytes over the round-trip time) and the ratio to `np.copyto` of the same
4·d bytes timed in the same interleaved repeats, so every ratio compares runs that saw the
same machine load; each figure is the best of the repeats (the least disturbed on a shared machine).
The issue's target is a ratio >= 0.25. Compression ratios (raw bytes /
payload bytes, index bytes included for top-k) are reported too.

The current codecs use the native kernels (`core/_kernels.c`) when the install compiled them (the
table says whether it did). `--baseline numpy` (the default) times the same `core/codecs.py` with the
kernels off, its numpy path, in the same interleaved loop, so the table shows both ratios and the
speed-up side by side; `--baseline REV` loads `core/codecs.py` as it was at that git revision instead
(e.g. 8c9ec4c, before the numpy fast paths); `--baseline none` skips it.

    python benchmarks/codecs.py [--size 1000000] [--repeats 7] [--baseline numpy|REV|none] [--out results]

Writes results/codecs.json and results/codecs.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dist_llm_train.core import codecs as current
from dist_llm_train.core import kernels

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.25
DEFAULT_BASELINE = "numpy"  # this tree's codecs with the native kernels off
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "int8": ("int8", {"chunk": 1024}),
    "int4": ("int4", {"chunk": 128}),
    "int2": ("int2", {"chunk": 128}),
    "topk_1%_delta": ("topk", {"ratio": 0.01, "index": "delta"}),
    "topk_1%_int32": ("topk", {"ratio": 0.01, "index": "int32"}),
    "topk_10%_delta": ("topk", {"ratio": 0.1, "index": "delta"}),
    "sparseloco_1%_2bit": ("sparseloco", {"ratio": 0.01, "chunk": 4096, "bits": 2}),
    "sparseloco_3%_2bit": ("sparseloco", {"ratio": 0.03, "chunk": 4096, "bits": 2}),
}
WITH_FEEDBACK = ("topk_1%_delta", "int2", "sparseloco_1%_2bit")  # what a worker with error feedback pays
Row = tuple[Callable[[np.ndarray], Any], Any]


def load_baseline(rev: str) -> ModuleType:
    """`core/codecs.py` as it was at git revision `rev` ('numpy': as it is, with the native kernels off), as a
    module of its own (numpy + pydantic only)."""
    if rev == "numpy":
        module = _module_from(Path(current.__file__).read_text(), "the numpy path")
        module.NATIVE = None
        return module
    path = "src/dist_llm_train/core/codecs.py"
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    return _module_from(source, f"{rev}:{path}")


def _module_from(source: str, origin: str) -> ModuleType:
    name = "baseline_codecs"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, origin, "exec"), module.__dict__)
    return module


def _rows(impl: ModuleType) -> dict[str, Row]:
    """Name -> (one round trip on a vector, the codec for its payload size)."""
    rows: dict[str, Row] = {}
    built = {name: impl.get_codec(codec, **params) for name, (codec, params) in CODECS.items()}
    for name, codec in built.items():
        rows[name] = ((lambda v, c=codec: c.decode(c.encode(v), v.size)), codec)
    for name in WITH_FEEDBACK:
        feedback = impl.ErrorFeedback(built[name])
        rows[f"{name}+error_feedback"] = (
            lambda v, c=built[name], f=feedback: c.decode(f.compress(v), v.size),
            built[name],
        )
    return rows


def _time(fn: Callable[[np.ndarray], Any], vec: np.ndarray, loops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        fn(vec)
    return (time.perf_counter() - t0) / loops


def measure(size: int, repeats: int, baseline: ModuleType | None = None) -> dict[str, Any]:
    vec = np.random.default_rng(0).normal(0, 0.01, size).astype(np.float32)
    dst = np.empty(size, np.float32)
    impls = {"current": _rows(current)} | ({"baseline": _rows(baseline)} if baseline is not None else {})
    timed: dict[tuple[str, str], Callable[[np.ndarray], Any]] = {("memcpy", "current"): lambda v: np.copyto(dst, v)}
    for impl, rows in impls.items():
        timed |= {(name, impl): fn for name, (fn, _) in rows.items()}
    for fn in timed.values():  # warm-up
        fn(vec)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in timed}
    for _ in range(repeats):  # interleaved: every row, old and new, sees the same load
        for key, fn in timed.items():
            samples[key].append(_time(fn, vec, 20 if key[0] == "memcpy" else 3))
    raw_mb = 4 * size / 1e6
    memcpy_s = min(samples["memcpy", "current"])
    out = [{"codec": "memcpy", "ms_per_round_trip": round(memcpy_s * 1e3, 3), "mb_per_s": round(raw_mb / memcpy_s, 1),
            "ratio_vs_memcpy": 1.0, "baseline_ratio_vs_memcpy": None, "speedup": None, "compression": 1.0,
            "meets_target": True}]
    for name, (_, codec) in impls["current"].items():
        seconds = min(samples[name, "current"])
        base_s = min(samples[name, "baseline"]) if baseline is not None else None
        out.append(
            {
                "codec": name,
                "ms_per_round_trip": round(seconds * 1e3, 3),
                "mb_per_s": round(raw_mb / seconds, 1),
                "ratio_vs_memcpy": round(memcpy_s / seconds, 3),
                "baseline_ratio_vs_memcpy": None if base_s is None else round(memcpy_s / base_s, 3),
                "speedup": None if base_s is None else round(base_s / seconds, 2),
                "compression": round(4 * size / len(codec.encode(vec).payload), 2),
                "meets_target": memcpy_s / seconds >= TARGET,
            }
        )
    return {"size": size, "raw_mb": raw_mb, "repeats": repeats, "target_ratio": TARGET, "rows": out}


def markdown(result: dict[str, Any]) -> str:
    base = result.get("baseline")
    lines = [
        "# Codec throughput (encode + decode) vs memcpy",
        "",
        f"float32 vector of {result['size']:,} elements ({result['raw_mb']:.1f} MB), N(0, 0.01) values; best of "
        f"{result['repeats']} interleaved repeats. Machine: {result['machine']}. The machine was shared with other "
        "jobs while this ran: absolute times move with the load, ratios measured side by side much less.",
        "MB/s counts the raw vector's bytes per encode+decode round trip; "
        "the ratio is memcpy time / codec time "
        f"(target >= {TARGET}). Compression = raw bytes / payload bytes (top-k index bytes included).",
        ("Codecs: " + ("with the native kernels (core/_kernels.c)." if result.get("native_kernels") else
                       "numpy path only: the native kernels are not in use here.")),
        (("Baseline: the same `core/codecs.py` with the native kernels off (its numpy path)" if base == "numpy" else
          f"Baseline: `core/codecs.py` at `{base}`") + ", timed in the same loop; speed-up = its time / this one's."
         if base else f"No baseline timed: {result.get('baseline_note', 'not requested')}."),
        "",
        "| codec | ms / round trip | MB/s | ratio vs memcpy | baseline ratio | speed-up | compression | target met |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        base_ratio = "" if r["baseline_ratio_vs_memcpy"] is None else r["baseline_ratio_vs_memcpy"]
        speedup = "" if r["speedup"] is None else f"{r['speedup']}x"
        lines.append(
            f"| {r['codec']} | {r['ms_per_round_trip']} | {r['mb_per_s']:,} | {r['ratio_vs_memcpy']} | {base_ratio} | "
            f"{speedup} | {r['compression']}x | {'yes' if r['meets_target'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with, or 'none'")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    baseline, baseline_note = None, "not requested (--baseline none)"
    if args.baseline != "none":
        try:
            baseline, baseline_note = load_baseline(args.baseline), args.baseline
        except (OSError, subprocess.CalledProcessError) as err:  # no git, or a shallow clone without that commit
            baseline_note = f"unavailable ({args.baseline}: {str(getattr(err, 'stderr', '') or err).strip()})"
            print(f"baseline {baseline_note}; timing the current codecs only", file=sys.stderr)
    load = os.getloadavg()
    result = measure(args.size, args.repeats, baseline)
    result["baseline"] = baseline_note if baseline is not None else None
    result["native_kernels"] = current.NATIVE is not None
    result["native_note"] = (f"native kernels: {kernels.library_path()}" if current.NATIVE is not None else
                             "native kernels: not in use (not built, DLT_NATIVE_KERNELS=0, or no AVX2/F16C)")
    result["baseline_note"] = baseline_note
    result["machine"] = (
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"load average at start {' '.join(f'{x:.2f}' for x in load)}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codecs.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "codecs.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Codec throughput: encode + decode of each codec vs numpy memcpy of the same bytes, in one run.

For a float32 vector of `--size` elements (default 1M = 4 MB), each row times one encode
followed by one decode (what one update costs the worker plus the PS) and reports raw MB/s
(the vector's 4·d bytes over the round-trip time) and the ratio to `np.copyto` of the same
4·d bytes timed in the same interleaved repeats, so every ratio compares runs that saw the
same machine load. The issue's target is a ratio >= 0.25. Compression ratios (raw bytes /
payload bytes, index bytes included for top-k) are reported too.

    python benchmarks/codecs.py [--size 1000000] [--repeats 7] [--out results]

Writes results/codecs.json and results/codecs.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dist_llm_train.core.codecs import Codec, ErrorFeedback, get_codec

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.25


def _rows(size: int) -> dict[str, tuple[Callable[[np.ndarray], Any], Codec | None]]:
    """Name -> (one round trip on a vector, the codec for its payload size)."""
    dst = np.empty(size, np.float32)
    rows: dict[str, tuple[Callable[[np.ndarray], Any], Codec | None]] = {
        "memcpy": (lambda v: np.copyto(dst, v), None),
    }
    codecs = {
        "none": get_codec("none"),
        "fp16": get_codec("fp16"),
        "int8": get_codec("int8", chunk=1024),
        "int4": get_codec("int4", chunk=128),
        "int2": get_codec("int2", chunk=128),
        "topk_1%_delta": get_codec("topk", ratio=0.01, index="delta"),
        "topk_1%_int32": get_codec("topk", ratio=0.01, index="int32"),
        "topk_10%_delta": get_codec("topk", ratio=0.1, index="delta"),
        "sparseloco_1%_2bit": get_codec("sparseloco", ratio=0.01, chunk=4096, bits=2),
        "sparseloco_3%_2bit": get_codec("sparseloco", ratio=0.03, chunk=4096, bits=2),
    }
    for name, codec in codecs.items():
        rows[name] = ((lambda v, c=codec: c.decode(c.encode(v), v.size)), codec)
    for name in ("topk_1%_delta", "int2", "sparseloco_1%_2bit"):  # what a worker with error feedback pays
        feedback = ErrorFeedback(codecs[name])
        rows[f"{name}+error_feedback"] = (
            lambda v, c=codecs[name], f=feedback: c.decode(f.compress(v), v.size),
            codecs[name],
        )
    return rows


def _time(fn: Callable[[np.ndarray], Any], vec: np.ndarray, loops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        fn(vec)
    return (time.perf_counter() - t0) / loops


def measure(size: int, repeats: int) -> dict[str, Any]:
    vec = np.random.default_rng(0).normal(0, 0.01, size).astype(np.float32)
    rows = _rows(size)
    for fn, _ in rows.values():  # warm-up
        fn(vec)
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):  # interleaved: every row sees the same load
        for name, (fn, _) in rows.items():
            samples[name].append(_time(fn, vec, 20 if name == "memcpy" else 3))
    raw_mb = 4 * size / 1e6
    memcpy_s = statistics.median(samples["memcpy"])
    out = []
    for name, (_, codec) in rows.items():
        seconds = statistics.median(samples[name])
        payload = len(codec.encode(vec).payload) if codec is not None else 4 * size
        out.append(
            {
                "codec": name,
                "ms_per_round_trip": round(seconds * 1e3, 3),
                "mb_per_s": round(raw_mb / seconds, 1),
                "ratio_vs_memcpy": round(memcpy_s / seconds, 3),
                "compression": round(4 * size / payload, 2),
                "meets_target": name == "memcpy" or memcpy_s / seconds >= TARGET,
            }
        )
    return {"size": size, "raw_mb": raw_mb, "repeats": repeats, "target_ratio": TARGET, "rows": out}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Codec throughput (encode + decode) vs memcpy",
        "",
        f"float32 vector of {result['size']:,} elements ({result['raw_mb']:.1f} MB); median of "
        f"{result['repeats']} interleaved repeats. Machine: {result['machine']}.",
        "MB/s counts the raw vector's bytes per encode+decode round trip; "
        "the ratio is memcpy time / codec time "
        f"(target >= {TARGET}). Compression = raw bytes / payload bytes (top-k index bytes included).",
        "",
        "| codec | ms / round trip | MB/s | ratio vs memcpy | compression | target met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['codec']} | {r['ms_per_round_trip']} | {r['mb_per_s']:,} | {r['ratio_vs_memcpy']} | "
            f"{r['compression']}x | {'yes' if r['meets_target'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    result = measure(args.size, args.repeats)
    result["machine"] = (
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codecs.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "codecs.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""Run a command while every core is kept busy: `make test-under-load` runs the fast suite this way.

CI shares its machine with other work, and a test that only passes on an idle machine rejects good submissions
at random (issue 14: a relay's measured delay left its tolerance while other work used the CPU). This starts one
busy-looping process per core (or `--procs`), at the same priority as the tests, runs the command, stops the
loops and exits with the command's status. Every loop is bounded: it stops by itself after `--max-seconds`
even if this script is killed, so a hog never outlives a broken run by more than that.

    python scripts/cpu_hog.py [--procs N] [--max-seconds S] -- COMMAND [ARG...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def burn(until: float) -> None:
    """Spin until the monotonic deadline; checks the clock every ~100k iterations."""
    x = 0
    while time.monotonic() < until:
        for _ in range(100_000):
            x += 1


def run_under_load(command: list[str], procs: int, max_seconds: float) -> int:
    until = time.monotonic() + max_seconds
    ctx = multiprocessing.get_context("fork")  # the hogs need nothing but this function
    hogs = [ctx.Process(target=burn, args=(until,), daemon=True, name=f"cpu-hog-{i}") for i in range(procs)]
    for hog in hogs:
        hog.start()
    print(f"cpu_hog: {procs} busy loop(s) for at most {max_seconds:.0f} s: {' '.join(command)}", flush=True)
    try:
        return subprocess.call(command)
    finally:
        for hog in hogs:
            hog.terminate()
        for hog in hogs:
            hog.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="busy loops (default: one per core)")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="the loops stop by themselves after this")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    if args.procs < 0 or args.max_seconds <= 0:
        ap.error("--procs must be >= 0 and --max-seconds > 0")
    return run_under_load(command, args.procs, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())

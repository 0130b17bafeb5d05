"""Shared fixtures.

`cpu_steal`: timing-fidelity tests (shaped delay, rate, loss through userspace code) measure what this machine's
CPU can deliver. On a virtual machine the host may take that CPU away (steal time in /proc/stat): 9-40 % was
seen on 2026-12-03 while such tests ran, and they then read e.g. 12.7 ms for 10 ms, old code and new alike.
A test judges its figures only when the host left it the CPU, and otherwise skips saying how much was stolen
and what it read, so a skip is visible in the summary (`-ra`) rather than a failure at random.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MAX_STEAL = 0.05  # of all CPU time since the test started: above it, timing says more about the host than the code


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks since boot, from /proc/stat (0 stolen where the kernel does not report it)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 1, 0
    return sum(fields), fields[7] if len(fields) > 7 else 0


class StealMeter:
    """CPU steal since it was made: the share of CPU time the VM's host took away."""

    def __init__(self) -> None:
        self.total0, self.stolen0 = cpu_ticks()

    def fraction(self) -> float:
        total, stolen = cpu_ticks()
        return (stolen - self.stolen0) / max(1, total - self.total0)

    def skip_if_stolen(self, read: str, max_steal: float = MAX_STEAL) -> None:
        steal = self.fraction()
        if steal > max_steal:
            pytest.skip(f"not judged: the host stole {steal:.0%} of the CPU while this was measured ({read})")


@pytest.fixture
def cpu_steal() -> StealMeter:
    return StealMeter()


def processes_with_marker(marker: str) -> list[int]:
    """Pids whose environment carries DLT_TEST_MARKER=<marker>: a launched run and everything it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"DLT_TEST_MARKER={marker}".encode() in env:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def marked_processes() -> Callable[[str], list[int]]:
    """`processes_with_marker`, for tests that check a run leaves no process behind."""
    return processes_with_marker


@pytest.fixture(scope="module", params=["native", "numpy"])
def codec_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a codec test module twice: with the native kernels (core/_kernels.c) and with the numpy reference
    path they replace, so both are held to every test. Module-scoped, so hypothesis tests may use it."""
    from dist_llm_train.core import codecs

    saved = codecs.NATIVE
    if request.param == "native" and saved is None:
        pytest.skip("the native codec kernels are not built here (test_kernels.py says whether they should be)")
    if request.param == "numpy":
        codecs.NATIVE = None
    try:
        yield request.param
    finally:
        codecs.NATIVE = saved

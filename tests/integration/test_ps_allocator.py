"""`serve paramserver` runs with glibc's huge-page malloc tunable (`paramserver.numerics.with_hugepage_malloc`):
it re-executes itself once with the tunable, keeping its pid and arguments, and never overrides an explicit one."""

from __future__ import annotations

import os
import platform

import pytest
from serve_process import insecure_paramserver

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc tunable")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("given", "running"),
    [
        (None, "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the way to opt out
    ],
)
def test_the_paramserver_process_runs_with_huge_page_malloc(given: str | None, running: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DLT_CLUSTER_SECRET")}
    if given is not None:
        env["GLIBC_TUNABLES"] = given
    with insecure_paramserver(env) as (proc, said):
        assert "paramserver ready" in said
        # The environment as the serving interpreter sees it (/proc/<pid>/environ is no witness: glibc's tunable
        # parser cuts the original string in place).
        assert f"malloc tunables: GLIBC_TUNABLES={running}\n" in said
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:  # the pid Popen started is the one serving
            assert f.read().split(b"\0")[1:5] == [b"-m", b"dist_llm_train", b"serve", b"paramserver"]
        assert said.count("--insecure: no authentication") == 1  # one process said it, once

"""netem's package surface: what each subpackage offers, that offering it costs nothing at import time, and the
CLI entry point `python -m dist_llm_train.netem`."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from dist_llm_train.netem.backends import AUTO_ORDER, REGISTRY, get_shaping_backend

PACKAGES = [
    "dist_llm_train.netem",
    "dist_llm_train.netem.profile",
    "dist_llm_train.netem.kernel",
    "dist_llm_train.netem.userspace",
    "dist_llm_train.netem.measure",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_exported_name_resolves(name: str) -> None:
    package = importlib.import_module(name)
    assert sorted(package.__all__) == sorted(package._SOURCES)
    for export in package.__all__:
        value = getattr(package, export)
        assert getattr(importlib.import_module(f"{name}.{package._SOURCES[export]}"), export) is value
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = package.nope


def test_marking_a_socket_imports_nothing_heavy() -> None:
    """The parameter server imports the traffic classes; their parent packages must not drag anything in."""
    code = (
        "import json, sys\n"
        "from dist_llm_train.netem.profile.classes import DSCP, mark_socket\n"
        "heavy = ('pydantic', 'yaml', 'numpy', 'asyncio', 'typer', 'prometheus_client')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_one_registry_with_the_three_builtin_backends() -> None:
    get_shaping_backend("userspace")  # registers the built-in backends
    assert set(AUTO_ORDER) <= set(REGISTRY) and AUTO_ORDER == ("tc_netem", "kernel_fallback", "userspace")


def test_python_dash_m_runs_the_netem_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dist_llm_train.netem", "plan", "-p", "cellular", "--dev", "eth0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "tc qdisc add dev eth0 root handle 1: htb default 10"
    usage = subprocess.run([sys.executable, "-m", "dist_llm_train.netem", "--help"], capture_output=True,
                           text=True, timeout=60)
    assert usage.returncode == 0 and "dist-llm-train netem" in usage.stdout

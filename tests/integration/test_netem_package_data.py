"""The wheel ships the netem profiles: built from a copy of the tree, unpacked outside any repo, loaded by
name."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_wheel_contains_profiles_and_loader_finds_them(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "deploy" / "netem", tree / "deploy" / "netem")
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(tree),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("dist_llm_train/netem/profile/shipped/"))
    assert shipped == sorted(p.name for p in (ROOT / "deploy" / "netem").glob("*.yaml"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import dist_llm_train; from dist_llm_train.netem.profile.loading import available_profiles, load_profile; "
        "print(load_profile('cellular').name, sorted(available_profiles()), dist_llm_train.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("cellular ") and "'straggler'" in out.stdout
    assert out.stdout.strip().endswith(
        str(site / "dist_llm_train" / "__init__.py")
    )  # the wheel's copy, no repo

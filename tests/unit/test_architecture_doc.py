"""docs/architecture.md keeps a map of every package: a package added or moved without updating it fails here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def _package_map():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("package_map", ROOT / "scripts" / "package_map.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_package_is_on_the_map() -> None:
    pm = _package_map()
    documented = set(re.findall(r"\| `(dist_llm_train[\w.]*)` \|", DOC.read_text()))
    names = {pm.summary(p)[0] for p in pm.packages()}
    missing = sorted(names - documented)
    assert not missing, f"packages missing from docs/architecture.md (run scripts/package_map.py): {missing}"
    stale = sorted(documented - names)
    assert not stale, f"docs/architecture.md maps packages that no longer exist: {stale}"


def test_every_package_says_what_it_offers() -> None:
    pm = _package_map()
    for pkg in pm.packages():
        if pkg.name == "proto":
            continue  # generated stubs
        text = (pkg / "__init__.py").read_text()
        assert text.lstrip().startswith('"""'), f"{pkg}: __init__.py needs a docstring saying what it offers"
        assert "__all__" in text, f"{pkg}: __init__.py needs __all__"

"""Print the package map of `src/dist_llm_train` as a markdown table: each package, its files and lines.

docs/architecture.md carries this table; `tests/unit/test_architecture_doc.py` fails when a package is
missing from it. Regenerate with `python scripts/package_map.py` after moving code.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "dist_llm_train"


def packages(root: Path = ROOT) -> list[Path]:
    """Every package directory (has an `__init__.py`) under the distribution, the root included."""
    return sorted(p.parent for p in root.rglob("__init__.py") if "__pycache__" not in p.parts)


def summary(pkg: Path, root: Path = ROOT) -> tuple[str, int, int]:
    """(dotted name, python files directly in it, their lines)."""
    files = sorted(pkg.glob("*.py"))
    lines = sum(len(f.read_text().splitlines()) for f in files)
    dotted = ".".join(("dist_llm_train", *pkg.relative_to(root).parts))
    return dotted, len(files), lines


def table(root: Path = ROOT) -> str:
    rows = ["| package | files | lines |", "|---|---:|---:|"]
    for pkg in packages(root):
        name, files, lines = summary(pkg, root)
        rows.append(f"| `{name}` | {files} | {lines:,} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(table() + "\n")

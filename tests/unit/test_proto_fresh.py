"""The committed stubs must be exactly what `make proto` generates from protos/."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_match_protos(tmp_path: Path) -> None:
    gen = _generator()
    written = gen.generate(tmp_path)
    assert written, "no stubs generated"
    stale = []
    for fresh in written:
        committed = gen.STUB_DIR / fresh.name
        if not committed.exists() or committed.read_text() != fresh.read_text():
            stale.append(fresh.name)
    extra = {p.name for p in gen.STUB_DIR.glob("*.py*")} - {p.name for p in written}
    assert not stale and not extra, f"stubs are stale ({stale}) or orphaned ({extra}): run `make proto`"

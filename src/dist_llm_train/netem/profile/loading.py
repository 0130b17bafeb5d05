"""Finding and loading profiles: by name, by path, or inline JSON/YAML (the seed's `--netem-profile`).

Profiles live in the repo's `deploy/netem/`. An installed wheel has no repo, so the search path is, in order:
an explicit directory, `$DLT_NETEM_PROFILE_DIR` (os.pathsep-separated), the repo's `deploy/netem` found relative
to this package (source checkouts and editable installs), and `dist_llm_train/netem/profile/shipped/` — package
data a wheel build copies there (setup.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from dist_llm_train.netem.profile.schema import Profile, ProfileError, parse_profile
from dist_llm_train.netem.profile.trace import load_trace_segments

ENV_DIR = "DLT_NETEM_PROFILE_DIR"
_HERE = Path(__file__).resolve().parent
REPO_PROFILE_DIR = _HERE.parents[3] / "deploy" / "netem"  # src/dist_llm_train/netem/profile → repo root
SHIPPED_PROFILE_DIR = _HERE / "shipped"


def profile_dirs(explicit: str | Path | None = None) -> list[Path]:
    """Directories searched for `<name>.yaml`, first match wins; only existing ones are returned."""
    cands: list[Path] = []
    if explicit is not None:
        cands.append(Path(explicit))
    env = os.environ.get(ENV_DIR)
    if env:
        cands.extend(Path(p) for p in env.split(os.pathsep) if p)
    cands.append(REPO_PROFILE_DIR)
    cands.append(SHIPPED_PROFILE_DIR)
    seen: list[Path] = []
    for c in cands:
        if c.is_dir() and c.resolve() not in seen:
            seen.append(c.resolve())
    return seen


def available_profiles(explicit: str | Path | None = None) -> dict[str, Path]:
    """name → file for every profile on the search path (earlier directories shadow later ones)."""
    out: dict[str, Path] = {}
    for d in profile_dirs(explicit):
        for f in sorted(d.glob("*.yaml")):
            out.setdefault(f.stem, f)
    return out


def parse_text(text: str, source: str) -> Any:
    """YAML or JSON text to data; JSON first when it looks like JSON, because its errors read better."""
    try:
        return json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ProfileError(f"{source}: cannot parse: {err}") from None


def load_profile_file(path: str | Path) -> Profile:
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile file not found: {p}")
    profile = parse_profile(parse_text(p.read_text(), str(p)), str(p))
    return expand_trace(profile, p.parent)


def expand_trace(profile: Profile, base_dir: Path | None) -> Profile:
    """Replace a `trace` schedule by the rate segments it averages to (kind becomes `cycle`, as traces loop)."""
    if profile.schedule is None or profile.schedule.kind != "trace":
        return profile
    assert profile.schedule.trace is not None
    segments = load_trace_segments(profile.schedule.trace, base_dir)
    return profile.model_copy(
        update={"schedule": profile.schedule.model_copy(update={"kind": "cycle", "segments": segments,
                                                                "trace": None})}
    )


def load_profile(spec: str | Path | Mapping[str, Any] | Profile, profile_dir: str | Path | None = None) -> Profile:
    """Load a profile from a name, a file path, inline JSON/YAML text, a mapping, or pass a Profile through."""
    if isinstance(spec, Profile):
        return spec
    if isinstance(spec, Mapping):
        return expand_trace(parse_profile(dict(spec), "<inline>"), None)
    text = str(spec).strip()
    if not text:
        raise ProfileError("empty profile spec")
    if text.startswith("{") or "\n" in text or ": " in text:
        return expand_trace(parse_profile(parse_text(text, "<inline>"), "<inline>"), None)
    if text.endswith((".yaml", ".yml", ".json")) or os.sep in text:
        return load_profile_file(text)
    found = available_profiles(profile_dir)
    if text not in found:
        names = ", ".join(sorted(found)) or "none (set $" + ENV_DIR + ")"
        raise ProfileError(f"unknown profile {text!r}; available: {names}")
    profile = load_profile_file(found[text])
    if profile.name != text:
        raise ProfileError(f"{found[text]}: name {profile.name!r} does not match the file name {text!r}")
    return profile

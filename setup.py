"""Build hooks (everything else is in pyproject.toml): ship the netem profiles inside the wheel, and compile the
codecs' native kernels.

The canonical profiles live in `deploy/netem/*.yaml`, where Compose mounts them and people edit them. A wheel
has no repo, so building one copies them to `dist_llm_train/netem/profile/shipped/`, the last place the profile
loader looks (netem/profile/loading.py). Editable installs need no copy: the loader finds the repo's `deploy/netem`
relative to the package. A copy, not a symlink, so it works on every filesystem and in every wheel.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PROFILES = Path(__file__).resolve().parent / "deploy" / "netem"


class BuildPyWithProfiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False) or not PROFILES.is_dir():
            return
        target = Path(self.build_lib) / "dist_llm_train" / "netem" / "profile" / "shipped"
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(PROFILES.glob("*.yaml")):
            shutil.copy2(f, target / f.name)


# The codecs' native inner loops (core/_kernels.c): plain C loaded with ctypes, no Python API. Optional: where it
# cannot be compiled (no C compiler) the install still succeeds and core/kernels.py uses the numpy path.
KERNELS = Extension(
    "dist_llm_train.core._kernels",
    sources=["src/dist_llm_train/core/_kernels.c"],
    extra_compile_args=["-O3", "-fno-math-errno"],  # no -ffast-math: the loops must round exactly as numpy does
    optional=True,
)

setup(cmdclass={"build_py": BuildPyWithProfiles}, ext_modules=[KERNELS])

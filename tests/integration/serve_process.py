"""A `serve paramserver --insecure` process started the way containers start it, read until it is ready."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def insecure_paramserver(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """(the process, everything it printed up to "paramserver ready"); terminated on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dist_llm_train", "serve", "paramserver", "--port", "0", "--metrics-port", "0",
         "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # bounded: the server logs "paramserver ready" within seconds
            seen.append(line)
            if "paramserver ready" in line:
                break
        yield proc, "".join(seen)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

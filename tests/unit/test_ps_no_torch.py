"""The PS image ships without torch: importing the server (and client) must not pull it in."""

from __future__ import annotations

import json
import subprocess
import sys


def test_paramserver_imports_without_torch() -> None:
    code = (
        "import json, sys\n"
        "import dist_llm_train.paramserver.server, dist_llm_train.paramserver.transport.client\n"
        "import dist_llm_train.paramserver.transport.grpc_client, dist_llm_train.paramserver.transport.zmq_client\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

"""Container HEALTHCHECK: exit 0 when the service answers, 1 otherwise (one line on stdout says why).

    dlt-healthcheck http://127.0.0.1:8000/readyz     any 2xx is healthy
    dlt-healthcheck grpc://127.0.0.1:50051           grpc.health.v1 SERVING (TCP connect when grpc is absent)

With DLT_PS_TLS_CA set, the gRPC check speaks TLS, trusting that CA (and presents DLT_PS_TLS_CERT / DLT_PS_TLS_KEY
when set: a PS with mutual TLS accepts no other client), as the PS of `docker-compose.tls.yml` requires;
DLT_PS_TLS_SERVER_NAME checks the server's certificate against that name instead of the target's host (every PS
shard serves the certificate made for `paramserver`).

Why Python and not curl: the images carry Python anyway, and the gRPC health protocol needs a real client.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 3.0


def check_http(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 (loopback URL from the image)
            return 200 <= resp.status < 300, f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return False, f"HTTP {err.code}"
    except OSError as err:
        return False, f"{type(err).__name__}: {err}"


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _channel(grpc: Any, target: str) -> Any:
    """Plaintext, or TLS (mutual when a client certificate is configured) when DLT_PS_TLS_CA names a CA."""
    ca = _read(os.environ.get("DLT_PS_TLS_CA"))
    if ca is None:
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=_read(os.environ.get("DLT_PS_TLS_KEY")),
        certificate_chain=_read(os.environ.get("DLT_PS_TLS_CERT")),
    )
    name = os.environ.get("DLT_PS_TLS_SERVER_NAME")
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", name)] if name else None)


def check_grpc(target: str) -> tuple[bool, str]:
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:
        host, _, port = target.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
                return True, "tcp connect ok (grpc health client not installed)"
        except OSError as err:
            return False, f"tcp connect: {err}"
    with _channel(grpc, target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            return False, f"grpc health: {err.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return status == "SERVING", f"grpc health: {status}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: dlt-healthcheck http://HOST:PORT/PATH | grpc://HOST:PORT")
        return 2
    parts = urlsplit(argv[1])
    if parts.scheme in ("http", "https"):
        ok, why = check_http(argv[1])
    elif parts.scheme == "grpc" and parts.netloc:
        ok, why = check_grpc(parts.netloc)
    else:
        print(f"unsupported target {argv[1]!r}")
        return 2
    print(why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

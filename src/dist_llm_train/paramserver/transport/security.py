"""How the parameter server's transports authenticate callers, and what a client brings to be let in.

Server side (`ServerSecurity`): the cluster's `TokenAuthority` checks the bearer token of every call
(gRPC metadata `authorization: Bearer …`, or the ZMQ token frame) before the request body is
parsed, then the role may make the call at all (`core.credentials.ps_role_allowed`); once the job and
worker ids are read, a worker credential must name that job and that worker (`ps_call_allowed`).
Transport encryption: gRPC over TLS with the operator's certificates (mutual TLS when a client CA is
given); ZMQ over CURVE with a key pair derived from the cluster secret, whose public half the
controller hands to workers with each assignment.

Client side (`PSCredentials`): the token, the PS's CURVE public key, and the TLS files — everything
optional, so a PS without security (tests, the simulator's in-process paths) is reached as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import zmq
from zmq.utils import z85

from dist_llm_train.core.credentials import Claims, CredentialError, TokenAuthority, ps_call_allowed, ps_role_allowed
from dist_llm_train.core.types import ErrorCode, PSError

AUTH_METADATA_KEY = "authorization"
BEARER = "Bearer "


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of the gRPC server's TLS: its certificate and key; `client_ca` turns on mutual TLS."""

    cert: str
    key: str
    client_ca: str | None = None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return Path(self.key).read_bytes(), Path(self.cert).read_bytes(), ca


def curve_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys from 32 seed bytes: any 32 bytes are a Curve25519 secret key."""
    if len(seed) != 32:
        raise ValueError(f"a CURVE seed is 32 bytes, got {len(seed)}")
    secret = z85.encode(seed)
    return zmq.curve_public(secret), secret


class ServerSecurity:
    """What a PS transport checks. `ServerSecurity(None)` lets everyone in (an explicitly insecure PS)."""

    def __init__(self, authority: TokenAuthority | None, tls: TLSFiles | None = None) -> None:
        self.authority = authority
        self.tls = tls
        self.curve = curve_keypair(authority.curve_seed) if authority is not None else None

    @property
    def enabled(self) -> bool:
        return self.authority is not None

    def authenticate(self, token: str | bytes | None, op: str | None = None) -> Claims | None:
        """The caller's claims (None when security is off); refuses a bad token, and a role not allowed `op`."""
        if self.authority is None:
            return None
        try:
            claims = self.authority.verify(token)
        except CredentialError as err:
            raise PSError(ErrorCode.UNAUTHENTICATED, str(err)) from None
        if op is not None:
            try:
                ps_role_allowed(claims, op)
            except CredentialError as err:
                raise PSError(ErrorCode.PERMISSION_DENIED, str(err)) from None
        return claims

    @staticmethod
    def authorize(claims: Claims | None, op: str, job_id: str | None, worker_id: str | None = None) -> None:
        """Once the request's ids are parsed: the caller acts in that job, as that worker (no-op when off)."""
        if claims is None:
            return
        try:
            ps_call_allowed(claims, op, job_id, worker_id)
        except CredentialError as err:
            raise PSError(ErrorCode.PERMISSION_DENIED, str(err)) from None


def bearer_token(metadata: object) -> str | None:
    """The token from gRPC invocation metadata (a sequence of (key, value) pairs)."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == AUTH_METADATA_KEY:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            return text[len(BEARER):] if text.startswith(BEARER) else None
    return None


@dataclass(frozen=True)
class PSCredentials:
    """What a client presents to the PS. Every field is optional; an empty one is simply not sent.

    `token`: the bearer token (a worker's job credential, or the controller's / an admin's).
    `curve_server_key`: the PS's Z85 CURVE public key; ZMQ clients then encrypt and check the server.
    `tls_ca`: PEM of the CA that signed the PS's certificate; gRPC clients then use TLS.
    `tls_cert` / `tls_key`: this client's certificate for mutual TLS. `tls_server_name`: the name to
    check the PS's certificate against when it differs from the address's host (e.g. a relay on loopback).
    """

    token: str | None = None
    curve_server_key: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None

    @classmethod
    def from_env(cls, token: str | None = None, curve_server_key: str | None = None) -> PSCredentials:
        """TLS files from DLT_PS_TLS_CA / _CERT / _KEY / _SERVER_NAME, plus the given token and key."""
        env = os.environ
        return cls(
            token=token,
            curve_server_key=curve_server_key,
            tls_ca=env.get("DLT_PS_TLS_CA") or None,
            tls_cert=env.get("DLT_PS_TLS_CERT") or None,
            tls_key=env.get("DLT_PS_TLS_KEY") or None,
            tls_server_name=env.get("DLT_PS_TLS_SERVER_NAME") or None,
        )

    def with_token(self, token: str | None, curve_server_key: str | None = None) -> PSCredentials:
        return replace(self, token=token, curve_server_key=curve_server_key or self.curve_server_key)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTH_METADATA_KEY, BEARER + self.token),) if self.token else ()

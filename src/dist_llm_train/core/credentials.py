"""Who is calling: HMAC-signed credentials minted from one cluster secret, and what each role may do.

One secret per cluster (`generate_secret`) is held by the controller and the parameter server only.
From it, `TokenAuthority` mints and verifies bearer tokens of the form

    dlt1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(key, "dlt1." + claims))>

where `key` is derived from the secret (never the secret itself), so a token reveals nothing
that would let its holder mint another. The claims say who the holder is:

- `admin`      — the operator (CLI, the embedded launcher): every REST route, job creation and
                 cancellation; on the PS every call except pushing on a worker's behalf.
- `controller` — the controller's own identity towards the PS: `SetMembers` and `GetStats`.
- `join`       — lets a worker register (`POST /v1/workers/register`) and nothing else; bound to
                 one worker name when `subject` is set, any name when it is empty.
- `worker`     — issued by the controller at registration, bound to the `worker_id` (`subject`):
                 that worker's own REST routes; with `job` set (issued with each assignment) also
                 the PS calls of that job as that worker (`InitJob` of the job, `Pull`, `Push`,
                 `GetStats` of the job).

Every token may carry an expiry (`expires_at`, Unix seconds; 0 = none). Verification is constant
time in the signature and raises `CredentialError` with a reason that never echoes the token.
Pure stdlib: both services and the CLI use it, and it does no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

Role = Literal["admin", "controller", "join", "worker"]
ROLES: tuple[str, ...] = get_args(Role)
TOKEN_PREFIX = "dlt1"
MIN_SECRET_CHARS = 32  # 32 url-safe characters carry >= 190 bits
MAX_TOKEN_CHARS = 2048  # anything longer is refused before it is decoded
_KEY_LABEL = b"dist-llm-train token signing key v1"
_CURVE_LABEL = b"dist-llm-train zmq curve server key v1"


class CredentialError(ValueError):
    """A credential is missing, malformed, forged, expired or not allowed for the call."""


@dataclass(frozen=True)
class Claims:
    role: Role
    subject: str = ""  # worker_id (worker), worker name or "" (join), a label otherwise
    job: str = ""  # worker tokens for the PS: the one job they act in
    expires_at: float = 0.0

    def to_json(self) -> bytes:
        body: dict[str, object] = {"role": self.role, "sub": self.subject}
        if self.job:
            body["job"] = self.job
        if self.expires_at:
            body["exp"] = self.expires_at
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Claims:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise CredentialError("malformed credential claims") from None
        if not isinstance(body, dict) or set(body) - {"role", "sub", "job", "exp"}:
            raise CredentialError("malformed credential claims")
        role, sub, job, exp = body.get("role"), body.get("sub", ""), body.get("job", ""), body.get("exp", 0)
        if role not in ROLES or not isinstance(sub, str) or not isinstance(job, str):
            raise CredentialError("malformed credential claims")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise CredentialError("malformed credential claims")
        return cls(role, sub, job, float(exp))


def generate_secret() -> str:
    """A fresh cluster secret (43 url-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def check_secret(secret: str) -> str:
    """The secret, stripped; refuses short ones (a guessable secret would let anyone mint tokens)."""
    secret = secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        raise CredentialError(
            f"the cluster secret must be at least {MIN_SECRET_CHARS} characters (got {len(secret)}); "
            "make one with `dist-llm-train secret`"
        )
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CredentialError("malformed credential") from None


class TokenAuthority:
    """Mints and verifies the cluster's tokens. Holds a key derived from the secret, not the secret."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        self._key = hmac.new(check_secret(secret).encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._curve_seed = hmac.new(check_secret(secret).encode(), _CURVE_LABEL, hashlib.sha256).digest()
        self._clock = clock

    @property
    def curve_seed(self) -> bytes:
        """32 bytes from which the PS derives its ZMQ CURVE key pair (paramserver.transport.security)."""
        return self._curve_seed

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, f"{TOKEN_PREFIX}.{payload}".encode(), hashlib.sha256).digest())

    def mint(self, claims: Claims) -> str:
        payload = _b64(claims.to_json())
        return f"{TOKEN_PREFIX}.{payload}.{self._sign(payload)}"

    def mint_for(
        self, role: Role, subject: str = "", *, job: str = "", ttl_s: float | None = None
    ) -> str:
        now = self._now()
        return self.mint(Claims(role, subject, job, now + ttl_s if ttl_s else 0.0))

    def _now(self) -> float:
        return float(self._clock())

    def verify(self, token: str | bytes | None) -> Claims:
        """The token's claims; `CredentialError` if it is missing, malformed, not ours or expired."""
        if not token:
            raise CredentialError("no credential")
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise CredentialError("malformed credential") from None
        if len(token) > MAX_TOKEN_CHARS:
            raise CredentialError("malformed credential")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise CredentialError("malformed credential")
        if not hmac.compare_digest(parts[2].encode(), self._sign(parts[1]).encode()):
            raise CredentialError("invalid credential (signature does not match this cluster)")
        claims = Claims.from_json(_unb64(parts[1]))
        if claims.expires_at and claims.expires_at < self._now():
            raise CredentialError("credential expired")
        return claims


# What a caller may do on the parameter server. The op names are the ZMQ ops; gRPC methods map onto them.
PS_OPS = ("init_job", "pull", "push", "set_members", "stats")
_PS_ROLES: dict[str, frozenset[str]] = {
    "init_job": frozenset({"admin", "controller", "worker"}),
    "pull": frozenset({"admin", "worker"}),
    "push": frozenset({"worker"}),
    "set_members": frozenset({"admin", "controller"}),
    "stats": frozenset({"admin", "controller", "worker"}),
}


def ps_role_allowed(claims: Claims, op: str) -> None:
    """The check that needs no request body: may this role make this call at all?"""
    if claims.role not in _PS_ROLES.get(op, frozenset()):
        raise CredentialError(f"a {claims.role} credential may not call {op}")
    if claims.role == "worker" and not claims.job:
        raise CredentialError("this worker credential is for the controller; the PS needs the job's credential")


def ps_call_allowed(claims: Claims, op: str, job_id: str | None, worker_id: str | None = None) -> None:
    """The full check once the request's job (and worker) id is known: a worker acts only in its job, as itself."""
    ps_role_allowed(claims, op)
    if claims.role != "worker":
        return
    if job_id != claims.job:
        raise CredentialError(f"this credential is for job {claims.job!r}, not {job_id!r}")
    if worker_id is not None and worker_id != claims.subject:
        raise CredentialError(f"this credential is worker {claims.subject!r}'s, not {worker_id!r}'s")

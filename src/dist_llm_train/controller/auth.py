"""Who may call which controller route, checked before the request body is read.

`ControllerAuth` holds the cluster's `TokenAuthority` (from `controller.cluster_secret`) and an optional
static operator token (`controller.auth_token`, which acts as `admin`). It issues each worker its own
credential at registration (`issue_worker_token`), a job-scoped one for the PS with each assignment
(`issue_ps_token`), and the controller's own for `SetMembers` (`controller_token`).

`AuthMiddleware` (ASGI) runs before routing and before a byte of the body is received: a request without
a valid bearer token gets 401, one whose role may not use the route (or that names another worker in the
path) gets 403, both without reading the body or touching the store. What only the body says — the
`worker_id` of a task report, the name a join token is bound to — is checked by the handler right after
FastAPI validated the body and before the service is called (`require_worker`, `require_name`).

Routes and who may use them:

    GET  /healthz, /readyz                                anyone (they read nothing but liveness)
    POST /v1/workers/register                             join (bound to the body's name if it has one), admin
    *    /v1/workers/{worker_id}/…                        worker {worker_id} itself, admin
    POST /v1/tasks/{task_id}/complete | fail              worker (body.worker_id must be its own), admin
    *    /v1/jobs…, GET /status                           admin
    GET  /metrics                                         admin, or anyone with `public_metrics`
    GET  /docs, /docs/oauth2-redirect, /redoc, /openapi.json   admin, or anyone with `public_docs`
    anything else                                         admin (then 404 / 405 as usual): default deny
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.errors import ControllerError
from dist_llm_train.core.credentials import Claims, CredentialError, TokenAuthority

STATIC_ADMIN = Claims("admin", "static-token")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@dataclass(frozen=True)
class _Rule:
    methods: frozenset[str]
    path: re.Pattern[str]
    roles: frozenset[str]
    own_worker: bool = False  # a worker may only name itself in the path's {worker} segment


def _rule(methods: str, path: str, roles: str, own_worker: bool = False) -> _Rule:
    return _Rule(frozenset(methods.split()), re.compile(path), frozenset(roles.split()), own_worker)


_RULES = (
    _rule("POST", r"/v1/workers/register", "join admin"),
    _rule("GET POST", r"/v1/workers/(?P<worker>[^/]+)/[^/]+", "worker admin", own_worker=True),
    _rule("POST", r"/v1/tasks/[^/]+/(?:complete|fail)", "worker admin"),
    _rule("GET POST", r"/v1/jobs(?:/.*)?", "admin"),
    _rule("GET", r"/status", "admin"),
)


class AuthError(ControllerError):
    """401 (no valid credential) or 403 (valid, but not for this)."""


class ControllerAuth:
    def __init__(self, cfg: ControllerConfig, ps_transport: str, clock: Callable[[], float] = time.time) -> None:
        self.authority = TokenAuthority(cfg.cluster_secret, clock) if cfg.cluster_secret else None
        self._static = cfg.auth_token.encode() if cfg.auth_token else None
        self.public_metrics = cfg.public_metrics
        self.public_docs = cfg.public_docs
        self.worker_ttl_s = cfg.worker_token_ttl_s or None
        self.curve_server_key: str | None = None
        if self.authority is not None and ps_transport == "zmq":
            from dist_llm_train.paramserver.transport.security import curve_keypair  # needs pyzmq: only for zmq

            self.curve_server_key = curve_keypair(self.authority.curve_seed)[0].decode()

    @property
    def enabled(self) -> bool:
        return self.authority is not None or self._static is not None

    # -- issuing ------------------------------------------------------------------------------------------
    def issue_worker_token(self, worker_id: str) -> str | None:
        if self.authority is None:
            return None
        return self.authority.mint_for("worker", worker_id, ttl_s=self.worker_ttl_s)

    def issue_ps_token(self, worker_id: str, job_id: str) -> str | None:
        if self.authority is None:
            return None
        return self.authority.mint_for("worker", worker_id, job=job_id, ttl_s=self.worker_ttl_s)

    def controller_token(self) -> str | None:
        return self.authority.mint_for("controller", "controller") if self.authority is not None else None

    # -- checking -----------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Claims:
        token = authorization[7:].strip() if authorization and authorization[:7].lower() == "bearer " else None
        if not token:
            raise AuthError("missing or invalid bearer token", status_code=401)
        if self._static is not None and hmac.compare_digest(token.encode(), self._static):
            return STATIC_ADMIN
        if self.authority is None:
            raise AuthError("missing or invalid bearer token", status_code=401)
        try:
            return self.authority.verify(token)
        except CredentialError as err:
            raise AuthError(f"missing or invalid bearer token: {err}", status_code=401) from None

    def check_route(self, method: str, path: str, authorization: str | None) -> Claims | None:
        """The caller's claims (None on an open route); AuthError when refused."""
        if path in OPEN_PATHS or (self.public_metrics and path == "/metrics") or (
            self.public_docs and path in DOC_PATHS
        ):
            return None
        claims = self.authenticate(authorization)
        if path == "/metrics" or path in DOC_PATHS:
            if claims.role != "admin":
                raise AuthError(f"a {claims.role} credential may not read {path}", status_code=403)
            return claims
        for rule in _RULES:
            match = rule.path.fullmatch(path)
            if match is None or method not in rule.methods:
                continue
            if claims.role not in rule.roles:
                raise AuthError(f"a {claims.role} credential may not call {method} {path}", status_code=403)
            if rule.own_worker and claims.role == "worker" and match["worker"] != claims.subject:
                raise AuthError("this credential is for another worker", status_code=403)
            return claims
        if claims.role != "admin":  # default deny: a route without a rule above is the operator's
            raise AuthError(f"a {claims.role} credential may not call {method} {path}", status_code=403)
        return claims


def caller(request: Request) -> Claims | None:
    """The claims `AuthMiddleware` verified for this request (None: auth off or an open route)."""
    claims = request.scope.get("state", {}).get("dlt_caller")
    return claims if isinstance(claims, Claims) else None


def require_worker(request: Request, worker_id: str) -> None:
    """A worker credential may only report for itself (checked once the body named the worker)."""
    claims = caller(request)
    if claims is not None and claims.role == "worker" and claims.subject != worker_id:
        raise AuthError("this credential is for another worker", status_code=403)


def require_name(request: Request, name: str) -> None:
    """A join token bound to a worker name registers that name only."""
    claims = caller(request)
    if claims is not None and claims.role == "join" and claims.subject and claims.subject != name:
        raise AuthError("this join credential is for another worker name", status_code=403)


class AuthMiddleware:
    """401/403 from the headers alone: the body is never received for a refused request."""

    def __init__(self, app: ASGIApp, auth: ControllerAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.enabled:
            await self.app(scope, receive, send)
            return
        authorization = None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            claims = self.auth.check_route(scope["method"], scope["path"], authorization)
        except AuthError as err:
            body = json.dumps({"detail": err.message}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if err.status_code == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["dlt_caller"] = claims
        await self.app(scope, receive, send)

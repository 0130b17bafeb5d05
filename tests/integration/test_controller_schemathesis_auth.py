"""The same fuzzing as test_controller_schemathesis.py with auth on: never a 5xx whoever calls, and without a
credential every operation but the health probes is a 401 (the body, whatever it is, is never looked at)."""

from __future__ import annotations

import warnings

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app
from dist_llm_train.core.credentials import TokenAuthority, generate_secret


class NullNotifier:
    def set_members(self, job_id: str, members: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


SECRET = generate_secret()
AUTHORITY = TokenAuthority(SECRET)
# public_docs: only so schemathesis can load the schema without a credential; the operations stay guarded.
app = create_app(ControllerConfig(cluster_secret=SECRET, public_docs=True), "grpc", "127.0.0.1:59999",
                 NullNotifier(), run_background=False)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
CALLERS = {
    "admin": AUTHORITY.mint_for("admin", "fuzz"),
    "worker": AUTHORITY.mint_for("worker", "w-1"),
    "join": AUTHORITY.mint_for("join"),
}
OPEN = {"/healthz", "/readyz"}


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_operation_answers_5xx_with_auth_on(case: schemathesis.Case) -> None:
    for token in CALLERS.values():
        response = case.call(headers={"Authorization": f"Bearer {token}"})
        case.validate_response(response, checks=[not_a_server_error])
    anonymous = case.call(headers={})
    if case.path not in OPEN:
        assert anonymous.status_code == 401, (case.path, anonymous.text)

"""Property-based fuzzing of every documented operation: whatever the input, never a 5xx.

Small budgets keep it to seconds; the point is breadth (every route, every body shape),
not depth.
"""

from __future__ import annotations

import warnings

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app


class NullNotifier:
    def set_members(self, job_id: str, members: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


app = create_app(ControllerConfig(), "grpc", "127.0.0.1:59999", NullNotifier(), run_background=False)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_operation_answers_5xx(case: schemathesis.Case) -> None:
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        assert isinstance(response.json()["detail"], str), response.text

"""Property-based fuzzing of every documented operation, with auth off and on.

For any input schemathesis generates from the OpenAPI document (valid and invalid by the schema, both modes
run by default): never a 5xx; every response's status code, content type and body are the ones the document
declares for that operation; and what the schema says is invalid the server refuses (`negative_data_rejection`:
the schema matches what the server enforces: `required_memory_gb: false` and config keys outside the three
sections are refused on both sides). Small budgets keep it to seconds; the point is breadth (every route,
every body shape), not depth: job submission, whose config schema is the whole run config, gets fewer
examples, and the auth-on run (the same routes behind one guard) fewer still (35 s of CPU in all here).
"""

from __future__ import annotations

import warnings

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from dist_llm_train.config import ControllerConfig
from dist_llm_train.controller.app import create_app

TOKEN = "fuzz-token"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class NullNotifier:
    def set_members(self, job_id: str, members: list[str]) -> None:
        pass

    def close(self) -> None:
        pass


def load(token: str | None) -> schemathesis.schemas.BaseSchema:
    # public_docs: so schemathesis can read the schema without a credential; the operations stay guarded.
    app = create_app(
        ControllerConfig(auth_token=token, public_docs=True),
        "grpc",
        "127.0.0.1:59999",
        NullNotifier(),
        run_background=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return schemathesis.openapi.from_asgi("/openapi.json", app)


open_api = load(None)
guarded_api = load(TOKEN)


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def check(case: schemathesis.Case, headers: dict[str, str] | None = None) -> None:
    response = case.call(headers=headers)
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 400:
        assert isinstance(response.json()["detail"], str), response.text


@open_api.exclude(method="POST", path="/v1/jobs").parametrize()
@fuzz(12)
def test_every_operation_conforms_without_auth(case: schemathesis.Case) -> None:
    check(case)


@open_api.include(method="POST", path="/v1/jobs").parametrize()
@fuzz(5)
def test_job_submission_conforms_without_auth(case: schemathesis.Case) -> None:
    check(case)


@guarded_api.parametrize()
@fuzz(3)
def test_every_operation_conforms_with_auth(case: schemathesis.Case) -> None:
    check(case, {"Authorization": f"Bearer {TOKEN}"})


def test_the_job_config_schema_is_the_one_the_server_enforces() -> None:
    doc = open_api.raw_schema
    config = doc["components"]["schemas"]["JobIn"]["properties"]["config"]
    assert config["additionalProperties"] is False and set(config["properties"]) == {"model", "training", "network"}
    training = doc["components"]["schemas"]["TrainingConfig"]
    assert training["additionalProperties"] is False and "update_bound" in training["properties"]
    assert doc["components"]["schemas"]["JobIn"]["properties"]["required_memory_gb"]["type"] == "number"

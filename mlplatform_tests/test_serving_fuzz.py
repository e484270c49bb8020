"""Schemathesis fuzzes a real `mlplatform serve` process (conftest's `served`, the server of
test_serving.py: a real warehouse and champion) from the OpenAPI schema that server publishes: no 5xx, every
request the schema allows is answered 2xx, every request it forbids is rejected with a 4xx,
and every response matches the schema (status codes, content types, bodies).

Schemathesis drives Hypothesis here directly (``operation.as_strategy``), once with requests
that fit the schema and once with requests that break it: its lazy pytest fixture
(``schemathesis.pytest.from_fixture``) does not run under pytest 9."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

LANE = "system"
pytestmark = pytest.mark.xdist_group("served")  # the same server as test_serving


CHECKS = [
    not_a_server_error,
    positive_data_acceptance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]
EXAMPLES = 40  # per operation and mode


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_api_does_what_its_schema_says(served, mode):
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} >= {"POST /predict", "POST /predict/batch",
                                                                     "GET /health", "GET /metrics"}
    called = []
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not operation.body and not operation.query:
            continue  # nothing to break in a request without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        # No deadline: a request's time depends on the machine's load (a loaded CI runner once took
        # 2.7 s where 0.6 s was usual); latency is measured by benchmarks/, never by a test.
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            case.call_and_validate(checks=CHECKS)
            called.append(case)

        check()
    assert len(called) >= EXAMPLES

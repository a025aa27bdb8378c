"""Schemathesis against ``/openapi.json`` of the real server: requests generated from the document never
get a server error, and the answers' status codes and error bodies are those the document declares."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")  # the dev extra installs it

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error, status_code_conformance  # noqa: E402


@pytest.fixture
def api_schema(api_server):
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json")


# The event stream never ends by itself: test_api.py reads it.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/api/events")


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_server_error(case):
    response = case.call(timeout=30)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance])

"""Schemathesis against the service's own OpenAPI document, over a real socket.

Every documented operation gets generated paths, queries and headers (bounded:
EXAMPLES per operation, derandomized, so a run is the same every time). No
answer may be a server error, and every answer must match what the document
declares for its status code and content type.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from app.config import Settings
from app.server import create_app
from tests.conftest import ServerFactory
from tests.live import LiveServer
from tests.protocols.fake_upstream import FakeUpstream

ADMIN = "admin-key-0123456789abcdef"
EXAMPLES = 15
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
# Streams that nobody writes end by themselves (so an SSE read of one ends, too).
QUICK_ENDS = {"idle_timeout_seconds": 1, "sweep_interval_seconds": 0.3}

schema = schemathesis.openapi.from_dict(
    create_app(Settings(database_url="memory")).openapi_schema.to_schema()
)


@pytest.fixture
def backend() -> str:
    """Only HTTP is fuzzed here: the in-memory log is enough."""
    return "memory"


@pytest.fixture
def server(live_server: ServerFactory, upstream: FakeUpstream) -> LiveServer:
    return live_server(
        api_keys=f"{ADMIN}:admin",
        token_secret="t" * 32,
        upstream_url=upstream.url,
        **QUICK_ENDS,
    )


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_and_every_answer_as_documented(
    case: Case[Any], server: LiveServer
) -> None:
    case.call_and_validate(
        base_url=server.url,
        headers={"Authorization": f"Bearer {ADMIN}"},
        checks=CHECKS,
        timeout=30,
    )


def test_the_document_names_its_security_schemes(server: LiveServer) -> None:
    document = httpx.get(
        f"{server.url}/schema/openapi.json", headers={"Authorization": f"Bearer {ADMIN}"}
    ).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "http", "scheme": "bearer"}
    assert schemes["readToken"]["in"] == "query"
    assert document["paths"]["/healthz"]["get"]["security"] == [{}]

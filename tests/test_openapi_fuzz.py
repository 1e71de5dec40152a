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
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from app.config import Settings
from app.server import create_app
from tests.conftest import ServerFactory
from tests.live import LiveServer
from tests.protocols.fake_upstream import FakeUpstream
from tests.support import fuzz_settings

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
@fuzz_settings(EXAMPLES)
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


def test_the_document_declares_the_bodies_and_headers_the_writes_take() -> None:
    """The handlers read their bodies themselves, so only the operation classes
    (app/protocols/openapi.py) tell the document, and the fuzzing above, what
    they take."""
    paths = schema.raw_schema["paths"]
    append = paths["/v1/streams/{stream_id}/events"]["post"]
    body = append["requestBody"]["content"]["application/json"]["schema"]
    single, batch = body["oneOf"]
    assert single["required"] == ["data"] and single["additionalProperties"] is False
    assert batch["items"] == single and batch["maxItems"] == 1000
    assert append["requestBody"]["required"] is True
    for route in ("events", "done", "error", "close"):
        operation = paths[f"/v1/streams/{{stream_id}}/{route}"]["post"]
        names = {p["name"] for p in operation["parameters"]}
        assert {"Producer-Id", "Producer-Epoch", "Producer-Seq"} <= names, route
    assert (
        "ttl_seconds"
        in paths["/v1/streams/{stream_id}"]["put"]["requestBody"]["content"]["application/json"][
            "schema"
        ]["properties"]
    )


def test_streaming_operations_declare_an_event_stream_answer() -> None:
    """Guards JsonOrEventStream: as a plain subclass of Operation (no dataclass of
    its own) its __post_init__ never ran, and no 200 listed text/event-stream."""
    paths = schema.raw_schema["paths"]
    for path in ("/flows/{name}", "/v1/responses", "/v1/chat/completions"):
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}, path
    flow = paths["/flows/{name}"]["post"]
    assert "data" in flow["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "X-Genkit-Stream-Id" in {p["name"] for p in flow["parameters"]}

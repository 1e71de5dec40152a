"""Odd input at the Durable Streams endpoint, generated: never a 5xx, and a
refused request changes nothing.

The conformance suite checks what valid requests do, and schemathesis
(tests/test_openapi_fuzz.py) fuzzes only the routes in the OpenAPI document,
which this one is not. Here every method meets the protocol's own headers and
query parameters with values near and far from valid ones, on a stream that
exists (with content, open) or on a new path. Derandomized and bounded, so a
run is the same every time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ServerFactory
from tests.support import fuzz_settings

EXAMPLES = 500
METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"]
HEADERS = [
    "content-type",
    "stream-ttl",
    "stream-expires-at",
    "stream-closed",
    "stream-seq",
    "producer-id",
    "producer-epoch",
    "producer-seq",
    "stream-forked-from",
    "stream-fork-offset",
    "stream-fork-sub-offset",
    "if-none-match",
    "access-control-request-headers",
]
QUERY = ["offset", "live", "cursor"]
# Values the endpoint parses, and their near misses.
NEAR_VALID = [
    "",
    "0",
    "1",
    "-1",
    "now",
    "true",
    "false",
    "0_0",
    "-1_0",
    "1_1",
    "0000000000000000_0000000000000001",
    "9" * 40,
    "0_" + "9" * 30,
    "9007199254740992",
    "application/json",
    "text/plain",
    "application/octet-stream",
    "application/json; charset=utf-8",
    "sse",
    "long-poll",
    "2030-01-01T00:00:00Z",
    "9999-99-99T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "/v1/stream/",
    " 1 ",
    "1e3",
    "0x10",
    "NaN",
    '"etag"',
    "*",
]
ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
# HTTP trims a header value's outer blanks (h11 refuses to send them).
HEADER_VALUES = st.one_of(
    st.sampled_from(NEAR_VALID), ASCII, st.integers(-(2**70), 2**70).map(str)
).map(str.strip)
QUERY_VALUES = st.one_of(st.sampled_from(NEAR_VALID), st.text(max_size=40))
TEXT = ("text/plain", b"abc")
BODIES = st.one_of(
    st.sampled_from([b"", b"[]", b"{}", b"[1,2]", b'"x"', b"[[", b"\xff\xfe", b"null"]),
    st.binary(max_size=64),
)


@dataclass(frozen=True)
class OddRequest:
    method: str
    on_existing: bool
    headers: dict[str, str]
    params: dict[str, str]
    body: bytes
    fork_from_existing: bool
    # The existing stream's content type, and whether the request names it (past
    # that check, the deeper rules run: JSON messages, producers, Stream-Seq).
    json_stream: bool
    its_content_type: bool


@st.composite
def odd_requests(draw: st.DrawFn) -> OddRequest:
    return OddRequest(
        method=draw(st.sampled_from(METHODS)),
        on_existing=draw(st.booleans()),
        headers=draw(st.dictionaries(st.sampled_from(HEADERS), HEADER_VALUES, max_size=5)),
        params=draw(st.dictionaries(st.sampled_from(QUERY), QUERY_VALUES, max_size=3)),
        body=draw(BODIES),
        fork_from_existing=draw(st.booleans()),
        json_stream=draw(st.booleans()),
        its_content_type=draw(st.booleans()),
    )


@pytest.fixture
def backend() -> str:
    """The HTTP layer is what is fuzzed; SQLite stores what it lets through."""
    return "sqlite"


@pytest.fixture
def client(live_server: ServerFactory) -> Iterator[tuple[httpx.Client, str]]:
    # Long-polls that find nothing end quickly; every read of an open stream would
    # otherwise wait for its timeout.
    server = live_server(long_poll_timeout=0.2)
    with httpx.Client(timeout=10) as http:
        yield http, f"{server.url}/v1/stream"


def state(http: httpx.Client, url: str) -> tuple[int, bytes, str | None, str | None]:
    """What a refused request must leave as it was: status, content, tail, closed."""
    response = http.get(url, params={"offset": "-1"})
    return (
        response.status_code,
        response.content,
        response.headers.get("stream-next-offset"),
        response.headers.get("stream-closed"),
    )


@given(request=odd_requests())
@fuzz_settings(EXAMPLES)
def test_odd_requests_get_no_5xx_and_a_refusal_changes_nothing(
    client: tuple[httpx.Client, str], request: OddRequest
) -> None:
    http, base = client
    existing = f"{base}/{uuid.uuid4().hex}"
    content_type, content = ("application/json", b"[1]") if request.json_stream else TEXT
    created = http.put(existing, headers={"content-type": content_type}, content=content)
    assert created.status_code == 201, created.text
    url = existing if request.on_existing else f"{base}/{uuid.uuid4().hex}"
    headers = dict(request.headers)
    if request.its_content_type:
        headers["content-type"] = content_type
    if request.fork_from_existing:  # a fork of it, at its tail unless told otherwise
        headers["stream-forked-from"] = httpx.URL(existing).path
        headers.setdefault("stream-fork-offset", created.headers["stream-next-offset"])
    # Both: a request on a new path may name the existing stream (a fork of it).
    before = state(http, url), state(http, existing)
    with http.stream(
        request.method, url, headers=headers, params=request.params, content=request.body
    ) as response:
        # An event stream stays open: its status is the answer.
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            response.read()
    assert response.status_code < 500, (request, response.status_code, response.text)
    if response.status_code >= 400:
        after = state(http, url), state(http, existing)
        assert after == before, (request, response.status_code, response.text)

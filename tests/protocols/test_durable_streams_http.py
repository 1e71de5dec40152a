"""Durable Streams behaviour over HTTP where the official suite is thin: error
precedence, odd input (always a 4xx, nothing changed) and CORS, on every backend."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from litestar.routes import HTTPRoute

from app.protocols import durable_streams
from tests.conftest import ServerFactory

JSON = {"content-type": "application/json"}


@pytest.fixture
def base(live_server: ServerFactory) -> str:
    return f"{live_server().url}/v1/stream"


def producer(seq: int, epoch: int = 0) -> dict[str, str]:
    return {**JSON, "producer-id": "p", "producer-epoch": str(epoch), "producer-seq": str(seq)}


def test_the_streams_own_errors_rank_before_a_bad_json_body(base: str) -> None:
    url = f"{base}/precedence"
    httpx.put(url, headers=JSON)
    # A bad body alone: 400, and the producer did not advance.
    assert httpx.post(url, headers=producer(0), content=b"{").status_code == 400
    assert httpx.post(url, headers=producer(0), content=b"[1]").status_code == 200
    # A sequence gap outranks the bad body; so do a stale epoch and a closed stream.
    assert httpx.post(url, headers=producer(5), content=b"{").status_code == 409
    assert httpx.post(url, headers=producer(0, epoch=1), content=b"[2]").status_code == 200
    assert httpx.post(url, headers=producer(1, epoch=0), content=b"{").status_code == 403
    httpx.post(url, headers={"stream-closed": "true"})
    closed = httpx.post(url, headers=JSON, content=b"[]")
    assert (closed.status_code, closed.headers["stream-closed"]) == (409, "true")
    assert httpx.get(url).json() == [1, 2]


def test_a_body_over_the_limit_is_refused_and_changes_nothing(base: str) -> None:
    url = f"{base}/big"
    httpx.put(url, headers={"content-type": "application/octet-stream"})
    big = httpx.post(
        url, content=b"x" * 10_000_001, headers={"content-type": "application/octet-stream"}
    )
    assert big.status_code == 413
    assert big.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(url).content == b""


def test_a_body_sent_in_chunks_is_joined_and_limited_without_a_content_length(
    live_server: ServerFactory,
) -> None:
    """The append reads its body from the server itself (app.protocols.read_body):
    chunked bodies have no Content-Length to refuse them by in advance."""
    url = f"{live_server(max_request_bytes=1000).url}/v1/stream/chunked"
    binary = {"content-type": "application/octet-stream"}
    assert httpx.put(url, headers=binary).status_code == 201
    chunks = [b"a" * 300, b"b" * 300, b"c" * 300]
    assert httpx.post(url, headers=binary, content=iter(chunks)).status_code == 204
    too_big = httpx.post(url, headers=binary, content=iter([*chunks, b"d" * 200]))
    assert too_big.status_code == 413
    announced = httpx.post(url, headers=binary, content=b"e" * 1001)
    assert announced.status_code == 413
    assert httpx.get(url).content == b"".join(chunks)


def test_a_message_over_the_event_limit_is_refused(live_server: ServerFactory) -> None:
    url = f"{live_server(max_event_bytes=1000).url}/v1/stream/limited"
    binary = {"content-type": "application/octet-stream"}
    assert httpx.put(url, headers=binary, content=b"x" * 1001).status_code == 413
    assert httpx.put(url, headers=binary, content=b"x" * 1000).status_code == 201
    assert httpx.post(url, headers=binary, content=b"y" * 1001).status_code == 413
    assert httpx.get(url).content == b"x" * 1000


@pytest.mark.parametrize(
    ("method", "params", "headers"),
    [
        ("PUT", {}, {"stream-expires-at": "9999-99-99T00:00:00Z"}),
        ("PUT", {}, {"stream-ttl": "1", "stream-expires-at": "2030-01-01T00:00:00Z"}),
        ("PUT", {}, {"stream-forked-from": "/v1/stream/odd", "stream-fork-offset": "9" * 40}),
        ("PUT", {}, {"stream-forked-from": "/v1/stream/", "stream-fork-offset": "1_1"}),
        ("PUT", {}, {"stream-fork-sub-offset": "1"}),
        ("GET", {"offset": "1_1", "live": "forever"}, {}),
        ("GET", {"offset": "9" * 40 + "_x"}, {}),
        ("GET", {"offset": "0_" + "9" * 30}, {}),
        ("GET", {"offset": "0_" + "9" * 30, "live": "long-poll"}, {}),
        ("PUT", {}, {"stream-ttl": "9" * 30}),
        ("POST", {}, {"content-type": "text/plain", "producer-seq": "1"}),
    ],
)
def test_odd_requests_get_a_4xx_never_a_5xx(
    base: str, method: str, params: dict[str, str], headers: dict[str, str]
) -> None:
    httpx.put(f"{base}/odd", headers={"content-type": "text/plain"}, content=b"abc")
    response = httpx.request(method, f"{base}/odd", params=params, headers=headers, content=b"x")
    assert 400 <= response.status_code < 500, response.text
    assert httpx.get(f"{base}/odd").content == b"abc"


def test_the_reserved_subscription_namespace_is_no_stream(base: str) -> None:
    response = httpx.put(f"{base}/__ds/subscriptions/x", headers={"content-type": "text/plain"})
    assert response.status_code == 501


def test_overlong_stream_ids_are_refused(base: str) -> None:
    response = httpx.put(f"{base}/{'x' * 2000}", headers={"content-type": "text/plain"})
    assert response.status_code == 400


def test_a_deleted_source_answers_410_until_its_last_fork_goes(base: str) -> None:
    httpx.put(f"{base}/src", headers={"content-type": "text/plain"}, content=b"abc")
    fork = httpx.put(
        f"{base}/fork",
        headers={"stream-forked-from": "/v1/stream/src", "stream-fork-sub-offset": "0"},
    )
    assert (fork.status_code, fork.headers["content-type"]) == (201, "text/plain")
    assert httpx.delete(f"{base}/src").status_code == 204
    assert httpx.head(f"{base}/src").status_code == 410
    assert httpx.put(f"{base}/src", headers={"content-type": "text/plain"}).status_code == 409
    assert httpx.get(f"{base}/fork").content == b"abc"
    assert httpx.delete(f"{base}/fork").status_code == 204
    assert httpx.head(f"{base}/src").status_code == 404
    assert httpx.put(f"{base}/src", headers={"content-type": "text/plain"}).status_code == 201


def test_cors_preflight_allows_what_the_browser_asks_for(base: str) -> None:
    response = httpx.options(
        f"{base}/any",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "GET",
            "access-control-request-headers": "if-none-match, producer-id",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert "if-none-match" in response.headers["access-control-allow-headers"]
    httpx.put(f"{base}/any", headers={"content-type": "text/plain"})
    read = httpx.get(f"{base}/any", headers={"origin": "https://app.example"})
    assert "Stream-Next-Offset" in read.headers["access-control-expose-headers"]
    assert read.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_an_append_after_another_replica_replaced_the_stream_follows_the_new_one(
    live_server: ServerFactory,
) -> None:
    """A replica that appended to a stream skips the lookup on its next appends.
    Another replica deleted the stream and created a native (read-only here)
    one under the same id: the append must not go to it by the old row's rules."""
    first, second = live_server(), live_server()
    url = f"{first.url}/v1/stream/replaced"
    assert httpx.put(url, headers=JSON).status_code == 201
    assert httpx.post(url, headers=JSON, content=b"[1]").status_code == 204
    assert httpx.delete(f"{second.url}/v1/stream/replaced").status_code == 204
    assert httpx.put(f"{second.url}/v1/streams/replaced", json={}).status_code == 201
    refused = httpx.post(url, headers=JSON, content=b"[2]")
    assert refused.status_code == 409, refused.text
    assert "not created as a Durable Stream" in refused.text
    assert httpx.get(f"{second.url}/v1/streams/replaced").json()["last_seq"] == 0


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_bug_an_append_that_met_a_stream_replaced_after_its_lookup_was_refused(
    live_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica deleted the stream and created it again between this
    replica's lookup and its commit. The commit is refused by the created_at
    condition and nothing is written; the append was answered 400 as if the
    request were bad. It now looks the stream up again and appends to the new one."""
    first, second = live_server(), live_server()
    assert httpx.put(f"{second.url}/v1/stream/raced", headers=JSON).status_code == 201
    original = durable_streams.existing
    replaced: list[bool] = []

    async def lookup_then_replaced(call: Any) -> Any:
        info = await original(call)
        if not replaced:
            replaced.append(True)
            async with httpx.AsyncClient() as other_replica:
                url = f"{second.url}/v1/stream/raced"
                assert (await other_replica.delete(url)).status_code == 204
                assert (await other_replica.put(url, headers=JSON)).status_code == 201
        return info

    monkeypatch.setattr(durable_streams, "existing", lookup_then_replaced)
    answer = httpx.post(f"{first.url}/v1/stream/raced", headers=JSON, content=b"[1]")
    assert answer.status_code == 204, answer.text
    assert replaced
    assert httpx.get(f"{second.url}/v1/stream/raced?offset=-1").json() == [1]


def test_a_live_sse_response_keeps_alive_while_idle_and_ends_after_its_deadline(
    live_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keep-alives are the log's idle ticks (min(long-poll timeout, a quarter of
    the deadline)); the response ends at the first frame after SSE_MAX_SECONDS."""
    monkeypatch.setattr(durable_streams, "SSE_MAX_SECONDS", 2.0)
    base = f"{live_server(long_poll_timeout=0.2).url}/v1/stream"
    assert httpx.put(f"{base}/sse", headers=JSON).status_code == 201
    events: list[tuple[str, str]] = []
    started = time.monotonic()
    with httpx.stream("GET", f"{base}/sse?offset=now&live=sse", timeout=10) as response:
        assert response.status_code == 200
        kind = ""
        for line in response.iter_lines():
            # Keep-alives would go on for ever: a response that outlives its deadline fails.
            assert time.monotonic() - started < 10, "the response did not end after its deadline"
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data:"):
                events.append((kind, line.removeprefix("data:")))
                if len(events) == 3:  # idle for a while: now an append
                    assert httpx.post(f"{base}/sse", headers=JSON, content=b'{"n":1}').is_success
    # it ended by itself: the deadline, not the client
    kinds = [k for k, _ in events]
    assert ("data", '[{"n":1}]') in events
    assert kinds.count("control") >= 5  # the first, keep-alives, and the data's own
    assert all('"upToDate":true' in data for kind, data in events if kind == "control")


def test_append_answers_carry_the_protocol_headers(base: str) -> None:
    """Answers without a body (appends, a delete) are durable_streams.Bodiless,
    not ASGIResponse: the same headers as every other answer of the protocol."""
    url = f"{base}/answers"
    text = {"content-type": "text/plain"}
    httpx.put(url, headers=text)
    plain = httpx.post(url, content=b"a", headers=text)
    producer = {"producer-id": "p", "producer-epoch": "0", "producer-seq": "0"}
    claimed = httpx.post(url, content=b"b", headers={**text, **producer})
    retried = httpx.post(url, content=b"b", headers={**text, **producer})
    for response, status in ((plain, 204), (claimed, 200), (retried, 204)):
        assert response.status_code == status
        assert response.content == b""
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cross-origin-resource-policy"] == "cross-origin"
        assert response.headers["stream-next-offset"]
    assert claimed.headers["content-length"] == "0"
    assert (claimed.headers["producer-epoch"], claimed.headers["producer-seq"]) == ("0", "0")
    assert httpx.get(url).content == b"ab"
    deleted = httpx.delete(url)
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert deleted.headers["x-content-type-options"] == "nosniff"


def test_the_route_is_answered_past_litestars_handler_pipeline_after_the_apps_middlewares(
    live_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """durable_streams.answer_directly answers the route's requests: Litestar's
    handler pipeline never runs for them, while routing (405 for other
    methods), the access log's metrics and authorization still do."""

    async def pipeline(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Litestar's handler pipeline ran")

    monkeypatch.setattr(HTTPRoute, "_call_handler_function", pipeline)
    server = live_server(api_keys="admin-key-0123456789:admin")
    key = {"authorization": "Bearer admin-key-0123456789"}
    url = f"{server.url}/v1/stream/direct"
    assert httpx.put(url, headers={**JSON, **key}).status_code == 201
    assert httpx.post(url, json=[1], headers=key).status_code == 204
    assert httpx.get(url, params={"offset": "-1"}, headers=key).json() == [1]
    assert httpx.post(url, json=[2]).status_code == 401  # authorization ran first
    assert httpx.patch(url, headers=key).status_code == 405  # routing ran first
    # The patch is in effect: a route of another protocol goes through the pipeline.
    assert httpx.get(f"{server.url}/v1/streams/direct", headers=key).status_code == 500
    monkeypatch.undo()
    metrics = httpx.get(f"{server.url}/metrics", headers=key).text
    assert 'method="POST",route="/v1/stream/{path}",status="204"' in metrics

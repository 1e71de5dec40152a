"""The Genkit durable-flow protocol, byte for byte, over real HTTP on every backend."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from app.config import Settings
from tests.conftest import ServerFactory
from tests.live import LiveServer
from tests.protocols import flows_for_tests

SSE = {"Accept": "text/event-stream"}
COUNTDOWN_3 = (
    b'data: {"message":3}\n\ndata: {"message":2}\n\ndata: {"message":1}\n\n'
    b'data: {"result":"countdown from 3 done"}\n\n'
)


@pytest.fixture
def server(live_server: ServerFactory) -> LiveServer:
    return live_server(flows="tests.protocols.flows_for_tests")


def post(
    server: LiveServer, flow: str, body: bytes | None = None, **kwargs: object
) -> httpx.Response:
    return httpx.post(f"{server.url}/flows/{flow}", content=body, timeout=30, **kwargs)  # type: ignore[arg-type]


def start(
    server: LiveServer, flow: str, data: object, headers: dict[str, str] | None = None
) -> httpx.Response:
    return post(
        server, flow, json.dumps({"data": data}).encode(), headers={**SSE, **(headers or {})}
    )


def reconnect(server: LiveServer, flow: str, stream_id: str, query: str = "") -> httpx.Response:
    return post(server, flow + query, b"{}", headers={**SSE, "X-Genkit-Stream-Id": stream_id})


def test_new_run_exact_frames_and_headers(server: LiveServer) -> None:
    response = start(server, "countdown", {"count": 3})
    assert response.status_code == 200
    assert response.content == COUNTDOWN_3
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert uuid.UUID(response.headers["x-genkit-stream-id"]).version == 4
    assert "content-encoding" not in response.headers


def test_reconnect_to_finished_run_replays_the_same_bytes(server: LiveServer) -> None:
    first = start(server, "countdown", {"count": 3})
    again = reconnect(server, "countdown", first.headers["x-genkit-stream-id"])
    assert again.status_code == 200
    assert again.content == COUNTDOWN_3
    assert again.headers["x-genkit-stream-id"] == first.headers["x-genkit-stream-id"]
    assert again.headers["content-type"].startswith("text/event-stream")


def test_reconnect_to_failed_run_replays_chunks_and_the_error(server: LiveServer) -> None:
    first = start(server, "fail_midway", {"count": 4})
    expected = (
        b'data: {"message":4}\n\ndata: {"message":3}\n\n'
        b'data: {"error":{"status":"INTERNAL",'
        b'"message":"fail_midway: failed after 2 of 4 chunks"}}\n\n'
    )
    assert first.content == expected
    assert reconnect(server, "fail_midway", first.headers["x-genkit-stream-id"]).content == expected


def test_reconnect_to_running_run_replays_then_follows(server: LiveServer) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/flows/countdown",
        json={"data": {"count": 5, "delay_ms": 100}},
        headers=SSE,
        timeout=30,
    ) as live:
        stream_id = live.headers["x-genkit-stream-id"]
        first = next(live.iter_raw())
        assert first.startswith(b'data: {"message":5}\n\n')
    # The first client left after one chunk; the run goes on, and a reconnect gets it all.
    replay = reconnect(server, "countdown", stream_id)
    assert replay.content == (
        b'data: {"message":5}\n\ndata: {"message":4}\n\ndata: {"message":3}\n\n'
        b'data: {"message":2}\n\ndata: {"message":1}\n\n'
        b'data: {"result":"countdown from 5 done"}\n\n'
    )


def test_reconnect_after_a_cursor_skips_what_the_client_has(server: LiveServer) -> None:
    first = start(server, "countdown", {"count": 3})
    resumed = reconnect(server, "countdown", first.headers["x-genkit-stream-id"], "?after=2")
    assert resumed.content == b'data: {"message":1}\n\ndata: {"result":"countdown from 3 done"}\n\n'


def test_unknown_stream_id_gets_204_and_an_empty_body(server: LiveServer) -> None:
    response = reconnect(server, "countdown", str(uuid.uuid4()))
    assert response.status_code == 204
    assert response.content == b""
    assert "x-genkit-stream-id" not in response.headers


def test_headers_are_sent_before_the_first_chunk(server: LiveServer) -> None:
    """Genkit's servers hold the stream id back until the first chunk; we do not."""
    flows_for_tests.gate.clear()
    with httpx.stream(
        "POST", f"{server.url}/flows/gated", json={"data": None}, headers=SSE, timeout=30
    ) as response:
        # The flow is still waiting at the gate, yet the headers are here.
        assert response.headers["x-genkit-stream-id"]
        flows_for_tests.gate.set()
        assert (
            response.read() == b'data: {"message":"through"}\n\ndata: {"result":"gated done"}\n\n'
        )


@pytest.mark.parametrize("body", [b"", b"{}", b'{"data": null, "init": {"x": 1}, "extra": 2}'])
def test_accepted_bodies(server: LiveServer, body: bytes) -> None:
    response = post(server, "echo", body, headers=SSE)
    assert response.content == b'data: {"message":null}\n\ndata: {"result":null}\n\n'


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "must be an object"),
        # Regression: json read it as infinity, which reached the flow.
        (b'{"data": 1e400}', "beyond the range of a double"),
        # Regression: RecursionError passed the 400 and became a 500.
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_bodies_get_400_and_start_nothing(
    server: LiveServer, body: bytes, message: str
) -> None:
    response = post(server, "echo", body, headers=SSE)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and message in error["message"]
    assert "x-genkit-stream-id" not in response.headers


def test_bad_flow_input_fails_the_run_with_invalid_argument(server: LiveServer) -> None:
    response = start(server, "countdown", {"count": "many"})
    frame = json.loads(response.content.removeprefix(b"data: "))
    assert frame["error"]["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("query", ["?stream=true", "?stream=1", "?stream=TRUE"])
def test_stream_query_parameter_selects_streaming(server: LiveServer, query: str) -> None:
    response = post(server, "countdown" + query, b'{"data": {"count": 3}}')
    assert response.content == COUNTDOWN_3


def test_invalid_stream_query_parameter_is_400(server: LiveServer) -> None:
    assert post(server, "countdown?stream=maybe", b"{}").status_code == 400


def test_non_streaming_result(server: LiveServer) -> None:
    response = post(server, "countdown", b'{"data": {"count": 2}}')
    assert response.status_code == 200
    assert response.json() == {"result": "countdown from 2 done"}


def test_non_streaming_null_result_keeps_the_key(server: LiveServer) -> None:
    assert post(server, "echo", b"{}").content == b'{"result":null}'


def test_non_streaming_error(server: LiveServer) -> None:
    response = post(server, "fail_midway", b'{"data": {"count": 4}}')
    assert response.status_code == 500
    assert response.json() == {
        "error": {"status": "INTERNAL", "message": "fail_midway: failed after 2 of 4 chunks"}
    }


def test_non_streaming_request_with_a_stream_id_runs_again(server: LiveServer) -> None:
    """As in all of Genkit's servers: the header only means "reconnect" when streaming."""
    response = post(
        server, "countdown", b'{"data": {"count": 1}}', headers={"X-Genkit-Stream-Id": "whatever"}
    )
    assert response.json() == {"result": "countdown from 1 done"}


def test_unknown_flow_is_404(server: LiveServer) -> None:
    response = post(server, "nope", b"{}", headers=SSE)
    assert response.status_code == 404
    assert response.json()["error"]["status"] == "NOT_FOUND"


def test_plain_exceptions_are_redacted(server: LiveServer) -> None:
    response = start(server, "leaky", None)
    assert response.content == (
        b'data: {"message":"before"}\n\n'
        b'data: {"error":{"status":"INTERNAL","message":"internal error"}}\n\n'
    )


def test_output_that_is_not_json_fails_cleanly(server: LiveServer) -> None:
    response = start(server, "unserialisable_output", None)
    frame = json.loads(response.content.removeprefix(b"data: "))
    assert frame["error"]["status"] == "INTERNAL"


def test_falsy_and_non_ascii_chunks_are_exact_ascii_json(server: LiveServer) -> None:
    for value, expected in [
        (0, b"0"),
        ("", b'""'),
        (False, b"false"),
        ([], b"[]"),
        ({}, b"{}"),
        ("h\u00e9 \u2713 \U0001f680", b'"h\\u00e9 \\u2713 \\ud83d\\ude80"'),
    ]:
        response = start(server, "echo", value)
        assert response.content == (
            b'data: {"message":' + expected + b'}\n\ndata: {"result":' + expected + b"}\n\n"
        )
        assert response.content.isascii()


def test_cors_lets_browsers_send_and_read_the_stream_id(server: LiveServer) -> None:
    origin = {"Origin": "http://example.com"}
    preflight = httpx.options(
        f"{server.url}/flows/countdown",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-genkit-stream-id",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "x-genkit-stream-id" in preflight.headers["access-control-allow-headers"].lower()
    response = start(server, "countdown", {"count": 1}, headers=origin)
    assert response.headers["access-control-allow-origin"] == "*"
    assert "x-genkit-stream-id" in response.headers["access-control-expose-headers"].lower()


def test_frames_never_contain_comments_or_sse_fields(server: LiveServer) -> None:
    body = start(server, "countdown", {"count": 50}).content
    frames = body.split(b"\n\n")
    assert frames[-1] == b""
    for frame in frames[:-1]:
        assert frame.startswith(b"data: {") and b"\n" not in frame and b"\r" not in frame


def test_many_chunks_with_a_slow_reader(server: LiveServer) -> None:
    chunks: list[dict[str, object]] = []
    with httpx.stream(
        "POST",
        f"{server.url}/flows/countdown",
        json={"data": {"count": 1000}},
        headers=SSE,
        timeout=30,
    ) as response:
        buffer = b""
        for data in response.iter_raw(64):
            buffer += data
            *frames, buffer = buffer.split(b"\n\n")
            chunks.extend(json.loads(f[6:]) for f in frames)
    assert [c["message"] for c in chunks[:-1]] == list(range(1000, 0, -1))
    assert chunks[-1] == {"result": "countdown from 1000 done"}


def test_shutdown_ends_running_flows_with_an_error(shared_url: str) -> None:
    settings = Settings(
        database_url=shared_url,
        flows="tests.protocols.flows_for_tests",
        shutdown_timeout_seconds=5,
    )
    first = LiveServer(settings).start()
    try:
        with httpx.stream(
            "POST", f"{first.url}/flows/forever", json={}, headers=SSE, timeout=30
        ) as response:
            stream_id = response.headers["x-genkit-stream-id"]
            next(response.iter_raw())
    finally:
        first.stop()
    second = LiveServer(settings).start()
    try:
        body = reconnect(second, "forever", stream_id).content
    finally:
        second.stop()
    last = json.loads(body.rstrip(b"\n").split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["status"] == "UNAVAILABLE"

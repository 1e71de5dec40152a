"""The durable proxy, driven by the official `openai` SDK against a fake upstream.

Both servers are real (uvicorn for streamkeep, http.server for the upstream),
on loopback; the SDK is the client. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import openai
import pytest

from app.log import StreamStatus, create_manager
from tests.conftest import ServerFactory
from tests.live import LiveServer
from tests.protocols.fake_upstream import ANSWER, GATE_AT, FakeUpstream, chat_run, responses_run
from tests.protocols.sse import Frame, frames, messages, read_until_end, until_end

UPSTREAM_KEY = "sk-upstream-secret"
RUN_LENGTH = len(responses_run("x"))
WAIT_LIMIT_SECONDS = 30


@pytest.fixture
def proxy(live_server: ServerFactory, upstream: FakeUpstream) -> LiveServer:
    return live_server(upstream_url=upstream.url, upstream_api_key=UPSTREAM_KEY)


@pytest.fixture
def sdk(proxy: LiveServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=f"{proxy.url}/v1", api_key="client-key", max_retries=0, timeout=30
    )
    yield client
    client.close()


@pytest.fixture
def http(proxy: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        yield client


def take(count: int, events: Iterable[Any]) -> list[Any]:
    """The next `count` events of an SDK stream (typed loosely: tests read their fields)."""
    return list(itertools.islice(events, count))


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition, bounded so that a bug fails the test instead of hanging it."""
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting until {what}")
        time.sleep(0.02)


def stream_status(http: httpx.Client, stream_id: str) -> str:
    return str(http.get(f"/v1/streams/{stream_id}").json()["status"])


def as_sent(events: list[Any]) -> list[dict[str, Any]]:
    """SDK event objects back as the JSON they were parsed from."""
    return [e.to_dict() for e in events]


def expected_run(response_id: str) -> list[dict[str, Any]]:
    return [data for _, data in responses_run(response_id)]


# -- Responses API -----------------------------------------------------------------------


def test_responses_stream_passes_every_upstream_event_through_unchanged(
    http: httpx.Client, upstream: FakeUpstream
) -> None:
    request = {"model": "ok", "input": "weather in Paris?", "stream": True}
    with http.stream("POST", "/v1/responses", json=request) as response:
        assert response.status_code == 200
        received = list(messages(response))
    response_id = json.loads(received[0].text)["response"]["id"]
    # Byte for byte: the event names and data texts the upstream sent.
    assert [(f.event, f.text) for f in received] == upstream.sent_responses_run(response_id)
    call = upstream.calls[0]
    assert call.path == "/v1/responses"
    assert call.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert call.json == request


def test_responses_run_is_recorded_as_a_typed_stream_and_retrievable(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    events: list[Any] = list(sdk.responses.create(model="ok", input="weather?", stream=True))
    response_id = events[0].response.id
    assert as_sent(events) == expected_run(response_id)
    kinds = [e.type for e in events]
    assert "response.reasoning_text.delta" in kinds
    assert "response.function_call_arguments.delta" in kinds

    native = read_until_end(http, f"/v1/streams/{response_id}/events")
    assert [f.event for f in native[:-1]] == kinds
    assert native[-1].json()["status"] == "done"

    final = sdk.responses.retrieve(response_id)
    assert final.status == "completed"
    assert final.output_text == "".join(ANSWER)
    assert [item.type for item in final.output] == ["reasoning", "function_call", "message"]


def test_responses_cut_connection_then_resume_with_starting_after_while_running(
    sdk: openai.OpenAI, http: httpx.Client, upstream: FakeUpstream
) -> None:
    """The client drops mid-stream; the upstream is held at a gate, so the response is
    still running when the client resumes with starting_after."""
    stream = sdk.responses.create(model="gated", input="weather?", stream=True)
    first = take(5, stream)
    stream.close()  # the cut connection
    response_id = first[0].response.id
    assert stream_status(http, response_id) == "open"

    resumed = sdk.responses.retrieve(
        response_id, stream=True, starting_after=first[-1].sequence_number
    )
    rest = take(GATE_AT - 5, resumed)
    assert stream_status(http, response_id) == "open"
    upstream.release()
    rest += list(resumed)

    assert as_sent(first + rest) == expected_run(response_id)


def test_upstream_is_read_to_the_end_after_the_client_left_then_resume_yields_the_rest(
    sdk: openai.OpenAI, http: httpx.Client, upstream: FakeUpstream
) -> None:
    stream = sdk.responses.create(model="gated", input="weather?", stream=True)
    first = take(3, stream)
    stream.close()
    response_id = first[0].response.id
    upstream.release()
    wait_until(lambda: stream_status(http, response_id) == "done", "the upstream finished")
    assert not upstream.calls[0].client_left.is_set()

    rest = list(sdk.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [e.sequence_number for e in rest] == list(range(3, RUN_LENGTH))
    assert as_sent(first + rest) == expected_run(response_id)
    assert sdk.responses.retrieve(response_id).status == "completed"


def test_upstream_failing_midway_ends_the_stream_with_response_failed(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    events: list[Any] = list(sdk.responses.create(model="fails", input="weather?", stream=True))
    assert [e.sequence_number for e in events] == list(range(GATE_AT + 1))
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None
    assert "connection" in failed.response.error.message

    response_id = events[0].response.id
    end = read_until_end(http, f"/v1/streams/{response_id}/events")[-1].json()
    assert (end["status"], end["error"]["status"]) == ("error", "UNAVAILABLE")
    assert sdk.responses.retrieve(response_id).status == "failed"
    # A resume after the failure replays it and ends; it never hangs.
    resumed = list(sdk.responses.retrieve(response_id, stream=True, starting_after=GATE_AT - 2))
    assert [e.type for e in resumed] == [events[-2].type, "response.failed"]


def test_upstream_error_event_ends_the_stream(sdk: openai.OpenAI, http: httpx.Client) -> None:
    events: list[Any] = list(sdk.responses.create(model="error", input="weather?", stream=True))
    assert events[-1].type == "error"
    end = read_until_end(http, f"/v1/streams/{events[0].response.id}/events")[-1].json()
    assert end["status"] == "error"
    assert end["error"]["message"] == "the GPU fell over"


def test_silent_upstream_times_out_into_response_failed(
    live_server: ServerFactory, upstream: FakeUpstream
) -> None:
    server = live_server(upstream_url=upstream.url, upstream_timeout_seconds=2)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as sdk:
        events: list[Any] = list(
            sdk.responses.create(model="silent", input="weather?", stream=True)
        )
    assert events[-1].type == "response.failed"
    assert "silent" in events[-1].response.error.message
    wait_until(upstream.calls[0].client_left.is_set, "streamkeep hung up on the upstream")


def test_cancel_stops_the_upstream_call_and_ends_the_stream(
    sdk: openai.OpenAI, http: httpx.Client, upstream: FakeUpstream
) -> None:
    stream = sdk.responses.create(model="gated", input="weather?", stream=True)
    before = take(GATE_AT, stream)
    response_id = before[0].response.id
    cancelled = sdk.responses.cancel(response_id)
    assert cancelled.status == "cancelled"
    wait_until(upstream.calls[0].client_left.is_set, "streamkeep hung up on the upstream")
    # The open client stream ends instead of waiting for events that never come.
    assert list(stream) == []
    end = read_until_end(http, f"/v1/streams/{response_id}/events")[-1].json()
    assert end["error"]["status"] == "CANCELLED"
    assert sdk.responses.retrieve(response_id).status == "cancelled"
    # Cancelling again answers with the same end.
    assert sdk.responses.cancel(response_id).status == "cancelled"


def test_upstream_refusal_is_relayed_and_records_nothing(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.responses.create(model="refuse", input="x", stream=True)
    assert err.value.code == "model_not_found"
    assert http.get("/v1/streams").json()["streams"] == []


def test_redirects_from_the_upstream_are_not_followed(
    sdk: openai.OpenAI, upstream: FakeUpstream
) -> None:
    elsewhere = FakeUpstream().start()
    try:
        upstream.redirect_to = f"{elsewhere.url}/responses"
        with pytest.raises(openai.APIStatusError) as err:
            sdk.responses.create(model="redirect", input="x", stream=True)
        assert "redirect" in err.value.message
        assert elsewhere.calls == []
    finally:
        elsewhere.stop()


def test_non_stream_requests_are_passed_through_unrecorded(
    http: httpx.Client, upstream: FakeUpstream
) -> None:
    response = http.post("/v1/responses", json={"model": "ok", "input": "x"})
    assert response.json() == {"id": "resp_plain", "object": "response", "output": []}
    assert upstream.calls[0].headers["Accept"] == "application/json"
    assert http.get("/v1/streams").json()["streams"] == []


@pytest.mark.parametrize(
    "body",
    [
        b"{oops",
        b"[1, 2]",
        b"",
        # Regression: RecursionError passed the 400 and became a 500.
        b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_bad_request_body_is_400_in_openai_shape(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/responses", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_ARGUMENT"


def test_unknown_response_is_404_for_the_sdk(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_nope", stream=True, starting_after=3)


def test_proxy_without_an_upstream_says_how_to_turn_it_on(live_server: ServerFactory) -> None:
    server = live_server()
    response = httpx.post(f"{server.url}/v1/responses", json={"model": "m", "stream": True})
    assert response.status_code == 503
    assert "STREAMKEEP_UPSTREAM_URL" in response.json()["error"]["message"]


# -- chat completions ------------------------------------------------------------------------


def test_chat_completion_cut_then_resume_through_native_sse(
    sdk: openai.OpenAI, http: httpx.Client, upstream: FakeUpstream
) -> None:
    """Chat chunks carry no sequence number: the k-th chunk is event k of the stream."""
    stream = sdk.chat.completions.create(
        model="gated", messages=[{"role": "user", "content": "weather?"}], stream=True
    )
    first = take(4, stream)
    stream.close()
    completion_id = first[0].id

    with http.stream(
        "GET", f"/v1/streams/{completion_id}/events", params={"after": len(first)}
    ) as response:
        received = messages(response)
        rest = [next(received) for _ in range(GATE_AT - len(first))]
        upstream.release()
        rest += list(until_end(received))

    assert [f.seq for f in rest] == list(range(5, len(chat_run("x")) + 2))
    chunks = [c.to_dict() for c in first] + [f.json() for f in rest[:-1]]
    assert chunks == chat_run(completion_id)
    assert rest[-1].json() == {"status": "done", "output": None}


def test_chat_completion_stream_ends_with_done_for_the_sdk(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="ok", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert [c.to_dict() for c in chunks] == chat_run(chunks[0].id)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "".join(ANSWER * 3)


def test_chat_upstream_failure_reaches_the_sdk_as_an_error(
    sdk: openai.OpenAI, http: httpx.Client
) -> None:
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in sdk.chat.completions.create(
            model="fails", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            received.append(chunk)
    assert "connection" in err.value.message
    assert len(received) == GATE_AT
    end = read_until_end(http, f"/v1/streams/{received[0].id}/events")[-1].json()
    assert end["error"]["status"] == "UNAVAILABLE"


# -- the run belongs to the app ----------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_shutdown_ends_running_proxied_streams_with_an_error(
    live_server: ServerFactory, upstream: FakeUpstream, database_url: str
) -> None:
    server = live_server(upstream_url=upstream.url)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        body = {"model": "gated", "input": "x", "stream": True}
        with http.stream("POST", "/v1/responses", json=body) as response:
            first = next(messages(response))
    response_id = json.loads(first.text)["response"]["id"]
    server.stop()
    info = asyncio.run(_info(database_url, response_id))
    assert info.status is StreamStatus.ERROR
    assert info.error_status == "UNAVAILABLE"


async def _info(database_url: str, stream_id: str) -> Any:
    async with create_manager(database_url) as manager:
        return await manager.info(stream_id)


def test_proxy_stream_keeps_idle_clients_alive_with_comments(
    live_server: ServerFactory, upstream: FakeUpstream
) -> None:
    server = live_server(upstream_url=upstream.url, sse_keepalive_seconds=0.05)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        body = {"model": "gated", "input": "x", "stream": True}
        with http.stream("POST", "/v1/responses", json=body) as response:
            received = frames(response)
            assert len(take(GATE_AT, (f for f in received if f.is_message))) == GATE_AT
            # The upstream is held at its gate: the stream is idle now.
            assert next(received) == Frame(comments=["keepalive"])
            upstream.release()
            assert sum(1 for f in received if f.is_message) == RUN_LENGTH - GATE_AT

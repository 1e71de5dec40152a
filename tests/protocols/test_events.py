"""Native typed event streams over HTTP: the producer API and SSE with resume.

Every test runs a real server (uvicorn in a thread) on each backend; the
cross-process ones write from another OS process on a shared SQLite file or
Postgres database while this process reads through the server.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.log import EventKind, NewEvent, create_manager
from tests.conftest import ServerFactory
from tests.protocols.sse import Frame, frames, messages, read_until_end, until_end
from tests.support import ROOT

SHARED_BACKENDS = pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def client(live_server: ServerFactory) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server().url, timeout=30) as c:
        yield c


def create(client: httpx.Client, stream_id: str, **options: Any) -> None:
    response = client.put(f"/v1/streams/{stream_id}", json=options or None)
    assert response.status_code == 201, response.text


def append(client: httpx.Client, stream_id: str, body: Any) -> httpx.Response:
    return client.post(f"/v1/streams/{stream_id}/events", json=body)


def ticks(client: httpx.Client, stream_id: str, count: int) -> None:
    events = [{"type": "tick", "data": {"i": i}} for i in range(count)]
    assert append(client, stream_id, events).status_code == 200


def summary(received: list[Frame]) -> list[tuple[int | None, str | None, Any]]:
    return [(int(f.id) if f.id else None, f.event, f.json()) for f in received]


# -- producing and reading -------------------------------------------------------------


def test_typed_events_round_trip_through_the_producer_api(client: httpx.Client) -> None:
    create(client, "s", ttl_seconds=60)
    batch = [{"type": "greeting", "data": "hi"}, {"data": {"n": 1}}]
    assert append(client, "s", batch).json() == {"first_seq": 1, "last_seq": 2}
    assert append(client, "s", {"type": "tick", "data": None}).json() == {
        "first_seq": 3,
        "last_seq": 3,
    }
    done = client.post("/v1/streams/s/done", json={"output": {"ok": True}})
    assert done.json() == {"seq": 4, "status": "done"}

    assert summary(read_until_end(client, "/v1/streams/s/events")) == [
        (1, "greeting", "hi"),
        (2, None, {"n": 1}),
        (3, "tick", None),
        (4, "end", {"status": "done", "output": {"ok": True}}),
    ]
    info = client.get("/v1/streams/s").json()
    assert (info["status"], info["last_seq"], info["output"]) == ("done", 4, {"ok": True})
    assert info["ttl_seconds"] == 60


def test_sse_starts_with_a_retry_hint_and_sends_the_sse_headers(client: httpx.Client) -> None:
    create(client, "s")
    client.post("/v1/streams/s/close")
    with client.stream("GET", "/v1/streams/s/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        first = next(frames(response))
    assert first.retry == 2000 and not first.is_message


def test_end_frame_says_how_the_stream_ended(client: httpx.Client) -> None:
    create(client, "failed")
    failure = {"status": "RESOURCE_EXHAUSTED", "message": "quota", "details": {"limit": 3}}
    assert client.post("/v1/streams/failed/error", json=failure).status_code == 200
    create(client, "closed")
    assert client.post("/v1/streams/closed/close").json() == {"seq": 1, "status": "closed"}

    assert read_until_end(client, "/v1/streams/failed/events")[-1].json() == {
        "status": "error",
        "error": failure,
    }
    assert read_until_end(client, "/v1/streams/closed/events")[-1].json() == {"status": "closed"}
    info = client.get("/v1/streams/failed").json()
    assert info["error"] == {"status": "RESOURCE_EXHAUSTED", "message": "quota"}


def test_resume_with_after_on_a_finished_stream_yields_exactly_the_rest(
    client: httpx.Client,
) -> None:
    create(client, "s")
    ticks(client, "s", 10)
    client.post("/v1/streams/s/done", json={"output": "fin"})
    rest = read_until_end(client, "/v1/streams/s/events", params={"after": 6})
    assert [f.seq for f in rest] == [7, 8, 9, 10, 11]
    assert [f.json() for f in rest[:-1]] == [{"i": 6}, {"i": 7}, {"i": 8}, {"i": 9}]
    # After the end there is nothing more, ever: 204 makes EventSource stop retrying.
    assert client.get("/v1/streams/s/events", params={"after": 11}).status_code == 204
    assert client.get("/v1/streams/s/events", headers={"Last-Event-ID": "11"}).status_code == 204


def test_last_event_id_wins_over_a_stale_after(client: httpx.Client) -> None:
    """EventSource reconnects to its original URL, ?after= included, plus Last-Event-ID."""
    create(client, "s")
    ticks(client, "s", 5)
    client.post("/v1/streams/s/close")
    rest = read_until_end(
        client, "/v1/streams/s/events", params={"after": 1}, headers={"Last-Event-ID": "4"}
    )
    assert [f.seq for f in rest] == [5, 6]


def test_reader_of_a_running_stream_gets_live_events_then_the_end(
    live_server: ServerFactory,
) -> None:
    server = live_server()
    with (
        httpx.Client(base_url=server.url, timeout=30) as reader,
        httpx.Client(base_url=server.url, timeout=30) as producer,
    ):
        create(producer, "s")
        ticks(producer, "s", 2)
        with reader.stream("GET", "/v1/streams/s/events", params={"after": 1}) as response:
            received = messages(response)
            assert next(received).seq == 2
            ticks(producer, "s", 1)  # written while the reader waits
            assert next(received).json() == {"i": 0}
            producer.post("/v1/streams/s/done", json={})
            assert next(received).json() == {"status": "done", "output": None}


def test_idle_stream_gets_comment_only_keepalives(live_server: ServerFactory) -> None:
    server = live_server(sse_keepalive_seconds=0.05)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        create(client, "s")
        ticks(client, "s", 1)
        with client.stream("GET", "/v1/streams/s/events") as response:
            received = frames(response)
            assert next(f for f in received if f.is_message).seq == 1
            # Caught up, and the stream is idle from now on.
            idle = next(received)
            # Nothing a browser would dispatch: no data line, no id, no event name.
            assert idle == Frame(comments=["keepalive"])
            client.post("/v1/streams/s/close")
            rest = [f for f in received if f.is_message]
    assert [(f.seq, f.event) for f in rest] == [(2, "end")]


def test_unknown_stream_is_404_before_the_stream_starts(client: httpx.Client) -> None:
    response = client.get("/v1/streams/nope/events")
    assert response.status_code == 404
    assert response.json() == {"status": "NOT_FOUND", "message": "stream 'nope' not found"}
    assert client.get("/v1/streams/nope").status_code == 404


def test_expired_stream_is_404(client: httpx.Client) -> None:
    create(client, "short", ttl_seconds=0)
    client.post("/v1/streams/short/done", json={})
    assert client.get("/v1/streams/short/events").status_code == 404
    assert client.get("/v1/streams/short").status_code == 404


def test_listing_shows_the_newest_streams_of_the_log_with_their_status(
    client: httpx.Client,
) -> None:
    create(client, "older")
    create(client, "newer")
    client.post("/v1/streams/older/done", json={"output": 1})
    listed = client.get("/v1/streams").json()["streams"]
    assert [(s["id"], s["status"]) for s in listed] == [("newer", "open"), ("older", "done")]
    assert [s["id"] for s in client.get("/v1/streams", params={"limit": 1}).json()["streams"]] == [
        "newer"
    ]
    done = client.get("/v1/streams", params={"status": "done"}).json()["streams"]
    assert [s["id"] for s in done] == ["older"]
    assert client.get("/v1/streams", params={"status": "finished"}).status_code == 400


# -- bad input changes nothing ----------------------------------------------------------

BAD_APPENDS = [
    pytest.param(b"{not json", id="invalid-json"),
    pytest.param(b'{"data": 1e400}', id="number-out-of-range-was-stored-as-null"),
    pytest.param(b'{"data": "\\udc00"}', id="unpaired-surrogate-was-a-500"),
    pytest.param(
        b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="deep-nesting-was-a-500"
    ),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"[]", id="empty-list"),
    pytest.param(b'"text"', id="not-an-object"),
    pytest.param(b'{"type": "t"}', id="missing-data"),
    pytest.param(b'{"data": 1, "typo": 2}', id="unknown-field"),
    pytest.param(b'{"type": "end", "data": 1}', id="reserved-type"),
    pytest.param(b'{"type": "a\\nb", "data": 1}', id="type-with-newline"),
    pytest.param(b'{"type": 5, "data": 1}', id="type-not-a-string"),
    pytest.param(b'[{"data": 1}, {"data": 2, "type": ""}]', id="one-bad-event-in-a-batch"),
]


@pytest.mark.parametrize("body", BAD_APPENDS)
def test_bad_append_is_400_and_changes_nothing(client: httpx.Client, body: bytes) -> None:
    create(client, "s")
    ticks(client, "s", 1)
    response = client.post(
        "/v1/streams/s/events", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["status"] == "INVALID_ARGUMENT"
    assert response.json()["message"]
    assert client.get("/v1/streams/s").json()["last_seq"] == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/streams/s/error", {"status": "NOT_A_STATUS", "message": "x"}),
        ("/v1/streams/s/error", {"status": "INTERNAL"}),
        ("/v1/streams/s/done", {"result": 1}),
        ("/v1/streams/s/done", [1]),
    ],
)
def test_bad_end_is_400_and_leaves_the_stream_open(
    client: httpx.Client, path: str, body: Any
) -> None:
    create(client, "s")
    assert client.post(path, json=body).status_code == 400
    assert client.get("/v1/streams/s").json()["status"] == "open"


@pytest.mark.parametrize(
    "options",
    [{"ttl_seconds": -1}, {"ttl_seconds": "60"}, {"idle_timeout_seconds": 0}, {"ttl": 5}],
)
def test_bad_create_is_400_and_creates_nothing(client: httpx.Client, options: Any) -> None:
    assert client.put("/v1/streams/s", json=options).status_code == 400
    assert client.get("/v1/streams/s").status_code == 404


def test_writing_to_a_finished_stream_fails_and_changes_nothing(client: httpx.Client) -> None:
    create(client, "s")
    client.post("/v1/streams/s/done", json={"output": 1})
    for path, body in [("events", {"data": 2}), ("done", {}), ("close", None)]:
        response = client.post(f"/v1/streams/s/{path}", json=body)
        assert response.status_code == 400
        assert response.json()["status"] == "FAILED_PRECONDITION"
    info = client.get("/v1/streams/s").json()
    assert (info["last_seq"], info["output"]) == (1, 1)


def test_creating_an_existing_stream_is_409(client: httpx.Client) -> None:
    create(client, "s")
    response = client.put("/v1/streams/s")
    assert response.status_code == 409
    assert response.json()["status"] == "ALREADY_EXISTS"


def test_appending_to_an_unknown_stream_is_404(client: httpx.Client) -> None:
    assert append(client, "nope", {"data": 1}).status_code == 404


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"after": "abc"}, {}),
        ({"after": "-1"}, {}),
        ({}, {"Last-Event-ID": "x"}),
        ({"after": 9}, {}),
    ],
)
def test_bad_or_impossible_cursor_is_400(
    client: httpx.Client, params: dict[str, Any], headers: dict[str, str]
) -> None:
    create(client, "s")
    ticks(client, "s", 2)
    response = client.get("/v1/streams/s/events", params=params, headers=headers)
    assert response.status_code == 400
    assert response.json()["status"] in ("INVALID_ARGUMENT", "OUT_OF_RANGE")


# -- idempotent producers --------------------------------------------------------------


def producer(epoch: int, seq: int, producer_id: str = "worker-1") -> dict[str, str]:
    return {"Producer-Id": producer_id, "Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


def test_a_producers_retried_writes_are_stored_once(client: httpx.Client) -> None:
    """A producer that lost the answer sends the same request again: the events
    and the end must be in the stream once, and the retry must say so."""
    create(client, "s")
    batch = [{"type": "token", "data": 1}, {"type": "token", "data": 2}]
    for _ in range(2):
        response = client.post("/v1/streams/s/events", json=batch, headers=producer(0, 0))
    assert response.status_code == 200
    assert response.json() == {"duplicate": True, "stream_last_seq": 2}
    response = client.post("/v1/streams/s/events", json={"data": 3}, headers=producer(0, 1))
    assert response.json() == {"first_seq": 3, "last_seq": 3}
    done = client.post("/v1/streams/s/done", json={"output": "ok"}, headers=producer(0, 2))
    assert done.json() == {"seq": 4, "status": "done"}
    again = client.post("/v1/streams/s/done", json={"output": "ok"}, headers=producer(0, 2))
    assert again.status_code == 200
    assert again.json() == {"duplicate": True, "stream_last_seq": 4, "status": "done"}

    assert summary(read_until_end(client, "/v1/streams/s/events")) == [
        (1, "token", 1),
        (2, "token", 2),
        (3, None, 3),
        (4, "end", {"status": "done", "output": "ok"}),
    ]


@pytest.mark.parametrize(
    ("accepted", "refused", "status", "code"),
    [
        pytest.param(producer(0, 0), producer(0, 2), 409, "ABORTED", id="seq-gap"),
        pytest.param(producer(1, 0), producer(0, 1), 403, "PERMISSION_DENIED", id="stale-epoch"),
        pytest.param(producer(0, 0), producer(1, 3), 400, "INVALID_ARGUMENT", id="epoch-not-at-0"),
        pytest.param({}, {"Producer-Id": "worker-1"}, 400, "INVALID_ARGUMENT", id="incomplete"),
        pytest.param({}, producer(0, 0) | {"Producer-Seq": "x"}, 400, "INVALID_ARGUMENT", id="nan"),
        pytest.param({}, producer(0, 0, producer_id=""), 400, "INVALID_ARGUMENT", id="empty-id"),
    ],
)
def test_a_refused_producer_write_changes_nothing(
    client: httpx.Client, accepted: dict[str, str], refused: dict[str, str], status: int, code: str
) -> None:
    create(client, "s")
    assert append_as(client, accepted).status_code == 200
    for path, body in [("events", {"data": "late"}), ("done", {}), ("close", None)]:
        response = client.post(f"/v1/streams/s/{path}", json=body, headers=refused)
        assert response.status_code == status, response.text
        assert response.json()["status"] == code
        assert response.json()["message"]
    info = client.get("/v1/streams/s").json()
    assert (info["status"], info["last_seq"]) == ("open", 1)


def append_as(client: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    return client.post("/v1/streams/s/events", json={"data": "first"}, headers=headers)


# -- streams written by other protocols or processes --------------------------------------


async def write_text_and_binary_streams(database_url: str) -> None:
    """Streams written through the log API, as other protocols write them."""
    async with create_manager(database_url) as manager:
        text = await manager.open("text", content_type="text/plain")
        await text.send_event(NewEvent(EventKind.CHUNK, b"line one\nline two"))
        await text.close()
        binary = await manager.open("bin", content_type="application/octet-stream")
        await binary.send_event(NewEvent(EventKind.CHUNK, b"\x00\xff\x10"))
        await binary.done(None)


@SHARED_BACKENDS
def test_any_stream_of_the_log_reads_as_sse_text_and_binary_too(
    live_server: ServerFactory, database_url: str
) -> None:
    asyncio.run(write_text_and_binary_streams(database_url))
    server = live_server()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        text_frames = read_until_end(client, "/v1/streams/text/events")
        assert text_frames[0].text == "line one\nline two"
        with client.stream("GET", "/v1/streams/bin/events") as response:
            assert response.headers["stream-sse-data-encoding"] == "base64"
            first = next(messages(response))
        assert base64.b64decode(first.text) == b"\x00\xff\x10"


@SHARED_BACKENDS
def test_resume_from_another_process_with_last_event_id_then_after(
    live_server: ServerFactory, database_url: str
) -> None:
    """The producer is another OS process; the reader drops and resumes while it runs,
    then once more after it finished."""
    server = live_server()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        create(client, "run")
        command = ["-m", "tests.protocols.gated_producer", database_url, "run", "40", "20"]
        producer = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdin=subprocess.PIPE)
        try:
            # First connection: read 5 events, then drop.
            with client.stream("GET", "/v1/streams/run/events") as response:
                first = [f for _, f in zip(range(5), messages(response), strict=False)]
            assert [f.seq for f in first] == [1, 2, 3, 4, 5]
            # Reconnect as EventSource does: the stale ?after=0 plus Last-Event-ID.
            # The producer is held at its gate after 20 events, so the stream is running.
            headers = {"Last-Event-ID": first[-1].id or ""}
            with client.stream(
                "GET", "/v1/streams/run/events", params={"after": 0}, headers=headers
            ) as response:
                received = messages(response)
                second = [next(received) for _ in range(15)]
                assert client.get("/v1/streams/run").json()["status"] == "open"
                open_gate(producer)
                second += list(until_end(received))
            assert producer.wait(60) == 0
        finally:
            producer.kill()
        everything = first + second
        assert [f.seq for f in everything] == list(range(1, 42))
        assert [f.json()["i"] for f in everything[:-1]] == list(range(40))
        assert everything[-1].json() == {"status": "done", "output": {"count": 40}}
        # And after the end, from the finished stream, with ?after= alone.
        tail = read_until_end(client, "/v1/streams/run/events", params={"after": 37})
        assert [f.seq for f in tail] == [38, 39, 40, 41]


def open_gate(producer: subprocess.Popen[bytes]) -> None:
    assert producer.stdin is not None
    producer.stdin.write(b"go\n")
    producer.stdin.close()


def test_envelope_makes_every_event_an_unnamed_message_with_its_type(
    client: httpx.Client,
) -> None:
    """For generic viewers: EventSource dispatches only the event names it listens for."""
    create(client, "s")
    append(client, "s", [{"type": "text", "data": "hi"}, {"data": [1, 2]}])
    client.post("/v1/streams/s/close")
    received = read_until_end(client, "/v1/streams/s/events", params={"envelope": "true"})
    assert summary(received) == [
        (1, None, {"type": "text", "data": "hi"}),
        (2, None, {"type": None, "data": [1, 2]}),
        (3, "end", {"status": "closed"}),
    ]
    assert client.get("/v1/streams/s/events", params={"envelope": "maybe"}).status_code == 400

"""Flow runs read through the Durable Streams protocol as read-only JSON streams:
from the start, from an offset, and live. A real run started at /flows/{name},
and runs written through the StreamManager the way the flow runner writes them
(application/json chunks, then done or error) by another manager on the same
database, as the flow endpoint of another replica would."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from app.config import Settings
from app.errors import Status, StreamError
from app.log import StreamManager, create_manager
from tests.conftest import ServerFactory
from tests.live import LiveServer


@pytest.fixture
def server(shared_url: str) -> Iterator[LiveServer]:
    server = LiveServer(
        Settings(database_url=shared_url, long_poll_timeout=2.0, sqlite_poll_seconds=0.02)
    ).start()
    yield server
    server.stop()


@pytest.fixture
async def flows(shared_url: str) -> AsyncIterator[StreamManager]:
    manager = create_manager(shared_url, sqlite_poll_seconds=0.02)
    await manager.start()
    yield manager
    await manager.close()


async def test_flow_run_reads_as_a_json_stream_with_its_result_last(
    server: LiveServer, flows: StreamManager
) -> None:
    writer = await flows.open("run-1")  # application/json, as the flow runner opens it
    await writer.write({"token": "Hel"})
    await writer.write({"token": "lo"})
    url = f"{server.url}/v1/stream/run-1"
    async with httpx.AsyncClient(timeout=10) as client:
        first = await client.get(url, params={"offset": "-1"})
        assert first.headers["content-type"] == "application/json"
        assert first.json() == [{"token": "Hel"}, {"token": "lo"}]
        assert "stream-closed" not in first.headers
        saved = first.headers["stream-next-offset"]

        # Live: a long-poll from the saved offset wakes on the next chunk.
        waiting = asyncio.create_task(
            client.get(url, params={"offset": saved, "live": "long-poll"})
        )
        await asyncio.sleep(0.2)
        await writer.write({"token": "!"})
        live = await waiting
        assert (live.status_code, live.json()) == (200, [{"token": "!"}])

        await writer.done({"text": "Hello!"})
        rest = await client.get(url, params={"offset": live.headers["stream-next-offset"]})
        assert rest.json() == [{"result": {"text": "Hello!"}}]
        assert rest.headers["stream-closed"] == "true"
        everything = await client.get(url, params={"offset": saved})
        assert everything.json() == [{"token": "!"}, {"result": {"text": "Hello!"}}]
        at_end = await client.get(url, params={"offset": rest.headers["stream-next-offset"]})
        assert (at_end.json(), at_end.headers["stream-closed"]) == ([], "true")


async def test_flow_run_is_followed_over_sse_to_its_error(
    server: LiveServer, flows: StreamManager
) -> None:
    writer = await flows.open("run-2")
    await writer.write("first")
    url = f"{server.url}/v1/stream/run-2"
    events: list[tuple[str, str]] = []

    async def follow() -> None:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response,
        ):
            assert response.headers["content-type"] == "text/event-stream"
            kind = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data:"):
                    events.append((kind, line.removeprefix("data:")))

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    await writer.write("second")
    await writer.error(StreamError(Status.INVALID_ARGUMENT, "bad prompt"))
    await asyncio.wait_for(reader, 10)  # the response ends after the final control
    data = [json.loads(d) for kind, d in events if kind == "data"]
    assert [item for batch in data for item in batch] == [
        "first",
        "second",
        {"error": {"status": "INVALID_ARGUMENT", "message": "bad prompt"}},
    ]
    final = json.loads(events[-1][1])
    assert final["streamClosed"] is True and "streamCursor" not in final


async def test_flow_run_is_read_only_through_the_protocol(
    server: LiveServer, flows: StreamManager
) -> None:
    await flows.open("run-3")
    url = f"{server.url}/v1/stream/run-3"
    async with httpx.AsyncClient(timeout=10) as client:
        append = await client.post(
            url, content=b'{"x":1}', headers={"content-type": "application/json"}
        )
        close = await client.post(url, headers={"stream-closed": "true"})
        create = await client.put(url, headers={"content-type": "application/json"})
        delete = await client.delete(url)
        assert [r.status_code for r in (append, close, create, delete)] == [409] * 4
        assert (await client.head(url)).status_code == 200
    assert (await flows.info("run-3")).last_seq == 0


def test_a_real_flow_run_is_followed_live_and_resumed_as_a_json_stream(
    live_server: ServerFactory,
) -> None:
    """POST /flows/countdown starts a run; a Durable Streams client follows it
    by its stream id with long-polls until it is closed, then resumes mid-way."""
    server = live_server(long_poll_timeout=0.5)
    start = {"count": 5, "delay_ms": 150}
    with httpx.stream(
        "POST",
        f"{server.url}/flows/countdown",
        json={"data": start},
        headers={"accept": "text/event-stream"},
    ) as response:
        run_id = response.headers["x-genkit-stream-id"]  # sent at once; we hang up here
    url = f"{server.url}/v1/stream/{run_id}"
    items: list[object] = []
    offsets: list[str] = []
    offset = "-1"
    for _ in range(100):
        poll = httpx.get(url, params={"offset": offset, "live": "long-poll"}, timeout=10)
        assert poll.status_code in (200, 204)
        if poll.status_code == 200:
            assert poll.headers["content-type"] == "application/json"
            items += poll.json()
            offsets += [poll.headers["stream-next-offset"]] * len(poll.json())
        offset = poll.headers["stream-next-offset"]
        if poll.headers.get("stream-closed") == "true":
            break
    assert items == [5, 4, 3, 2, 1, {"result": "countdown from 5 done"}]
    resumed = httpx.get(url, params={"offset": offsets[1]})
    assert resumed.json() == [3, 2, 1, {"result": "countdown from 5 done"}]
    assert resumed.headers["stream-closed"] == "true"

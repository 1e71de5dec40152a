"""Limits and slow readers: clear errors that change nothing, and bounded memory."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.errors import Status, StreamError
from app.flows import Flow, SendChunk
from app.flows.runner import FlowRunner
from app.log import StreamManager
from tests.conftest import ManagerFactory, ServerFactory
from tests.support import free_port
from tests.test_ops import start_service

SSE = {"Accept": "text/event-stream"}


async def test_too_large_event_is_refused_with_413_and_nothing_stored(
    make_manager: ManagerFactory,
) -> None:
    manager = make_manager(max_event_bytes=1000)
    await manager.start()
    writer = await manager.open("s")
    with pytest.raises(StreamError) as err:
        await writer.write("x" * 1000)
    assert err.value.status is Status.RESOURCE_EXHAUSTED and err.value.http == 413
    assert (await manager.info("s")).last_seq == 0
    await writer.write("x" * 10)  # the writer still works


async def test_readers_per_stream_are_capped(make_manager: ManagerFactory) -> None:
    manager = make_manager(max_readers_per_stream=2)
    await manager.start()
    await manager.open("s")
    readers = [await manager.subscribe("s") for _ in range(2)]
    first_steps = [asyncio.ensure_future(r.__anext__()) for r in readers]
    await asyncio.sleep(0.05)  # both are attached and waiting
    with pytest.raises(StreamError) as err:
        await manager.subscribe("s")
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    for step in first_steps:
        step.cancel()


async def test_open_streams_are_capped(make_manager: ManagerFactory) -> None:
    manager: StreamManager = make_manager(max_open_streams=2)
    await manager.start()
    await manager.open("a")
    await manager.open("b")
    with pytest.raises(StreamError) as err:
        await manager.open("c")
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    await manager.writer("a").done(None)
    await manager.open("c")  # a finished stream no longer counts


def test_request_body_over_the_limit_is_413_json(live_server: ServerFactory) -> None:
    server = live_server(max_request_bytes=1000)
    response = httpx.post(
        f"{server.url}/flows/countdown", content=b'{"data": "' + b"x" * 2000 + b'"}', headers=SSE
    )
    assert response.status_code == 413
    assert response.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_unknown_route_is_404_json(live_server: ServerFactory) -> None:
    response = httpx.get(f"{live_server().url}/no/such/route")
    assert response.status_code == 404
    assert response.json()["error"]["status"] == "NOT_FOUND"


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_stalled_readers_cost_bounded_memory_and_do_not_hold_up_others(sqlite_url: str) -> None:
    """200 readers: 50 that never read a byte of a 40 MB stream, 150 that read another."""
    port = free_port()
    env = {
        "STREAMKEEP_FLOWS": "tests.protocols.flows_for_tests",
        "STREAMKEEP_STALL_TIMEOUT_SECONDS": "4",
    }
    server = start_service(sqlite_url, port, env=env)
    try:
        result = asyncio.run(_readers_scenario(port, server.pid))
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert result["complete_readers"] == 150, result
    # 50 stalled readers of 40 MB would be 2 GB if the server buffered for them;
    # they hold only their socket buffers.
    assert result["rss_growth_mb"] < 200, result
    # Then they are dropped: each got far less than the stream, and none is left.
    assert result["most_a_stalled_reader_got_mb"] < 20, result
    assert result["live_readers_after_stall_timeout"] == 0, result


async def _raw_reconnect(
    port: int, stream_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /flows/firehose HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        f"X-Genkit-Stream-Id: {stream_id}\r\nContent-Length: 2\r\n\r\n{{}}".encode()
    )
    await writer.drain()
    return reader, writer


async def _readers_scenario(port: int, pid: int) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        baseline = _rss_mb(pid)
        big = await _start_run(client, base, count=20_000, size=2000)
        stalled = [await _raw_reconnect(port, big) for _ in range(50)]
        busy = await _start_run(client, base, count=2000, size=500)

        async def read_all() -> bool:
            async with client.stream(
                "POST",
                f"{base}/flows/firehose",
                content=b"{}",
                headers={**SSE, "X-Genkit-Stream-Id": busy},
            ) as response:
                body = b"".join([data async for data in response.aiter_raw()])
            return body.count(b"\n\n") == 2001 and body.endswith(b'{"result":2000}\n\n')

        done = await asyncio.wait_for(asyncio.gather(*[read_all() for _ in range(150)]), 240)
        peak = _rss_mb(pid)
        live = await _live_readers_when_zero(client, base)
    received = [await _read_until_closed(reader) for reader, _ in stalled]
    for _, writer in stalled:
        writer.close()
    return {
        "complete_readers": sum(done),
        "rss_growth_mb": peak - baseline,
        "most_a_stalled_reader_got_mb": max(received) / 1e6,
        "live_readers_after_stall_timeout": live,
    }


async def _start_run(client: httpx.AsyncClient, base: str, count: int, size: int) -> str:
    """Starts a firehose run and leaves it running; returns its stream id."""
    request = client.build_request(
        "POST",
        f"{base}/flows/firehose",
        json={"data": {"count": count, "size": size, "pause_ms": 1}},
        headers=SSE,
    )
    started = await client.send(request, stream=True)
    stream_id = started.headers["x-genkit-stream-id"]
    await started.aclose()  # the run goes on without us
    return stream_id


async def _live_readers_when_zero(client: httpx.AsyncClient, base: str) -> float:
    live = -1.0
    for _ in range(150):
        metrics = (await client.get(f"{base}/metrics")).text
        live = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("streamkeep_live_readers ")
        )
        if live == 0:
            break
        await asyncio.sleep(0.2)
    return live


async def _read_until_closed(reader: asyncio.StreamReader) -> int:
    received = 0
    async with asyncio.timeout(30):
        while data := await reader.read(1 << 20):
            received += len(data)
    return received


async def _drain(response: httpx.Response, count: int) -> bool:
    frames = 0
    async for data in response.aiter_raw():
        frames += data.count(b"\n\n")
    return frames == count + 1


async def test_too_large_pushed_chunk_is_refused_too(make_manager: ManagerFactory) -> None:
    """Regression: push() (a flow's send_chunk) skipped the event size limit."""
    manager = make_manager(max_event_bytes=1000)
    await manager.start()
    writer = await manager.open("s")
    with pytest.raises(StreamError) as err:
        writer.push("x" * 1000)
    assert err.value.http == 413
    await writer.flush()
    assert (await manager.info("s")).last_seq == 0


async def test_a_flow_that_awaits_send_chunk_runs_with_a_bounded_backlog(
    make_manager: ManagerFactory,
) -> None:
    """send_chunk returns what push returns: a flow faster than the database may
    await it, and then never has much more than the limit waiting in memory."""
    manager = make_manager(push_backlog_bytes=20_000)
    await manager.start()
    most_waiting = 0

    async def firehose(data: Any, send_chunk: SendChunk) -> str:
        nonlocal most_waiting
        for n in range(400):
            await send_chunk(f"{n:04d}" + "x" * 500)
            committed = manager.stats.appends.get("flows", 0)
            most_waiting = max(most_waiting, (n + 1) - committed)
        return "done"

    runner = FlowRunner(manager)
    stream_id = await runner.start(Flow("firehose", firehose), None)
    events = await manager.subscribe(stream_id)
    received = [event async for event in events]
    assert len(received) == 401 and received[-1].json() == "done"
    # 20,000 bytes are 39 chunks of 506; one more may join before the wait.
    assert most_waiting <= 40

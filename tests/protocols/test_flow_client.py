"""The Python flow client (app.client.stream_flow) against a real server."""

from __future__ import annotations

import pytest

from app.client import stream_flow
from app.errors import Status, StreamError
from tests.conftest import ServerFactory
from tests.live import LiveServer
from tests.support import CuttingProxy


@pytest.fixture
def server(live_server: ServerFactory) -> LiveServer:
    return live_server()


async def test_run_gives_chunks_result_and_stream_id(server: LiveServer) -> None:
    async with stream_flow(f"{server.url}/flows/countdown", input={"count": 4}) as run:
        chunks = [c async for c in run]
    assert chunks == [4, 3, 2, 1]
    assert run.result == "countdown from 4 done"
    assert run.stream_id


async def test_follow_an_existing_run_by_id(server: LiveServer) -> None:
    url = f"{server.url}/flows/countdown"
    async with stream_flow(url, input={"count": 3}) as first:
        assert [c async for c in first] == [3, 2, 1]
    async with stream_flow(url, stream_id=first.stream_id) as again:
        assert [c async for c in again] == [3, 2, 1]
    assert again.result == first.result


async def test_failed_run_raises_its_error_after_its_chunks(server: LiveServer) -> None:
    received = []
    async with stream_flow(f"{server.url}/flows/fail_midway", input={"count": 6}) as run:
        with pytest.raises(StreamError) as err:
            async for chunk in run:
                received.append(chunk)
    assert received == [6, 5, 4]
    assert err.value.status is Status.INTERNAL
    assert err.value.message == "fail_midway: failed after 3 of 6 chunks"


async def test_unknown_id_raises_not_found(server: LiveServer) -> None:
    async with stream_flow(f"{server.url}/flows/countdown", stream_id="nope") as run:
        with pytest.raises(StreamError) as err:
            _ = [c async for c in run]
    assert err.value.status is Status.NOT_FOUND


async def test_a_cut_connection_is_resumed_without_repeats(server: LiveServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    async with CuttingProxy(port, cut_after=420) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/flows/countdown"
        async with stream_flow(url, input={"count": 30, "delay_ms": 10}) as run:
            chunks = [c async for c in run]
        assert proxy.connections >= 2  # it really was cut and resumed
    assert chunks == list(range(30, 0, -1))
    assert run.result == "countdown from 30 done"

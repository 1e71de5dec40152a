"""The Python Durable Streams client (PyPI durable-streams 0.1.0) as a real client
of streamkeep, on every backend. Its 0.1.0 release has no idempotent producer,
so producer retries go through plain httpx, as that client's newer versions do."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import httpx
from durable_streams import DurableStream, stream

from tests.conftest import ServerFactory


def stream_url(base: str, name: str) -> str:
    return f"{base}/v1/stream/py-{name}-{uuid.uuid4().hex[:8]}"


def test_create_append_read_and_resume(live_server: ServerFactory) -> None:
    url = stream_url(live_server().url, "basic")
    handle = DurableStream.create(url, content_type="text/plain", body="a;")
    appended = handle.append("b;")
    with stream(url, offset="-1", live=False) as response:
        text, saved = response.read_text(), response.offset
    assert text == "a;b;" and saved == appended.next_offset
    handle.append("c;")
    handle.append("d;")
    with stream(url, offset=saved, live=False) as response:
        assert response.read_text() == "c;d;"


def test_json_stream_reads_back_values(live_server: ServerFactory) -> None:
    url = stream_url(live_server().url, "json")
    handle = DurableStream.create(url, content_type="application/json")
    for value in ({"a": 1}, [1, 2], "three", None):
        handle.append(value)
    with stream(url, offset="-1", live=False) as response:
        assert response.read_json() == [{"a": 1}, [1, 2], "three", None]


def follow(
    url: str,
    mode: Literal["long-poll", "sse"],
    reader: str,
    count: int,
    write: Callable[[int], Any],
) -> list[Any]:
    """Follow `url` live while another thread appends `count` messages."""

    def writer() -> None:
        for i in range(count):
            time.sleep(0.8 if i == 2 else 0.2)  # one pause longer than the long-poll wait
            write(i)

    threading.Thread(target=writer, daemon=True).start()
    got: list[Any] = []
    deadline = time.monotonic() + 15
    with stream(url, offset="-1", live=mode, timeout=10) as response:
        for item in getattr(response, reader)():
            if item not in (None, "", []):
                got.append(item)
            if len(got) >= count or time.monotonic() > deadline:
                break
    return got


def test_follow_a_json_stream_live_over_sse(live_server: ServerFactory) -> None:
    url = stream_url(live_server(long_poll_timeout=0.5).url, "sse")
    handle = DurableStream.create(url, content_type="application/json")
    got = follow(url, "sse", "iter_json", 4, lambda i: handle.append({"i": i}))
    assert got == [{"i": i} for i in range(4)]


def test_follow_a_text_stream_live_with_long_poll(live_server: ServerFactory) -> None:
    url = stream_url(live_server(long_poll_timeout=0.5).url, "long-poll")
    handle = DurableStream.create(url, content_type="text/plain")
    got = follow(url, "long-poll", "iter_text", 4, lambda i: handle.append(f"m{i};"))
    assert "".join(got) == "m0;m1;m2;m3;"


def test_idempotent_producer_retries_are_stored_once(live_server: ServerFactory) -> None:
    url = stream_url(live_server().url, "producer")
    DurableStream.create(url, content_type="application/json")

    def send(seq: int, epoch: int = 0) -> httpx.Response:
        headers = {
            "content-type": "application/json",
            "producer-id": "p1",
            "producer-epoch": str(epoch),
            "producer-seq": str(seq),
        }
        return httpx.post(url, headers=headers, content=json.dumps([{"m": seq}]))

    # seq 1 is sent twice (its response was "lost"), then an old retry of seq 0.
    assert [send(s).status_code for s in (0, 1, 1, 0)] == [200, 200, 204, 204]
    assert send(1).headers["producer-seq"] == "1"
    gap = send(5)
    assert (gap.status_code, gap.headers["producer-expected-seq"]) == (409, "2")
    assert send(0, epoch=1).status_code == 200  # a new epoch takes over
    stale = send(2, epoch=0)
    assert (stale.status_code, stale.headers["producer-epoch"]) == (403, "1")
    with stream(url, offset="-1", live=False) as response:
        assert response.read_json() == [{"m": 0}, {"m": 1}, {"m": 0}]

"""Two streamkeep processes on one database: appends made through one wake the
long-poll and SSE readers held by the other (Postgres NOTIFY, the SQLite poll)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.protocols.process import ServerProcess


@pytest.fixture
def two_servers(shared_url: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers = [
        ServerProcess(shared_url, tmp_path / f"server-{i}.log", long_poll_timeout="5")
        for i in range(2)
    ]
    try:
        yield [s.wait_ready() for s in servers]
    finally:
        for s in servers:
            s.stop()


def append(server: ServerProcess, path: str, text: str) -> None:
    response = httpx.post(
        f"{server.url}/v1/stream/{path}", content=text, headers={"content-type": "text/plain"}
    )
    assert response.status_code == 204, response.text


@pytest.mark.slow
def test_long_poll_on_one_process_wakes_on_an_append_through_the_other(
    two_servers: list[ServerProcess],
) -> None:
    writer, reader = two_servers
    url = f"{reader.url}/v1/stream/cross-lp"
    assert (
        httpx.put(
            f"{writer.url}/v1/stream/cross-lp", headers={"content-type": "text/plain"}
        ).status_code
        == 201
    )
    tail = httpx.head(url).headers["stream-next-offset"]
    result: dict[str, httpx.Response] = {}
    poll = threading.Thread(
        target=lambda: result.setdefault(
            "r", httpx.get(url, params={"offset": tail, "live": "long-poll"}, timeout=30)
        )
    )
    poll.start()
    threading.Event().wait(0.5)  # the reader is waiting (its timeout is 5 s)
    append(writer, "cross-lp", "hello")
    poll.join(30)
    # 200 with the data: the wake-up came before the 5 s timeout (a 204 would be empty).
    assert (result["r"].status_code, result["r"].text) == (200, "hello")


@pytest.mark.slow
def test_sse_on_one_process_follows_appends_through_the_other_until_closed(
    two_servers: list[ServerProcess],
) -> None:
    writer, reader = two_servers
    path = "cross-sse"
    httpx.put(f"{writer.url}/v1/stream/{path}", headers={"content-type": "application/json"})
    received: list[object] = []
    closed = threading.Event()

    def follow() -> None:
        params = {"offset": "-1", "live": "sse"}
        with httpx.stream("GET", f"{reader.url}/v1/stream/{path}", params=params, timeout=30) as r:
            event = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data:") and event == "data":
                    received.extend(json.loads(line[5:]))
                elif line.startswith("data:") and json.loads(line[5:]).get("streamClosed"):
                    closed.set()

    thread = threading.Thread(target=follow)
    thread.start()
    for i in range(3):
        threading.Event().wait(0.3)
        response = httpx.post(
            f"{writer.url}/v1/stream/{path}",
            content=json.dumps({"i": i}),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 204
    httpx.post(f"{writer.url}/v1/stream/{path}", headers={"stream-closed": "true"})
    thread.join(30)
    assert closed.is_set() and received == [{"i": 0}, {"i": 1}, {"i": 2}]

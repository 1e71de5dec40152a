"""Genkit's own JS client (genkit@1.42.0, genkit/beta/client) against streamkeep, unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerFactory
from tests.live import LiveServer
from tests.support import ROOT, free_port

GENKIT_DIR = ROOT / "tests" / "node" / "genkit"


@pytest.fixture(scope="session")
def genkit_client() -> Path:
    if not (GENKIT_DIR / "node_modules" / "genkit").is_dir():
        raise RuntimeError(
            "the Genkit JS client is not installed: "
            "cd tests/node/genkit && npm ci --omit=optional (scripts/test.sh does this)"
        )
    return GENKIT_DIR / "client.mjs"


def run_client(client: Path, scenario: str, url: str, args: dict[str, Any]) -> dict[str, Any]:
    # An OS-level timeout: a body without a terminal frame makes the client spin
    # forever, and then no timer inside Node fires.
    result = subprocess.run(
        ["timeout", "90", "node", str(client), scenario, url, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    observed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert not observed.get("timedOut"), observed
    return observed


@pytest.fixture
def server(live_server: ServerFactory) -> LiveServer:
    return live_server()


def flow_url(server: LiveServer, name: str) -> str:
    return f"{server.url}/flows/{name}"


def delivered(observed: dict[str, Any]) -> list[Any]:
    """Chunks the client received, including those its error handling drops.

    genkit@1.42.0 stops its chunk iterator at an error frame even when chunks
    that arrived in the same read are still unread; the harness reports those.
    """
    return list(observed["chunks"]) + list(observed.get("unreadOnError") or [])


def test_run_whole(genkit_client: Path, server: LiveServer) -> None:
    seen = run_client(genkit_client, "run", flow_url(server, "countdown"), {"input": {"count": 5}})
    assert seen["chunks"] == [5, 4, 3, 2, 1]
    assert seen["output"] == "countdown from 5 done"
    assert seen["streamId"]


def test_disconnect_midway_and_reconnect(genkit_client: Path, server: LiveServer) -> None:
    seen = run_client(
        genkit_client,
        "disconnect-reconnect",
        flow_url(server, "countdown"),
        {"input": {"count": 8, "delay_ms": 50}, "k": 3},
    )
    assert seen["live"]["chunks"] == [8, 7, 6]
    assert seen["reconnect"]["chunks"] == [8, 7, 6, 5, 4, 3, 2, 1]
    assert seen["reconnect"]["output"] == "countdown from 8 done"
    assert seen["reconnectStreamId"] == seen["live"]["streamId"]


def test_reconnect_after_completion(genkit_client: Path, server: LiveServer) -> None:
    url = flow_url(server, "countdown")
    first = run_client(genkit_client, "run", url, {"input": {"count": 4}})
    again = run_client(genkit_client, "reconnect", url, {"stream_id": first["streamId"]})
    assert again["chunks"] == first["chunks"] == [4, 3, 2, 1]
    assert again["output"] == first["output"]
    assert again["streamId"] == first["streamId"]


def test_failed_run_gives_the_same_error_on_reconnect(
    genkit_client: Path, server: LiveServer
) -> None:
    url = flow_url(server, "fail_midway")
    live = run_client(genkit_client, "run", url, {"input": {"count": 6, "delay_ms": 20}})
    expected_error = "INTERNAL: fail_midway: failed after 3 of 6 chunks\nundefined"
    assert live["error"] == expected_error
    assert delivered(live) == [6, 5, 4]
    again = run_client(genkit_client, "reconnect", url, {"stream_id": live["streamId"]})
    assert again["error"] == expected_error
    assert delivered(again) == [6, 5, 4]


def test_unknown_id_is_not_found(genkit_client: Path, server: LiveServer) -> None:
    seen = run_client(
        genkit_client, "reconnect", flow_url(server, "countdown"), {"stream_id": "no-such-run"}
    )
    assert seen["error"] == "NOT_FOUND: Stream not found."


def test_thousand_chunks_with_a_slow_reader(genkit_client: Path, server: LiveServer) -> None:
    seen = run_client(
        genkit_client,
        "slow",
        flow_url(server, "countdown"),
        {"input": {"count": 1000}, "delay_ms": 1},
    )
    assert seen["chunks"] == list(range(1000, 0, -1))
    assert seen["output"] == "countdown from 1000 done"


def test_run_flow_non_streaming(genkit_client: Path, server: LiveServer) -> None:
    ok = run_client(
        genkit_client, "runflow", flow_url(server, "countdown"), {"input": {"count": 2}}
    )
    assert ok["output"] == "countdown from 2 done"
    failed = run_client(
        genkit_client, "runflow", flow_url(server, "fail_midway"), {"input": {"count": 4}}
    )
    assert failed["error"] == (
        "Server returned: 500: "
        '{"error":{"status":"INTERNAL","message":"fail_midway: failed after 2 of 4 chunks"}}'
    )


@pytest.mark.postgres
@pytest.mark.slow
def test_run_on_one_process_reconnect_on_another(genkit_client: Path, pg_url: str) -> None:
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--database-url", pg_url, "serve", "--port", str(p)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    try:
        urls = [f"http://127.0.0.1:{p}/flows/countdown" for p in ports]
        for url in urls:
            _wait_until_up(url.replace("/flows/countdown", "/healthz"))
        seen = run_client(
            genkit_client,
            "disconnect-reconnect",
            urls[0],
            {"input": {"count": 10, "delay_ms": 50}, "k": 2, "reconnect_url": urls[1]},
        )
        assert seen["live"]["chunks"] == [10, 9]
        assert seen["reconnect"]["chunks"] == list(range(10, 0, -1))
        assert seen["reconnect"]["output"] == "countdown from 10 done"
    finally:
        for process in servers:
            process.terminate()
            process.wait(20)


def _wait_until_up(url: str) -> None:
    import time

    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")

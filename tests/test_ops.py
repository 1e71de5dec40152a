"""Operating the service: readiness, metrics, logs, the inspection commands, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from app.observability import REQUEST_BUCKETS, Metrics, RequestLatencies, new_request_id
from tests.conftest import ServerFactory
from tests.support import ROOT, free_port

SSE = {"Accept": "text/event-stream"}


def test_readyz_reports_each_check(live_server: ServerFactory) -> None:
    server = live_server()
    response = httpx.get(f"{server.url}/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "schema": "ok", "listener": "ok"},
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_change_as_appends_happen(live_server: ServerFactory) -> None:
    server = live_server()
    before = httpx.get(f"{server.url}/metrics").text
    httpx.post(f"{server.url}/flows/countdown", json={"data": {"count": 5}}, headers=SSE)
    after = httpx.get(f"{server.url}/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    name = 'streamkeep_appends_total{protocol="flows"}'
    assert _metric(after.text, name) == _metric(before, name) + 6  # 5 chunks and the result
    assert _metric(after.text, "streamkeep_commits_total") > _metric(
        before, "streamkeep_commits_total"
    )
    assert "streamkeep_request_duration_seconds_bucket" in after.text
    assert 'route="/flows/{name}"' in after.text  # templates, not stream ids, as labels


def _count_of(metrics: str, route: str, status: int) -> float:
    labels = f'method="POST",route="{route}",status="{status}"'
    return _metric(metrics, f"streamkeep_request_duration_seconds_count{{{labels}}}")


def test_a_producer_that_dies_mid_request_is_logged_499_not_500(
    live_server: ServerFactory,
) -> None:
    """Regression: a producer killed while its append was on the wire (the Postgres
    restart fault test, under load) showed in the access log and the metrics as
    a 500, because Litestar answers a body cut short with one, to nobody."""
    server = live_server()
    assert httpx.put(f"{server.url}/v1/streams/cut").status_code == 201
    route = "/v1/streams/{stream_id}/events"
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/streams/cut/events HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"data": '
        )
    deadline = time.monotonic() + 30
    while _count_of(metrics := httpx.get(f"{server.url}/metrics").text, route, 499) < 1:
        assert time.monotonic() < deadline, f"500s: {_count_of(metrics, route, 500)}"
        time.sleep(0.05)
    assert _count_of(metrics, route, 500) == 0
    assert httpx.get(f"{server.url}/v1/streams/cut").json()["last_seq"] == 0


def test_every_response_carries_a_request_id(live_server: ServerFactory) -> None:
    server = live_server()
    generated = httpx.get(f"{server.url}/healthz").headers["x-request-id"]
    assert len(generated) == 32
    echoed = httpx.get(f"{server.url}/healthz", headers={"X-Request-Id": "edge-42"})
    assert echoed.headers["x-request-id"] == "edge-42"
    ignored = httpx.get(f"{server.url}/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert ignored.headers["x-request-id"] != "bad id\twith spaces"


def test_generated_request_ids_are_unique_and_32_hex_digits() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


FORKED_IDS = """
import os
from app.observability import new_request_id
read_end, write_end = os.pipe()
if os.fork() == 0:
    os.write(write_end, new_request_id().encode())
    os._exit(0)
os.close(write_end)
os.wait()
print(os.read(read_end, 64).decode(), new_request_id())
"""


def test_a_forked_process_generates_request_ids_of_its_own() -> None:
    """Guards the counter's prefix: a child forked from a preloaded app (one
    worker process per core) would otherwise repeat its parent's ids. (In a
    fresh interpreter: forking this multi-threaded test process is unsafe.)"""
    completed = subprocess.run(
        [sys.executable, "-c", FORKED_IDS], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    child_id, parent_id = completed.stdout.split()
    assert len(child_id) == len(parent_id) == 32
    assert child_id[:16] != parent_id[:16]


def test_request_latencies_read_as_prometheus_clients_histogram() -> None:
    """Our lock-free histogram must expose what prometheus_client's Histogram would."""
    ours = Metrics()
    registry = CollectorRegistry()
    theirs = Histogram(
        "streamkeep_request_duration_seconds",
        "Time from request to the end of the response (streams: until they end).",
        ["method", "route", "status"],
        registry=registry,
        buckets=REQUEST_BUCKETS,
    )
    # On a bound, just above one, below the first, past the last.
    samples = [("GET", "/healthz", 200, s) for s in (0.001, 0.005, 0.0051, 0.3, 1, 299, 301)]
    samples.append(("POST", "/v1/stream/{path:path}", 409, 0.02))
    for method, route, status, seconds in samples:
        ours.observe_request(method, route, status, seconds)
        theirs.labels(method, route, str(status)).observe(seconds)

    def series(text: bytes) -> list[str]:
        lines = text.decode().splitlines()
        return sorted(line for line in lines if line.startswith(RequestLatencies.NAME + "_"))

    expected = [line for line in series(generate_latest(registry)) if "_created" not in line]
    assert series(ours.render()) == expected
    assert len(expected) == 2 * (len(REQUEST_BUCKETS) + 3)  # buckets, +Inf, _count, _sum


def test_path_prefix(live_server: ServerFactory) -> None:
    server = live_server(path_prefix="/streamkeep/")
    assert httpx.get(f"{server.url}/streamkeep/healthz").status_code == 200
    assert httpx.get(f"{server.url}/healthz").status_code == 404
    response = httpx.post(
        f"{server.url}/streamkeep/flows/countdown", json={"data": {"count": 1}}, headers=SSE
    )
    assert response.content.endswith(b'data: {"result":"countdown from 1 done"}\n\n')


# -- the service as a process ------------------------------------------------------------


def start_service(
    url: str, port: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "--database-url",
            url,
            "serve",
            "--port",
            str(port),
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[0])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("service did not start")


def test_json_logs_one_line_per_request_without_payloads(shared_url: str) -> None:
    port = free_port()
    process = start_service(shared_url, port, env={"STREAMKEEP_LOG_FORMAT": "json"})
    try:
        httpx.post(
            f"http://127.0.0.1:{port}/flows/echo",
            json={"data": "SECRET-PAYLOAD"},
            headers=SSE,
        )
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == len(output.splitlines())  # every line is JSON
    access = [line for line in lines if line["logger"] == "streamkeep.access"]
    assert [line["route"] for line in access if line["method"] == "POST"] == ["/flows/{name}"]
    assert all(line["request_id"] for line in access)
    assert "SECRET-PAYLOAD" not in output


def test_sigterm_ends_readers_and_flows_and_exits(shared_url: str) -> None:
    port = free_port()
    env = {"STREAMKEEP_FLOWS": "tests.protocols.flows_for_tests"}
    process = start_service(shared_url, port, env=env)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(timeout=30)
    running = client.stream("POST", f"{base}/flows/forever", json={}, headers=SSE)
    response = running.__enter__()
    stream_id = response.headers["x-genkit-stream-id"]
    chunks = response.iter_raw()
    next(chunks)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    body = b"".join(chunks)  # ends cleanly, with a terminal frame
    running.__exit__(None, None, None)
    output = process.communicate(timeout=30)[0]
    # uvicorn re-raises the signal once it has shut down cleanly.
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in output
    assert time.monotonic() - started < 15  # within the shutdown timeout (10 s) and some slack
    last = json.loads(body.rstrip(b"\n").split(b"\n\n")[-1].removeprefix(b"data: "))
    assert last["error"]["status"] == "UNAVAILABLE"
    # The run's stream was ended in the database, not left open.
    show = subprocess.run(
        [sys.executable, "-m", "app.cli", "--database-url", shared_url, "show", stream_id],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(show.stdout.split("\n}\n")[0] + "}")["status"] == "error"


# -- inspection commands -------------------------------------------------------------------


def streamkeep(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "--database-url", url, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ls_show_tail_rm(shared_url: str) -> None:
    port = free_port()
    process = start_service(shared_url, port)
    try:
        for count in (2, 3):
            httpx.post(
                f"http://127.0.0.1:{port}/flows/countdown",
                json={"data": {"count": count}},
                headers=SSE,
            )
        failed = httpx.post(
            f"http://127.0.0.1:{port}/flows/fail_midway", json={"data": {"count": 2}}, headers=SSE
        ).headers["x-genkit-stream-id"]
    finally:
        process.terminate()
        process.communicate(timeout=30)

    listed = streamkeep(shared_url, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(r["status"] for r in rows) == ["done", "done", "error"]
    errors = streamkeep(shared_url, "ls", "--status", "error").stdout.splitlines()
    assert len(errors) == 1 and errors[0].startswith(failed)

    shown = streamkeep(shared_url, "show", failed, "--events", "1")
    assert '"error_message": "fail_midway: failed after 1 of 2 chunks"' in shown.stdout
    assert shown.stdout.rstrip().endswith(
        '2\terror\t{"status":"INTERNAL","message":"fail_midway: failed after 1 of 2 chunks"}'
    )

    tailed = streamkeep(shared_url, "tail", failed)
    assert tailed.stdout.splitlines()[0] == "1\tchunk\t2"
    assert streamkeep(shared_url, "tail", failed, "--after", "1").stdout.startswith("2\terror")

    assert streamkeep(shared_url, "rm", failed).returncode == 0
    again = streamkeep(shared_url, "rm", failed)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr
    assert streamkeep(shared_url, "show", failed).returncode == 1


def test_tail_follows_a_live_stream_to_its_end(shared_url: str, tmp_path: Path) -> None:
    port = free_port()
    process = start_service(shared_url, port)
    try:
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/flows/countdown",
            json={"data": {"count": 20, "delay_ms": 50}},
            headers=SSE,
            timeout=30,
        ) as response:
            stream_id = response.headers["x-genkit-stream-id"]
            tail = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "--database-url", shared_url, "tail", stream_id],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            response.read()
        out, _ = tail.communicate(timeout=60)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    lines = out.splitlines()
    assert [line.split("\t")[2] for line in lines[:-1]] == [str(n) for n in range(20, 0, -1)]
    assert lines[-1] == '21\tdone\t"countdown from 20 done"'


@pytest.mark.postgres
@pytest.mark.slow
def test_readyz_follows_postgres_going_away_and_coming_back() -> None:
    from app.migrate import upgrade
    from tests.support import PostgresServer

    # A server of its own: stopping the shared one would disturb other tests.
    server = PostgresServer.start()
    try:
        import asyncio

        asyncio.run(upgrade(server.url))
        port = free_port()
        process = start_service(server.url, port)
        ready = f"http://127.0.0.1:{port}/readyz"
        try:
            assert httpx.get(ready).status_code == 200
            server.pg_ctl("stop")
            unready = _poll(ready, lambda r: r.status_code == 503)
            assert unready.headers["retry-after"]
            assert unready.json()["checks"]["database"] != "ok"
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            server.pg_ctl("start")
            back = _poll(ready, lambda r: r.status_code == 200, within=60)
            assert back.json()["checks"] == {"database": "ok", "schema": "ok", "listener": "ok"}
        finally:
            process.terminate()
            process.communicate(timeout=30)
    finally:
        server.stop()


def _poll(url: str, until: Any, within: float = 30) -> httpx.Response:
    deadline = time.monotonic() + within
    while True:
        response = httpx.get(url, timeout=10)
        if until(response) or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_auto_migrate_with_three_processes_starting_at_once(empty_url: str) -> None:
    ports = [free_port() for _ in range(3)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "--database-url",
                empty_url,
                "serve",
                "--port",
                str(port),
                "--auto-migrate",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for port in ports
    ]
    try:
        for port, process in zip(ports, processes, strict=True):
            response = _poll_up(f"http://127.0.0.1:{port}/readyz", process)
            assert response.json()["checks"]["schema"] == "ok"
    finally:
        for process in processes:
            process.terminate()
            process.communicate(timeout=30)


def _poll_up(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[0])
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


def test_sigterm_ends_native_sse_and_durable_streams_readers_cleanly(sqlite_url: str) -> None:
    """Open SSE and long-poll responses of every protocol end, so clients reconnect elsewhere."""
    import threading

    port = free_port()
    process = start_service(sqlite_url, port, env={"STREAMKEEP_LONG_POLL_TIMEOUT": "60"})
    base = f"http://127.0.0.1:{port}"
    assert httpx.put(f"{base}/v1/streams/waiting", json={}).status_code == 201
    created = httpx.put(f"{base}/v1/stream/ds-waiting", headers={"Content-Type": "text/plain"})
    assert created.status_code == 201
    tail = created.headers["stream-next-offset"]
    outcomes: dict[str, object] = {}

    def read(name: str, method: str, url: str) -> None:
        try:
            with httpx.stream(method, url, timeout=30) as response:
                body = response.read()
            outcomes[name] = (response.status_code, body)
        except httpx.HTTPError as exc:  # a reset, not a clean end
            outcomes[name] = exc

    readers = [
        threading.Thread(target=read, args=("native", "GET", f"{base}/v1/streams/waiting/events")),
        threading.Thread(
            target=read,
            args=("long-poll", "GET", f"{base}/v1/stream/ds-waiting?offset={tail}&live=long-poll"),
        ),
        threading.Thread(
            target=read,
            args=("ds-sse", "GET", f"{base}/v1/stream/ds-waiting?offset={tail}&live=sse"),
        ),
    ]
    for reader in readers:
        reader.start()
    time.sleep(1)  # all three are waiting for events
    process.send_signal(signal.SIGTERM)
    for reader in readers:
        reader.join(30)
    process.communicate(timeout=30)
    assert set(outcomes) == {"native", "long-poll", "ds-sse"}
    for name, outcome in outcomes.items():
        assert isinstance(outcome, tuple), f"{name}: {outcome!r}"
    assert outcomes["native"][0] == 200  # type: ignore[index]
    assert outcomes["ds-sse"][0] == 200  # type: ignore[index]
    assert outcomes["long-poll"][0] in (204, 503)  # type: ignore[index]

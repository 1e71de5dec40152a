"""Faults of the real service: SIGKILL, the database going away, the SQLite write lock.

Everything here runs `streamkeep serve` as a process of its own and talks HTTP to
it. No assertion is about speed: every wait is bounded by a timeout, and what is
checked are counts, orders and statuses. Kill points come from a seeded random
generator, so a failure repeats with the same seed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.errors import Status, StreamError
from app.log.db import normalize_url
from tests.live import LiveServer
from tests.protocols.sse import frames
from tests.protocols.test_genkit_js_client import GENKIT_DIR, run_client
from tests.support import ROOT, PostgresServer, free_port
from tests.test_ops import start_service

SEED = 7
SSE = {"Accept": "text/event-stream"}
# Short keepalives, so that a reader notices a dead connection quickly.
SERVICE_ENV = {"STREAMKEEP_SSE_KEEPALIVE_SECONDS": "1", "STREAMKEEP_SSE_RETRY_MS": "200"}


def wait_until(condition: Callable[[], bool], what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f} s waiting for {what}")
        time.sleep(0.02)


def sigkill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)


def stop(process: subprocess.Popen[str]) -> str:
    """Stop a service cleanly (if it still runs) and return its output."""
    if process.poll() is None:
        process.terminate()
    return process.communicate(timeout=30)[0] or ""


def server_errors(output: str) -> list[str]:
    """Access-log lines of a service's output with a 5xx other than 503."""
    return re.findall(r"^.*streamkeep\.access \S+ \S+ 5(?!03)\d\d .*$", output, re.MULTILINE)


# -- the producer process and what it recorded ---------------------------------------------


def start_producer(base: str, stream_id: str, first: int, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fault_producer", base, stream_id, str(first), "1000000", log],
        cwd=ROOT,
        text=True,
    )


@dataclass
class ProducerLog:
    acked: list[tuple[int, int]] = field(default_factory=list)  # (counter, seq)
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (counter, status, retry)
    messages: dict[int, str] = field(default_factory=dict)  # counter -> the error's message

    @classmethod
    def read(cls, path: Path) -> ProducerLog:
        log = cls()
        if not path.exists():
            return log
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts[0] == "ok" and len(parts) == 3:
                log.acked.append((int(parts[1]), int(parts[2])))
            elif parts[0] == "fail" and len(parts) >= 3:
                log.failed.append((int(parts[1]), parts[2], parts[3] if len(parts) > 3 else "-"))
                log.messages[int(parts[1])] = " ".join(parts[4:])
        return log


def acked_count(path: Path) -> int:
    return len(ProducerLog.read(path).acked)


def at_least(path: Path, count: int) -> bool:
    return acked_count(path) >= count


def is_ready(base: str) -> bool:
    return httpx.get(f"{base}/readyz", timeout=30).status_code == 200


@dataclass(frozen=True)
class Tally:
    """How the stored stream compares with what the producers were told."""

    lost: int  # acknowledged, not stored
    duplicated: int  # a counter stored more than once
    reordered: int  # a counter stored after a larger one
    misnumbered: int  # stored under another seq than the one acknowledged
    acknowledged: int
    stored: int


def tally(acked: list[tuple[int, int]], stored: list[tuple[int, int]]) -> Tally:
    """`stored` is (seq, counter) in seq order, unacknowledged appends included."""
    counters = [n for _, n in stored]
    seq_of = {n: seq for seq, n in stored}
    return Tally(
        lost=sum(1 for n, _ in acked if n not in seq_of),
        duplicated=sum(c - 1 for c in Counter(counters).values()),
        reordered=sum(1 for a, b in itertools.pairwise(counters) if b <= a),
        misnumbered=sum(1 for n, seq in acked if n in seq_of and seq_of[n] != seq),
        acknowledged=len(acked),
        stored=len(stored),
    )


NO_FAULT = {"lost": 0, "duplicated": 0, "reordered": 0, "misnumbered": 0}


def faults_of(t: Tally) -> dict[str, int]:
    return {k: getattr(t, k) for k in NO_FAULT}


# -- a native SSE reader that resumes by Last-Event-ID ---------------------------------------


class ResumingReader(threading.Thread):
    """Follows /v1/streams/{id}/events to its `end` frame, reconnecting with Last-Event-ID.

    What a browser's EventSource does. Records every (seq, counter) it got, and
    how each connection ended: "clean" (the body ended without the end frame),
    "broken" (the connection failed mid-body) or a refused status code.
    """

    def __init__(self, base: str, stream_id: str, within: float = 120) -> None:
        super().__init__(daemon=True)
        self.url = f"{base}/v1/streams/{stream_id}/events"
        self.deadline = time.monotonic() + within
        self.got: list[tuple[int, int]] = []
        self.end: Any = None
        self.endings: list[str] = []
        self.connections = 0

    def run(self) -> None:
        while self.end is None and time.monotonic() < self.deadline:
            headers = {"Last-Event-ID": str(self.got[-1][0])} if self.got else {}
            try:
                with httpx.stream(
                    "GET", self.url, headers=headers, timeout=httpx.Timeout(10, read=15)
                ) as response:
                    if response.status_code == 204:
                        self.endings.append("204")
                        return
                    if response.status_code != 200:
                        self.endings.append(str(response.status_code))
                        retry = response.headers.get("retry-after")
                        self.endings.append(f"retry-after:{retry}")
                        time.sleep(0.1)
                        continue
                    self.connections += 1
                    for frame in frames(response):
                        if frame.event == "end":
                            self.end = frame.json()
                            return
                        if frame.id is not None:
                            self.got.append((frame.seq, frame.json()["n"]))
                    self.endings.append("clean")
            except httpx.ConnectError:
                self.endings.append("refused")
            except httpx.HTTPError:
                self.endings.append("broken")
            time.sleep(0.1)


def read_all(base: str, stream_id: str) -> tuple[list[tuple[int, int]], Any]:
    """Every event of an ended stream, from a fresh connection, and its end frame."""
    got: list[tuple[int, int]] = []
    end: Any = None
    with httpx.stream("GET", f"{base}/v1/streams/{stream_id}/events", timeout=30) as response:
        assert response.status_code == 200
        for frame in frames(response):
            if frame.event == "end":
                end = frame.json()
                break
            if frame.id is not None:
                got.append((frame.seq, frame.json()["n"]))
    return got, end


def end_and_check(
    base: str, stream_id: str, log: Path, reader: ResumingReader
) -> tuple[ProducerLog, Tally]:
    """End the stream (its producers are dead), then compare it with the acknowledgements.

    No acknowledged append lost, none stored twice, out of order or under another
    seq; seqs without gaps; and the reader that lived through the faults got
    exactly the stored events, each once, in order, and the end.
    """
    ended = httpx.post(f"{base}/v1/streams/{stream_id}/done", json={"output": "ok"}, timeout=30)
    assert ended.status_code == 200, ended.text
    reader.join(60)
    acks = ProducerLog.read(log)
    stored, end = read_all(base, stream_id)
    counts = tally(acks.acked, stored)
    assert faults_of(counts) == NO_FAULT, counts
    assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    assert reader.end == end == {"status": "done", "output": "ok"}
    assert reader.got == stored
    return acks, counts


def create_stream(base: str, stream_id: str) -> None:
    # No idle timeout: the stream must outlive its producers' deaths in these tests.
    created = httpx.put(
        f"{base}/v1/streams/{stream_id}", json={"idle_timeout_seconds": None}, timeout=30
    )
    assert created.status_code == 201, created.text


def durable_url(request: pytest.FixtureRequest, backend: str) -> str:
    return str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

# -- 1. SIGKILL ------------------------------------------------------------------------------

# Who is killed in each round, in this order, on one stream: every restart of the
# service goes back to the same database and the same port.
KILL_ROUNDS = ["service", "producer", "both", "service", "producer"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_of_service_and_producer_loses_and_repeats_nothing_acknowledged(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = durable_url(request, backend)
    rng = random.Random(SEED)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    service = start_service(url, port, env=SERVICE_ENV)
    producer: subprocess.Popen[str] | None = None
    log = tmp_path / "acks.log"
    try:
        create_stream(base, "crash")
        reader = ResumingReader(base, "crash")
        reader.start()
        first = 0
        for victim in KILL_ROUNDS:
            if producer is None or producer.poll() is not None:
                # A new producer counts on from far above anything sent before.
                producer = start_producer(base, "crash", first, log)
                first += 1_000_000
            target = acked_count(log) + rng.randint(30, 300)
            wait_until(partial(at_least, log, target), f"{target} acknowledged appends")
            if victim in ("service", "both"):
                sigkill(service)
            if victim in ("producer", "both"):
                sigkill(producer)
            if service.poll() is not None:
                time.sleep(rng.uniform(0, 0.3))
                service = start_service(url, port, env=SERVICE_ENV)
        assert producer is not None
        sigkill(producer)
        acks, counts = end_and_check(base, "crash", log, reader)
        print(f"\n[{backend}] SIGKILL rounds {KILL_ROUNDS} seed {SEED}: {counts}")
        assert counts.acknowledged >= 150
        assert reader.connections >= 4  # it resumed after each of the three service kills
        # Nothing but the crash itself failed an append: no 500, no other refusal.
        assert {status for _, status, _ in acks.failed} <= {"conn"}
    finally:
        if producer is not None and producer.poll() is None:
            sigkill(producer)
        stop(service)


def genkit_client_path() -> Path:
    if not (GENKIT_DIR / "node_modules" / "genkit").is_dir():
        raise RuntimeError("the Genkit JS client is not installed (scripts/test.sh installs it)")
    return GENKIT_DIR / "client.mjs"


def genkit_frames(body: bytes) -> list[Any]:
    import json

    return [
        json.loads(part.removeprefix(b"data: "))
        for part in body.split(b"\n\n")
        if part.startswith(b"data: ")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flow_whose_service_was_killed_is_ended_by_the_idle_sweep(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = durable_url(request, backend)
    client = genkit_client_path()
    env = {
        **SERVICE_ENV,
        "STREAMKEEP_FLOWS": "tests.protocols.flows_for_tests",
        "STREAMKEEP_IDLE_TIMEOUT_SECONDS": "2",
        "STREAMKEEP_SWEEP_INTERVAL_SECONDS": "0.2",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    service = start_service(url, port, env=env)
    try:
        with httpx.stream(
            "POST", f"{base}/flows/forever", json={}, headers=SSE, timeout=30
        ) as response:
            stream_id = response.headers["x-genkit-stream-id"]
            seen = b""
            for piece in response.iter_raw():
                seen += piece
                if seen.count(b"\n\n") >= 5:
                    break
            sigkill(service)  # mid-run: the run's stream stays open in the database
        service = start_service(url, port, env=env)
        # A reconnect made at once waits for the dead run, and the sweep ends it.
        again = httpx.post(
            f"{base}/flows/forever",
            headers={**SSE, "X-Genkit-Stream-Id": stream_id},
            json={},
            timeout=60,
        )
        assert again.status_code == 200
        replayed = genkit_frames(again.content)
        chunks = [f["message"] for f in replayed[:-1]]
        assert chunks == list(range(len(chunks))) and len(chunks) >= 5
        assert replayed[-1] == {"error": {"status": "ABORTED", "message": "producer went silent"}}
        # Genkit's own JS client gets the same chunks and the same terminal error.
        seen_js = run_client(client, "reconnect", f"{base}/flows/forever", {"stream_id": stream_id})
        assert list(seen_js["chunks"]) + list(seen_js.get("unreadOnError") or []) == chunks
        assert seen_js["error"].startswith("ABORTED: producer went silent")
    finally:
        stop(service)


# -- 2. Postgres stopped and restarted ------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_restart_while_producers_and_readers_run(tmp_path: Path) -> None:
    from app.migrate import upgrade

    # A server of its own: stopping the shared one would disturb other tests.
    server = PostgresServer.start()
    services: list[subprocess.Popen[str]] = []
    producer: subprocess.Popen[str] | None = None
    try:
        asyncio.run(upgrade(server.url))
        # No safety poll to speak of: only LISTEN/NOTIFY can wake a reader in time.
        env = {**SERVICE_ENV, "STREAMKEEP_SAFETY_POLL_SECONDS": "3600"}
        port_a, port_b = free_port(), free_port()
        a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
        services += [start_service(server.url, port_a, env=env)]
        services += [start_service(server.url, port_b, env=env)]
        create_stream(a, "pg")
        reader = ResumingReader(a, "pg", within=180)
        reader.start()
        log = tmp_path / "acks.log"
        producer = start_producer(a, "pg", 0, log)
        wait_until(lambda: acked_count(log) >= 100, "100 acknowledged appends")

        server.pg_ctl("stop")
        acked_before = acked_count(log)
        wait_until(
            lambda: len(ProducerLog.read(log).failed) >= 10,
            "refused appends while Postgres is away",
        )
        # The service answers while the database is away: 503 with Retry-After.
        for method, path, body in [
            ("GET", "/v1/streams/pg", None),
            ("GET", "/v1/streams/pg/events", None),
            ("POST", "/v1/streams/pg/events", {"data": {"n": -1}}),
            ("PUT", "/v1/streams/other", {}),
            ("POST", "/flows/countdown", {"data": {"count": 1}}),
        ]:
            response = httpx.request(method, f"{a}{path}", json=body, timeout=30)
            assert response.status_code == 503, (method, path, response.text)
            assert response.headers.get("retry-after"), (method, path)
        assert httpx.get(f"{a}/healthz", timeout=30).status_code == 200
        assert httpx.get(f"{a}/readyz", timeout=30).status_code == 503

        server.pg_ctl("start")
        for base in (a, b):
            wait_until(partial(is_ready, base), f"{base} ready again")
        wait_until(lambda: acked_count(log) >= acked_before + 100, "appends acknowledged again")
        sigkill(producer)

        # LISTEN works again on A: its waiting reader is woken by an append through B.
        create_stream(b, "wake")
        with httpx.stream("GET", f"{a}/v1/streams/wake/events", timeout=30) as response:
            events = frames(response)
            assert next(events).retry is not None
            appended = httpx.post(
                f"{b}/v1/streams/wake/events", json={"data": {"n": 1}}, timeout=30
            )
            assert appended.status_code == 200
            woken = next(frame for frame in events if frame.id is not None)
            assert woken.seq == 1 and woken.json() == {"n": 1}

        acks, counts = end_and_check(b, "pg", log, reader)
        print(f"\n[postgres restart] {counts}; reader connections ended: {reader.endings}")
        # Refusals were 503s with Retry-After, never a 500 or a dropped connection.
        wrong = [
            (n, status, acks.messages[n]) for n, status, retry in acks.failed if status != "503"
        ]
        assert acks.failed and not wrong, wrong
        assert all(retry != "-" for _, _, retry in acks.failed)
        # The reader's connections ended cleanly or were refused with 503, never broken.
        assert set(reader.endings) <= {"clean", "503", "retry-after:2"}, reader.endings
        assert all(s.poll() is None for s in services)  # no crash
    finally:
        if producer is not None and producer.poll() is None:
            sigkill(producer)
        outputs = [stop(s) for s in services]
        server.stop()
        # Shown by pytest only when the test fails: the services' tracebacks and access log.
        for output in outputs:
            print(output[-20_000:])
    for output in outputs:
        assert server_errors(output) == []


# -- 3. SQLite locked by another process ----------------------------------------------------


@pytest.mark.slow
def test_sqlite_writers_wait_out_a_lock_within_the_busy_timeout_and_get_503_beyond(
    sqlite_url: str,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    service = start_service(
        sqlite_url, port, env={**SERVICE_ENV, "STREAMKEEP_SQLITE_BUSY_TIMEOUT_MS": "3000"}
    )
    path = normalize_url(sqlite_url).database or ""
    # This test process is "another process" holding SQLite's write lock.
    locker = sqlite3.connect(path, isolation_level=None, timeout=30)
    statuses: list[tuple[int, str | None]] = []

    def append(n: int) -> None:
        response = httpx.post(
            f"{base}/v1/streams/locked/events", json={"data": {"n": n}}, timeout=60
        )
        statuses.append((response.status_code, response.headers.get("retry-after")))

    try:
        create_stream(base, "locked")
        # Held for less than the busy timeout: writers wait and succeed.
        locker.execute("BEGIN IMMEDIATE")
        waiting = [threading.Thread(target=append, args=(n,)) for n in range(5)]
        for thread in waiting:
            thread.start()
        time.sleep(0.5)
        # Readers are not blocked by a writer (WAL).
        assert httpx.get(f"{base}/v1/streams/locked", timeout=30).status_code == 200
        locker.execute("COMMIT")
        for thread in waiting:
            thread.join(60)
        assert statuses == [(200, None)] * 5

        # Held for longer than the busy timeout: a clear 503 with Retry-After.
        statuses.clear()
        locker.execute("BEGIN IMMEDIATE")
        refused = [threading.Thread(target=append, args=(n,)) for n in range(5, 7)]
        for thread in refused:
            thread.start()
        for thread in refused:
            thread.join(60)
        locker.execute("COMMIT")
        assert statuses == [(503, "2")] * 2
        refusal = httpx.post(f"{base}/v1/streams/locked/events", json={"data": {"n": 99}})
        assert refusal.status_code == 200  # the lock is gone: writes work again

        info = httpx.get(f"{base}/v1/streams/locked", timeout=30).json()
        assert info["last_seq"] == 6  # five, then the one after the lock; no hole
        httpx.post(f"{base}/v1/streams/locked/done", json={}, timeout=30)
        stored, _ = read_all(base, "locked")
        assert sorted(n for _, n in stored) == [0, 1, 2, 3, 4, 99]
    finally:
        locker.close()
        output = stop(service)
    assert server_errors(output) == []


def test_producer_log_and_tally_count_each_kind_of_fault(tmp_path: Path) -> None:
    log = tmp_path / "acks.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"ok 1 1\nfail 2 conn\nok 3 3\nfail 4 503 2\nok 5 4\n")
    os.close(fd)
    acks = ProducerLog.read(log)
    assert acks.acked == [(1, 1), (3, 3), (5, 4)]
    assert acks.failed == [(2, "conn", "-"), (4, "503", "2")]
    clean = tally(acks.acked, [(1, 1), (2, 2), (3, 3), (4, 5)])
    assert faults_of(clean) == NO_FAULT  # counter 2 was not acknowledged: may be there
    broken = tally(acks.acked, [(1, 1), (2, 3), (3, 2), (4, 2)])
    assert faults_of(broken) == {"lost": 1, "duplicated": 1, "reordered": 2, "misnumbered": 1}


def test_bug_native_api_503_had_no_retry_after() -> None:
    """Found by the SQLite lock test: the native API's own error handler answered a
    locked or absent database with 503 but without Retry-After (the app's handler,
    which adds it, never saw those errors). Genkit's and the proxy's did the same."""
    server = LiveServer(Settings(database_url="memory")).start()
    try:
        assert httpx.put(f"{server.url}/v1/streams/s").status_code == 201
        server.manager.store.fail_next_commit(
            StreamError(Status.UNAVAILABLE, "database unavailable (OperationalError)")
        )
        refused = httpx.post(f"{server.url}/v1/streams/s/events", json={"data": 1})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["status"] == "UNAVAILABLE"
        assert httpx.post(f"{server.url}/v1/streams/s/events", json={"data": 1}).json() == {
            "first_seq": 1,
            "last_seq": 1,
        }
    finally:
        server.stop()

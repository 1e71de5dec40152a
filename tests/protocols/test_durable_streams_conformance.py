"""The official Durable Streams conformance suite (0.3.6) and the official
TypeScript client, run against a live streamkeep process on SQLite and on
Postgres. Needs Node and tests/node/durable-streams/node_modules
(scripts/test.sh installs them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.protocols.process import NODE_HARNESS, ServerProcess, run_node
from tests.support import PostgresServer, drop_database, new_database

SUITE_TESTS = 332  # what suite 0.3.6 runs by default (6 more are opt-in)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One streamkeep process per backend, on a fresh database, long-poll 0.5 s."""
    workdir = tmp_path_factory.mktemp(f"ds-{request.param}")
    if request.param == "sqlite":
        url, cleanup = f"sqlite:///{workdir / 'streams.db'}", None
    else:
        pg: PostgresServer = request.getfixturevalue("pg_server")
        name, url = new_database(pg)
        cleanup = (pg, name)
    process = ServerProcess(url, workdir / "server.log", long_poll_timeout="0.5")
    try:
        yield process.wait_ready()
    finally:
        process.stop()
        if cleanup is not None:
            drop_database(*cleanup)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_official_conformance_suite_passes_in_full(server: ServerProcess) -> None:
    report = NODE_HARNESS / "out" / f"conformance-{server.port}.json"
    run = run_node(
        [
            "node_modules/.bin/vitest",
            "run",
            "--reporter=dot",
            "--reporter=json",
            f"--outputFile.json={report}",
        ],
        seconds=360,
        STREAM_URL=server.url,
        LONG_POLL_TIMEOUT_MS="500",
    )
    summary = run_node(["node", "summarize.mjs", str(report)], seconds=30)
    result = json.loads(summary.stdout.splitlines()[0])
    failures = "\n".join(f"{t['name']}: {t['message']}" for t in result["failedTests"])
    assert (result["passed"], result["failed"]) == (SUITE_TESTS, 0), (
        f"{failures}\n{run.stdout[-3000:]}\nserver log:\n{server.log()}"
    )
    assert result["loadErrors"] == []
    Path(report).unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_typescript_client_scenarios(server: ServerProcess) -> None:
    """Create, append, read from -1, resume, follow live with SSE and long-poll,
    idempotent producer retries: @durable-streams/client 0.2.6 as a real client."""
    run = run_node(["node", "client-scenarios.mjs", server.url], seconds=100)
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    assert run.returncode == 0 and not failed, f"{failed}\n{run.stderr[-2000:]}"
    assert len(results) == 10

"""The benchmark harness in smoke mode: every scenario runs and reports well-formed results.

Never asserts a timing: benchmarks are not tests (issue 8). Each database
gets one run of `python -m bench --smoke`, which starts what it needs itself
(a durable throwaway Postgres included).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow

STATUSES = {"ok", "pending", "skipped"}


def run_smoke(db: str, out: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--db", db, "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "scenario" in completed.stdout  # the table's header
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def check_result(result: dict[str, Any]) -> None:
    assert result["status"] in STATUSES, result
    assert result["scenario"] and result["case"] and result["key"]
    if result["status"] != "ok":
        assert result["note"], result  # pending and skipped say why
        return
    figures = [result["value"], result["p50_ms"], result["p99_ms"]]
    measured = [f for f in figures if f is not None]
    assert measured, result
    assert all(isinstance(f, int | float) and math.isfinite(f) and f >= 0 for f in measured)
    for target in result["targets"]:
        assert target["metric"] in ("value", "ratio", "p50_ms", "p99_ms")
        assert target["op"] in (">=", "<=")
    if result["ratio_to"] is not None and result["value"] is not None:
        assert result["ratio"] is not None, result
    if result["same_work_to"] is not None and result["value"] is not None:
        assert result["same_work_ratio"] is not None, result
        assert f"of {result['same_work_to']}, the same work by hand" in result["note"], result
    if result["out_of_reach"]:  # only a miss, and the note says what the same work reached
        assert result["met"] is False and "out of reach: the same work" in result["note"], result


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_smoke_run_produces_well_formed_results(db: str, tmp_path: Path) -> None:
    document = run_smoke(db, tmp_path / "bench.json")
    assert document["db"] == db
    assert document["smoke"] is True
    assert document["machine"]["cores"] >= 1
    assert document["machine"]["python"]
    results = document["results"]
    keys = [r["key"] for r in results]
    assert len(keys) == len(set(keys)), "result keys must be unique"
    for result in results:
        check_result(result)
    measured = {r["key"] for r in results if r["status"] == "ok"}
    # What the log and the service support today must actually run, the SSE readers
    # included (other HTTP and Node parts may be pending or skipped).
    for key in (
        "db-ceiling/batched",
        "db-ceiling/16-rows",
        "db-ceiling/100-streams",
        "db-ceiling/100-rows",
        "db-ceiling/16-rows-awaited",
        "db-ceiling/100-rows-awaited",
        "db-ceiling/100-streams-awaited",
        "append/pipelined-1",
        "append/writers16-1",
        "append/writers100-100",
        "db-ceiling/around-writers16-1",
        "catchup/subscribe",
        "latency/in-process",
        "latency/cross-process",
        "fanout/500-cross-process",
        "sweep/during",
        "memory/after-sweep",
        "memory/idle-subscribers",
        "latency/sse",
        "fanout/sse-500",
        "memory/idle-sse",
    ):
        assert key in measured, key
    # The in-process cases held to the batched loop are measured against it just
    # before and just after each, not against the run's first measurement.
    by_key = {r["key"]: r for r in results}
    for key in ("append/pipelined-1", "append/writers16-1", "append/writers100-100"):
        assert by_key[key]["ratio_to"] == key.replace("append/", "db-ceiling/around-"), key
        assert by_key[key]["ratio"] is not None, key
        # ... and again with no database: the log's own work per event beside both.
        without = by_key[key.replace("append/", "append/memory-")]
        assert without["status"] == "ok" and without["value"] > 0, without
        assert "µs per event" in without["note"] and "per row" in without["note"], without
    # Those cases and the HTTP appends are measured in rounds (one in a smoke
    # run); the ratio shown is the median round's.
    held = ["append/pipelined-1", "append/writers16-1", "append/writers100-100"]
    held += [f"http-append/durable-streams-{n}" for n in (1, 100)]
    for key in held:
        result = by_key.get(key)  # the HTTP cases are absent where wrk is missing
        if result is None or result["status"] != "ok":
            continue
        [only] = result["extra"]["rounds"]
        assert only["ratio"] == pytest.approx(result["ratio"]), result
    # Every wrk run reports what a request cost the server (wrk is installed by .ci/run).
    for result in results:
        if result["status"] == "ok" and result["key"].startswith(("http-append/", "http-ceiling/")):
            runs = [result["extra"]]
            if result["key"].startswith("http-ceiling/around-"):
                runs = [result["extra"]["before"], result["extra"]["after"]]
            assert all(run["server_cpu_per_request_us"] > 0 for run in runs), result
            # ... and how busy the machine's cores were meanwhile (server, wrk, the rest).
            assert all(run["machine_cores"] > 0 for run in runs), result
            assert "µs server CPU per request" in result["note"], result
    for streams in (1, 100):
        appended = by_key.get(f"http-append/durable-streams-{streams}")
        if appended is None or appended["status"] != "ok":
            continue
        # streamkeep's appends tell how full their group commits were (its /metrics).
        assert 0 < appended["extra"]["commits"] <= appended["extra"]["requests"], appended
        assert "appends each" in appended["note"], appended
        # On SQLite each case also runs against the least durable endpoint
        # (bench.durable_noop): every request answered 204, every one committed.
        if db != "sqlite":
            continue
        durable = by_key[f"http-ceiling/noop-durable-{streams}"]
        assert durable["status"] == "ok", durable
        assert durable["value"] > 0 and durable["extra"]["non_2xx"] == 0, durable
        assert durable["extra"]["committed"] >= durable["extra"]["requests"], durable
        assert durable["ratio_to"] == appended["ratio_to"], durable
        assert appended["same_work_to"] == durable["key"], appended

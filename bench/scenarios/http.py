"""Scenario 1 (HTTP appends) and the Durable Streams peers of scenario 9.

wrk keeps 16 connections busy appending small JSON events, to one stream and
round-robin over 100 streams, against the real service (`streamkeep serve`,
one uvicorn worker). Throughput is reported as a ratio to the no-op endpoint,
measured right before and right after each case. Afterwards the streams are
read back: every acknowledged append must be there (acknowledged only after
commit).

On SQLite each case is also measured against the least durable endpoint
(bench.durable_noop: the no-op made durable, nothing more) under the same
load: what the framework and the database reach together, without the
protocol and the log.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid

import httpx

from bench.context import Context
from bench.durable_noop import stream_ids as durable_stream_ids
from bench.endpoints import APPEND_ENDPOINTS, AppendEndpoint
from bench.loadgen import (
    WRK_MISSING,
    HttpLoad,
    HttpServer,
    LoadResult,
    cpu_per_request,
    run_wrk,
    start_durable_noop,
    start_noop_server,
    start_streamkeep,
    wrk_available,
)
from bench.peers import DURABLE_STREAMS_DIR, missing_node_harness, start_durable_streams_reference
from bench.results import Result, Target, pending, skipped
from bench.rounds import ROUNDS, Round, median_round, rounds_note
from bench.scenarios.ceilings import HTTP_CEILING_KEY, HTTP_SCENARIO, measure_noop
from bench.sse import counted_since, unlabelled_metrics

SCENARIO = "1 HTTP append"
PEER_SCENARIO = "9 peer: Durable Streams ref."
PRODUCERS = 16
STREAM_COUNTS = (1, 100)


async def measure_appends(
    endpoint: AppendEndpoint, base_url: str, server_pid: int, streams: int, seconds: float
) -> tuple[LoadResult, int | None, int | None] | None:
    """wrk appending over `streams` new streams: the load, the appends found
    committed afterwards, and the server's group commits during the load (a
    server without streamkeep's metrics: None). None if the server lacks the
    endpoint."""
    names = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(streams)]
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for name in names:
            if not await endpoint.create(client, name):
                return None
        load = append_load(endpoint, base_url, [endpoint.path(n) for n in names], seconds)
        before = await service_counters(client)
        measured = await run_wrk(load, server_pid)
        after = await service_counters(client)
        counts = [await endpoint.count(client, n) for n in names]
    committed = None if None in counts else sum(c or 0 for c in counts)
    commits = None
    if before is not None and after is not None:
        commits = counted_since(before, after, ("commits",))["commits"]
    return measured, committed, commits


async def service_counters(client: httpx.AsyncClient) -> dict[str, float] | None:
    """streamkeep's counters from its /metrics, or None from another server."""
    response = await client.get("/metrics")
    return unlabelled_metrics(response.text) if response.status_code == 200 else None


def append_load(
    endpoint: AppendEndpoint, base_url: str, paths: list[str], seconds: float
) -> HttpLoad:
    """The endpoint's append from PRODUCERS connections, round-robin over `paths`."""
    return HttpLoad(
        base_url=base_url,
        paths=paths,
        method=endpoint.append_method,
        headers=endpoint.append_headers,
        body=endpoint.body,
        connections=PRODUCERS,
        seconds=seconds,
    )


def append_result(
    scenario: str,
    case: str,
    key: str,
    measured: LoadResult,
    committed: int | None,
    commits: int | None,
    targets: list[Target],
    ratio_to: str,
) -> Result:
    acknowledged = measured.requests - measured.non_2xx
    checked = "unchecked" if committed is None else f"{committed:,} committed"
    if commits:  # how full the group commits were: the appends each took
        checked += f" in {commits:,} commits ({acknowledged / commits:.1f} appends each)"
    return Result(
        scenario,
        case,
        key,
        value=measured.per_second,
        unit="appends/s",
        p50_ms=measured.p50_ms,
        p99_ms=measured.p99_ms,
        ratio_to=ratio_to,
        targets=targets,
        status="failed" if _lost(measured, committed) else "ok",
        note=f"{acknowledged:,} acknowledged, {checked}; non-2xx {measured.non_2xx}; "
        f"server CPU {measured.server_cpu or 0:.0%}{cpu_per_request(measured)}"
        f"{measured.machine_note()}",
        extra={**measured.extra(), "committed": committed, "commits": commits},
    )


def _lost(measured: LoadResult, committed: int | None) -> bool:
    """Appends acknowledged and not found committed, or connections that failed."""
    acknowledged = measured.requests - measured.non_2xx
    return bool((committed is not None and committed < acknowledged) or measured.socket_errors)


async def run(ctx: Context) -> list[Result]:
    """Each case in rounds between runs of the no-op endpoint (bench.rounds):
    a round's ratio is to the mean of the no-op just before and just after it.

    The machine's speed drifts by 10-30 % within minutes; the no-op ceiling
    of the run's first scenario, minutes earlier, moved every ratio with it.
    """
    if not wrk_available():
        return [skipped(SCENARIO, "HTTP appends", "http-append/skipped", WRK_MISSING)]
    seconds = ctx.size(5.0, 1.0)
    ratio = 0.8 if ctx.db == "sqlite" else 0.6
    targets = [Target("ratio", ">=", ratio, f">= {ratio:.2f} of no-op")]
    results = []
    async with contextlib.AsyncExitStack() as running:
        server = await start_streamkeep(ctx.database_url)
        running.push_async_callback(server.stop)
        noop = await start_noop_server()
        running.push_async_callback(noop.stop)
        before = await measure_noop(noop, seconds)
        for endpoint in APPEND_ENDPOINTS:
            for streams in STREAM_COUNTS:
                case = f"{endpoint.name}, {PRODUCERS} producers, {streams} stream(s)"
                name = f"{endpoint.name.lower().replace(' ', '-')}-{streams}"
                measured, durable, before = await _in_rounds(
                    ctx, endpoint, server, noop, streams, seconds, before
                )
                if not measured:
                    why = "pending endpoint: not on this branch yet"
                    results.append(pending(SCENARIO, case, f"http-append/{name}", why))
                    continue
                results.extend(_case_results(case, name, streams, measured, durable, targets))
    return results


# What measure_appends found: the load, the appends committed, the group commits.
Appended = tuple[LoadResult, int | None, int | None]


async def _in_rounds(
    ctx: Context,
    endpoint: AppendEndpoint,
    server: HttpServer,
    noop: HttpServer,
    streams: int,
    seconds: float,
    before: LoadResult,
) -> tuple[list[Round[Appended, LoadResult]], tuple[LoadResult, int] | None, LoadResult]:
    """The case's rounds (none if the server lacks the endpoint), the least
    durable endpoint after the first (SQLite), and the no-op's last run."""
    rounds: list[Round[Appended, LoadResult]] = []
    durable = None
    for number in range(ctx.size(ROUNDS, 1)):
        appended = await measure_appends(endpoint, server.base_url, server.pid, streams, seconds)
        if appended is None:
            break
        if number == 0 and ctx.db == "sqlite":
            durable = await measure_durable_noop(ctx, endpoint, streams, seconds)
        after = await measure_noop(noop, seconds)
        rounds.append(_round(appended, before, after))
        before = after
    return rounds, durable, before


def _round(
    appended: Appended, before: LoadResult, after: LoadResult
) -> Round[Appended, LoadResult]:
    ceiling = (before.per_second + after.per_second) / 2
    return Round(appended, before, after, appended[0].per_second, ceiling)


def _case_results(
    case: str,
    name: str,
    streams: int,
    rounds: list[Round[Appended, LoadResult]],
    durable: tuple[LoadResult, int] | None,
    targets: list[Target],
) -> list[Result]:
    """The no-op around the median round, the least durable endpoint (SQLite)
    and the case as the median round measured it; a loss in any round fails it."""
    median = median_round(rounds)
    ceiling = _ceiling_around(case, name, median.before, median.after)
    appended = append_result(
        SCENARIO, case, f"http-append/{name}", *median.measured, targets, ceiling.key
    )
    if any(_lost(*r.measured[:2]) for r in rounds):
        appended.status = "failed"
    note = rounds_note(rounds, "the no-op")
    if note:
        appended.note = f"{appended.note}; {note}"
    appended.extra["rounds"] = [
        {"ratio": r.ratio, "appends_per_second": r.rate, "noop_mean": r.ceiling} for r in rounds
    ]
    results = [ceiling]
    if durable is not None:
        results.append(_durable_result(case, streams, *durable, ceiling.key))
        appended.same_work_to = results[-1].key
    return [*results, appended]


async def measure_durable_noop(
    ctx: Context, endpoint: AppendEndpoint, streams: int, seconds: float
) -> tuple[LoadResult, int]:
    """The endpoint's append load against bench.durable_noop, on a database of
    its own, and how many events that database holds afterwards."""
    path = ctx.scratch / f"durable-noop-{streams}.db"
    server = await start_durable_noop(f"sqlite:///{path}", streams)
    try:
        paths = [f"/durable/{stream_id}" for stream_id in durable_stream_ids(streams)]
        load = append_load(endpoint, server.base_url, paths, seconds)
        measured = await run_wrk(load, server.pid)
    finally:
        await server.stop()
    with contextlib.closing(sqlite3.connect(path)) as db:
        (committed,) = db.execute("SELECT count(*) FROM events").fetchone()
    return measured, int(committed)


def _durable_result(
    case: str, streams: int, measured: LoadResult, committed: int, ratio_to: str
) -> Result:
    acknowledged = measured.requests - measured.non_2xx
    return Result(
        HTTP_SCENARIO,
        f"the least durable endpoint: no-op + bare group commit, {streams} stream(s)",
        f"{HTTP_CEILING_KEY}-durable-{streams}",
        value=measured.per_second,
        unit="appends/s",
        p50_ms=measured.p50_ms,
        p99_ms=measured.p99_ms,
        ratio_to=ratio_to,
        status="failed" if _lost(measured, committed) or measured.non_2xx else "ok",
        note=f"the same load as {case}, after its first round; answered past the handler "
        f"pipeline, each append "
        f"committed (stdlib driver) before its 204; no protocol, no log; "
        f"{acknowledged:,} acknowledged, {committed:,} committed; server CPU "
        f"{measured.server_cpu or 0:.0%}{cpu_per_request(measured)}",
        extra={**measured.extra(), "committed": committed},
    )


def _ceiling_around(case: str, name: str, before: LoadResult, after: LoadResult) -> Result:
    """The no-op's throughput just before and just after a case: what its ratio is to."""
    return Result(
        HTTP_SCENARIO,
        f"no-op POST around: {case}",
        f"http-ceiling/around-{name}",
        value=(before.per_second + after.per_second) / 2,
        unit="req/s",
        note=f"mean of {before.per_second:,.0f} just before and {after.per_second:,.0f} "
        f"just after; server CPU {before.server_cpu or 0:.0%} and {after.server_cpu or 0:.0%}"
        f"{cpu_per_request(before, after)}",
        extra={"before": before.extra(), "after": after.extra()},
    )


async def peers(ctx: Context) -> list[Result]:
    """The Durable Streams reference server through the same append load, each
    case once, between two runs of the no-op endpoint: the peers are held to
    no target, so they do without `run`'s rounds."""
    why_not = missing_node_harness(
        DURABLE_STREAMS_DIR, "start-reference-server.mjs", "npm install --no-audit --no-fund"
    )
    if why_not is None and not wrk_available():
        why_not = WRK_MISSING
    if why_not is not None:
        return [skipped(PEER_SCENARIO, "HTTP appends", "peer-durable-streams/skipped", why_not)]
    seconds = ctx.size(5.0, 1.0)
    results = []
    async with contextlib.AsyncExitStack() as running:
        noop = await start_noop_server()
        running.push_async_callback(noop.stop)
        before = await measure_noop(noop, seconds)
        for file_backed in (False, True):
            mode = "file" if file_backed else "memory"
            described = "file (fdatasync)" if file_backed else "memory"
            server = await start_durable_streams_reference(file_backed)
            try:
                for streams in STREAM_COUNTS:
                    measured = await measure_appends(
                        APPEND_ENDPOINTS[0], server.url, server.pid, streams, seconds
                    )
                    if measured is None:
                        raise RuntimeError("the reference server has no Durable Streams routes?")
                    case = f"{described}, {PRODUCERS} producers, {streams} stream(s)"
                    name = f"peer-{mode}-{streams}"
                    after = await measure_noop(noop, seconds)
                    ceiling = _ceiling_around(case, name, before, after)
                    key = f"peer-durable-streams/{mode}-{streams}"
                    results.append(ceiling)
                    results.append(
                        append_result(PEER_SCENARIO, case, key, *measured, [], ceiling.key)
                    )
                    before = after
            finally:
                await server.stop()
    return results

"""The ceilings every other figure is a ratio to, measured in the same run.

* HTTP: wrk against a no-op Litestar endpoint served like streamkeep. This is
  both the load generator's and the framework's ceiling for a handler of its
  own (streamkeep's appends, answered past the handler pipeline, can beat it).
  The scenario of HTTP appends adds the least durable endpoint on SQLite
  (bench.durable_noop, from the same-work pieces below).
* Database: a plain insert loop into the same `events` table with the same
  durability (SQLite WAL + synchronous=NORMAL through the stdlib driver;
  Postgres with fsync on through asyncpg), one row per commit and 1,000 rows
  per commit. No SQLAlchemy, no asyncio thread hop, SQLite's own automatic
  checkpoints: the raw limit.
* The same work as the in-process writers that each await their commit: 16
  or 100 rows into one stream, or one row into each of 100 streams, per commit, each
  commit also moving the streams' rows as an append does. Concurrent writers
  cannot put more in a commit than there are writers, so this is their limit;
  the batched loop is the target's. On SQLite these checkpoint as the service
  does, off the loop's thread.
* That same work once more, by that many writers that each await their commit
  through the least asyncio they need: one queue, one committer task, a
  future per append, and none of the log's own work (no rows read or planned,
  no checks). What is left of a writer's cycle there is what asyncio and the
  database cost together: about as far as any asyncio log's awaiting writers
  can go.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import count

import asyncpg

from app.log.db import asyncpg_dsn, normalize_url
from app.log.manager import let_arrivals_join
from app.log.sqlite_inline import CHECKPOINT_PAGES, PAGES_PER_COMMIT
from bench.context import Context
from bench.loadgen import (
    WRK_MISSING,
    HttpLoad,
    HttpServer,
    LoadResult,
    cpu_per_request,
    run_wrk,
    start_noop_server,
    wrk_available,
)
from bench.results import Result, percentile, skipped
from bench.workload import SMALL_EVENT_BYTES, until

HTTP_SCENARIO = "0 ceiling: HTTP"
DB_SCENARIO = "0 ceiling: raw database"
HTTP_CONNECTIONS = 16
BATCH_ROWS = 1000
RAW_STREAM = "raw-insert"

HTTP_CEILING_KEY = "http-ceiling/noop"
RAW_SINGLE_KEY = "db-ceiling/single"
RAW_BATCHED_KEY = "db-ceiling/batched"
RAW_16_ROWS_KEY = "db-ceiling/16-rows"
RAW_100_STREAMS_KEY = "db-ceiling/100-streams"
RAW_100_ROWS_KEY = "db-ceiling/100-rows"
AWAITED_16_ROWS_KEY = "db-ceiling/16-rows-awaited"
AWAITED_100_ROWS_KEY = "db-ceiling/100-rows-awaited"
AWAITED_100_STREAMS_KEY = "db-ceiling/100-streams-awaited"


@dataclass(frozen=True)
class SameWork:
    """What writers that each await their commit put in one commit, done by hand."""

    key: str
    case: str
    streams: int
    rows_each: int  # rows into each stream per commit: the writers per stream
    awaited_key: str  # the same commits, made by that many awaiting writers

    @property
    def writers(self) -> int:
        return self.streams * self.rows_each


SAME_WORK = (
    SameWork(
        RAW_16_ROWS_KEY,
        "16 rows into 1 stream + its row, per commit",
        1,
        16,
        AWAITED_16_ROWS_KEY,
    ),
    SameWork(
        RAW_100_ROWS_KEY,
        "100 rows into 1 stream + its row, per commit",
        1,
        100,
        AWAITED_100_ROWS_KEY,
    ),
    SameWork(
        RAW_100_STREAMS_KEY,
        "1 row into each of 100 streams + their rows, per commit",
        100,
        1,
        AWAITED_100_STREAMS_KEY,
    ),
)


async def http_ceiling(ctx: Context) -> list[Result]:
    if not wrk_available():
        return [skipped(HTTP_SCENARIO, "no-op endpoint", HTTP_CEILING_KEY, WRK_MISSING)]
    server = await start_noop_server()
    try:
        measured = await measure_noop(server, ctx.size(5.0, 1.0))
    finally:
        await server.stop()
    return [
        Result(
            HTTP_SCENARIO,
            f"no-op POST, wrk {HTTP_CONNECTIONS} connections",
            HTTP_CEILING_KEY,
            value=measured.per_second,
            unit="req/s",
            p50_ms=measured.p50_ms,
            p99_ms=measured.p99_ms,
            note=f"server CPU {measured.server_cpu:.0%}, wrk CPU {measured.loadgen_cpu:.0%}"
            f"{cpu_per_request(measured)}{measured.machine_note()}",
            extra=measured.extra(),
        )
    ]


async def measure_noop(server: HttpServer, seconds: float) -> LoadResult:
    """wrk against the no-op POST: the framework's and the load generator's ceiling."""
    load = HttpLoad(
        base_url=server.base_url,
        paths=[f"/noop/s{i}" for i in range(100)],
        headers={"Content-Type": "application/json"},
        body=SMALL_EVENT_BYTES,
        connections=HTTP_CONNECTIONS,
        seconds=seconds,
    )
    return await run_wrk(load, server.pid)


def _rows(stream_id: str, created_at: object) -> Iterator[tuple[object, ...]]:
    for seq in count(1):
        yield (stream_id, seq, "chunk", None, SMALL_EVENT_BYTES, created_at)


async def db_ceiling(ctx: Context) -> list[Result]:
    seconds = ctx.size(3.0, 0.2)
    same_work: list[float] = []
    awaited: list[float] = []
    if ctx.db == "sqlite":
        single, batched = _sqlite_raw(ctx.database_url, seconds)
        writer = functools.partial(sqlite_writer, ctx.database_url)
    else:
        single, batched = await _postgres_raw(ctx.database_url, seconds)
        writer = functools.partial(_postgres_writer, ctx.database_url)
    for work in SAME_WORK:
        loop_rate, awaited_rate = await _same_work(writer, work, seconds)
        same_work.append(loop_rate)
        awaited.append(awaited_rate)
    # A durable append waits for a commit: the 1-row loop's commit times are the
    # floor of any append-to-reader latency (a stalled WAL flush shows in p99).
    rate, commit_ms = single
    durability = (
        "WAL, synchronous=NORMAL" if ctx.db == "sqlite" else "fsync on, synchronous_commit on"
    )
    return [
        Result(
            DB_SCENARIO,
            "insert loop, 1 row per commit",
            RAW_SINGLE_KEY,
            value=rate,
            unit="rows/s",
            p50_ms=percentile(commit_ms, 50),
            p99_ms=percentile(commit_ms, 99),
            note=f"{durability}; p50/p99: one commit, slowest {max(commit_ms, default=0):.1f} ms",
        ),
        Result(
            DB_SCENARIO,
            f"insert loop, {BATCH_ROWS} rows per commit",
            RAW_BATCHED_KEY,
            value=batched,
            unit="rows/s",
            note=durability,
        ),
        *(
            Result(DB_SCENARIO, work.case, work.key, value=rows, unit="rows/s", note=durability)
            for work, rows in zip(SAME_WORK, same_work, strict=True)
        ),
        *(_awaited_result(work, rows) for work, rows in zip(SAME_WORK, awaited, strict=True)),
    ]


def _awaited_result(work: SameWork, rows_per_second: float) -> Result:
    return Result(
        DB_SCENARIO,
        f"the same, made by {work.writers} writers each awaiting its commit (bare asyncio)",
        work.awaited_key,
        value=rows_per_second,
        unit="rows/s",
        ratio_to=RAW_BATCHED_KEY,
        same_work_to=work.key,
        note="one queue, one committer task, a future per append; no planning, no checks",
    )


INSERT_SQLITE = (
    "INSERT INTO events (stream_id, seq, kind, type, payload, created_at) VALUES (?, ?, ?, ?, ?, ?)"
)
INSERT_POSTGRES = (
    "INSERT INTO events (stream_id, seq, kind, type, payload, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
# Each commit of the same-work loops moves its streams' rows as an append does.
MOVE_STREAM_SQLITE = (
    "UPDATE streams SET last_seq = ?, updated_at = ?, last_write_at = ? WHERE id = ?"
)
# Postgres: the rows and the events in one statement, autocommitted, as the
# service's committer sends a batch on rows it wrote last.
MOVE_AND_INSERT_POSTGRES = """
WITH moved AS (
    UPDATE streams SET last_seq = v.last_seq, updated_at = $3, last_write_at = $3
    FROM unnest($1::text[], $2::bigint[]) AS v(id, last_seq) WHERE streams.id = v.id
)
INSERT INTO events (stream_id, seq, kind, type, payload, created_at)
SELECT r.stream_id, r.seq, 'chunk', NULL, r.payload, $3
FROM unnest($4::text[], $5::bigint[], $6::bytea[]) AS r(stream_id, seq, payload)
"""
CREATE_STREAM = (
    "INSERT INTO streams (id, content_type, status, created_at, updated_at, ttl_seconds, "
    "last_write_at, last_seq) VALUES ({p}, 'application/json', 'open', {t}, {t}, 300, {t}, 0)"
)


# (rows/s, each commit's milliseconds) of the 1-row loop, and rows/s of the batched one.
RawRates = tuple[tuple[float, list[float]], float]


def _sqlite_connect(url: str, *, any_thread: bool = False) -> sqlite3.Connection:
    """A connection with the service's durability (WAL, synchronous=NORMAL)."""
    path = normalize_url(url).database
    assert path is not None
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=not any_thread)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
        conn.execute(f"PRAGMA {pragma}")
    return conn


def _sqlite_now() -> str:
    # The same text the service stores (SQLAlchemy's SQLite DateTime format).
    return datetime.now(UTC).replace(tzinfo=None).isoformat(" ")


def _sqlite_raw(url: str, seconds: float) -> RawRates:
    conn = _sqlite_connect(url)
    try:
        single = _sqlite_loop(conn, f"{RAW_STREAM}-1", 1, seconds)
        batched, _ = _sqlite_loop(conn, f"{RAW_STREAM}-{BATCH_ROWS}", BATCH_ROWS, seconds)
        return single, batched
    finally:
        conn.close()


def _sqlite_loop(
    conn: sqlite3.Connection, stream_id: str, per_commit: int, seconds: float
) -> tuple[float, list[float]]:
    """Rows per second into a new stream, `per_commit` rows a commit, and each
    commit's milliseconds when that is one row."""
    now = _sqlite_now()
    conn.execute(CREATE_STREAM.format(p="?", t="?"), (stream_id, now, now, now))
    rows = _rows(stream_id, now)
    commit_ms: list[float] = []
    written, started, running = 0, time.perf_counter(), until(seconds)
    while running():
        began = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_SQLITE, [next(rows) for _ in range(per_commit)])
        conn.execute("COMMIT")
        if per_commit == 1:
            commit_ms.append((time.perf_counter() - began) * 1000)
        written += per_commit
    return written / (time.perf_counter() - started), commit_ms


async def _postgres_raw(url: str, seconds: float) -> RawRates:
    conn = await asyncpg.connect(asyncpg_dsn(normalize_url(url)))
    try:
        single = await _postgres_loop(conn, f"{RAW_STREAM}-1", 1, seconds)
        batched, _ = await _postgres_loop(conn, f"{RAW_STREAM}-{BATCH_ROWS}", BATCH_ROWS, seconds)
        return single, batched
    finally:
        await conn.close()


async def _postgres_loop(
    conn: asyncpg.Connection, stream_id: str, per_commit: int, seconds: float
) -> tuple[float, list[float]]:
    """As _sqlite_loop; one row is one statement in autocommit."""
    now = datetime.now(UTC)
    insert = await conn.prepare(INSERT_POSTGRES)
    await conn.execute(CREATE_STREAM.format(p="$1", t="$2"), stream_id, now)
    rows = _rows(stream_id, now)
    commit_ms: list[float] = []
    written, started, running = 0, time.perf_counter(), until(seconds)
    while running():
        if per_commit == 1:
            began = time.perf_counter()
            await insert.fetch(*next(rows))
            commit_ms.append((time.perf_counter() - began) * 1000)
        else:
            async with conn.transaction():
                await insert.executemany([next(rows) for _ in range(per_commit)])
        written += per_commit
    return written / (time.perf_counter() - started), commit_ms


async def batched_loop_rate(db: str, url: str, run: str, seconds: float) -> float:
    """Rows per second of the batched insert loop alone, into a new stream
    named after `run`: the ceiling measured again around each in-process case.

    The machine's speed (its disk's above all) drifts within minutes; a
    ceiling measured once, at the start of the run, moved every ratio with it.
    """
    stream_id = f"{RAW_STREAM}-{run}"
    if db == "sqlite":

        def loop() -> float:
            conn = _sqlite_connect(url)
            try:
                return _sqlite_loop(conn, stream_id, BATCH_ROWS, seconds)[0]
            finally:
                conn.close()

        return await asyncio.to_thread(loop)
    conn = await asyncpg.connect(asyncpg_dsn(normalize_url(url)))
    try:
        return (await _postgres_loop(conn, stream_id, BATCH_ROWS, seconds))[0]
    finally:
        await conn.close()


# One commit of the same-work loops: each stream's new last_seq, then the rows
# (stream, seq) to insert.
Batch = tuple[dict[str, int], list[tuple[str, int]]]


def _batches(ids: list[str], rows_each: int) -> Iterator[Batch]:
    for last_seq in count(rows_each, rows_each):
        first = last_seq - rows_each + 1
        rows = [(stream_id, seq) for stream_id in ids for seq in range(first, last_seq + 1)]
        yield dict.fromkeys(ids, last_seq), rows


def _same_work_ids(work: SameWork, run: str) -> list[str]:
    return [f"{RAW_STREAM}-{run}-{work.streams}x{work.rows_each}-{i}" for i in range(work.streams)]


# Commits one batch; the SQLite one runs it on the event loop's thread without
# suspending, as the service's committer does when the write lock is free.
Commit = Callable[[Batch], Awaitable[None]]


# The service's cadence for commits of small rows: a passive checkpoint once the
# commits since the last one wrote about as many pages as SQLite's automatic one
# waits for (app.log.sqlite_inline).
COMMITS_PER_CHECKPOINT = CHECKPOINT_PAGES // PAGES_PER_COMMIT


@contextlib.asynccontextmanager
async def sqlite_writer(url: str, ids: list[str]) -> AsyncIterator[Commit]:
    """A connection with `ids` created, and what commits one batch on it.

    Checkpoints as the service makes them: none inside a commit, a passive one
    on a worker thread every COMMITS_PER_CHECKPOINT commits, which the next
    commit waits for. SQLite's automatic one would run inside a commit on the
    loop's thread, milliseconds of I/O the service does not spend there.
    """
    conn = _sqlite_connect(url, any_thread=True)
    checkpoint: asyncio.Future[None] | None = None
    commits = 0
    try:
        conn.execute("PRAGMA wal_autocheckpoint=0")
        now = _sqlite_now()
        for stream_id in ids:
            conn.execute(CREATE_STREAM.format(p="?", t="?"), (stream_id, now, now, now))

        async def commit(batch: Batch) -> None:
            nonlocal checkpoint, commits
            if checkpoint is not None:
                await checkpoint
                checkpoint = None
            moved, rows = batch
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(MOVE_STREAM_SQLITE, [(q, now, now, s) for s, q in moved.items()])
            conn.executemany(
                INSERT_SQLITE, [(s, q, "chunk", None, SMALL_EVENT_BYTES, now) for s, q in rows]
            )
            conn.execute("COMMIT")
            commits += 1
            if commits % COMMITS_PER_CHECKPOINT == 0:
                checkpoint = asyncio.ensure_future(asyncio.to_thread(_checkpoint, conn))

        yield commit
    finally:
        if checkpoint is not None:
            await checkpoint
        conn.close()


def _checkpoint(conn: sqlite3.Connection) -> None:
    # Read to the end: a statement left with a row to return stays active.
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


@contextlib.asynccontextmanager
async def _postgres_writer(url: str, ids: list[str]) -> AsyncIterator[Commit]:
    """As sqlite_writer: each commit one statement in autocommit."""
    conn = await asyncpg.connect(asyncpg_dsn(normalize_url(url)))
    try:
        now = datetime.now(UTC)
        for stream_id in ids:
            await conn.execute(CREATE_STREAM.format(p="$1", t="$2"), stream_id, now)
        statement = await conn.prepare(MOVE_AND_INSERT_POSTGRES)

        async def commit(batch: Batch) -> None:
            moved, rows = batch
            await statement.fetch(
                list(moved),
                list(moved.values()),
                now,
                [s for s, _ in rows],
                [q for _, q in rows],
                [SMALL_EVENT_BYTES] * len(rows),
            )

        yield commit
    finally:
        await conn.close()


async def _same_work(
    writer: Callable[[list[str]], AbstractAsyncContextManager[Commit]],
    work: SameWork,
    seconds: float,
) -> tuple[float, float]:
    """Rows per second of `work`'s commits made one after another by a loop,
    then by as many writers as it has, each awaiting its commit."""
    rates = []
    for run, measure in (("loop", _loop_rate), ("awaited", _awaited_rate)):
        ids = _same_work_ids(work, run)
        async with writer(ids) as commit:
            rates.append(await measure(commit, ids, work.rows_each, seconds))
    return rates[0], rates[1]


async def _loop_rate(commit: Commit, ids: list[str], rows_each: int, seconds: float) -> float:
    """Each commit inserts `rows_each` rows into every one of `ids` and moves
    their rows, in one transaction; nothing waits between two commits."""
    batches = _batches(ids, rows_each)
    written, started, running = 0, time.perf_counter(), until(seconds)
    while running():
        batch = next(batches)
        await commit(batch)
        written += len(batch[1])
    return written / (time.perf_counter() - started)


class BareGroupCommit:
    """Group commit with nothing but asyncio around the database: appends queue
    with a future each, and one task commits whatever is queued when it runs.

    With `gather`, appends on their way join a commit first, as they do in the
    StreamManager on SQLite (let_arrivals_join): the least durable endpoint
    gathers; the awaited writers, which all come back at once, need not.
    """

    def __init__(self, commit: Commit, ids: list[str], gather: bool = False) -> None:
        self._commit = commit
        self._gather = gather
        self._last_seq = dict.fromkeys(ids, 0)
        self._queued: list[tuple[str, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()

    async def append(self, stream_id: str) -> None:
        future = asyncio.get_running_loop().create_future()
        self._queued.append((stream_id, future))
        self._wake.set()
        await future

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            if self._gather:
                await let_arrivals_join(lambda: len(self._queued))
            self._wake.clear()
            queued, self._queued = self._queued, []
            rows = []
            for stream_id, _ in queued:
                self._last_seq[stream_id] += 1
                rows.append((stream_id, self._last_seq[stream_id]))
            try:
                await self._commit(({s: self._last_seq[s] for s, _ in rows}, rows))
            except BaseException as exc:
                for _, future in queued:
                    future.set_exception(exc)
                raise
            for _, future in queued:
                future.set_result(None)


async def _awaited_rate(commit: Commit, ids: list[str], writers_each: int, seconds: float) -> float:
    """Appends per second by `writers_each` writers per stream, each awaiting its commit."""
    group = BareGroupCommit(commit, ids)
    committer = asyncio.create_task(group.run())
    running = until(seconds)

    async def writer(stream_id: str) -> int:
        written = 0
        while running():
            await group.append(stream_id)
            written += 1
        return written

    try:
        started = time.perf_counter()
        counts = await asyncio.gather(*(writer(s) for s in ids for _ in range(writers_each)))
        return sum(counts) / (time.perf_counter() - started)
    finally:
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer

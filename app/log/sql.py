"""The SQL store: SQLite (sqlite3, aiosqlite), Postgres through asyncpg, SQLAlchemy Core.

What runs per request or per event skips SQLAlchemy's statement handling and
goes to the driver with named statements: the append transaction
(sqlite_commit.py, postgres_commit.py, one per dialect) and the hot reads
(HotSql). On SQLite they run on the event loop's own thread unless they would
wait for a lock (sqlite_inline.py). Everything else is SQLAlchemy Core, where
dialect differences are kept to a few spots: the upsert helper and the
advisory lock of the sweeper.

Ordering guarantee: an append locks its stream's row (Postgres: SELECT ... FOR
UPDATE; SQLite: BEGIN IMMEDIATE locks the whole file) and bumps last_seq in the
same transaction as the event insert. The next writer of that stream waits
for the commit, so commit order equals seq order, numbers have no gaps, and a
reader asking for seq > N can never see N+2 before N+1.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import asyncpg
import msgspec
from sqlalchemy import Row, delete, exists, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import Status, StreamError
from app.log.api import (
    AppendRequest,
    Event,
    EventKind,
    NewStream,
    StreamInfo,
    StreamStatus,
    encode_json,
)
from app.log.db import is_sqlite, postgres_engine, sqlite_engine, sqlite_pragmas
from app.log.driver_pool import DriverPool
from app.log.postgres_commit import PostgresCommit
from app.log.schema import STREAM_COLUMNS, TIME_COLUMNS, events, streams
from app.log.sqlite_commit import SqliteCommit
from app.log.sqlite_inline import InlineSqlite
from app.log.store import (
    AppendOutcome,
    already_exists,
    plan_create,
)

NOTIFY_CHANNEL = "streamkeep"
# Postgres refuses NOTIFY payloads of 8000 bytes or more.
NOTIFY_PAYLOAD_LIMIT = 7000
# Any constant works; it only has to be the same in every replica.
SWEEP_LOCK_KEY = 0x5354524B  # "STRK"

_KINDS = {k.value: k for k in EventKind}
_STATUSES = {s.value: s for s in StreamStatus}


# SQLSTATEs of a server that is away for now, not of a bad statement: connection
# exceptions (08), insufficient resources (53: too many connections, disk full) and
# operator intervention (57P01 admin shutdown, 57P02 crash shutdown, 57P03 "the
# database system is shutting down" or "is starting up" while Postgres restarts).
UNAVAILABLE_SQLSTATES = ("08", "53", "57P")


def _sqlstate(exc: BaseException) -> str | None:
    """The Postgres SQLSTATE of an error, whether SQLAlchemy wrapped it or not."""
    seen: BaseException | None = exc
    for _ in range(5):  # DBAPIError -> the adapter's Error -> asyncpg's error
        if seen is None:
            return None
        code = getattr(seen, "sqlstate", None)
        if isinstance(code, str):
            return code
        seen = getattr(seen, "orig", None) or seen.__cause__
    return None


def storage_error(exc: BaseException) -> StreamError:
    """A StreamError for a failure of the database itself (the cause stays attached).

    INTERNAL only for what says our SQL or data is wrong (integrity, syntax,
    bad data: trying again cannot help); everything else is UNAVAILABLE (503
    with Retry-After), since a database that is restarting, unreachable, out of
    connections or locked fails in more ways than anyone can list, and a
    client that tries again later will succeed.
    """
    sqlstate = _sqlstate(exc) or ""
    name = type(getattr(exc, "orig", None) or exc).__name__
    if sqlstate.startswith(UNAVAILABLE_SQLSTATES) or not _our_fault(exc, sqlstate):
        return StreamError(Status.UNAVAILABLE, f"database unavailable ({name})")
    return StreamError(Status.INTERNAL, f"storage failure ({name})")


# SQLSTATE classes of failures that retrying cannot fix: data exception,
# integrity constraint violation, syntax error or access rule violation.
OUR_FAULT_SQLSTATES = ("22", "23", "42")


def _our_fault(exc: BaseException, sqlstate: str) -> bool:
    if sqlstate:
        return sqlstate.startswith(OUR_FAULT_SQLSTATES)
    orig = getattr(exc, "orig", None) or exc
    return isinstance(exc, IntegrityError | ProgrammingError | DataError) or isinstance(
        orig, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.DataError
    )


# Failures of the database, whether they come through SQLAlchemy or straight
# from a driver (the hot insert talks to the driver itself).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    SQLAlchemyError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except StreamError:
        raise
    except (*DATABASE_ERRORS,) as exc:
        raise storage_error(exc) from exc


# What a connection that is gone raises (a busy SQLite file or a bad statement
# leaves the connection usable). 57P: the server shut down or restarts. asyncpg's
# InternalClientError: a termination that arrived while the connection sat idle
# in the pool ("cannot switch to state 15") leaves its protocol state unusable.
LOST_CONNECTION = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
)


P = ParamSpec("P")
T = TypeVar("T")


def _closed_error() -> StreamError:
    return StreamError(Status.UNAVAILABLE, "the database is closed (shutting down)")


def _finish_when_cancelled(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Run a read to its end even when its caller is cancelled (a reader that
    disconnects mid-query): interrupting the driver mid-statement throws the
    connection away instead of returning it to the pool."""

    @functools.wraps(method)
    async def shielded(*args: P.args, **kwargs: P.kwargs) -> T:
        store = args[0]
        assert isinstance(store, SqlStore)
        if store.closed:
            raise _closed_error()
        task = asyncio.ensure_future(method(*args, **kwargs))
        # The store's close waits for it: a read still in the driver's thread
        # when the event loop closes fails there.
        store._reads.add(task)
        task.add_done_callback(store._reads.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_ignore_outcome)
            raise

    return shielded


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: nobody waits for it any more


SQLITE_READERS_PER_POOL_SLOT = 4
# Connections the read pool keeps per pool_size slot, of the engine's: on SQLite
# 3 of the reader engine's 4, on Postgres 2 of the shared engine's 3 (commits and
# SQLAlchemy's statements use the rest).
READ_POOL_SLOTS = {"sqlite": 3, "postgresql": 2}
# Commits of disjoint streams Postgres runs at once for a process: while one
# waits on the database, the process plans and sends the next (see _Committer).
POSTGRES_COMMIT_LANES = 2
# Well below SQLite's limit of host parameters per statement (32,766).
HEADS_PER_QUERY = 500
# An event row's bytes besides its payload (its index entry included), about.
ROW_BYTES = 64


class SqlStore:
    def __init__(
        self,
        url: URL,
        *,
        busy_timeout_ms: int = 5000,
        sqlite_synchronous: str = "NORMAL",
        pool_size: int = 5,
        postgres_commit_lanes: int = POSTGRES_COMMIT_LANES,
    ) -> None:
        self.url = url
        self.dialect = "sqlite" if is_sqlite(url) else "postgresql"
        self.name = self.dialect
        if self.dialect == "sqlite":
            self.writer: AsyncEngine = sqlite_engine(
                url, writer=True, busy_timeout_ms=busy_timeout_ms, synchronous=sqlite_synchronous
            )
            self.reader: AsyncEngine = sqlite_engine(
                url,
                writer=False,
                busy_timeout_ms=busy_timeout_ms,
                synchronous=sqlite_synchronous,
                # A reader is a thread and a file handle: cheap enough to keep
                # one per concurrent request of a busy process.
                pool_size=pool_size * SQLITE_READERS_PER_POOL_SLOT,
            )
        else:
            self.writer = self.reader = postgres_engine(
                url, pool_size=pool_size, commit_lanes=postgres_commit_lanes
            )
        # SQLite's hot reads and commits, on the event loop's thread when they
        # need no lock (sqlite_inline).
        self._inline: InlineSqlite | None = None
        # One write at a time in the process, appends and SQLAlchemy's alike (SQLite
        # only; Postgres locks rows, not the database).
        self._sqlite_writes: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Lock() if self.dialect == "sqlite" else contextlib.nullcontext()
        )
        if self.dialect == "sqlite":
            if url.database in (None, "", ":memory:"):
                # One database per connection: appends would not see the streams.
                raise ValueError("SQLite needs a file; the in-memory store is 'memory'")
            pragmas = sqlite_pragmas(sqlite_synchronous)
            self._inline = InlineSqlite(str(url.database), pragmas, busy_timeout_ms)
        self._sql = SQLITE_HOT_SQL if self.dialect == "sqlite" else POSTGRES_HOT_SQL
        # Kept for the one-statement reads; the engine keeps the rest of its
        # connections for SQLAlchemy's own statements (and, on Postgres, commits).
        self._read_pool = DriverPool(
            self.reader, pool_size * READ_POOL_SLOTS[self.dialect], LOST_CONNECTION
        )
        # SQLite has one writer; Postgres takes commits of disjoint streams at once.
        self.commit_lanes = 1 if self.dialect == "sqlite" else postgres_commit_lanes
        # A commit on Postgres waits on the server: the appends that arrive
        # meanwhile are read then, and go into the next commit.
        self.commits_on_loop = self.dialect == "sqlite"
        # The committer's connections on Postgres, one per lane, kept like the
        # read pool's: checking a connection out of SQLAlchemy's pool for each
        # commit cost a third of a commit's main-thread CPU.
        self._commit_pool = (
            DriverPool(self.writer, self.commit_lanes, LOST_CONNECTION)
            if self.dialect == "postgresql"
            else None
        )
        self.closed = False
        self._reads: set[asyncio.Future[Any]] = set()  # see _finish_when_cancelled
        self._sqlite_commit = (
            SqliteCommit(
                self._sql.insert_events,
                lambda values: self._sql.stream_info(values, _mapping_info),
                self._sql.bind_time,
            )
            if self.dialect == "sqlite"
            else None
        )
        self._postgres_commit = (
            PostgresCommit(
                lambda values: self._sql.stream_info(values, _mapping_info),
                NOTIFY_CHANNEL,
                _notify_payloads,
            )
            if self.dialect == "postgresql"
            else None
        )

    # -- writes ---------------------------------------------------------------

    @asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction of SQLAlchemy's writer connection (creates, deletes, sweeps).

        On SQLite it waits its turn with the appends in the process, in order,
        rather than at the file lock: there a commit that found the lock taken
        retried on SQLite's sleeping back-off (1, 2, 5 ... 100 ms), and appends
        during a sweep saw a p99 of 107 ms.
        """
        async with self._sqlite_writes, self.writer.begin() as conn:
            yield conn

    async def create(self, spec: NewStream, now: datetime) -> StreamInfo:
        async with _translated(), self._write_transaction() as conn:
            # An expired stream that no fork reads is gone for everyone; its id is free again.
            await self._drop(conn, [spec.id], now, only_expired=True)
            source = None
            if spec.fork is not None:
                locked = await self._lock_streams(conn, [spec.fork.source])
                source = locked.get(spec.fork.source)
            info, initial = plan_create(spec, now, source)
            inserted = await conn.execute(
                self._insert_ignoring_conflict(_info_row(info)).returning(streams.c.id)
            )
            if inserted.first() is None:
                raise already_exists(spec.id)
            if source is not None:
                await conn.execute(
                    update(streams)
                    .where(streams.c.id == source.id)
                    .values(fork_count=streams.c.fork_count + 1)
                )
            if initial:
                await self._insert_events(conn, initial)
        return info

    async def _drop(
        self, conn: AsyncConnection, ids: list[str], now: datetime, *, only_expired: bool
    ) -> dict[str, int]:
        """Delete streams no fork reads, with their events (producers follow by
        cascade), then each source whose last fork this was, if it is gone.
        Returns the deleted ids with the number of their own events."""
        dropped: dict[str, int] = {}
        while ids:
            query = delete(streams).where(streams.c.id.in_(ids), streams.c.fork_count == 0)
            if only_expired:
                query = query.where(streams.c.expires_at <= now)
            rows = (
                await conn.execute(
                    query.returning(
                        streams.c.id, streams.c.forked_from, streams.c.last_seq, streams.c.fork_seq
                    )
                )
            ).all()
            if rows:
                # Events have no foreign key (migration 0004): they go here, by name.
                gone = [row.id for row in rows]
                await conn.execute(delete(events).where(events.c.stream_id.in_(gone)))
            dropped.update((row.id, row.last_seq - row.fork_seq) for row in rows)
            sources = [row.forked_from for row in rows if row.forked_from is not None]
            ids = await self._release(conn, sources, now)
            only_expired = True
        if dropped and self.dialect == "postgresql":
            # seq -1 tells other processes' readers that the stream is gone.
            for payload in _notify_payloads([(i, -1) for i in dropped]):
                await conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, payload)))
        return dropped

    async def _release(self, conn: AsyncConnection, sources: list[str], now: datetime) -> list[str]:
        """Drop one fork reference from each source; returns those now free to delete."""
        freed: list[str] = []
        for source in sources:
            row = (
                await conn.execute(
                    update(streams)
                    .where(streams.c.id == source)
                    .values(fork_count=streams.c.fork_count - 1)
                    .returning(streams.c.fork_count, streams.c.expires_at)
                )
            ).first()
            gone = row is not None and row.expires_at is not None and row.expires_at <= now
            if gone and row is not None and row.fork_count == 0:
                freed.append(source)
        return freed

    async def commit(self, requests: Sequence[AppendRequest], now: datetime) -> list[AppendOutcome]:
        # The hottest transaction goes to the driver itself, in as few round trips
        # as each allows: see sqlite_commit and postgres_commit.
        if self.closed:
            raise _closed_error()
        sqlite_commit = self._sqlite_commit
        if self._inline is not None and sqlite_commit is not None:
            rows_bytes = sum(len(e.payload) + ROW_BYTES for r in requests for e in r.events)
            async with _translated(), self._sqlite_writes:
                return await self._inline.commit(
                    lambda db: sqlite_commit(db, requests, now), rows_bytes
                )
        assert self._postgres_commit is not None and self._commit_pool is not None
        async with _translated(), self._commit_pool.connection() as driver:
            return await self._postgres_commit(driver, requests, now)

    async def _lock_streams(self, conn: AsyncConnection, ids: list[str]) -> dict[str, StreamInfo]:
        # ORDER BY id makes every transaction lock rows in the same order, so two
        # batches touching the same streams cannot deadlock.
        query = select(streams).where(streams.c.id.in_(ids)).order_by(streams.c.id)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        rows = await conn.execute(query)
        return {row.id: _row_info(row) for row in rows}

    async def _insert_events(self, conn: AsyncConnection, new: list[Event]) -> None:
        # A new stream's first events (Durable Streams creates with a body, forks):
        # to the driver, in this same transaction, with one timestamp for them all,
        # as the append transactions do.
        created = self._sql.bind_time(new[0].created_at)
        raw = await conn.get_raw_connection()
        # kind._value_: the plain attribute (.value is a property, slow once per event).
        await raw.driver_connection.executemany(  # type: ignore[union-attr]
            self._sql.insert_events,
            [
                (e.stream_id, e.seq, e.kind._value_, e.type, e.payload, created, e.batch_end)
                for e in new
            ],
        )

    def _insert_ignoring_conflict(self, row: dict[str, Any]) -> Any:
        if self.dialect == "postgresql":
            return pg_insert(streams).values(row).on_conflict_do_nothing(index_elements=["id"])
        return sqlite_insert(streams).values(row).on_conflict_do_nothing(index_elements=["id"])

    # -- reads ----------------------------------------------------------------

    async def read(self, stream_id: str, after: int, limit: int, now: datetime) -> list[Event]:
        sql = self._sql
        params = (stream_id, after, sql.bind_time(now), limit, after + limit)
        return self._events(stream_id, await self._fetch(sql.read_events, params))

    async def read_range(self, stream_id: str, after: int, upto: int, limit: int) -> list[Event]:
        # Bounded by the page as read_events is.
        params = (stream_id, after, min(upto, after + limit), limit)
        return self._events(stream_id, await self._fetch(self._sql.read_range, params))

    async def _fetch(self, statement: str, params: tuple[Any, ...]) -> Sequence[Any]:
        if self._inline is not None:
            if self.closed:
                raise _closed_error()
            try:
                rows = self._inline.read(statement, params)
            except sqlite3.Error as exc:
                raise storage_error(exc) from exc
            if rows is not None:
                return rows
        return await self._fetch_pooled(statement, params)

    @_finish_when_cancelled
    async def _fetch_pooled(self, statement: str, params: tuple[Any, ...]) -> Sequence[Any]:
        """On a kept driver connection: Postgres, or an SQLite read that must wait."""
        async with _translated():
            try:
                return await self._fetch_once(statement, params)
            except LOST_CONNECTION:
                # A kept connection the server dropped while it sat idle (a restart,
                # a failover): it is discarded, and a read can simply run again.
                return await self._fetch_once(statement, params)

    async def _fetch_once(self, statement: str, params: tuple[Any, ...]) -> Sequence[Any]:
        async with self._read_pool.connection() as driver:
            return await self._sql.fetch(driver, statement, params)

    def _events(self, stream_id: str, rows: Sequence[Any]) -> list[Event]:
        kinds = _KINDS
        if self.dialect == "postgresql":
            # asyncpg already gives bytes, bools and aware UTC datetimes: no
            # conversion per row (catch-up reads are all rows).
            return [
                Event(stream_id, seq, kinds[kind], payload, created, type_, end)
                for seq, kind, type_, payload, created, end in rows
            ]
        parse_time = _parse_sqlite_time  # events committed together share their time
        return [
            Event(
                stream_id, seq, kinds[kind], bytes(payload), parse_time(created), type_, bool(end)
            )
            for seq, kind, type_, payload, created, end in rows
        ]

    async def info(self, stream_id: str) -> StreamInfo | None:
        # Every request starts here: straight to the driver, as the hot reads do.
        rows = await self._fetch(self._sql.select_stream, (stream_id,))
        return self._sql.stream_info(rows[0], _mapping_info) if rows else None

    async def heads(self, stream_ids: Sequence[str]) -> dict[str, int]:
        if not stream_ids:
            return {}
        # Run by the SQLite poll whenever the file changed: straight to the driver.
        ids = list(stream_ids)
        heads: dict[str, int] = {}
        for start in range(0, len(ids), HEADS_PER_QUERY):
            some = ids[start : start + HEADS_PER_QUERY]
            statement, params = self._sql.heads(some)
            heads.update((row[0], row[1]) for row in await self._fetch(statement, params))
        return heads

    def data_version(self) -> int | None:
        """SQLite's `PRAGMA data_version` as this process's appends see it: it
        changes when another connection commits; None when it cannot be read now."""
        return self._inline.data_version() if self._inline is not None else None

    async def list_streams(self, status: StreamStatus | None, limit: int) -> list[StreamInfo]:
        query = select(streams).order_by(streams.c.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(streams.c.status == status.value)
        async with _translated(), self.reader.connect() as conn:
            return [_row_info(row) for row in await conn.execute(query)]

    async def count_streams(self, status: StreamStatus | None) -> int:
        query = select(func.count()).select_from(streams)
        if status is not None:
            query = query.where(streams.c.status == status.value)
        async with _translated(), self.reader.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def ping(self) -> str | None:
        async with _translated(), self.reader.connect() as conn:
            revision = await conn.execute(text("SELECT version_num FROM alembic_version"))
            return revision.scalar()

    async def renew(self, stream_id: str, expires_at: datetime, now: datetime) -> bool:
        async with _translated(), self._write_transaction() as conn:
            result = await conn.execute(
                update(streams)
                .where(
                    streams.c.id == stream_id,
                    streams.c.expires_at > now,
                    streams.c.expires_at < expires_at,
                )
                .values(expires_at=expires_at)
            )
            return bool(result.rowcount)

    # -- retention ------------------------------------------------------------

    async def find_abandoned(self, now: datetime, limit: int) -> list[str]:
        query = (
            select(streams.c.id)
            .where(streams.c.status == StreamStatus.OPEN.value, streams.c.abandon_at <= now)
            .order_by(streams.c.abandon_at)
            .limit(limit)
        )
        async with _translated(), self.reader.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def purge_expired(self, now: datetime, batch_size: int) -> tuple[int, int]:
        """Delete expired streams, never more than about `batch_size` rows per transaction.

        Small streams go many at a time, with their events in the same transaction;
        a large stream loses its events in seq ranges first, so that no single
        transaction holds the write lock for long.
        """
        deleted_streams = deleted_events = 0
        while True:
            async with _translated(), self.reader.connect() as conn:
                expired = (
                    await conn.execute(
                        select(streams.c.id, streams.c.fork_seq, streams.c.last_seq)
                        .where(streams.c.expires_at <= now, streams.c.fork_count == 0)
                        .order_by(streams.c.expires_at)
                        .limit(batch_size)
                    )
                ).all()
            if not expired:
                return deleted_streams, deleted_events
            # stream id -> events it still holds (a large one loses them in ranges first)
            group: dict[str, int] = {}
            for stream_id, fork_seq, last_seq in expired:
                remaining = last_seq - fork_seq  # a fork's inherited events are not its rows
                if remaining > batch_size:
                    deleted_events += await self._delete_event_ranges(
                        stream_id, fork_seq, last_seq, now, batch_size
                    )
                    remaining = 0
                if group and sum(group.values()) + remaining > batch_size:
                    s, e = await self._delete_streams(group, now)
                    deleted_streams, deleted_events = deleted_streams + s, deleted_events + e
                    group = {}
                group[stream_id] = remaining
            s, e = await self._delete_streams(group, now)
            deleted_streams, deleted_events = deleted_streams + s, deleted_events + e

    async def _delete_event_ranges(
        self, stream_id: str, first_seq: int, last_seq: int, now: datetime, batch_size: int
    ) -> int:
        still_expired = exists().where(
            streams.c.id == stream_id, streams.c.expires_at <= now, streams.c.fork_count == 0
        )
        deleted = 0
        for upper in range(first_seq + batch_size, last_seq + batch_size, batch_size):
            async with _translated(), self._write_transaction() as conn:
                # The EXISTS guard: if the id was re-created meanwhile, the new
                # stream's events are not ours to delete.
                result = await conn.execute(
                    delete(events).where(
                        events.c.stream_id == stream_id,
                        events.c.seq > upper - batch_size,
                        events.c.seq <= upper,
                        still_expired,
                    )
                )
                deleted += result.rowcount or 0
        return deleted

    async def _delete_streams(self, remaining: dict[str, int], now: datetime) -> tuple[int, int]:
        async with _translated(), self._write_transaction() as conn:
            deleted = await self._drop(conn, list(remaining), now, only_expired=True)
        # A source freed by these deletions went with them, all its rows at once.
        return len(deleted), sum(remaining.get(i, count) for i, count in deleted.items())

    async def delete(self, stream_id: str, now: datetime) -> bool:
        async with _translated(), self._write_transaction() as conn:
            row = (await self._lock_streams(conn, [stream_id])).get(stream_id)
            if row is None:
                return False
            live = not row.expired(now)
            if row.fork_count == 0:
                await self._drop(conn, [stream_id], now, only_expired=False)
            elif live:
                # Its forks still read its events: gone for everyone else, kept for them.
                await conn.execute(
                    update(streams).where(streams.c.id == stream_id).values(expires_at=now)
                )
                if self.dialect == "postgresql":
                    payload = json.dumps([[stream_id, -1]])
                    await conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, payload)))
            return live

    @asynccontextmanager
    async def sweep_lock(self) -> AsyncIterator[bool]:
        if self.dialect == "sqlite":
            # BEGIN IMMEDIATE already serialises sweepers on one file, and every
            # sweep step is conditional, so two sweepers cannot do harm.
            yield True
            return
        async with _translated(), self.writer.connect() as conn:
            got = bool(await conn.scalar(select(func.pg_try_advisory_lock(SWEEP_LOCK_KEY))))
            await conn.commit()
            try:
                yield got
            finally:
                if got:
                    await conn.execute(select(func.pg_advisory_unlock(SWEEP_LOCK_KEY)))
                    await conn.commit()

    async def close(self) -> None:
        self.closed = True
        if self._reads:
            await asyncio.wait(self._reads)
        await self._read_pool.close()
        if self._commit_pool is not None:
            await self._commit_pool.close()
        if self._inline is not None:
            await self._inline.close()
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()


class HotSql:
    """The statements that run per event or per request, sent to the driver directly.

    They skip SQLAlchemy's statement and row processing, which cost more than
    the database work itself: the event insert and the reads by cursor, the
    stream lookup every request starts with, and the heads the SQLite poll
    asks for. On Postgres they run on connections of SQLAlchemy's pool (the
    reads on ones kept by driver_pool.DriverPool); on SQLite on the event
    loop's own connections (sqlite_inline), the pool only when they must wait
    for a lock. Times are bound and parsed here the way UtcDateTime stores them.
    """

    def __init__(self, placeholders: list[str], text_times: bool) -> None:
        p = placeholders
        self.insert_events = (
            "INSERT INTO events (stream_id, seq, kind, type, payload, created_at, batch_end) "
            f"VALUES ({p[0]}, {p[1]}, {p[2]}, {p[3]}, {p[4]}, {p[5]}, {p[6]})"
        )
        # The EXISTS makes an expired stream read as gone before the sweeper
        # deletes it. It does not depend on the event row, so it runs once per
        # page. As a join, Postgres checked the stream again for every row (a
        # nested loop over streams).
        # The upper bound (after + limit: a stream's own seqs have no gaps) keeps
        # a page's cost to its own rows whatever plan Postgres picks. Without
        # it, a table whose statistics underestimate a stream (new tables, a
        # stream that grew since the last ANALYZE) was read by a bitmap scan of
        # everything after the cursor and a sort of it, for every page: a
        # catch-up of n events cost n²/limit rows.
        self.read_events = (
            "SELECT e.seq, e.kind, e.type, e.payload, e.created_at, e.batch_end FROM events e "
            f"WHERE e.stream_id = {p[0]} AND e.seq > {p[1]} AND e.seq <= {p[4]} "
            f"AND EXISTS (SELECT 1 FROM streams s WHERE s.id = {p[0]} "
            f"AND (s.expires_at IS NULL OR s.expires_at > {p[2]})) "
            f"ORDER BY e.seq LIMIT {p[3]}"
        )
        self.select_stream = f"SELECT {', '.join(STREAM_COLUMNS)} FROM streams WHERE id = {p[0]}"
        self._any_id = p[0]
        # What a fork inherited: its source may be gone, its rows are kept for the fork.
        self.read_range = (
            "SELECT seq, kind, type, payload, created_at, batch_end FROM events "
            f"WHERE stream_id = {p[0]} AND seq > {p[1]} AND seq <= {p[2]} "
            f"ORDER BY seq LIMIT {p[3]}"
        )
        self._text_times = text_times

    async def fetch(self, driver: Any, statement: str, params: tuple[Any, ...]) -> Sequence[Any]:
        """Rows as plain tuples from a pooled driver connection (aiosqlite, asyncpg)."""
        if self._text_times:
            # One round trip to aiosqlite's thread (execute, fetchall and close are three).
            return list(await driver.execute_fetchall(statement, params))
        return list(await driver.fetch(statement, *params))

    def stream_info(
        self, values: Sequence[Any], info: Callable[[Mapping[str, Any]], StreamInfo]
    ) -> StreamInfo:
        """A StreamInfo from a row of `select_stream`."""
        row = dict(zip(STREAM_COLUMNS, values, strict=True))
        if self._text_times:
            for name in TIME_COLUMNS:
                if row[name] is not None:
                    row[name] = _parse_sqlite_time(row[name])
        return info(row)

    def heads(self, stream_ids: list[str]) -> tuple[str, tuple[Any, ...]]:
        """The statement and parameters reading the last_seq of these streams."""
        if self._text_times:  # SQLite: one placeholder per id
            marks = ", ".join("?" * len(stream_ids))
            return f"SELECT id, last_seq FROM streams WHERE id IN ({marks})", tuple(stream_ids)
        return f"SELECT id, last_seq FROM streams WHERE id = ANY({self._any_id})", (stream_ids,)

    def bind_time(self, value: datetime) -> Any:
        if not self._text_times:
            return value
        # SQLAlchemy's SQLite DateTime format, naive UTC (see schema.UtcDateTime).
        # A commit binds the same few times several times (now, created_at).
        bound = _BOUND_TIMES.get(value)
        if bound is None:
            if len(_BOUND_TIMES) >= 4096:
                _BOUND_TIMES.clear()
            bound = _BOUND_TIMES[value] = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return bound


_BOUND_TIMES: dict[datetime, str] = {}


def _parse_sqlite_time(raw: str) -> datetime:
    parsed = _PARSED_TIMES.get(raw)
    if parsed is None:
        if len(_PARSED_TIMES) >= 4096:
            _PARSED_TIMES.clear()
        parsed = _PARSED_TIMES[raw] = datetime.fromisoformat(raw).replace(tzinfo=UTC)
    return parsed


# A stream's row is looked up by every request to it, with the same stored
# times each time (created, updated, expires...), and events committed together
# share theirs: parsing them was a tenth of an HTTP append's main-thread time.
_PARSED_TIMES: dict[str, datetime] = {}


# Numbered, so that a statement can use a parameter twice.
SQLITE_HOT_SQL = HotSql([f"?{i}" for i in range(1, 8)], text_times=True)
POSTGRES_HOT_SQL = HotSql([f"${i}" for i in range(1, 8)], text_times=False)


def _notify_payloads(heads: list[tuple[str, int]]) -> list[str]:
    """JSON lists of [stream_id, last_seq], split to fit NOTIFY's payload limit.

    Each entry is encoded once by msgspec and the payloads are joined from
    those bytes: json.dumps per entry (to measure it) and again per payload
    took 4 µs a stream, 0.4 ms of every commit of 100 streams.
    """
    payloads: list[str] = []
    batch: list[bytes] = []
    size = 2  # the brackets
    for head in heads:
        entry = encode_json(head)
        entry_size = len(entry) + 1  # and a comma
        if batch and size + entry_size > NOTIFY_PAYLOAD_LIMIT:
            payloads.append(_json_list(batch))
            batch, size = [], 2
        if entry_size > NOTIFY_PAYLOAD_LIMIT:
            continue  # an absurdly long id: its readers fall back to the safety poll
        batch.append(entry)
        size += entry_size
    if batch:
        payloads.append(_json_list(batch))
    return payloads


def _json_list(entries: list[bytes]) -> str:
    return (b"[" + b",".join(entries) + b"]").decode()


# Stored by json.dumps (_info_row); msgspec reads it back to the same values, faster.
_decode_json = msgspec.json.Decoder().decode

# StreamInfo's fields are the streams columns; these three are encoded on the way.
_ENCODED_FIELDS = ("status", "output", "attributes")
_PLAIN_FIELDS = [f.name for f in fields(StreamInfo) if f.name not in _ENCODED_FIELDS]


def _row_info(row: Row[Any]) -> StreamInfo:
    return _mapping_info(row._mapping)


def _mapping_info(m: Mapping[Any, Any]) -> StreamInfo:
    return StreamInfo(
        **{name: m[name] for name in _PLAIN_FIELDS},
        status=_STATUSES[m["status"]],
        output=bytes(m["output"]) if m["output"] is not None else None,
        attributes=_decode_json(m["attributes"]) if m["attributes"] is not None else None,
    )


def _info_row(info: StreamInfo) -> dict[str, Any]:
    row = {name: getattr(info, name) for name in _PLAIN_FIELDS}
    row["status"] = info.status.value
    row["output"] = info.output
    row["attributes"] = json.dumps(info.attributes) if info.attributes is not None else None
    return row

"""Postgres's append transaction, on asyncpg directly and in few round trips.

Through SQLAlchemy a group commit was eight round trips (BEGIN, lock,
update, insert, NOTIFY, COMMIT, ...), each a turn of the event loop, plus
SQLAlchemy's statement handling on the one core the service has. Here one
statement updates the streams, inserts the events, upserts the producers'
states and notifies (data-modifying CTEs over arrays). A batch on rows the
committer already knows is that statement alone, guarded by the rows'
versions; otherwise it is BEGIN, one locking SELECT (and one reading the
producers the batch names), the statement and COMMIT.

sqlite_commit.py is the same transaction for SQLite; both plan with
store.plan_batch, and `tests/log` runs one contract against every store.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.dialects import postgresql

from app.log.api import AppendRequest, ProducerState, StreamInfo
from app.log.schema import APPENDED_COLUMNS, STREAM_COLUMNS, TIME_COLUMNS, streams
from app.log.store import AppendOutcome, KeptRows, StreamPlan, plan_batch


def _column_type(name: str) -> str:
    dialect: Any = postgresql.dialect()  # type: ignore[no-untyped-call]
    return str(streams.c[name].type.compile(dialect=dialect))


# ORDER BY id locks the rows in one order in every transaction: no deadlocks.
LOCK_STREAMS = (
    f"SELECT {', '.join(STREAM_COLUMNS)}, xmin::text FROM streams WHERE id = ANY($1::text[]) "
    "ORDER BY id FOR UPDATE"
)
SELECT_PRODUCERS = (
    "SELECT stream_id, producer_id, epoch, last_seq FROM producers "
    "WHERE stream_id = ANY($1::text[]) AND producer_id = ANY($2::text[])"
)


# The events' columns a commit sends, with their types (created_at is one value for all).
EVENT_COLUMNS = (
    ("stream_id", "text"),
    ("seq", "bigint"),
    ("kind", "text"),
    ("type", "text"),
    ("payload", "bytea"),
    ("batch_end", "boolean"),
)
# The columns sent once when every row of a batch has the same value: the
# streams' times (a batch sets updated_at and last_write_at to its `now`, the
# others from it), their status, and what most events share. Not the row keys id
# and seq (unnest() needs an array to make rows of), and not the values that
# match only by chance (seqs, payloads, outputs): each such match would be one
# more shape, so one more statement for Postgres to prepare and plan.
SENT_ONCE_WHEN_SHARED = frozenset(TIME_COLUMNS & set(APPENDED_COLUMNS)) | {
    "status",
    "stream_id",
    "kind",
    "type",
    "batch_end",
}


class WriteShape(NamedTuple):
    """What write_statement needs to know of a batch's values.

    `columns` are the stream columns the batch sets (APPENDED_COLUMNS order).
    `once` names the columns, of the streams' and of the events', whose value
    is the same in every row (of SENT_ONCE_WHEN_SHARED): those are sent as
    one parameter, not an array.
    asyncpg encodes an array element by element, in part through Python, at
    about 1 µs a text element and 4 µs a timestamp; a commit of one append to
    each of 100 streams spent some 2 ms on it, a fifth of its cycle. Most of
    those values are one value: every written stream gets the same
    updated_at and last_write_at, and most events are chunks without a type
    that end their append.
    """

    columns: tuple[str, ...]
    once: frozenset[str]


@functools.lru_cache(maxsize=256)
def write_statement(shape: WriteShape, guarded: bool) -> str:
    """Update the streams, insert the events, upsert the producers, then
    NOTIFY: one statement.

    Only `shape.columns` of the streams are set (those the batch changes).

    Its parameters, in order: the streams' ids and their `shape.columns`; the
    events' columns (EVENT_COLUMNS) and their shared created_at; the
    producers' stream ids, ids, epochs and seqs as arrays and their
    updated_at; the channel and the NOTIFY payloads. A column is an array
    with a value per row, or one value when `shape.once` names it. It returns
    whether it wrote, and the updated streams' ids and row versions (xmin).

    Guarded, two more arrays follow: the ids of every stream of the batch and
    the row versions the batch was planned against. It then locks those rows
    and writes only if none of them changed since (see PostgresCommit).
    """
    params = _Params()
    stream_columns = [("id", "text"), *((name, _column_type(name)) for name in shape.columns)]
    updates, set_to = params.rows("u", stream_columns, shape.once)
    inserts, insert_of = params.rows("e", EVENT_COLUMNS, shape.once)
    events_created_at = params.next()
    producer_args = ", ".join(
        params.next(f"::{cast}[]") for cast in ("text", "text", "bigint", "bigint")
    )
    producers_updated_at = params.next()
    channel, payloads = params.next(), params.next("::text[]")
    check = "checked AS (SELECT true AS ok), "
    if guarded:
        ids, versions = params.next("::text[]"), params.next("::text[]")
        # FOR UPDATE re-reads a row another transaction changed meanwhile, so
        # its new xmin no longer matches: the count falls short.
        check = (
            "locked AS ("
            "SELECT s.id FROM streams AS s "
            f"JOIN unnest({ids}, {versions}) AS x(id, version) "
            "ON s.id = x.id AND s.xmin::text = x.version "
            "ORDER BY s.id FOR UPDATE OF s), "
            f"checked AS (SELECT count(*) = cardinality({ids}) AS ok FROM locked), "
        )
    sets = ", ".join(f"{name} = {set_to[name]}" for name in shape.columns)
    inserted = ", ".join(insert_of[name] for name, _ in EVENT_COLUMNS)
    return (
        f"WITH {check}"
        "updated AS ("
        f"UPDATE streams AS s SET {sets} FROM {updates}, checked "
        f"WHERE s.id = {set_to['id']} AND checked.ok RETURNING s.id, s.xmin::text AS version), "
        "inserted AS ("
        "INSERT INTO events (stream_id, seq, kind, type, payload, batch_end, created_at) "
        f"SELECT {inserted}, {events_created_at} FROM {inserts}, checked WHERE checked.ok), "
        "upserted AS ("
        "INSERT INTO producers (stream_id, producer_id, epoch, last_seq, updated_at) "
        f"SELECT p.*, {producers_updated_at} FROM unnest({producer_args}) "
        "AS p(stream_id, producer_id, epoch, last_seq), checked WHERE checked.ok "
        "ON CONFLICT (stream_id, producer_id) DO UPDATE SET "
        "epoch = excluded.epoch, last_seq = excluded.last_seq, updated_at = excluded.updated_at), "
        "notified AS ("
        f"SELECT pg_notify({channel}, payload) FROM unnest({payloads}) AS payload, "
        "checked WHERE checked.ok) "
        "SELECT checked.ok, array(SELECT id FROM updated), array(SELECT version FROM updated), "
        "(SELECT count(*) FROM notified) FROM checked"
    )


class _Params:
    """The statement's numbered parameters, handed out in order."""

    def __init__(self) -> None:
        self.count = 0

    def next(self, cast: str = "") -> str:
        self.count += 1
        return f"${self.count}{cast}"

    def rows(
        self, alias: str, columns: Sequence[tuple[str, str]], once: frozenset[str]
    ) -> tuple[str, dict[str, str]]:
        """`unnest(arrays) AS alias(names)` over the columns sent as arrays, and
        the SQL of every column: `alias.name`, or the parameter sent once."""
        arrays: list[str] = []
        names: list[str] = []
        value_of: dict[str, str] = {}
        for name, sql_type in columns:
            if name in once:
                value_of[name] = self.next(f"::{sql_type}")
            else:
                arrays.append(self.next(f"::{sql_type}[]"))
                names.append(name)
                value_of[name] = f"{alias}.{name}"
        return f"unnest({', '.join(arrays)}) AS {alias}({', '.join(names)})", value_of


def changed_columns(plans: list[StreamPlan]) -> tuple[str, ...]:
    """The stream columns any plan of the batch changes, in APPENDED_COLUMNS order.

    A batch that appends nothing (every request refused) still runs the
    guarded statement, which confirms the rows its refusals were planned
    against; its UPDATE, of no rows, still needs a column to name.
    """
    changed = {name for plan in plans for name in plan.columns}
    return tuple(name for name in APPENDED_COLUMNS if name in changed) or ("last_seq",)


# What the committer knows of a stream's producers: the state of each it has
# read or written, None for one it found absent.
KnownProducers = dict[str, ProducerState | None]


class PostgresCommit:
    """The append transaction for one batch on an asyncpg connection.

    `stream_info` turns a row of STREAM_COLUMNS into a StreamInfo;
    `notify_payloads` splits (stream id, last seq) heads into NOTIFY payloads.

    A transaction that locks the rows, plans and writes is four round trips
    (BEGIN, the locking SELECT, the write, COMMIT), each a turn of the event
    loop; under load they cost the committer more than the WAL flush. So the
    committer keeps the rows it last locked or wrote, with their xmin (the row
    version Postgres gives every update), plans a batch against those and
    sends one statement that writes only if no row changed since: one round
    trip, committed by Postgres on its own. A row another writer changed (an
    append from another replica, a renewal, a delete) fails the check and the
    batch runs as a locked transaction, which learns the row again.

    Producer states are kept with their stream's row: a producer row changes
    only in a transaction that also updates its stream's row, so an unchanged
    xmin vouches for them too. A batch naming a producer the committer has
    not seen on that stream runs locked, and reads it.
    """

    def __init__(
        self,
        stream_info: Callable[[Sequence[Any]], StreamInfo],
        channel: str,
        notify_payloads: Callable[[list[tuple[str, int]]], list[str]],
    ) -> None:
        self.stream_info = stream_info
        self.channel = channel
        self.notify_payloads = notify_payloads
        self._kept: KeptRows[tuple[str, KnownProducers]] = KeptRows()

    async def __call__(
        self, db: Any, requests: Sequence[AppendRequest], now: datetime
    ) -> list[AppendOutcome]:
        outcomes = await self._commit_if_unchanged(db, requests, now)
        if outcomes is None:
            outcomes = await self._commit_locked(db, requests, now)
        return outcomes

    async def _commit_if_unchanged(
        self, db: Any, requests: Sequence[AppendRequest], now: datetime
    ) -> list[AppendOutcome] | None:
        """The batch planned against the kept rows, or None if it must be locked."""
        ids = sorted({r.stream_id for r in requests})
        current: dict[str, StreamInfo] = {}
        versions: list[str] = []
        known: dict[str, KnownProducers] = {}
        for stream_id in ids:
            kept = self._kept.get(stream_id)
            if kept is None:
                return None
            current[stream_id], (version, known[stream_id]) = kept
            versions.append(version)
        producers: dict[str, dict[str, ProducerState]] = {}
        for request in requests:
            if request.producer is not None:
                producer_id = request.producer.producer_id
                if producer_id not in known[request.stream_id]:
                    return None
                state = known[request.stream_id][producer_id]
                if state is not None:
                    producers.setdefault(request.stream_id, {})[producer_id] = state
        plans, outcomes = plan_batch(requests, current, producers, now)
        shape, args = self._write_args(plans, now)
        written, updated, new_versions, _ = await db.fetchrow(
            write_statement(shape, guarded=True), *args, ids, versions
        )
        if not written:
            for stream_id in ids:
                self._kept.forget(stream_id)
            return None
        self._keep_written(plans, updated, new_versions)
        return outcomes

    async def _commit_locked(
        self, db: Any, requests: Sequence[AppendRequest], now: datetime
    ) -> list[AppendOutcome]:
        ids = sorted({r.stream_id for r in requests})
        claims = {(r.stream_id, r.producer.producer_id) for r in requests if r.producer}
        async with db.transaction():
            current: dict[str, StreamInfo] = {}
            versions: dict[str, str] = {}
            for row in await db.fetch(LOCK_STREAMS, ids):
                values = tuple(row)
                info = self.stream_info(values[:-1])
                current[info.id], versions[info.id] = info, values[-1]
            found = await self._producers(db, claims)
            plans, outcomes = plan_batch(requests, current, found, now)
            if plans:
                shape, args = self._write_args(plans, now)
                _, updated, new_versions, _ = await db.fetchrow(
                    write_statement(shape, guarded=False), *args
                )
        claimed: dict[str, list[str]] = {}
        for stream_id, producer_id in claims:
            claimed.setdefault(stream_id, []).append(producer_id)
        for stream_id in ids:
            if stream_id in current:
                stored = found.get(stream_id, {})
                named = {p: stored.get(p) for p in claimed.get(stream_id, [])}
                self._keep_read(current[stream_id], versions[stream_id], named)
            else:
                self._kept.forget(stream_id)
        # Written rows are kept only once committed: a rollback raised above.
        if plans:
            self._keep_written(plans, updated, new_versions)
        return outcomes

    def _keep_read(self, info: StreamInfo, version: str, named: KnownProducers) -> None:
        """Keep a locked row, with what is known of its producers at that version:
        those the batch named (None if absent), and those kept before if the row
        has not changed since."""
        kept = self._kept.get(info.id)
        known: KnownProducers = {}
        if kept is not None:
            _, (kept_version, kept_producers) = kept
            if kept_version == version:
                known.update(kept_producers)
        known.update(named)
        self._kept.keep(info, (version, _bounded(known)))

    def _keep_written(
        self, plans: list[StreamPlan], updated: list[str], versions: list[str]
    ) -> None:
        new_versions = dict(zip(updated, versions, strict=True))
        for plan in plans:
            version = new_versions.get(plan.info.id)
            kept = self._kept.get(plan.info.id)
            if version is None or kept is None:  # not updated after all: not known any more
                self._kept.forget(plan.info.id)
                continue
            _, (_, kept_producers) = kept
            known: KnownProducers = {**kept_producers, **plan.producers}
            self._kept.keep(plan.info, (version, _bounded(known)))

    async def _producers(
        self, db: Any, claims: set[tuple[str, str]]
    ) -> dict[str, dict[str, ProducerState]]:
        """The stored states of these (stream id, producer id) pairs."""
        if not claims:
            return {}
        rows = await db.fetch(
            SELECT_PRODUCERS, sorted({s for s, _ in claims}), sorted({p for _, p in claims})
        )
        found: dict[str, dict[str, ProducerState]] = {}
        for stream_id, producer_id, epoch, last_seq in rows:
            if (stream_id, producer_id) in claims:
                found.setdefault(stream_id, {})[producer_id] = ProducerState(epoch, last_seq)
        return found

    def _write_args(self, plans: list[StreamPlan], now: datetime) -> tuple[WriteShape, list[Any]]:
        """The shape and the parameters of the write statement for these plans:
        the streams' new rows, the events, the producers' states and the NOTIFY."""
        infos = [plan.info for plan in plans]
        columns = changed_columns(plans)
        values: list[tuple[str, list[Any]]] = [("id", [info.id for info in infos])]
        for name in columns:
            if name == "status":
                values.append((name, [info.status.value for info in infos]))
            else:
                values.append((name, [getattr(info, name) for info in infos]))
        new = [e for plan in plans for e in plan.events]
        # kind._value_: the plain attribute (.value is a property, slow once per event).
        values += [
            ("stream_id", [e.stream_id for e in new]),
            ("seq", [e.seq for e in new]),
            ("kind", [e.kind._value_ for e in new]),
            ("type", [e.type for e in new]),
            ("payload", [e.payload for e in new]),
            ("batch_end", [e.batch_end for e in new]),
        ]
        once = frozenset(
            name for name, column in values if name in SENT_ONCE_WHEN_SHARED and _one_value(column)
        )
        sent = [column[0] if name in once else column for name, column in values]
        created_at = new[0].created_at if new else now
        states = [
            (plan.info.id, producer_id, state.epoch, state.last_seq)
            for plan in plans
            for producer_id, state in plan.producers.items()
        ]
        producers = (
            [list(column) for column in zip(*states, strict=True)] if states else [[], [], [], []]
        )
        # Delivered at COMMIT and dropped on rollback: a wake-up never announces
        # rows that do not exist. One NOTIFY per transaction, not per event.
        payloads = self.notify_payloads([(info.id, info.last_seq) for info in infos])
        args = [*sent, created_at, *producers, now, self.channel, payloads]
        return WriteShape(columns, once), args


def _one_value(column: list[Any]) -> bool:
    """Whether every row has the same value (compared in C, by identity first)."""
    return bool(column) and column.count(column[0]) == len(column)


# A stream's producers kept with its row, at most; beyond, the oldest go.
KEPT_PRODUCERS_PER_STREAM = 256


def _bounded(known: KnownProducers) -> KnownProducers:
    while len(known) > KEPT_PRODUCERS_PER_STREAM:
        del known[next(iter(known))]
    return known

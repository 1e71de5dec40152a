"""Postgres's append transaction, on asyncpg directly and in few round trips.

Through SQLAlchemy a group commit was eight round trips (BEGIN, lock,
update, insert, NOTIFY, COMMIT, ...), each a turn of the event loop, plus
SQLAlchemy's statement handling on the one core the service has. Here it is
BEGIN, one locking SELECT, one statement that updates the streams, inserts
the events and notifies (data-modifying CTEs over arrays), and COMMIT.

sqlite_commit.py is the same transaction for SQLite; both plan with
store.plan_batch, and `tests/log` runs one contract against every store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql

from app.log.api import AppendRequest, ProducerState, StreamInfo
from app.log.schema import APPENDED_COLUMNS, STREAM_COLUMNS, streams
from app.log.store import AppendOutcome, StreamPlan, plan_batch


def _array_type(name: str) -> str:
    dialect: Any = postgresql.dialect()  # type: ignore[no-untyped-call]
    return f"{streams.c[name].type.compile(dialect=dialect)}[]"


# ORDER BY id locks the rows in one order in every transaction: no deadlocks.
LOCK_STREAMS = (
    f"SELECT {', '.join(STREAM_COLUMNS)} FROM streams WHERE id = ANY($1::text[]) "
    "ORDER BY id FOR UPDATE"
)
SELECT_PRODUCERS = (
    "SELECT stream_id, producer_id, epoch, last_seq FROM producers "
    "WHERE stream_id = ANY($1::text[]) AND producer_id = ANY($2::text[])"
)
UPSERT_PRODUCERS = (
    "INSERT INTO producers (stream_id, producer_id, epoch, last_seq, updated_at) "
    "SELECT u.*, $5 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS u "
    "ON CONFLICT (stream_id, producer_id) DO UPDATE SET "
    "epoch = excluded.epoch, last_seq = excluded.last_seq, updated_at = excluded.updated_at"
)


def _write_statement() -> str:
    """Update the streams, insert the events, then NOTIFY: one statement.

    $1.. are the streams' ids and APPENDED_COLUMNS as arrays; then the
    events' columns as arrays, their shared created_at, the channel and the
    NOTIFY payloads.
    """
    updated = ["id", *APPENDED_COLUMNS]
    update_args = ", ".join(
        f"${i}::{'text[]' if name == 'id' else _array_type(name)}"
        for i, name in enumerate(updated, start=1)
    )
    sets = ", ".join(f"{name} = u.{name}" for name in APPENDED_COLUMNS)
    n = len(updated)
    return (
        "WITH updated AS ("
        f"UPDATE streams AS s SET {sets} FROM unnest({update_args}) AS u({', '.join(updated)}) "
        "WHERE s.id = u.id), "
        "inserted AS ("
        "INSERT INTO events (stream_id, seq, kind, type, payload, batch_end, created_at) "
        f"SELECT e.*, ${n + 7} FROM unnest(${n + 1}::text[], ${n + 2}::bigint[], "
        f"${n + 3}::text[], ${n + 4}::text[], ${n + 5}::bytea[], ${n + 6}::boolean[]) AS e) "
        f"SELECT pg_notify(${n + 8}, payload) FROM unnest(${n + 9}::text[]) AS payload"
    )


WRITE = _write_statement()


class PostgresCommit:
    """The append transaction for one batch on an asyncpg connection.

    `stream_info` turns a row of STREAM_COLUMNS into a StreamInfo;
    `notify_payloads` splits (stream id, last seq) heads into NOTIFY payloads.
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

    async def __call__(
        self, db: Any, requests: Sequence[AppendRequest], now: datetime
    ) -> list[AppendOutcome]:
        ids = sorted({r.stream_id for r in requests})
        async with db.transaction():
            infos = (self.stream_info(row) for row in await db.fetch(LOCK_STREAMS, ids))
            current = {info.id: info for info in infos}
            known = await self._producers(db, requests)
            plans, outcomes = plan_batch(requests, current, known, now)
            if plans:
                await self._write(db, plans, now)
        return outcomes

    async def _producers(
        self, db: Any, requests: Sequence[AppendRequest]
    ) -> dict[str, dict[str, ProducerState]]:
        claims = {(r.stream_id, r.producer.producer_id) for r in requests if r.producer}
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

    async def _write(self, db: Any, plans: list[StreamPlan], now: datetime) -> None:
        infos = [plan.info for plan in plans]
        columns: list[list[Any]] = [[info.id for info in infos]]
        for name in APPENDED_COLUMNS:
            columns.append([getattr(info, name) for info in infos])
        columns[1 + APPENDED_COLUMNS.index("status")] = [info.status.value for info in infos]
        new = [e for plan in plans for e in plan.events]
        # kind._value_: the plain attribute (.value is a property, slow once per event).
        events = [
            [e.stream_id for e in new],
            [e.seq for e in new],
            [e.kind._value_ for e in new],
            [e.type for e in new],
            [e.payload for e in new],
            [e.batch_end for e in new],
        ]
        # Delivered at COMMIT and dropped on rollback: a wake-up never announces
        # rows that do not exist. One NOTIFY per transaction, not per event.
        payloads = self.notify_payloads([(info.id, info.last_seq) for info in infos])
        await db.execute(WRITE, *columns, *events, new[0].created_at, self.channel, payloads)
        states = [
            (plan.info.id, producer_id, state.epoch, state.last_seq)
            for plan in plans
            for producer_id, state in plan.producers.items()
        ]
        if states:
            await db.execute(UPSERT_PRODUCERS, *map(list, zip(*states, strict=True)), now)

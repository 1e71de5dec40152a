"""SQLite's append transaction: one function from BEGIN IMMEDIATE to COMMIT.

A group commit through SQLAlchemy and aiosqlite took seven round trips to a
worker thread (begin, lock, update, insert, commit, ...), and under HTTP load
each waited for a turn of a busy event loop: commits took 14 ms where SQLite
needs a fraction of one. As one function it runs in a single call: on the
event loop's thread when the write lock is free, on a worker thread when it
must wait for it (sqlite_inline.InlineSqlite).

postgres_commit.py is the same transaction for Postgres; both plan with
store.plan_batch, and `tests/log` runs one contract against every store.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from app.log.api import AppendRequest, ProducerState, StreamInfo
from app.log.schema import STREAM_COLUMNS, TIME_COLUMNS
from app.log.store import AppendOutcome, KeptRows, StreamPlan, plan_batch


@functools.cache
def update_stream(columns: tuple[str, ...]) -> str:
    """An UPDATE of these columns only.

    An append changes a few of the row's columns (last_seq and the times, as
    a rule; StreamPlan.columns). Setting only those made a row's update about
    4 µs instead of 9-15: fewer values to bind and store, and SQLite leaves
    alone the indexes (expires_at, abandon_at) whose columns are not set.
    """
    return f"UPDATE streams SET {', '.join(f'{c} = ?' for c in columns)} WHERE id = ?"


UPSERT_PRODUCER = (
    "INSERT INTO producers (stream_id, producer_id, epoch, last_seq, updated_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (stream_id, producer_id) DO UPDATE SET "
    "epoch = excluded.epoch, last_seq = excluded.last_seq, updated_at = excluded.updated_at"
)


def select_streams(count: int) -> str:
    # ORDER BY id as on Postgres, where it fixes the lock order; harmless here.
    marks = ", ".join("?" * count)
    return f"SELECT {', '.join(STREAM_COLUMNS)} FROM streams WHERE id IN ({marks}) ORDER BY id"


def select_producers(streams_count: int, producers_count: int) -> str:
    return (
        "SELECT stream_id, producer_id, epoch, last_seq FROM producers "
        f"WHERE stream_id IN ({', '.join('?' * streams_count)}) "
        f"AND producer_id IN ({', '.join('?' * producers_count)})"
    )


class SqliteCommit:
    """The append transaction for one batch, callable on the connection's thread.

    `stream_info` turns a row of STREAM_COLUMNS into a StreamInfo and
    `bind_time` a time into its stored form: the store's own conversions.

    It keeps the stream rows it read and wrote. SQLite's data_version, read
    once the transaction holds the write lock, tells whether any other
    connection (another process, the store's own SQLAlchemy writer) committed
    since this one's last commit; if none did, the kept rows are the stored
    ones and are not read again. Always called on one connection, one call at
    a time.
    """

    def __init__(
        self,
        insert_events: str,
        stream_info: Callable[[Sequence[Any]], StreamInfo],
        bind_time: Callable[[datetime], Any],
    ) -> None:
        self.insert_events = insert_events
        self.stream_info = stream_info
        self.bind_time = bind_time
        self._kept: KeptRows[None] = KeptRows()
        # data_version is a counter of one connection: the kept rows are valid
        # on the connection they were kept on, at that version.
        self._kept_at: tuple[sqlite3.Connection, int] | None = None

    def __call__(
        self, db: sqlite3.Connection, requests: Sequence[AppendRequest], now: datetime
    ) -> list[AppendOutcome]:
        # The connection runs in autocommit (isolation_level None): this
        # transaction is ours to open and to end, also when a statement fails.
        db.execute("BEGIN IMMEDIATE")
        try:
            outcomes = self._append(db, requests, now)
            db.execute("COMMIT")
        except BaseException:
            self._kept.clear()  # they may hold rows that were rolled back
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    def _append(
        self, db: sqlite3.Connection, requests: Sequence[AppendRequest], now: datetime
    ) -> list[AppendOutcome]:
        current = self._streams(db, sorted({r.stream_id for r in requests}))
        known = self._producers(db, requests)
        plans, outcomes = plan_batch(requests, current, known, now)
        if plans:
            self._write(db, plans, now)
            for plan in plans:
                self._kept.keep(plan.info, None)
        return outcomes

    def _streams(self, db: sqlite3.Connection, ids: list[str]) -> dict[str, StreamInfo]:
        """The rows of these streams: kept ones while no other connection wrote."""
        (version,) = db.execute("PRAGMA data_version").fetchone()
        if self._kept_at != (db, version):
            self._kept.clear()
            self._kept_at = (db, version)
        current: dict[str, StreamInfo] = {}
        missing: list[str] = []
        for stream_id in ids:
            kept = self._kept.get(stream_id)
            if kept is None:
                missing.append(stream_id)
            else:
                current[stream_id] = kept[0]
        if missing:
            for values in db.execute(select_streams(len(missing)), missing):
                info = self.stream_info(values)
                current[info.id] = info
                self._kept.keep(info, None)
        return current

    def _producers(
        self, db: sqlite3.Connection, requests: Sequence[AppendRequest]
    ) -> dict[str, dict[str, ProducerState]]:
        claims = {(r.stream_id, r.producer.producer_id) for r in requests if r.producer}
        if not claims:
            return {}
        stream_ids = sorted({s for s, _ in claims})
        producer_ids = sorted({p for _, p in claims})
        query = select_producers(len(stream_ids), len(producer_ids))
        found: dict[str, dict[str, ProducerState]] = {}
        for stream_id, producer_id, epoch, last_seq in db.execute(
            query, [*stream_ids, *producer_ids]
        ):
            if (stream_id, producer_id) in claims:
                found.setdefault(stream_id, {})[producer_id] = ProducerState(epoch, last_seq)
        return found

    def _write(self, db: sqlite3.Connection, plans: list[StreamPlan], now: datetime) -> None:
        updates: dict[tuple[str, ...], list[list[Any]]] = {}
        for plan in plans:  # plan.columns is never empty: every plan moves last_seq
            row, changed = plan.info, plan.columns
            values = [self._stored(c, getattr(row, c)) for c in changed]
            updates.setdefault(changed, []).append([*values, row.id])
        for columns, rows in updates.items():
            db.executemany(update_stream(columns), rows)
        new = [e for plan in plans for e in plan.events]
        created = self.bind_time(new[0].created_at)
        # kind._value_: the plain attribute (.value is a property, slow once per event).
        db.executemany(
            self.insert_events,
            [
                (e.stream_id, e.seq, e.kind._value_, e.type, e.payload, created, e.batch_end)
                for e in new
            ],
        )
        stamp = self.bind_time(now)
        states = [
            (plan.info.id, producer_id, state.epoch, state.last_seq, stamp)
            for plan in plans
            for producer_id, state in plan.producers.items()
        ]
        if states:
            db.executemany(UPSERT_PRODUCER, states)

    def _stored(self, column: str, value: Any) -> Any:
        if value is None:
            return None
        if column in TIME_COLUMNS:
            return self.bind_time(value)
        if column == "status":
            return value.value
        return value

"""Which columns of a Postgres commit go as one value rather than an array.

asyncpg encodes arrays element by element (about 4 µs a timestamp), so the
values every row shares are sent once. Whether that stores the right rows is
the contract's `test_one_group_commit_of_appends_that_differ_in_every_column`;
this checks that the shared ones are found.
"""

from __future__ import annotations

from datetime import UTC, datetime

from app.log.api import AppendRequest, NewEvent, StreamInfo, StreamStatus
from app.log.postgres_commit import (
    EVENT_COLUMNS,
    SENT_ONCE_WHEN_SHARED,
    PostgresCommit,
    write_statement,
)
from app.log.schema import APPENDED_COLUMNS
from app.log.store import plan_batch

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def open_row(stream_id: str) -> StreamInfo:
    return StreamInfo(
        id=stream_id,
        content_type="application/json",
        status=StreamStatus.OPEN,
        created_at=NOW,
        updated_at=NOW,
        finished_at=None,
        ttl_seconds=300,
        expires_at=None,
        idle_timeout_seconds=None,
        abandon_at=None,
        last_write_at=NOW,
        last_seq=0,
    )


def commit() -> PostgresCommit:
    return PostgresCommit(lambda row: open_row(row[0]), "channel", lambda heads: [])


def test_values_every_row_shares_are_sent_once() -> None:
    requests = [AppendRequest(s, [NewEvent.chunk(s)]) for s in ("a", "b", "c")]
    rows = {s: open_row(s) for s in ("a", "b", "c")}
    later = datetime(2026, 11, 23, 12, 1, tzinfo=UTC)
    plans, _ = plan_batch(requests, rows, {}, later)
    shape, args = commit()._write_args(plans, later)
    assert shape.columns == ("updated_at", "last_write_at", "last_seq")
    # last_seq is 1 on every stream, but only by chance: still an array.
    assert shape.once == {"updated_at", "last_write_at", "kind", "type", "batch_end"}
    assert args[:4] == [["a", "b", "c"], later, later, [1, 1, 1]]
    statement = write_statement(shape, guarded=True)
    assert "unnest($1::text[], $4::BIGINT[]) AS u(id, last_seq)" in statement


def test_values_that_differ_are_sent_as_arrays() -> None:
    requests = [
        AppendRequest("a", [NewEvent.chunk(1, type="t")]),
        AppendRequest("b", [NewEvent.chunk(1), NewEvent.chunk(2)]),
        AppendRequest("c", [NewEvent.done("out")]),
    ]
    rows = {s: open_row(s) for s in ("a", "b", "c")}
    plans, _ = plan_batch(requests, rows, {}, NOW)
    shape, _ = commit()._write_args(plans, NOW)
    assert {"status", "last_seq", "kind", "type", "batch_end", "stream_id"}.isdisjoint(shape.once)


def test_row_keys_are_always_arrays_and_names_never_clash() -> None:
    plans, _ = plan_batch([AppendRequest("a", [NewEvent.chunk(1)])], {"a": open_row("a")}, {}, NOW)
    shape, _ = commit()._write_args(plans, NOW)
    # A batch of one: every candidate is one value, the row keys stay arrays.
    sent = {*shape.columns, *(name for name, _ in EVENT_COLUMNS)}
    assert shape.once == SENT_ONCE_WHEN_SHARED & sent
    assert {"id", "seq"}.isdisjoint(SENT_ONCE_WHEN_SHARED)
    # `once` names columns of both tables: no name may mean two columns.
    assert {name for name, _ in EVENT_COLUMNS}.isdisjoint(APPENDED_COLUMNS)

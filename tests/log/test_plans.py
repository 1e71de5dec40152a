"""The planned row and the columns a store writes for it.

Both SQL stores update only `StreamPlan.columns`. A column that changed but is
missing there would be planned, kept by the committer and served from its
kept rows, yet never stored: the next process to read the row would see the
old value.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.errors import Status, StreamError
from app.log.api import AppendRequest, NewEvent, ProducerClaim, StreamInfo, StreamStatus
from app.log.schema import APPENDED_COLUMNS
from app.log.store import KeptRows, plan_appends, with_changes

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def stream_row(
    ttl: int | None, idle_timeout: int | None, idle_ttl: int | None, writer_seq: str | None
) -> StreamInfo:
    created = NOW - timedelta(seconds=30)
    return StreamInfo(
        id="s",
        content_type="application/json",
        status=StreamStatus.OPEN,
        created_at=created,
        updated_at=created,
        finished_at=None,
        ttl_seconds=ttl,
        expires_at=created + timedelta(seconds=idle_ttl) if idle_ttl else None,
        idle_timeout_seconds=idle_timeout,
        abandon_at=created + timedelta(seconds=idle_timeout) if idle_timeout else None,
        last_write_at=created,
        last_seq=4,
        idle_ttl_seconds=idle_ttl,
        writer_seq=writer_seq,
    )


def last_event(kind: str) -> NewEvent:
    if kind == "done":
        return NewEvent.done({"answer": 42})
    if kind == "error":
        return NewEvent.error(StreamError(Status.INTERNAL, "it broke"))
    if kind == "closed":
        return NewEvent.closed()
    return NewEvent.chunk({"delta": "x"})


@given(
    ttl=st.sampled_from([None, 0, 60]),
    idle_timeout=st.sampled_from([None, 5]),
    idle_ttl=st.sampled_from([None, 120]),
    stored_writer_seq=st.sampled_from([None, "a"]),
    chunks=st.integers(min_value=0, max_value=3),
    last=st.sampled_from(["chunk", "done", "error", "closed"]),
    writer_seq=st.sampled_from([None, "b"]),
    producer=st.booleans(),
)
def test_a_plan_lists_exactly_the_columns_whose_values_changed(
    ttl: int | None,
    idle_timeout: int | None,
    idle_ttl: int | None,
    stored_writer_seq: str | None,
    chunks: int,
    last: str,
    writer_seq: str | None,
    producer: bool,
) -> None:
    before = stream_row(ttl, idle_timeout, idle_ttl, stored_writer_seq)
    events = [NewEvent.chunk(i) for i in range(chunks)] + [last_event(last)]
    claim = ProducerClaim("p", epoch=0, seq=0) if producer else None
    request = AppendRequest("s", events, producer=claim, writer_seq=writer_seq)

    plan, outcomes = plan_appends("s", before, [request], NOW)

    assert plan is not None, outcomes
    after = plan.info
    names = [f.name for f in fields(StreamInfo)]
    differing = {name for name in names if getattr(after, name) != getattr(before, name)}
    assert set(plan.columns) == differing
    assert len(plan.columns) == len(set(plan.columns))
    assert differing <= set(APPENDED_COLUMNS)
    assert "last_seq" in plan.columns  # SqliteCommit._write relies on a plan naming one


def test_a_changed_row_is_an_ordinary_frozen_stream_info() -> None:
    # with_changes builds the row in an unfrozen class with the same slots,
    # then gives it StreamInfo's class: nothing of that may show.
    before = stream_row(ttl=60, idle_timeout=5, idle_ttl=None, writer_seq=None)
    after = with_changes(before, {"last_seq": 9, "closed_by": "p"})
    assert type(after) is StreamInfo
    assert after == replace(before, last_seq=9, closed_by="p")
    with pytest.raises(FrozenInstanceError):
        after.last_seq = 10  # type: ignore[misc]
    assert before.last_seq == 4


def test_kept_rows_evict_the_stream_kept_least_recently() -> None:
    """Guards the eviction order: by first insertion, a stream appended to all
    along was evicted as soon as it was the oldest, and its next commit had to
    lock and read its row again."""
    kept: KeptRows[None] = KeptRows(limit=3)
    hot = stream_row(None, None, None, None)
    kept.keep(hot, None)
    for n in range(10):
        kept.keep(replace(hot, id=f"passing-{n}"), None)
        assert kept.get(hot.id) is not None, f"evicted by passing-{n}"
        kept.keep(hot, None)  # the hot stream is written again after each
    assert kept.get("passing-9") is not None
    assert kept.get("passing-7") is None

"""The storage interface behind the StreamManager, and the append rules all stores share.

A store does atomic storage work and nothing else: no waiting, no wake-ups,
no clock of its own (callers pass `now`, so tests can move time). The rules for
what an append may do live in `plan_appends`, so the in-memory store and the
SQL store cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from app.errors import Status, StreamError, not_found
from app.log.api import (
    STATUS_AFTER,
    AppendRequest,
    Event,
    EventKind,
    NewStream,
    StreamInfo,
    StreamStatus,
)

AppendOutcome = list[Event] | StreamError


class StreamStore(Protocol):
    """Atomic storage operations; implemented in memory and in SQL."""

    name: str

    async def create(self, spec: NewStream, now: datetime) -> StreamInfo:
        """Insert a stream; an expired one with the same id is replaced.

        Raises ALREADY_EXISTS if a live stream has that id.
        """

    async def commit(self, requests: Sequence[AppendRequest], now: datetime) -> list[AppendOutcome]:
        """Apply every request in one transaction (group commit).

        A request that breaks a rule gets a StreamError in its slot and changes
        nothing; the others still commit. A storage failure raises and commits
        nothing.
        """

    async def read(self, stream_id: str, after: int, limit: int, now: datetime) -> list[Event]:
        """Up to `limit` events with seq > `after`; none if the stream is gone or expired."""

    async def info(self, stream_id: str) -> StreamInfo | None:
        """The stream's row, expired or not."""

    async def heads(self, stream_ids: Sequence[str]) -> dict[str, int]:
        """last_seq of each stream that still exists."""

    async def list_streams(self, status: StreamStatus | None, limit: int) -> list[StreamInfo]:
        """The newest streams first, optionally of one status (expired ones included)."""

    async def count_streams(self, status: StreamStatus | None) -> int: ...

    async def ping(self) -> str | None:
        """Raises if the database is unreachable; returns its schema revision."""

    async def find_abandoned(self, now: datetime, limit: int) -> list[str]:
        """Open streams whose producer has been silent past their abandon deadline."""

    async def purge_expired(self, now: datetime, batch_size: int) -> tuple[int, int]:
        """Delete expired streams in bounded transactions; returns (streams, events)."""

    async def delete(self, stream_id: str) -> bool:
        """Delete a stream and its events at once."""

    def sweep_lock(self) -> AbstractAsyncContextManager[bool]:
        """Held for a sweep pass; yields False when another process is sweeping."""

    async def close(self) -> None: ...


@dataclass(slots=True)
class StreamPlan:
    """What a batch of appends does to one stream: the new row and the new events."""

    info: StreamInfo
    events: list[Event]


def plan_appends(
    stream_id: str,
    info: StreamInfo | None,
    requests: Sequence[AppendRequest],
    now: datetime,
) -> tuple[StreamPlan | None, list[AppendOutcome]]:
    """Number the events of `requests` (all for one stream) and compute the new row.

    Returns no plan when nothing is appended.
    """
    if info is None or info.expired(now):
        return None, [not_found(stream_id) for _ in requests]
    outcomes: list[AppendOutcome] = []
    new_events: list[Event] = []
    # Only what the rule checks need is tracked per request; the row itself is
    # computed once, from the last event (this runs for every event appended).
    last_seq, status, abandon_at = info.last_seq, info.status, info.abandon_at
    idle = info.idle_timeout_seconds
    abandon_after_write = now + timedelta(seconds=idle) if idle is not None else None
    open_ = StreamStatus.OPEN
    for request in requests:
        if status is not open_ or request.abandoned_by is not None:
            problem = _check_request(info.id, status, abandon_at, request)
            if problem is not None:
                outcomes.append(problem)
                continue
        if len(request.events) == 1:  # the usual case, without a loop
            e = request.events[0]
            last_seq += 1
            committed = [Event(stream_id, last_seq, e.kind, e.payload, now, e.type)]
        else:
            committed = [
                Event(stream_id, last_seq + i, e.kind, e.payload, now, e.type)
                for i, e in enumerate(request.events, start=1)
            ]
            last_seq = committed[-1].seq
        new_events.extend(committed)
        outcomes.append(committed)
        if committed[-1].kind is not EventKind.CHUNK:
            status = STATUS_AFTER[committed[-1].kind]
        abandon_at = abandon_after_write
    if not new_events:
        return None, outcomes
    return StreamPlan(_advance(info, new_events, now), new_events), outcomes


def _check_request(
    stream_id: str, status: StreamStatus, abandon_at: datetime | None, request: AppendRequest
) -> StreamError | None:
    if status is not StreamStatus.OPEN:
        return StreamError(
            Status.FAILED_PRECONDITION,
            f"stream {stream_id!r} is already {status}; nothing can be appended",
        )
    if request.abandoned_by is not None and (
        abandon_at is None or abandon_at > request.abandoned_by
    ):
        return StreamError(Status.FAILED_PRECONDITION, f"stream {stream_id!r} is not abandoned")
    return None


def _advance(info: StreamInfo, events: list[Event], now: datetime) -> StreamInfo:
    last = events[-1]
    changes: dict[str, object] = {"last_seq": last.seq, "updated_at": now, "last_write_at": now}
    if last.kind.is_terminal:
        changes.update(
            status=STATUS_AFTER[last.kind],
            finished_at=now,
            expires_at=now + timedelta(seconds=info.ttl_seconds),
            abandon_at=None,
        )
        if last.kind is EventKind.DONE:
            changes["output"] = last.payload
        elif last.kind is EventKind.ERROR:
            err = last.as_error()
            changes.update(error_status=str(err.status), error_message=err.message)
    elif info.idle_timeout_seconds is not None:
        changes["abandon_at"] = now + timedelta(seconds=info.idle_timeout_seconds)
    return replace(info, **changes)  # type: ignore[arg-type]


def new_stream_info(spec: NewStream, now: datetime) -> StreamInfo:
    abandon_at = (
        now + timedelta(seconds=spec.idle_timeout_seconds)
        if spec.idle_timeout_seconds is not None
        else None
    )
    return StreamInfo(
        id=spec.id,
        content_type=spec.content_type,
        status=StreamStatus.OPEN,
        created_at=now,
        updated_at=now,
        finished_at=None,
        ttl_seconds=spec.ttl_seconds,
        expires_at=None,
        idle_timeout_seconds=spec.idle_timeout_seconds,
        abandon_at=abandon_at,
        last_write_at=now,
        last_seq=0,
    )


def already_exists(stream_id: str) -> StreamError:
    return StreamError(Status.ALREADY_EXISTS, f"stream {stream_id!r} already exists")


def group_by_stream(requests: Sequence[AppendRequest]) -> dict[str, list[int]]:
    """Indexes of the requests of each stream, in request order."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.stream_id, []).append(i)
    return groups

"""In-memory store: for tests and for embedding streamkeep without a database.

It follows the same rules as the SQL store (they share `plan_appends`) and is
run through the same contract suite. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from app.errors import Status, StreamError
from app.log.api import AppendRequest, Event, NewStream, StreamInfo, StreamStatus
from app.log.store import (
    AppendOutcome,
    already_exists,
    group_by_stream,
    new_stream_info,
    plan_appends,
)

if TYPE_CHECKING:
    from app.log.manager import StreamManager


@dataclass(slots=True)
class _Stream:
    info: StreamInfo
    events: list[Event] = field(default_factory=list)


class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._sweep_lock = asyncio.Lock()
        self._failure: Exception | None = None
        # Managers sharing this store, told of every commit as Postgres NOTIFY would.
        self.listeners: list[Callable[[str, int], None]] = []

    def fail_next_commit(self, error: Exception) -> None:
        """Make the next commit raise `error`, as a broken disk or lost database would."""
        self._failure = error

    async def create(self, spec: NewStream, now: datetime) -> StreamInfo:
        existing = self._streams.get(spec.id)
        if existing is not None and not existing.info.expired(now):
            raise already_exists(spec.id)
        info = new_stream_info(spec, now)
        self._streams[spec.id] = _Stream(info)
        return info

    async def commit(self, requests: Sequence[AppendRequest], now: datetime) -> list[AppendOutcome]:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        outcomes: list[AppendOutcome | None] = [None] * len(requests)
        for stream_id, indexes in group_by_stream(requests).items():
            stream = self._streams.get(stream_id)
            plan, results = plan_appends(
                stream_id, stream.info if stream else None, [requests[i] for i in indexes], now
            )
            if plan is not None and stream is not None:
                stream.info = plan.info
                stream.events.extend(plan.events)
                self._announce(stream_id, plan.info.last_seq)
            for i, result in zip(indexes, results, strict=True):
                outcomes[i] = result
        return [o for o in outcomes if o is not None]

    def _announce(self, stream_id: str, last_seq: int) -> None:
        # After the commit returns, as Postgres delivers NOTIFY after COMMIT.
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.call_soon(listener, stream_id, last_seq)

    async def read(self, stream_id: str, after: int, limit: int, now: datetime) -> list[Event]:
        stream = self._streams.get(stream_id)
        if stream is None or stream.info.expired(now):
            return []
        # Events are numbered 1..N, so seq n sits at index n - 1.
        return stream.events[max(after, 0) : max(after, 0) + limit]

    async def info(self, stream_id: str) -> StreamInfo | None:
        stream = self._streams.get(stream_id)
        return stream.info if stream else None

    async def heads(self, stream_ids: Sequence[str]) -> dict[str, int]:
        return {i: self._streams[i].info.last_seq for i in stream_ids if i in self._streams}

    async def list_streams(self, status: StreamStatus | None, limit: int) -> list[StreamInfo]:
        infos = [s.info for s in self._streams.values() if status in (None, s.info.status)]
        return sorted(infos, key=lambda i: i.created_at, reverse=True)[:limit]

    async def count_streams(self, status: StreamStatus | None) -> int:
        return sum(1 for s in self._streams.values() if status in (None, s.info.status))

    async def ping(self) -> str | None:
        return "memory"

    async def find_abandoned(self, now: datetime, limit: int) -> list[str]:
        found = [
            s.info.id
            for s in self._streams.values()
            if s.info.is_open and s.info.abandon_at is not None and s.info.abandon_at <= now
        ]
        return sorted(found)[:limit]

    async def purge_expired(self, now: datetime, batch_size: int) -> tuple[int, int]:
        expired = [s for s in self._streams.values() if s.info.expired(now)]
        events = sum(len(s.events) for s in expired)
        for s in expired:
            del self._streams[s.info.id]
        return len(expired), events

    async def delete(self, stream_id: str) -> bool:
        deleted = self._streams.pop(stream_id, None) is not None
        if deleted:
            self._announce(stream_id, -1)
        return deleted

    @asynccontextmanager
    async def sweep_lock(self) -> AsyncIterator[bool]:
        if self._sweep_lock.locked():
            yield False
            return
        async with self._sweep_lock:
            yield True

    async def close(self) -> None:
        return None


def storage_failure(message: str = "simulated storage failure") -> StreamError:
    return StreamError(Status.UNAVAILABLE, message)


class MemoryNotifier:
    """Wakes a manager when another manager on the same MemoryStore commits."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._listener: Callable[[str, int], None] | None = None

    @property
    def connected(self) -> bool:
        return self._listener is not None

    async def start(self, manager: StreamManager) -> None:
        self._listener = manager.hint
        self._store.listeners.append(manager.hint)

    async def stop(self) -> None:
        if self._listener is not None:
            self._store.listeners.remove(self._listener)
            self._listener = None

"""In-memory store: for tests and for embedding streamkeep without a database.

It follows the same rules as the SQL store (they share `plan_batch`) and is
run through the same contract suite. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from app.errors import Status, StreamError
from app.log.api import AppendRequest, Event, NewStream, ProducerState, StreamInfo, StreamStatus
from app.log.store import (
    AppendOutcome,
    already_exists,
    plan_batch,
    plan_create,
)

if TYPE_CHECKING:
    from app.log.manager import StreamManager


@dataclass(slots=True)
class _Stream:
    info: StreamInfo
    # Its own events only: a fork's inherited ones live in its source.
    events: list[Event] = field(default_factory=list)
    producers: dict[str, ProducerState] = field(default_factory=dict)

    def own(self, after: int, upto: int, limit: int) -> list[Event]:
        # Own events are numbered fork_seq + 1 .. last_seq, so seq n sits at n - fork_seq - 1.
        base = self.info.fork_seq
        start, stop = max(after - base, 0), max(upto - base, 0)
        return self.events[start : min(stop, start + limit)]


class MemoryStore:
    name = "memory"

    def __init__(self, commit_lanes: int = 1) -> None:
        # Its commits never wait, so lanes do not overlap here; tests set more
        # to run the committer as it runs on Postgres.
        self.commit_lanes = commit_lanes
        self.commits_on_loop = True
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
        if existing is not None:
            if not existing.info.expired(now) or existing.info.fork_count > 0:
                raise already_exists(spec.id)
            self._drop(spec.id, now)
        source = self._streams.get(spec.fork.source) if spec.fork else None
        info, events = plan_create(spec, now, source.info if source else None)
        if source is not None:
            source.info = replace(source.info, fork_count=source.info.fork_count + 1)
        self._streams[spec.id] = _Stream(info, events)
        return info

    async def commit(self, requests: Sequence[AppendRequest], now: datetime) -> list[AppendOutcome]:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        found = {r.stream_id: self._streams.get(r.stream_id) for r in requests}
        plans, outcomes = plan_batch(
            requests,
            {sid: stream.info for sid, stream in found.items() if stream is not None},
            {sid: stream.producers for sid, stream in found.items() if stream is not None},
            now,
        )
        for plan in plans:
            stream = self._streams[plan.info.id]
            stream.info = plan.info
            stream.events.extend(plan.events)
            stream.producers.update(plan.producers)
            self._announce(plan.info.id, plan.info.last_seq)
        return outcomes

    def _announce(self, stream_id: str, last_seq: int) -> None:
        # After the commit returns, as Postgres delivers NOTIFY after COMMIT.
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            loop.call_soon(listener, stream_id, last_seq)

    async def read(self, stream_id: str, after: int, limit: int, now: datetime) -> list[Event]:
        stream = self._streams.get(stream_id)
        if stream is None or stream.info.expired(now):
            return []
        return stream.own(after, stream.info.last_seq, limit)

    async def read_range(self, stream_id: str, after: int, upto: int, limit: int) -> list[Event]:
        stream = self._streams.get(stream_id)
        return stream.own(after, upto, limit) if stream else []

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

    async def renew(self, stream_id: str, expires_at: datetime, now: datetime) -> bool:
        stream = self._streams.get(stream_id)
        if stream is None or stream.info.expired(now):
            return False
        current = stream.info.expires_at
        if current is not None and current >= expires_at:
            return False
        stream.info = replace(stream.info, expires_at=expires_at)
        return True

    async def find_abandoned(self, now: datetime, limit: int) -> list[str]:
        found = [
            s.info.id
            for s in self._streams.values()
            if s.info.is_open and s.info.abandon_at is not None and s.info.abandon_at <= now
        ]
        return sorted(found)[:limit]

    async def purge_expired(self, now: datetime, batch_size: int) -> tuple[int, int]:
        streams = events = 0
        while purgeable := [
            s for s in self._streams.values() if s.info.expired(now) and s.info.fork_count == 0
        ]:
            for stream in purgeable:
                for dropped in self._drop(stream.info.id, now):
                    streams, events = streams + 1, events + len(dropped.events)
        return streams, events

    async def delete(self, stream_id: str, now: datetime) -> bool:
        stream = self._streams.get(stream_id)
        if stream is None:
            return False
        live = not stream.info.expired(now)
        if stream.info.fork_count > 0:
            # Its forks still read its events: gone for everyone else, kept for them.
            if live:
                stream.info = replace(stream.info, expires_at=now)
                self._announce(stream_id, -1)
            return live
        self._drop(stream_id, now)
        return live

    def _drop(self, stream_id: str, now: datetime) -> list[_Stream]:
        """Delete a stream, then its source if this was the last fork of a gone one."""
        dropped: list[_Stream] = []
        next_id: str | None = stream_id
        while next_id is not None and (stream := self._streams.pop(next_id, None)) is not None:
            dropped.append(stream)
            self._announce(next_id, -1)
            next_id = None
            source = self._streams.get(stream.info.forked_from or "")
            if source is not None:
                source.info = replace(source.info, fork_count=source.info.fork_count - 1)
                if source.info.fork_count == 0 and source.info.expired(now):
                    next_id = source.info.id
        return dropped

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

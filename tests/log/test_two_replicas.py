"""Two managers on one database, as two replicas of the service.

Whatever one replica does to a stream, the other's next append must see. On
Postgres a committer plans a batch against the rows it wrote last and writes
only if they are unchanged (postgres_commit); these tests are what that guard
keeps true.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from app.errors import Status, StreamError
from app.log import EventKind, StreamManager, create_manager
from app.log.postgres_commit import PostgresCommit


@asynccontextmanager
async def replicas(url: str) -> AsyncIterator[tuple[StreamManager, StreamManager]]:
    async with create_manager(url) as first, create_manager(url) as second:
        yield first, second


async def seqs(manager: StreamManager, stream_id: str) -> list[int]:
    return [e.seq for e in await manager.read(stream_id, 0)]


async def test_appends_alternating_between_replicas_leave_no_gap(shared_url: str) -> None:
    async with replicas(shared_url) as (a, b):
        await a.open("s")
        written = []
        for i in range(10):
            manager = a if i % 2 == 0 else b
            written.append((await manager.writer("s").write({"n": i})).seq)
        assert written == list(range(1, 11))
        assert await seqs(a, "s") == list(range(1, 11))


async def test_an_append_after_another_replica_ended_the_stream_is_refused(
    shared_url: str,
) -> None:
    async with replicas(shared_url) as (a, b):
        await a.open("s")
        await a.writer("s").write("first")
        await b.writer("s").done({"ok": True})
        with pytest.raises(StreamError) as refused:
            await a.writer("s").write("too late")
        assert refused.value.status is Status.FAILED_PRECONDITION
        events = await a.read("s", 0)
        assert [e.kind for e in events] == [EventKind.CHUNK, EventKind.DONE]


async def test_an_append_after_another_replica_deleted_the_stream_is_refused(
    shared_url: str,
) -> None:
    async with replicas(shared_url) as (a, b):
        await a.open("s")
        await a.writer("s").write("first")
        assert await b.delete("s")
        with pytest.raises(StreamError) as refused:
            await a.writer("s").write("into nothing")
        assert refused.value.status is Status.NOT_FOUND


async def test_an_append_after_another_replica_created_the_stream_again_starts_it_over(
    shared_url: str,
) -> None:
    async with replicas(shared_url) as (a, b):
        await a.open("s")
        for i in range(3):
            await a.writer("s").write(i)
        assert await b.delete("s")
        await b.open("s")
        assert (await a.writer("s").write("new")).seq == 1
        assert await seqs(b, "s") == [1]


@pytest.mark.postgres
async def test_a_batch_on_a_row_the_committer_wrote_last_is_not_locked_again(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The performance property: one statement, no BEGIN/SELECT FOR UPDATE/COMMIT."""
    locked: list[Any] = []
    original = PostgresCommit._commit_locked

    async def counting(self: PostgresCommit, *args: Any) -> Any:
        locked.append(args)
        return await original(self, *args)

    monkeypatch.setattr(PostgresCommit, "_commit_locked", counting)
    async with replicas(pg_url) as (a, b):
        await a.open("s")
        for i in range(5):
            await a.writer("s").write(i)
        assert len(locked) == 1  # the first append learns the row
        await b.writer("s").write("from b")
        await a.writer("s").write("after b")
        assert len(locked) == 3  # b learns it; a's kept row is stale and is locked again
        assert await seqs(a, "s") == list(range(1, 8))

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
from app.log import (
    AppendRequest,
    EventKind,
    NewEvent,
    Problem,
    ProducerClaim,
    StreamManager,
    create_manager,
)
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


async def produce(manager: StreamManager, producer: str, epoch: int, seq: int) -> Any:
    claim = ProducerClaim(producer, epoch, seq)
    request = AppendRequest("s", [NewEvent.chunk([producer, seq])], producer=claim)
    return await manager.apply(request)


async def test_a_producers_retry_is_a_duplicate_whichever_replica_took_the_original(
    shared_url: str,
) -> None:
    async with replicas(shared_url) as (a, b):
        await a.open("s")
        assert not (await produce(a, "p", 0, 0)).duplicate
        assert not (await produce(b, "p", 0, 1)).duplicate
        # a kept p at seq 0; b has moved it on. The retry of seq 1 on a is a duplicate.
        assert (await produce(a, "p", 0, 1)).duplicate
        assert not (await produce(a, "p", 0, 2)).duplicate
        assert await seqs(a, "s") == [1, 2, 3]


async def test_a_stale_epoch_is_refused_after_another_replica_fenced_it(shared_url: str) -> None:
    async with replicas(shared_url) as (a, b):
        await a.open("s")
        await produce(a, "p", 0, 0)
        await produce(b, "p", 1, 0)  # a new epoch, on the other replica
        with pytest.raises(StreamError) as refused:
            await produce(a, "p", 0, 1)
        assert refused.value.status is Status.PERMISSION_DENIED
        assert refused.value.details["reason"] == str(Problem.STALE_EPOCH)
        assert await seqs(a, "s") == [1, 2]


@pytest.fixture
def locked(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every batch the Postgres committer runs as a locked transaction."""
    batches: list[Any] = []
    original = PostgresCommit._commit_locked

    async def counting(self: PostgresCommit, *args: Any) -> Any:
        batches.append(args)
        return await original(self, *args)

    monkeypatch.setattr(PostgresCommit, "_commit_locked", counting)
    return batches


@pytest.mark.postgres
async def test_a_batch_on_a_row_the_committer_wrote_last_is_not_locked_again(
    pg_url: str, locked: list[Any]
) -> None:
    """The performance property: one statement, no BEGIN/SELECT FOR UPDATE/COMMIT."""
    async with replicas(pg_url) as (a, b):
        await a.open("s")
        for i in range(5):
            await a.writer("s").write(i)
        assert len(locked) == 1  # the first append learns the row
        await b.writer("s").write("from b")
        await a.writer("s").write("after b")
        assert len(locked) == 3  # b learns it; a's kept row is stale and is locked again
        assert await seqs(a, "s") == list(range(1, 8))


@pytest.mark.postgres
async def test_a_known_producers_next_append_is_not_locked_again(
    pg_url: str, locked: list[Any]
) -> None:
    async with create_manager(pg_url) as manager:
        await manager.open("s")
        await produce(manager, "p", 0, 0)  # learns the row and that p is new
        assert len(locked) == 1
        for seq in range(1, 5):
            await produce(manager, "p", 0, seq)
        assert (await produce(manager, "p", 0, 4)).duplicate
        await produce(manager, "q", 0, 0)  # a producer not seen on this stream: read
        assert len(locked) == 2
        assert await seqs(manager, "s") == list(range(1, 7))

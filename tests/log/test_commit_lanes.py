"""The committer's lanes: commits of disjoint streams at once (as on Postgres).

The in-memory store stands for the database here, with a gate per stream that
holds its commits until the test opens it, so commits can finish in any
order. The contract suite runs the same committer against Postgres (two
lanes) and in memory (see conftest). A commit runs beside another only with
LANE_MIN_EVENTS events, so the appends here hold that many.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import pytest

from app.errors import Status, StreamError
from app.log import Event, StreamManager
from app.log.api import AppendRequest, NewEvent
from app.log.manager import LANE_MIN_EVENTS, _Pending, split_by_stream
from app.log.memory import MemoryStore
from app.log.store import AppendOutcome


class GatedStore(MemoryStore):
    """A MemoryStore whose commits wait until every stream they name is opened."""

    def __init__(self, lanes: int) -> None:
        super().__init__(commit_lanes=lanes)
        self.gates: dict[str, asyncio.Event] = {}
        self.batches: list[list[str]] = []  # each commit's stream ids, in request order
        self.running = 0
        self.most_running = 0

    def gate(self, stream_id: str) -> asyncio.Event:
        return self.gates.setdefault(stream_id, asyncio.Event())

    def open(self, *stream_ids: str) -> None:
        for stream_id in stream_ids:
            self.gate(stream_id).set()

    async def commit(self, requests: Sequence[AppendRequest], now: datetime) -> list[AppendOutcome]:
        self.batches.append([r.stream_id for r in requests])
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            for stream_id in {r.stream_id for r in requests}:
                await self.gate(stream_id).wait()
            return await super().commit(requests, now)
        finally:
            self.running -= 1


async def started(store: GatedStore, *stream_ids: str) -> StreamManager:
    manager = StreamManager(store)
    await manager.start()
    for stream_id in stream_ids:
        await manager.create(stream_id)
    return manager


async def turns(count: int = 5) -> None:
    """Let every runnable task go as far as it can."""
    for _ in range(count):
        await asyncio.sleep(0)


LANE = LANE_MIN_EVENTS


def submit(
    manager: StreamManager, stream_id: str, value: object, events: int = LANE
) -> asyncio.Future[list[Event]]:
    """An append of `events` chunks, each `value`."""
    chunks = [NewEvent.chunk(value) for _ in range(events)]
    return asyncio.ensure_future(manager.append(stream_id, chunks))


async def values(manager: StreamManager, stream_id: str) -> list[object]:
    """The stream's chunks, each run of equal ones once."""
    runs: list[object] = []
    for event in await manager.read(stream_id, limit=10_000):
        if not runs or runs[-1] != event.json():
            runs.append(event.json())
    return runs


async def test_appends_to_many_streams_are_split_across_the_lanes_by_stream() -> None:
    store = GatedStore(lanes=2)
    names = [f"s{i}" for i in range(6)]
    manager = await started(store, *names)
    sent = [submit(manager, name, n, events=LANE // 2) for n in range(2) for name in names]
    await turns()
    assert store.running == 2
    first, second = store.batches
    assert not set(first) & set(second)  # no stream in both commits
    assert sorted(first + second) == sorted(names * 2)
    store.open(*names)
    await asyncio.gather(*sent)
    for stream_id in names:
        assert await values(manager, stream_id) == [0, 1]
    await manager.close()


async def one_lane_busy_with_a(store: GatedStore, manager: StreamManager) -> asyncio.Future[Any]:
    """Appends to "a" and "b" split across the lanes; "b"'s commit is done,
    "a"'s still runs (in a lane of its own, as a commit beside another does)."""
    both = asyncio.gather(submit(manager, "a", "a1"), submit(manager, "b", "b1"))
    await turns()
    assert store.running == 2
    store.open("b")
    await turns()
    assert store.running == 1
    return both


async def test_a_stream_being_committed_waits_for_its_commit_so_its_order_holds() -> None:
    store = GatedStore(lanes=2)
    manager = await started(store, "a", "b", "c")
    first = await one_lane_busy_with_a(store, manager)
    second = submit(manager, "a", "a2")
    other = submit(manager, "c", "c1")
    await turns()
    # "a" is in the running commit: its second append waits, and so does "c"
    # behind it, to keep the queue's order.
    assert store.running == 1 and len(store.batches) == 2
    store.open("a", "c")
    await asyncio.gather(first, second, other)
    assert await values(manager, "a") == ["a1", "a2"]
    await manager.close()


async def test_a_few_appends_wait_for_the_running_commit_instead_of_a_lane_of_their_own() -> None:
    store = GatedStore(lanes=2)
    manager = await started(store, "a", "b", "c")
    first = await one_lane_busy_with_a(store, manager)
    few = [submit(manager, "b", 2, events=LANE // 4), submit(manager, "c", 3, events=LANE // 4)]
    await turns()
    assert len(store.batches) == 2  # not worth a commit of their own yet
    enough = submit(manager, "c", 4, events=LANE)
    await turns()
    assert store.batches[2:] == [["b", "c", "c"]]
    store.open("a", "c")
    await asyncio.gather(first, *few, enough)
    assert await values(manager, "c") == [3, 4]
    await manager.close()


async def test_a_commit_alone_runs_in_the_committer_itself() -> None:
    """No task of its own: it would start only after everything else ready on
    the loop. Meanwhile nothing else starts, however much is queued."""
    store = GatedStore(lanes=2)
    manager = await started(store, "a", "b")
    first = submit(manager, "a", 1)
    await turns()
    second = submit(manager, "b", 2, events=LANE * 2)
    await turns()
    assert store.batches == [["a"]]
    assert manager._committer is not None and not manager._committer._running
    store.open("a", "b")
    await asyncio.gather(first, second)
    await manager.close()


async def test_settling_waits_for_an_earlier_commit_that_finishes_last() -> None:
    """Settled is a count in queue order: appends settled on a later lane must
    not stand in for an earlier one still in flight."""
    store = GatedStore(lanes=2)
    manager = await started(store, "a", "b")
    first = [submit(manager, "a", "a1"), submit(manager, "b", "b1")]
    await turns()
    assert store.running == 2
    store.open("b")
    await turns()
    later = [submit(manager, "b", "b2")]
    # Queued before it: a1, b1, b2. The b appends are committed on the other
    # lane meanwhile, as many as there are of those three.
    settled = asyncio.ensure_future(manager.settle_queued())
    later += [submit(manager, "b", "b3"), submit(manager, "b", "b4")]
    await asyncio.gather(*later)
    await turns(10)
    assert not settled.done()  # a1 was queued before it and is not committed yet
    store.open("a")
    await asyncio.wait_for(settled, 5)
    await asyncio.gather(*first)
    assert await values(manager, "b") == ["b1", "b2", "b3", "b4"]
    await manager.close()


async def test_a_failed_commit_fails_only_its_own_lane() -> None:
    store = GatedStore(lanes=2)
    manager = await started(store, "a", "b")
    failing = submit(manager, "a", 1)
    fine = submit(manager, "b", 2)
    await turns()
    assert store.running == 2
    store.fail_next_commit(OSError("disk unplugged"))  # the next past its gate
    store.open("a")
    await turns()
    store.open("b")
    with pytest.raises(StreamError) as err:
        await failing
    assert err.value.status is Status.INTERNAL
    assert (await fine)[0].seq == 1
    await manager.close()


async def test_close_waits_for_every_lane() -> None:
    store = GatedStore(lanes=2)
    manager = await started(store, "a", "b")
    sent = [submit(manager, "a", 1), submit(manager, "b", 2)]
    await turns()
    assert store.running == 2
    closing = asyncio.ensure_future(manager.close())
    await turns()
    assert not closing.done()
    store.open("a", "b")
    await asyncio.wait_for(closing, 5)
    assert all(f.done() and not f.exception() for f in sent)


async def test_one_lane_commits_one_batch_at_a_time() -> None:
    store = GatedStore(lanes=1)
    manager = await started(store, "a", "b")
    sent = [submit(manager, "a", 1), submit(manager, "b", 2)]
    await turns()
    assert store.batches == [["a", "b"]]
    store.open("a", "b")
    await asyncio.gather(*sent)
    assert store.most_running == 1
    await manager.close()


def test_split_by_stream_balances_events_and_keeps_each_stream_whole() -> None:
    def queued(stream_id: str, events: int) -> _Pending:
        return _Pending(AppendRequest(stream_id, [NewEvent.chunk(0)] * events), None)

    queue = [queued(s, n) for s, n in [("a", 1), ("b", 1), ("a", 1), ("c", 1), ("d", 2)]]
    batches = split_by_stream(queue, 2)
    assert [[p.request.stream_id for p in batch] for batch in batches] == [
        ["a", "b", "a"],
        ["c", "d"],
    ]
    one_stream = [queue[0], queue[2]]
    assert split_by_stream(one_stream, 2) == [one_stream]
    many = split_by_stream(queue, 8)
    assert 2 <= len(many) <= 4  # never more batches than streams
    assert sorted(p.request.stream_id for batch in many for p in batch) == ["a", "a", "b", "c", "d"]

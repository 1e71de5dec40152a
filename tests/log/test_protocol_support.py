"""The log's additions for the Durable Streams protocol, on every backend.

Creation with initial batches, sliding and absolute retention, forks (reads
through the source chain, reference counts, cascading deletion), idempotent
producers, writer sequence tokens and rejected appends. Several managers on
one database stand for several processes, as in test_contract.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any

import pytest

from app.errors import Status, StreamError
from app.log import (
    AppendRequest,
    Event,
    EventKind,
    ForkSpec,
    NewEvent,
    Problem,
    ProducerClaim,
    StreamManager,
    StreamStatus,
)
from tests.conftest import ManagerFactory
from tests.support import FakeClock


def raw(*payloads: bytes) -> tuple[NewEvent, ...]:
    return tuple(NewEvent.raw(p) for p in payloads)


def payloads(events: list[Event]) -> list[bytes]:
    return [e.payload for e in events if e.kind is EventKind.CHUNK]


async def refused(awaitable: Any) -> StreamError:
    with pytest.raises(StreamError) as err:
        await awaitable
    return err.value


def reason(err: StreamError) -> str:
    assert isinstance(err.details, dict)
    return str(err.details["reason"])


# -- creation with initial events ------------------------------------------------------


async def test_create_with_initial_batches_keeps_batch_boundaries(manager: StreamManager) -> None:
    info = await manager.create("s", initial=(raw(b"a", b"b", b"c"), raw(b"d")))
    assert info.last_seq == 4
    events = await manager.read("s")
    assert payloads(events) == [b"a", b"b", b"c", b"d"]
    assert [e.batch_end for e in events] == [False, False, True, True]


async def test_append_of_several_events_marks_only_its_last_as_batch_end(
    manager: StreamManager,
) -> None:
    await manager.create("s")
    await manager.append("s", [NewEvent.raw(b"1"), NewEvent.raw(b"2")])
    await manager.append("s", [NewEvent.raw(b"3")])
    assert [e.batch_end for e in await manager.read("s")] == [False, True, True]


async def test_create_closed_with_content(manager: StreamManager) -> None:
    info = await manager.create("s", initial=((NewEvent.raw(b"x"), NewEvent.closed()),))
    assert info.status is StreamStatus.CLOSED and info.chunk_tail == 1
    with pytest.raises(StreamError):
        await manager.append("s", [NewEvent.raw(b"y")])


async def test_create_refuses_a_terminal_event_before_the_end(manager: StreamManager) -> None:
    err = await refused(manager.create("s", initial=((NewEvent.closed(),), raw(b"x"))))
    assert err.status is Status.INVALID_ARGUMENT
    assert await manager.find("s") is None


# -- retention --------------------------------------------------------------------------


async def test_finished_stream_without_ttl_is_kept(
    manager: StreamManager, clock: FakeClock
) -> None:
    await manager.create("s", ttl_seconds=None, idle_timeout_seconds=None)
    await manager.append("s", [NewEvent.closed()])
    clock.advance(10**6)
    await manager.sweep()
    assert (await manager.info("s")).status is StreamStatus.CLOSED


async def test_sliding_retention_is_renewed_by_reads_and_writes(
    manager: StreamManager, clock: FakeClock
) -> None:
    await manager.create("s", ttl_seconds=None, idle_ttl_seconds=10)
    clock.advance(8)
    await manager.touch(await manager.info("s"))  # a read
    clock.advance(8)
    await manager.append("s", [NewEvent.raw(b"x")])  # a write
    clock.advance(8)
    assert (await manager.info("s")).last_seq == 1
    clock.advance(3)
    err = await refused(manager.info("s"))
    assert err.status is Status.NOT_FOUND
    await manager.touch(await manager.store.info("s"))  # type: ignore[arg-type]
    assert (await manager.find("s")).expired(clock())  # type: ignore[union-attr]


async def test_absolute_expiry_is_never_extended(manager: StreamManager, clock: FakeClock) -> None:
    await manager.create("s", idle_ttl_seconds=100, expires_at=clock() + timedelta(seconds=5))
    clock.advance(4)
    await manager.touch(await manager.info("s"))
    await manager.append("s", [NewEvent.raw(b"x")])
    clock.advance(2)
    assert (await refused(manager.read("s"))).status is Status.NOT_FOUND


# -- forks ------------------------------------------------------------------------------


async def test_fork_reads_its_source_up_to_the_fork_point_then_its_own(
    manager: StreamManager,
) -> None:
    await manager.create("src", initial=(raw(b"a"), raw(b"b"), raw(b"c")))
    fork = await manager.create("fork", fork=ForkSpec("src", 2), initial=(raw(b"X"),))
    assert (fork.fork_seq, fork.last_seq) == (2, 3)
    await manager.append("src", [NewEvent.raw(b"late")])  # invisible to the fork
    await manager.append("fork", [NewEvent.raw(b"Y")])
    events = await manager.read("fork")
    assert payloads(events) == [b"a", b"b", b"X", b"Y"]
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert {e.stream_id for e in events} == {"fork"}
    assert payloads(await manager.read("fork", after=1, limit=2)) == [b"b", b"X"]
    assert payloads(await manager.read("fork", after=3)) == [b"Y"]


async def test_three_level_fork_chain_reads_across_every_level(manager: StreamManager) -> None:
    await manager.create("l0", initial=(raw(b"a"), raw(b"b")))
    await manager.create("l1", fork=ForkSpec("l0", 1), initial=(raw(b"c"),))
    await manager.create("l2", fork=ForkSpec("l1", 2), initial=(raw(b"d"),))
    assert payloads(await manager.read("l2")) == [b"a", b"c", b"d"]
    assert payloads(await manager.read("l2", after=1)) == [b"c", b"d"]


async def test_subscribing_to_a_fork_replays_the_inherited_part_then_follows_it(
    manager: StreamManager,
) -> None:
    await manager.create("src", initial=(raw(b"a"), raw(b"b")))
    await manager.create("fork", fork=ForkSpec("src", 2))
    received: list[Event] = []

    async def follow() -> None:
        async with contextlib.aclosing(await manager.subscribe("fork")) as events:  # type: ignore[type-var]
            async for event in events:
                received.append(event)

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await manager.append("src", [NewEvent.raw(b"not mine")])
    await manager.append("fork", [NewEvent.raw(b"c"), NewEvent.closed()])
    await asyncio.wait_for(reader, 10)
    assert payloads(received) == [b"a", b"b", b"c"]


async def test_fork_of_a_closed_source_starts_open(manager: StreamManager) -> None:
    await manager.create("src", initial=((NewEvent.raw(b"a"), NewEvent.closed()),))
    fork = await manager.create("fork", fork=ForkSpec("src", 1))
    assert fork.is_open
    await manager.append("fork", [NewEvent.raw(b"b")])
    assert payloads(await manager.read("fork")) == [b"a", b"b"]


async def test_fork_past_the_source_tail_or_its_terminal_is_refused(
    manager: StreamManager,
) -> None:
    await manager.create("src", initial=((NewEvent.raw(b"a"), NewEvent.closed()),))
    err = await refused(manager.create("fork", fork=ForkSpec("src", 2)))
    assert err.status is Status.OUT_OF_RANGE and reason(err) == Problem.FORK_BEYOND_TAIL
    err = await refused(manager.create("fork", fork=ForkSpec("missing", 0)))
    assert err.status is Status.NOT_FOUND
    assert await manager.find("fork") is None
    assert (await manager.info("src")).fork_count == 0


async def test_deleted_source_with_forks_is_gone_but_kept_for_them(
    manager: StreamManager,
) -> None:
    await manager.create("src", initial=(raw(b"a"),))
    await manager.create("fork", fork=ForkSpec("src", 1))
    assert await manager.delete("src")
    assert (await refused(manager.info("src"))).status is Status.NOT_FOUND
    kept = await manager.find("src")
    assert kept is not None and kept.fork_count == 1
    assert payloads(await manager.read("fork")) == [b"a"]
    # Neither re-created, nor forked, nor appended to, nor deleted again.
    assert (await refused(manager.create("src"))).status is Status.ALREADY_EXISTS
    err = await refused(manager.create("fork2", fork=ForkSpec("src", 1)))
    assert reason(err) == Problem.SOURCE_RETIRED
    assert (await refused(manager.append("src", [NewEvent.raw(b"x")]))).status is Status.NOT_FOUND
    assert not await manager.delete("src")
    # The last fork going takes the source with it.
    assert await manager.delete("fork")
    assert await manager.find("src") is None
    assert await manager.find("fork") is None


async def test_deleting_the_last_fork_cascades_up_a_chain_of_deleted_sources(
    manager: StreamManager,
) -> None:
    await manager.create("a", initial=(raw(b"1"),))
    await manager.create("b", fork=ForkSpec("a", 1))
    await manager.create("c", fork=ForkSpec("b", 1))
    await manager.delete("a")
    await manager.delete("b")
    assert payloads(await manager.read("c")) == [b"1"]
    await manager.delete("c")
    assert [await manager.find(i) for i in "abc"] == [None, None, None]


async def test_expired_source_is_kept_until_its_forks_are_swept(
    manager: StreamManager, clock: FakeClock
) -> None:
    await manager.create("src", idle_ttl_seconds=5, initial=(raw(b"a"),))
    await manager.create("fork", idle_ttl_seconds=60, fork=ForkSpec("src", 1))
    clock.advance(10)
    await manager.sweep()
    assert (await refused(manager.info("src"))).status is Status.NOT_FOUND
    assert payloads(await manager.read("fork")) == [b"a"]
    clock.advance(100)
    report = await manager.sweep()
    assert report.deleted_streams == 2
    assert await manager.find("src") is None


async def test_expired_fork_gives_its_reference_back_when_replaced(
    manager: StreamManager, clock: FakeClock
) -> None:
    await manager.create("src", initial=(raw(b"a"),))
    await manager.create("fork", idle_ttl_seconds=1, fork=ForkSpec("src", 1))
    clock.advance(2)
    await manager.create("fork")  # the expired fork's id is free again
    assert (await manager.info("src")).fork_count == 0


async def test_fork_reference_is_visible_to_other_processes(make_manager: ManagerFactory) -> None:
    one, two = make_manager(), make_manager()
    await one.start()
    await two.start()
    await one.create("src", initial=(raw(b"a"),))
    await two.create("fork", fork=ForkSpec("src", 1))
    await one.delete("src")
    assert payloads(await two.read("fork")) == [b"a"]
    await two.delete("fork")
    assert await one.find("src") is None


# -- idempotent producers ----------------------------------------------------------------


def produce(stream_id: str, epoch: int, seq: int, *events: NewEvent) -> AppendRequest:
    return AppendRequest(stream_id, list(events), producer=ProducerClaim("p", epoch, seq))


async def test_producer_appends_are_deduplicated_and_fenced(manager: StreamManager) -> None:
    await manager.create("s")
    first = await manager.apply(produce("s", 0, 0, NewEvent.raw(b"a")))
    assert (first.duplicate, first.producer and first.producer.last_seq) == (False, 0)
    await manager.apply(produce("s", 0, 1, NewEvent.raw(b"b")))
    retry = await manager.apply(produce("s", 0, 0, NewEvent.raw(b"a")))
    assert retry.duplicate and retry.events == []
    assert retry.producer is not None and retry.producer.last_seq == 1  # the highest accepted
    gap = await refused(manager.apply(produce("s", 0, 5, NewEvent.raw(b"x"))))
    assert (gap.status, reason(gap)) == (Status.ABORTED, Problem.SEQ_GAP)
    assert gap.details["expected"] == 2
    bump = await refused(manager.apply(produce("s", 1, 3, NewEvent.raw(b"x"))))
    assert reason(bump) == Problem.EPOCH_NEEDS_SEQ_ZERO
    await manager.apply(produce("s", 1, 0, NewEvent.raw(b"c")))
    stale = await refused(manager.apply(produce("s", 0, 2, NewEvent.raw(b"x"))))
    assert (stale.status, stale.details["epoch"]) == (Status.PERMISSION_DENIED, 1)
    assert payloads(await manager.read("s")) == [b"a", b"b", b"c"]


async def test_unknown_producer_must_start_at_seq_zero(manager: StreamManager) -> None:
    await manager.create("s")
    err = await refused(manager.apply(produce("s", 3, 1, NewEvent.raw(b"x"))))
    assert reason(err) == Problem.SEQ_GAP and err.details["expected"] == 0


async def test_retried_closing_append_is_a_duplicate_others_are_refused(
    manager: StreamManager,
) -> None:
    await manager.create("s")
    closing = produce("s", 0, 0, NewEvent.raw(b"last"), NewEvent.closed())
    result = await manager.apply(closing)
    assert result.status is StreamStatus.CLOSED
    again = await manager.apply(produce("s", 0, 0, NewEvent.raw(b"other body")))
    assert again.duplicate and again.last_seq == 2
    err = await refused(manager.apply(produce("s", 0, 1, NewEvent.raw(b"x"))))
    assert reason(err) == Problem.FINISHED
    assert payloads(await manager.read("s")) == [b"last"]


async def test_producer_state_is_committed_with_the_append_across_processes(
    make_manager: ManagerFactory,
) -> None:
    one, two = make_manager(), make_manager()
    await one.start()
    await two.start()
    await one.create("s")
    await one.apply(produce("s", 0, 0, NewEvent.raw(b"a")))
    assert (await two.apply(produce("s", 0, 0, NewEvent.raw(b"a")))).duplicate
    await two.apply(produce("s", 0, 1, NewEvent.raw(b"b")))
    assert payloads(await one.read("s")) == [b"a", b"b"]


async def test_concurrent_retries_of_one_producer_append_store_it_once(
    manager: StreamManager,
) -> None:
    await manager.create("s")
    results = await asyncio.gather(
        *[manager.apply(produce("s", 0, 0, NewEvent.raw(b"once"))) for _ in range(5)]
    )
    assert sum(not r.duplicate for r in results) == 1
    assert payloads(await manager.read("s")) == [b"once"]


async def test_forks_do_not_inherit_producer_state(manager: StreamManager) -> None:
    await manager.create("src")
    await manager.apply(produce("src", 0, 0, NewEvent.raw(b"a")))
    await manager.create("fork", fork=ForkSpec("src", 1))
    assert not (await manager.apply(produce("fork", 0, 0, NewEvent.raw(b"b")))).duplicate


# -- writer sequence tokens and rejected appends -------------------------------------------


async def test_writer_seq_must_grow_byte_wise(manager: StreamManager) -> None:
    await manager.create("s")
    await manager.apply(AppendRequest("s", [NewEvent.raw(b"a")], writer_seq="09"))
    await manager.apply(AppendRequest("s", [NewEvent.raw(b"b")], writer_seq="10"))
    for stale in ("10", "09", "1"):  # "2" would be after "10"
        err = await refused(
            manager.apply(AppendRequest("s", [NewEvent.raw(b"x")], writer_seq=stale))
        )
        assert (err.status, reason(err)) == (Status.ABORTED, Problem.WRITER_SEQ_REGRESSION)
    assert payloads(await manager.read("s")) == [b"a", b"b"]


async def test_a_producer_retry_wins_over_a_writer_seq_regression(manager: StreamManager) -> None:
    await manager.create("s")
    request = AppendRequest(
        "s", [NewEvent.raw(b"a")], producer=ProducerClaim("p", 0, 0), writer_seq="1"
    )
    await manager.apply(request)
    assert (await manager.apply(request)).duplicate


async def test_reject_runs_the_checks_then_fails_without_writing(manager: StreamManager) -> None:
    await manager.create("s")
    bad_payload = StreamError(Status.INVALID_ARGUMENT, "bad JSON")
    request = AppendRequest("s", [], producer=ProducerClaim("p", 0, 0), reject=bad_payload)
    assert await refused(manager.apply(request)) == bad_payload
    # The producer did not advance: seq 0 is still the next one.
    assert not (await manager.apply(produce("s", 0, 0, NewEvent.raw(b"a")))).duplicate
    await manager.append("s", [NewEvent.closed()])
    err = await refused(manager.apply(AppendRequest("s", [], reject=bad_payload)))
    assert reason(err) == Problem.FINISHED  # the stream's own error ranks first

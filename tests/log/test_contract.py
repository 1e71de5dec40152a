"""The event log's contract, run against every backend (memory, SQLite, Postgres).

Several managers on one database stand for several processes: they share
rows, and learn of each other's appends only through their notifier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.errors import Status, StreamError
from app.log import Event, EventKind, NewEvent, StreamManager, StreamStatus
from app.log.api import AppendRequest, Problem, decode_json
from app.log.manager import ARRIVAL_TURNS
from tests.conftest import ManagerFactory
from tests.support import CallCounter, FakeClock

FALSY = [0, "", None, False, [], {}]


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(30), contextlib.aclosing(events) as stream:  # type: ignore[type-var]
        async for event in stream:
            out.append(event)
    return out


def chunks(events: list[Event]) -> list[Any]:
    return [e.json() for e in events if e.kind is EventKind.CHUNK]


def assert_gap_free(events: list[Event], start: int = 1) -> None:
    assert [e.seq for e in events] == list(range(start, start + len(events)))


# -- open, write, end ---------------------------------------------------------------


async def test_open_existing_id_raises_already_exists(manager: StreamManager) -> None:
    await manager.open("s")
    with pytest.raises(StreamError) as err:
        await manager.open("s")
    assert err.value.status is Status.ALREADY_EXISTS


async def test_write_after_done_raises_failed_precondition(manager: StreamManager) -> None:
    writer = await manager.open("s")
    await writer.write(1)
    await writer.done("out")
    for attempt in (writer.write(2), writer.done("again"), writer.error(RuntimeError("x"))):
        with pytest.raises(StreamError) as err:
            await attempt
        assert err.value.status is Status.FAILED_PRECONDITION


async def test_second_writer_cannot_append_to_a_finished_stream(manager: StreamManager) -> None:
    writer = await manager.open("s")
    await writer.done(None)
    with pytest.raises(StreamError) as err:
        await manager.writer("s").write("late")
    assert err.value.status is Status.FAILED_PRECONDITION
    assert (await manager.info("s")).last_seq == 1


async def test_write_to_unknown_stream_is_not_found(manager: StreamManager) -> None:
    with pytest.raises(StreamError) as err:
        await manager.writer("nope").write(1)
    assert err.value.status is Status.NOT_FOUND


async def test_subscribe_unknown_stream_is_not_found(manager: StreamManager) -> None:
    with pytest.raises(StreamError) as err:
        await manager.subscribe("nope")
    assert err.value.status is Status.NOT_FOUND


@pytest.mark.parametrize(
    "bad_id", ["", "x" * 1025, "a\x00b", "line\nbreak", "tab\there", "del\x7f"]
)
async def test_bad_stream_ids_are_rejected(manager: StreamManager, bad_id: str) -> None:
    with pytest.raises(StreamError) as err:
        await manager.open(bad_id)
    assert err.value.status is Status.INVALID_ARGUMENT


async def test_writes_return_committed_numbered_events(manager: StreamManager) -> None:
    writer = await manager.open("s")
    first = await writer.write({"a": 1})
    second = await writer.write("two", type="greeting")
    assert (first.seq, second.seq) == (1, 2)
    assert second.type == "greeting"
    stored = await manager.read("s")
    assert [(e.seq, e.json(), e.type) for e in stored] == [
        (1, {"a": 1}, None),
        (2, "two", "greeting"),
    ]


async def test_close_ends_the_stream_without_a_result(manager: StreamManager) -> None:
    writer = await manager.open("s")
    await writer.write(1)
    await writer.close()
    await writer.close()  # releasing twice is harmless
    events = await collect(await manager.subscribe("s"))
    assert [e.kind for e in events] == [EventKind.CHUNK, EventKind.CLOSED]
    assert (await manager.info("s")).status is StreamStatus.CLOSED
    with pytest.raises(StreamError) as err:
        await writer.write(2)
    assert err.value.status is Status.FAILED_PRECONDITION


async def test_an_append_for_a_stream_created_at_a_time_refuses_a_new_stream_of_that_id(
    manager: StreamManager, clock: FakeClock
) -> None:
    first = await manager.create("s")
    request = AppendRequest("s", [NewEvent.chunk(1)], created_at=first.created_at)
    assert (await manager.apply(request)).last_seq == 1
    await manager.delete("s")
    clock.advance(1)
    await manager.create("s", content_type="application/octet-stream")
    stale = AppendRequest("s", [NewEvent.chunk(2)], created_at=first.created_at)
    with pytest.raises(StreamError) as err:
        await manager.apply(stale)
    assert err.value.status is Status.FAILED_PRECONDITION
    assert err.value.details["reason"] == Problem.REPLACED
    assert await manager.read("s") == []


# -- reading --------------------------------------------------------------------------


async def test_replay_then_live(manager: StreamManager) -> None:
    writer = await manager.open("s")
    for i in range(3):
        await writer.write(i)
    reader = asyncio.create_task(collect(await manager.subscribe("s")))
    await asyncio.sleep(0.05)
    for i in range(3, 6):
        await writer.write(i)
    await writer.done("end")
    events = await reader
    assert chunks(events) == [0, 1, 2, 3, 4, 5]
    assert events[-1].kind is EventKind.DONE and events[-1].json() == "end"
    assert_gap_free(events)


async def test_resume_after_cursor(manager: StreamManager) -> None:
    writer = await manager.open("s")
    for i in range(10):
        await writer.write(i)
    await writer.done("end")
    events = await collect(await manager.subscribe("s", after=4))
    assert [e.seq for e in events] == list(range(5, 12))
    assert chunks(events) == [4, 5, 6, 7, 8, 9]


async def test_reader_joining_mid_stream_gets_every_event_once(manager: StreamManager) -> None:
    writer = await manager.open("s")

    async def produce() -> None:
        for i in range(200):
            await writer.write(i)
            if i % 20 == 0:
                await asyncio.sleep(0)
        await writer.done("end")

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.01)
    late_readers = [asyncio.create_task(collect(await manager.subscribe("s"))) for _ in range(5)]
    await producer
    for events in await asyncio.gather(*late_readers):
        assert chunks(events) == list(range(200))
        assert_gap_free(events)


async def test_finished_stream_replays_everything_and_its_terminal(manager: StreamManager) -> None:
    writer = await manager.open("s")
    await writer.write("a")
    await writer.done({"answer": 42})
    for _ in range(2):
        events = await collect(await manager.subscribe("s"))
        assert chunks(events) == ["a"]
        assert events[-1].kind is EventKind.DONE
        assert events[-1].json() == {"answer": 42}


async def test_error_keeps_status_and_message(manager: StreamManager) -> None:
    writer = await manager.open("s")
    await writer.write("a")
    await writer.error(StreamError(Status.INVALID_ARGUMENT, "bad input", {"field": "x"}))
    events = await collect(await manager.subscribe("s"))
    error = events[-1].as_error()
    assert (error.status, error.message, error.details) == (
        Status.INVALID_ARGUMENT,
        "bad input",
        {"field": "x"},
    )
    info = await manager.info("s")
    assert (info.status, info.error_status, info.error_message) == (
        StreamStatus.ERROR,
        "INVALID_ARGUMENT",
        "bad input",
    )


async def test_plain_exception_becomes_internal_error(manager: StreamManager) -> None:
    writer = await manager.open("s")
    await writer.error(ValueError("boom"))
    events = await collect(await manager.subscribe("s"))
    assert events[-1].as_error() == StreamError(Status.INTERNAL, "boom")


async def test_falsy_chunks_survive_unchanged(manager: StreamManager) -> None:
    writer = await manager.open("s")
    for chunk in FALSY:
        await writer.write(chunk)
    await writer.done(None)
    events = await collect(await manager.subscribe("s"))
    assert chunks(events) == FALSY
    assert [type(c) for c in chunks(events)] == [type(c) for c in FALSY]
    assert events[-1].kind is EventKind.DONE and events[-1].json() is None


async def test_non_ascii_chunks_survive(manager: StreamManager) -> None:
    writer = await manager.open("s")
    await writer.write("héllo wörld ✓ 🚀")
    await writer.done("ok")
    assert chunks(await collect(await manager.subscribe("s"))) == ["héllo wörld ✓ 🚀"]


async def test_slow_reader_gets_every_chunk_and_never_blocks_the_writer(
    manager: StreamManager,
) -> None:
    """Regression: Genkit's Go manager drops chunks for a reader 100 behind.

    The reader stops after its first event until the writer is done, so that
    the writer is shown not to wait for it. (It used to sleep 1 ms per event
    instead, and on Postgres could keep up with 1,000 sequential writes.)"""
    writer = await manager.open("s")
    received: list[Event] = []
    first_read, writer_finished = asyncio.Event(), asyncio.Event()

    async def slow_reader() -> None:
        async with contextlib.aclosing(await manager.subscribe("s")) as stream:  # type: ignore[type-var]
            async for event in stream:
                received.append(event)
                first_read.set()
                await writer_finished.wait()

    reader = asyncio.create_task(slow_reader())
    await writer.write(0)
    await first_read.wait()
    for i in range(1, 1000):
        await writer.write(i)
    await asyncio.wait_for(writer.done("end"), 60)
    # The writer finished while the reader is 1,000 behind: it never waited for it.
    assert len(received) == 1
    writer_finished.set()
    await asyncio.wait_for(reader, 60)
    assert chunks(received) == list(range(1000))
    assert_gap_free(received)


@pytest.mark.parametrize("count", [100, 1000])
async def test_reconnect_to_finished_stream(manager: StreamManager, count: int) -> None:
    """Regression: exactly 100 (and 1,000) buffered chunks deadlock Genkit's Go manager."""
    writer = await manager.open("s")
    futures = [writer.send(i) for i in range(count)]
    await asyncio.gather(*futures)
    await writer.done("end")
    for _ in range(2):
        events = await collect(await manager.subscribe("s"))
        assert chunks(events) == list(range(count))
        assert events[-1].json() == "end"


async def test_reconnect_to_running_stream_with_more_than_100_chunks(
    manager: StreamManager,
) -> None:
    """Regression: Go's Subscribe stalls the flow once 100+ chunks are buffered."""
    writer = await manager.open("s")
    await asyncio.gather(*[writer.send(i) for i in range(150)])
    reader = asyncio.create_task(collect(await manager.subscribe("s")))
    await asyncio.sleep(0.02)
    await asyncio.wait_for(writer.write(150), 5)  # the writer is not stalled
    await writer.done("end")
    assert chunks(await reader) == list(range(151))


# -- concurrency ----------------------------------------------------------------------


async def test_twenty_writers_and_twenty_readers(manager: StreamManager) -> None:
    writers = [await manager.open(f"s{i}") for i in range(20)]
    readers = [asyncio.create_task(collect(await manager.subscribe(f"s{i}"))) for i in range(20)]

    async def produce(i: int) -> None:
        for n in range(50):
            await writers[i].write([i, n])
        await writers[i].done(i)

    await asyncio.gather(*[produce(i) for i in range(20)])
    for i, events in enumerate(await asyncio.gather(*readers)):
        assert chunks(events) == [[i, n] for n in range(50)]
        assert events[-1].json() == i


async def test_racing_opens_of_one_id(make_manager: ManagerFactory) -> None:
    first, second = make_manager(), make_manager()
    await first.start()
    await second.start()
    results = await asyncio.gather(first.open("race"), second.open("race"), return_exceptions=True)
    errors = [r for r in results if isinstance(r, StreamError)]
    assert len(errors) == 1 and errors[0].status is Status.ALREADY_EXISTS


async def test_concurrent_writers_on_one_stream_leave_no_gap(make_manager: ManagerFactory) -> None:
    managers = [make_manager() for _ in range(3)]
    for m in managers:
        await m.start()
    await managers[0].open("hot")

    async def produce(m: StreamManager, name: str) -> None:
        writer = m.writer("hot")
        for n in range(40):
            await writer.write(f"{name}-{n}")

    await asyncio.gather(
        *[produce(m, f"w{i}{j}") for i, m in enumerate(managers) for j in range(3)]
    )
    events = await managers[0].read("hot", limit=10_000)
    assert_gap_free(events)
    values = chunks(events)
    assert len(values) == len(set(values)) == 3 * 3 * 40
    for i in range(3):
        for j in range(3):
            mine = [v for v in values if v.startswith(f"w{i}{j}-")]
            assert mine == [f"w{i}{j}-{n}" for n in range(40)]  # each writer's order kept


async def test_group_commit_batches_pipelined_sends(manager: StreamManager) -> None:
    commits = CallCounter(manager.store, "commit")
    writer = await manager.open("s")
    await asyncio.gather(*[writer.send(i) for i in range(500)])
    assert commits.count <= 2
    assert chunks(await manager.read("s", limit=1000)) == list(range(500))


async def test_one_bad_append_does_not_fail_its_batch(manager: StreamManager) -> None:
    good = await manager.open("good")
    finished = await manager.open("finished")
    await finished.done(None)
    late = manager.writer("finished").send("late")
    fine = good.send("fine")
    with pytest.raises(StreamError) as err:
        await late
    assert err.value.status is Status.FAILED_PRECONDITION
    assert (await fine)[0].seq == 1


async def test_one_group_commit_of_appends_that_differ_in_every_column(
    make_manager: ManagerFactory,
) -> None:
    """A commit sends a column once when every row of the batch has the same
    value, and as an array otherwise (Postgres). Each mix stores what each
    append asked for: appends that share nothing, then appends that share
    everything they can, then a batch of one. One commit lane, so that each
    group is one commit, not split by stream."""
    manager = make_manager(commit_lanes=1)
    await manager.start()
    ids = ["typed", "plain", "done", "failed", "several"]
    for stream_id in ids:
        await manager.open(stream_id)
    commits = manager.stats.commits
    mixed = [
        manager.submit(AppendRequest("typed", [NewEvent.chunk({"n": 1}, type="delta")])),
        manager.submit(AppendRequest("plain", [NewEvent.chunk("x")])),
        manager.submit(AppendRequest("done", [NewEvent.done({"answer": 42})])),
        manager.submit(
            AppendRequest("failed", [NewEvent.error(StreamError(Status.INTERNAL, "boom"))])
        ),
        manager.submit(AppendRequest("several", [NewEvent.chunk(1), NewEvent.chunk(2, type="t")])),
    ]
    await asyncio.gather(*mixed)
    alike = [manager.submit(AppendRequest(s, [NewEvent.chunk("same")])) for s in ("typed", "plain")]
    await asyncio.gather(*alike)
    await manager.append("several", [NewEvent.chunk("alone")])
    assert manager.stats.commits - commits == 3  # each group was one commit

    def stored(events: list[Event]) -> list[tuple[int, EventKind, str | None, Any, bool]]:
        return [(e.seq, e.kind, e.type, e.json(), e.batch_end) for e in events]

    async def events_of(stream_id: str) -> list[Event]:
        return await manager.read(stream_id, after=0)

    assert stored(await events_of("typed")) == [
        (1, EventKind.CHUNK, "delta", {"n": 1}, True),
        (2, EventKind.CHUNK, None, "same", True),
    ]
    assert stored(await events_of("plain")) == [
        (1, EventKind.CHUNK, None, "x", True),
        (2, EventKind.CHUNK, None, "same", True),
    ]
    assert stored(await events_of("several")) == [
        (1, EventKind.CHUNK, None, 1, False),
        (2, EventKind.CHUNK, "t", 2, True),
        (3, EventKind.CHUNK, None, "alone", True),
    ]
    done, failed = await manager.info("done"), await manager.info("failed")
    assert (done.status, done.last_seq, done.finished_at is not None) == (
        StreamStatus.DONE,
        1,
        True,
    )
    assert done.output is not None and decode_json(done.output) == {"answer": 42}
    assert (failed.status, failed.error_status, failed.error_message) == (
        StreamStatus.ERROR,
        str(Status.INTERNAL),
        "boom",
    )
    for stream_id, last_seq in [("typed", 2), ("plain", 2), ("several", 3)]:
        info = await manager.info(stream_id)
        assert (info.status, info.last_seq, info.finished_at) == (StreamStatus.OPEN, last_seq, None)


# -- readers in other "processes" ----------------------------------------------------------


async def test_reader_on_another_manager_sees_live_appends(make_manager: ManagerFactory) -> None:
    producer, consumer = make_manager(), make_manager()
    await producer.start()
    await consumer.start()
    writer = await producer.open("s")
    await writer.write(0)
    reader = asyncio.create_task(collect(await consumer.subscribe("s")))
    await asyncio.sleep(0.05)
    for i in range(1, 30):
        await writer.write(i)
    await writer.done("end")
    events = await reader
    assert chunks(events) == list(range(30))
    assert_gap_free(events)


async def test_many_local_readers_cost_no_read_per_reader(
    manager: StreamManager, backend: str
) -> None:
    writer = await manager.open("s")
    readers = [asyncio.create_task(collect(await manager.subscribe("s"))) for _ in range(100)]
    await asyncio.sleep(0.05)
    reads = CallCounter(manager.store, "read")
    for i in range(20):
        await writer.write(i)
    await writer.done("end")
    for events in await asyncio.gather(*readers):
        assert chunks(events) == list(range(20))
    # Committed events reach local readers without a query. On SQLite the
    # data_version probe cannot tell our own commits from other processes', so
    # it may re-check the stream after a commit: once, never once per reader.
    assert reads.count == 0 if backend != "sqlite" else reads.count <= 21


async def test_many_readers_of_a_remote_stream_share_one_read_per_wakeup(
    make_manager: ManagerFactory,
) -> None:
    producer, consumer = make_manager(), make_manager()
    await producer.start()
    await consumer.start()
    writer = await producer.open("s")
    readers = [asyncio.create_task(collect(await consumer.subscribe("s"))) for _ in range(100)]
    await asyncio.sleep(0.1)
    reads = CallCounter(consumer.store, "read")
    for i in range(10):
        await writer.write(i)
        await asyncio.sleep(0.05)
    await writer.done("end")
    for events in await asyncio.gather(*readers):
        assert chunks(events) == list(range(10))
    assert reads.count <= 2 * 11  # about one per wake-up, not one per reader (that would be 1,100)


# -- retention ------------------------------------------------------------------------------


async def test_finished_stream_expires_after_its_ttl(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    manager = make_manager(ttl_seconds=60)
    await manager.start()
    writer = await manager.open("s")
    await writer.write(1)
    await writer.done("x")
    clock.advance(59)
    assert (await manager.sweep()).deleted_streams == 0
    assert chunks(await collect(await manager.subscribe("s"))) == [1]
    clock.advance(2)
    # Expired but not yet swept: already gone for readers.
    with pytest.raises(StreamError) as err:
        await manager.subscribe("s")
    assert err.value.status is Status.NOT_FOUND
    with pytest.raises(StreamError):
        await manager.read("s")
    report = await manager.sweep()
    assert (report.deleted_streams, report.deleted_events) == (1, 2)
    assert await manager.store.info("s") is None


async def test_per_stream_ttl(manager: StreamManager, clock: FakeClock) -> None:
    short = await manager.open("short", ttl_seconds=1)
    long = await manager.open("long", ttl_seconds=3600)
    await short.done(None)
    await long.done(None)
    clock.advance(10)
    await manager.sweep()
    assert await manager.store.info("short") is None
    assert await manager.store.info("long") is not None


async def test_expired_id_can_be_opened_again(manager: StreamManager, clock: FakeClock) -> None:
    old = await manager.open("s", ttl_seconds=5)
    await old.write("old")
    await old.done(None)
    clock.advance(6)
    new = await manager.open("s")
    await new.write("new")
    await new.done(None)
    assert chunks(await collect(await manager.subscribe("s"))) == ["new"]


async def test_sweep_deletes_large_streams_in_bounded_batches(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    manager = make_manager(ttl_seconds=1, sweep_batch_size=100)
    await manager.start()
    for name, size in (("big", 450), ("small-1", 5), ("small-2", 7)):
        writer = await manager.open(name)
        await asyncio.gather(*[writer.send(i) for i in range(size)])
        await writer.done(None)
    keep = await manager.open("open-one")
    await keep.write("stay")
    clock.advance(2)
    report = await manager.sweep()
    assert report.deleted_streams == 3
    assert report.deleted_events == 451 + 6 + 8
    assert chunks(await manager.read("open-one")) == ["stay"]


async def test_idle_sweep_ends_abandoned_stream_and_its_reader(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    manager = make_manager(idle_timeout_seconds=600)
    await manager.start()
    writer = await manager.open("s")
    await writer.write("only")
    reader = asyncio.create_task(collect(await manager.subscribe("s")))
    clock.advance(599)
    assert (await manager.sweep()).abandoned == 0
    clock.advance(2)
    report = await manager.sweep()
    assert report.abandoned_ids == ["s"]
    events = await reader
    assert chunks(events) == ["only"]
    assert events[-1].as_error().status is Status.ABORTED
    assert events[-1].as_error().message == "producer went silent"
    with pytest.raises(StreamError) as err:
        await writer.write("too late")
    assert err.value.status is Status.FAILED_PRECONDITION


async def test_a_write_resets_the_idle_clock(manager: StreamManager, clock: FakeClock) -> None:
    writer = await manager.open("s")
    for _ in range(5):
        clock.advance(500)
        await writer.write("alive")
    assert (await manager.sweep()).abandoned == 0
    assert (await manager.info("s")).is_open


async def test_a_writing_stream_moves_its_idle_deadline_once_per_slack_and_never_early(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    """Writes move abandon_at only when it falls short of the idle timeout, then
    a tenth of it further (store.abandon_after_write): the row's indexed column
    changes once per slack, not on every append, and a silent stream ends at
    most that slack late."""
    manager = make_manager(idle_timeout_seconds=600)
    await manager.start()
    writer = await manager.open("s")
    opened = (await manager.info("s")).abandon_at
    clock.advance(100)
    await writer.write("a")
    moved = (await manager.info("s")).abandon_at
    assert opened is not None and moved is not None
    assert (moved - opened).total_seconds() == 100 + 60
    for _ in range(5):  # within the slack: the row's deadline stays put
        clock.advance(10)
        await writer.write("b")
        assert (await manager.info("s")).abandon_at == moved
    clock.advance(599)  # 599 s after the last write: not before the idle timeout
    assert (await manager.sweep()).abandoned == 0
    clock.advance(12)  # past the stored deadline, 611 s after the last write
    assert (await manager.sweep()).abandoned_ids == ["s"]


async def test_stream_without_idle_timeout_is_never_abandoned(
    manager: StreamManager, clock: FakeClock
) -> None:
    await manager.open("s", idle_timeout_seconds=None)
    clock.advance(10**7)
    assert (await manager.sweep()).abandoned == 0


async def test_abandoned_stream_of_another_manager_ends_its_remote_reader(
    make_manager: ManagerFactory, clock: FakeClock
) -> None:
    producer, reader_side = make_manager(), make_manager()
    await producer.start()
    await reader_side.start()
    await producer.open("s")
    reader = asyncio.create_task(collect(await reader_side.subscribe("s")))
    await asyncio.sleep(0.05)
    clock.advance(601)
    await producer.sweep()
    events = await reader
    assert events[-1].as_error().status is Status.ABORTED


async def test_deleted_stream_ends_its_readers_with_not_found(manager: StreamManager) -> None:
    await manager.open("s")
    reader = asyncio.create_task(collect(await manager.subscribe("s")))
    await asyncio.sleep(0.02)
    assert await manager.delete("s")
    with pytest.raises(StreamError) as err:
        await reader
    assert err.value.status is Status.NOT_FOUND


async def test_pushed_chunks_are_committed_in_order_by_flush(manager: StreamManager) -> None:
    writer = await manager.open("s")
    for i in range(2500):
        writer.push(i)
    await writer.flush()
    assert (await manager.info("s")).last_seq == 2500
    await writer.done("end")
    assert chunks(await collect(await manager.subscribe("s"))) == list(range(2500))


async def test_pushed_chunks_queued_together_stay_one_append_each(manager: StreamManager) -> None:
    """Pushes of one writer share a queued request; each is still its own append."""
    writer = await manager.open("s")
    other = await manager.open("t")
    for i in range(5):
        writer.push(i)
    for i in range(5):
        other.push(i)
    sent = writer.send("awaited")
    writer.push("after")
    await writer.flush()
    await other.flush()
    await sent
    events = await manager.read("s")
    assert [e.json() for e in events] == [0, 1, 2, 3, 4, "awaited", "after"]
    assert all(e.batch_end for e in events)
    assert [e.json() for e in await manager.read("t")] == [0, 1, 2, 3, 4]
    assert manager.stats.appends["api"] == 5 + 1 + 1 + 5


async def test_sent_chunks_queued_together_stay_one_append_each(manager: StreamManager) -> None:
    """Sends to one stream share a queued request and a commit; each is still
    its own append, and its future holds its own event."""
    writer = await manager.open("s")
    other = await manager.open("t")
    flow = manager.writer("s", origin="flow")
    commits = CallCounter(manager.store, "commit")
    sent = [writer.send(i) for i in range(100)]  # in one turn of the loop
    await asyncio.gather(*sent)
    [(requests, _now)] = commits.calls
    assert [len(r.events) for r in requests] == [100]
    # Interleaved with another stream, another origin, a push and an awaited
    # write: each joins only the request queued right before it.
    mixed = [writer.send("a"), other.send("t"), writer.send("b"), flow.send("c")]
    writer.push("pushed")
    mixed += [writer.send("d"), writer.send_event(NewEvent.chunk("e", type="typed"))]
    await writer.write("f")
    await writer.flush()
    results = await asyncio.gather(*sent, *mixed)
    assert [len(r) for r in results] == [1] * len(results)
    assert [r[0].seq for r in results[:100]] == list(range(1, 101))
    assert [r[0].json() for r in results[100:]] == ["a", "t", "b", "c", "d", "e"]
    assert [(r[0].stream_id, r[0].seq) for r in results[100:]] == [
        ("s", 101),
        ("t", 1),
        ("s", 102),
        ("s", 103),
        ("s", 105),
        ("s", 106),
    ]
    assert results[-1][0].type == "typed"
    events = await manager.read("s", limit=1000)
    assert [e.json() for e in events[100:]] == ["a", "b", "c", "pushed", "d", "e", "f"]
    assert all(e.batch_end for e in events)
    assert manager.stats.appends == {"api": 100 + 6 + 1, "flow": 1}


async def test_sent_chunks_after_the_stream_ended_each_fail(manager: StreamManager) -> None:
    """Queued behind the end of their stream, sends queued together fail one by one."""
    writer = await manager.open("s")
    late = manager.writer("s")
    ended = writer.send_event(NewEvent.chunk("last"))
    done = asyncio.ensure_future(writer.done("out"))
    await asyncio.sleep(0)  # done() queued its end
    refused = [late.send(i) for i in range(3)]
    outcomes = await asyncio.gather(*refused, return_exceptions=True)
    assert (await ended)[0].seq == 1 and (await done).seq == 2
    for outcome in outcomes:
        assert isinstance(outcome, StreamError)
        assert outcome.status is Status.FAILED_PRECONDITION
    assert (await manager.info("s")).last_seq == 2
    assert manager.stats.rejected_appends == 3  # appends, not queued requests


async def test_refused_pushes_count_as_one_rejected_append_each(manager: StreamManager) -> None:
    """Regression: pushes queued together were counted as one rejected append."""
    writer = await manager.open("s")
    late = manager.writer("s")
    done = asyncio.ensure_future(writer.done("out"))
    await asyncio.sleep(0)  # done() queued its end
    for i in range(4):
        late.push(i)
    with pytest.raises(StreamError) as err:
        await late.flush()
    assert err.value.status is Status.FAILED_PRECONDITION
    assert (await done).seq == 1
    assert manager.stats.rejected_appends == 4


async def test_sent_chunks_fill_group_commits_of_at_most_max_batch_events(
    make_manager: ManagerFactory,
) -> None:
    manager = make_manager(max_batch=10)
    await manager.start()
    writer = await manager.open("s")
    commits = manager.stats.commits
    sent = [writer.send(i) for i in range(35)]
    results = await asyncio.gather(*sent)
    assert manager.stats.commits - commits == 4  # 10 + 10 + 10 + 5
    assert [r[0].json() for r in results] == list(range(35))
    assert [r[0].seq for r in results] == list(range(1, 36))


async def test_appends_arriving_over_a_few_loop_turns_share_one_commit(
    make_manager: ManagerFactory,
) -> None:
    """Guards the half-empty commits of HTTP appends on SQLite: the first append
    woke the committer before the requests read in the same turn of the event
    loop had reached the log, so 16 producers made two commits of 7-8 appends
    where one would do. Here each producer is one turn later than the one
    before. A store whose commits wait on a server (Postgres) does not hold
    the first one back: the others arrive while it runs."""
    manager = make_manager(commit_lanes=1)
    await manager.start()
    ids = [f"s{i}" for i in range(3)]
    for stream_id in ids:
        await manager.open(stream_id)
    commits = manager.stats.commits

    async def producer(turns_late: int, stream_id: str) -> list[Event]:
        for _ in range(turns_late):
            await asyncio.sleep(0)
        return await manager.append(stream_id, [NewEvent.chunk(turns_late)])

    results = await asyncio.gather(*(producer(i, ids[i % 3]) for i in range(ARRIVAL_TURNS)))
    assert [r[0].json() for r in results] == list(range(ARRIVAL_TURNS))
    if not manager.store.commits_on_loop:
        assert manager.stats.commits - commits >= 2
        return
    assert manager.stats.commits - commits == 1

    # An append alone is not held back for turns that bring nothing.
    await manager.append("s0", [NewEvent.chunk("alone")])
    assert manager.stats.commits - commits == 2


async def test_an_idle_subscription_ticks_with_empty_batches(manager: StreamManager) -> None:
    """The SSE keepalive tick: an empty batch when nothing came for idle_seconds."""
    writer = await manager.open("s")
    await writer.write("first")
    batches = await manager.subscribe_batches("s", idle_seconds=0.05)
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        assert [e.json() for e in await anext(batches)] == ["first"]
        assert await anext(batches) == []  # idle
        await writer.done("end")
        assert [e.json() for e in await anext(batches)] == ["end"]


async def test_the_idle_tick_counts_from_the_start_of_the_current_wait(
    manager: StreamManager,
) -> None:
    """The idle timer outlives waits that end with events (one timer per idle
    period, not per event): when it fires it must measure from the wait in
    progress, so events more frequent than idle_seconds never get a keepalive."""
    writer = await manager.open("s")
    batches = await manager.subscribe_batches("s", idle_seconds=1.0)
    received: list[list[Any]] = []
    async with contextlib.aclosing(batches):  # type: ignore[type-var]

        async def produce() -> None:
            for n in range(25):  # 2.5 idle periods, one event every tenth of one
                await writer.write(n)
                await asyncio.sleep(0.1)

        producer = asyncio.create_task(produce())
        async with asyncio.timeout(30):  # a lost event would otherwise wait for ever
            while sum(len(b) for b in received) < 25:
                received.append([e.json() for e in await anext(batches)])
        await producer
        quiet_from = asyncio.get_running_loop().time()
        assert await anext(batches) == []  # then silence: the tick comes
        waited = asyncio.get_running_loop().time() - quiet_from
    assert [] not in received
    assert [n for batch in received for n in batch] == list(range(25))
    assert 0.8 <= waited < 3.0


async def test_a_subscription_yields_at_most_batch_bytes_at_once(
    make_manager: ManagerFactory,
) -> None:
    """A reader that stops reading holds one batch until the stall timeout:
    large events come in several batches, from the rows and from the tail."""
    manager = make_manager(batch_bytes=10_000, tail_window=8)
    await manager.start()
    writer = await manager.open("s")
    for _ in range(30):
        await writer.write("x" * 3000)  # 3,002 bytes of JSON each
    await writer.done("end")
    batches = await manager.subscribe_batches("s")
    seqs, sizes = [], []
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            seqs += [e.seq for e in batch]
            sizes.append(sum(len(e.payload) for e in batch))
    assert seqs == list(range(1, 32))
    assert max(sizes) <= 10_000 and len(sizes) >= 10


async def test_a_subscription_reads_pages_of_about_batch_bytes(
    make_manager: ManagerFactory,
) -> None:
    """Regression: after a page that fitted, the next read asked for page_size
    events again. Fifty readers of 2 KB events each read 2 MB pages to keep
    512 KiB of them, and a clean-clone run went over the stalled-readers limit."""
    manager = make_manager(batch_bytes=10_000, page_size=1000, tail_window=4)
    await manager.start()
    writer = await manager.open("s")
    for _ in range(40):
        await writer.write("x" * 3000)
    await writer.done("end")
    reads = CallCounter(manager.store, "read")
    batches = await manager.subscribe_batches("s")
    seqs = []
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            seqs += [e.seq for e in batch]
    assert seqs == list(range(1, 42))
    # The reader's own pages, from the start: not a refresh of the stream's tail,
    # which reads only what came after the row the subscription read (its last
    # seq) and runs when a commit or a wake-up (a late NOTIFY of the writes above,
    # on Postgres) found no tail while that row was read.
    last_seq = seqs[-1]
    limits = [limit for _stream, after, limit, _now in reads.calls if after < last_seq]
    assert len(limits) > 5 and max(limits[1:]) <= 10_000 // 3000


async def test_a_push_beyond_the_backlog_limit_can_be_awaited_until_there_is_room(
    make_manager: ManagerFactory,
) -> None:
    """A producer faster than the database awaits what push returns: memory stays
    bounded. Within the limit it is done at once; beyond it, once the backlog
    is down to half the limit (here: everything pushed is committed)."""
    manager = make_manager(push_backlog_bytes=10_000)
    await manager.start()
    writer = await manager.open("s")
    early = writer.push("x" * 1000)  # 1,002 bytes of JSON: well within
    assert not isinstance(early, asyncio.Future)
    await early
    for _ in range(20):
        late = writer.push("x" * 1000)
    assert isinstance(late, asyncio.Future) and not late.done()
    await asyncio.wait_for(late, 10)
    assert (await manager.info("s")).last_seq == 21
    assert not isinstance(writer.push("x"), asyncio.Future)  # room again


async def test_a_group_commit_holds_at_most_max_batch_events(make_manager: ManagerFactory) -> None:
    """Coalesced pushes must not make one transaction of everything queued."""
    manager = make_manager(max_batch=10)
    await manager.start()
    writer = await manager.open("s")
    commits = manager.stats.commits
    for i in range(35):
        writer.push(i)
    await writer.flush()
    assert manager.stats.commits - commits == 4  # 10 + 10 + 10 + 5
    assert [e.json() for e in await manager.read("s")] == list(range(35))


async def test_a_lost_wakeup_is_caught_by_the_safety_recheck(make_manager: ManagerFactory) -> None:
    """Wake-ups are hints: a reader that never gets one still sees the rows."""
    producer = make_manager()
    deaf = make_manager(safety_poll_seconds=0.1)
    deaf.notifier = None  # it will never hear of the producer's appends
    await producer.start()
    await deaf.start()
    writer = await producer.open("s")
    reader = asyncio.create_task(collect(await deaf.subscribe("s")))
    await asyncio.sleep(0.05)
    for i in range(3):
        await writer.write(i)
    await writer.done("end")
    assert chunks(await reader) == [0, 1, 2]

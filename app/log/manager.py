"""The StreamManager: open, write, subscribe, sweep. Genkit's semantics on durable rows.

Three pieces sit between callers and the store:

* the committer batches every pending append of the process into one
  transaction (group commit), so a hot stream does not cost a commit per event;
* tails: one per stream with local readers, holding a small window of the
  newest committed events. Readers that are caught up wait on their tail, and
  one wake-up costs at most one database read per stream, however many
  readers there are. A reader that falls behind the window reads rows by
  cursor, so being slow never loses or skips anything;
* a notifier (Postgres LISTEN, an SQLite poll) that tells tails when another
  process appended. Wake-ups are hints only: tails always re-read the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from app.errors import Status, StreamError, not_found, too_large
from app.log.api import (
    JSON_CONTENT_TYPE,
    AppendRequest,
    AppendResult,
    Event,
    ForkSpec,
    LogStats,
    NewEvent,
    NewStream,
    StreamInfo,
    StreamStatus,
    SweepReport,
)
from app.log.store import StreamStore, renewed_expiry
from app.log.tasks import cancel_and_wait

log = logging.getLogger("streamkeep.log")

Clock = Callable[[], datetime]
MAX_STREAM_ID_LENGTH = 1024
ABANDONED_MESSAGE = "producer went silent"


def utcnow() -> datetime:
    return datetime.now(UTC)


def validate_stream_id(stream_id: str) -> None:
    if not isinstance(stream_id, str) or not stream_id:
        raise StreamError(Status.INVALID_ARGUMENT, "stream id must be a non-empty string")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise StreamError(
            Status.INVALID_ARGUMENT, f"stream id is longer than {MAX_STREAM_ID_LENGTH} characters"
        )
    if not stream_id.isprintable():
        # Control characters (NUL, newlines, ...) would end up in headers and logs.
        raise StreamError(Status.INVALID_ARGUMENT, "stream id must not contain control characters")


def as_stream_error(err: BaseException | StreamError) -> StreamError:
    """The error a failed producer records: StreamErrors keep their status."""
    if isinstance(err, StreamError):
        return err
    return StreamError(Status.INTERNAL, str(err) or type(err).__name__)


class Notifier(Protocol):
    """Tells the manager that other processes appended (see app.log.wakeup)."""

    @property
    def connected(self) -> bool: ...

    async def start(self, manager: StreamManager) -> None: ...

    async def stop(self) -> None: ...


FailureSink = Callable[[StreamError], None]


class _Ready:
    """An awaitable that is done at once: what push returns while there is room
    (cheaper than a Future per chunk, and no loop is needed to make it)."""

    def __await__(self) -> Generator[None, None, None]:
        return
        yield  # a generator, finished before its first step


_READY = _Ready()


class _Pending:
    """A queued append; it reports to a future, to a future per event (sent
    chunks queued together), or (pushed appends) only its failure."""

    __slots__ = ("detailed", "future", "futures", "on_failure", "pushed_bytes", "request")

    def __init__(
        self,
        request: AppendRequest,
        future: asyncio.Future[Any] | None,
        on_failure: FailureSink | None = None,
        detailed: bool = False,
        futures: list[asyncio.Future[list[Event]]] | None = None,
    ) -> None:
        self.request = request
        # Resolved with the AppendResult when detailed, else with its events.
        self.future = future
        # Sent chunks: each event's own future, resolved with [that event].
        self.futures = futures
        self.on_failure = on_failure
        self.detailed = detailed
        self.pushed_bytes = 0  # payload of the pushed events it holds (push backlog)

    def fail(self, error: StreamError) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(error)
        elif self.futures is not None:
            for future in self.futures:
                if not future.done():
                    future.set_exception(error)
        elif self.on_failure is not None:
            self.on_failure(error)

    def succeed(self, outcome: AppendResult) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_result(outcome if self.detailed else outcome.events)
        elif self.futures is not None:
            for future, event in zip(self.futures, outcome.events, strict=True):
                if not future.done():
                    future.set_result([event])


# How many turns of the event loop a committer woken from idle waits for
# appends still on their way (see let_arrivals_join).
ARRIVAL_TURNS = 4


async def let_arrivals_join(arrivals: Callable[[], int], turns: int = ARRIVAL_TURNS) -> None:
    """Give the event loop a turn while appends keep arriving, up to `turns` times
    (`arrivals` counts the appends queued so far).

    The first append wakes an idle committer before the requests read in the
    same turn of the loop have reached the log: with 16 HTTP producers, a
    commit took 7-8 appends and the rest made a commit of their own, each
    paying the transaction's fixed cost (BEGIN, the stream rows' pages written
    again, COMMIT). A turn costs microseconds, and the wait ends at the first
    turn that brings nothing: an append alone is committed one turn later.

    Only where a commit holds the loop's thread (SQLite). A Postgres commit
    waits on the server while the loop reads the next requests: gathering
    there put the 16 producers in lock step, the process idle during each
    commit (100 streams: 80 % CPU against 92 %, 0.60-0.64 of the no-op
    against 0.66-0.67).
    """
    for _ in range(turns):
        before = arrivals()
        await asyncio.sleep(0)
        if arrivals() == before:
            return


# The fewest events a commit runs with beside another (commit lanes). Each
# commit has its own cost, in this process and in the database: with 16 HTTP
# producers on 100 streams, a second lane taking the few appends that came in
# meanwhile made 0.70-0.73 of the no-op's appends per second, against
# 0.77-0.80 with one lane (alternating runs). Writers that all come back at
# once (100 on 100 streams) still fill two lanes.
LANE_MIN_EVENTS = 32


class _Taken:
    """Appends taken off the queue together: how many, and how many of the
    commits they went into are not done."""

    __slots__ = ("appends", "left")

    def __init__(self, appends: int, commits: int) -> None:
        self.appends = appends
        self.left = commits


def split_by_stream(appends: list[_Pending], parts: int) -> list[list[_Pending]]:
    """Queued appends in up to `parts` batches of about as many events, no
    stream in two of them, each in queue order."""
    events: dict[str, int] = {}
    for p in appends:
        events[p.request.stream_id] = events.get(p.request.stream_id, 0) + len(p.request.events)
    parts = min(parts, len(events))
    if parts <= 1:
        return [appends]
    share = sum(events.values()) / parts
    part_of: dict[str, int] = {}
    part, filled = 0, 0
    for stream_id, count in events.items():
        if filled >= share and part < parts - 1:
            part, filled = part + 1, 0
        part_of[stream_id] = part
        filled += count
    batches: list[list[_Pending]] = [[] for _ in range(part + 1)]
    for p in appends:
        batches[part_of[p.request.stream_id]].append(p)
    return batches


class _Committer:
    """Group commit: whatever is pending when a transaction starts goes into it.

    Where a commit holds the event loop's thread (SQLite), a committer started
    or woken by an append first lets the appends on their way join it
    (let_arrivals_join).

    A store with more than one commit lane (Postgres) runs that many commits at
    once, on disjoint streams: while one waits on the database, the process
    plans and sends the next. Awaiting writers all come back when their commit
    does, so the appends taken together are split by stream across the free
    lanes. A stream is in at most one commit at a time: its appends stay in
    order.
    """

    def __init__(
        self, manager: StreamManager, max_batch: int, lanes: int, gather: bool = False
    ) -> None:
        self._manager = manager
        self._max_batch = max_batch
        self._lanes = lanes
        # Whether to let appends on their way join a commit (let_arrivals_join).
        self._gather = gather
        self._running: set[asyncio.Task[None]] = set()  # commits in lanes of their own
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Appends are settled in the order they were queued, so "everything
        # queued before now is settled" is a count: (target, future) waiters.
        # Appends taken together count once all their commits, and all those
        # taken before them, are done: a _Taken per take, in order.
        self._enqueued = 0
        self._settled = 0
        # Every append queued or joined to a queued one (see let_arrivals_join).
        self._arrivals = 0
        self._settle_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._taken: deque[_Taken] = deque()
        # Pushed payload bytes not yet settled, and the future of producers that
        # wait for the backlog to shrink (see StreamWriter.push).
        self._pushed_bytes = 0
        self._room: asyncio.Future[None] | None = None

    def submit(self, request: AppendRequest, detailed: bool = False) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(request, future, detailed=detailed))
        return future

    def send(self, stream_id: str, origin: str, event: NewEvent) -> asyncio.Future[list[Event]]:
        """Queue one chunk with a future of its own (StreamWriter.send, send_event, write).

        Consecutive sends to one stream (a writer's pipelined chunks, or the
        chunks of writers that each await theirs) share one queued request,
        each event still its own append. A request, its queue entry, its plan
        and its result per chunk were about half of the log's own work per
        event (in-memory store, pipelined: 7.8-9.3 -> 3.4-4.2 µs).
        """
        future: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        group = self._group_to_join(stream_id, origin)
        if group is not None and group.futures is not None:
            group.request.events.append(event)
            group.futures.append(future)
            self._arrivals += 1
        else:
            request = AppendRequest(stream_id, [event], origin=origin, separate=True)
            self._enqueue(_Pending(request, None, futures=[future]))
        return future

    def push(
        self, stream_id: str, origin: str, event: NewEvent, on_failure: FailureSink
    ) -> Awaitable[None]:
        """Queue one event without a future: the cheapest way to stream many.

        Consecutive pushes of one writer share one queued request (each event
        still its own append): per-request work was a third of a flow's cost.
        Returns what a producer may await for the push backlog to shrink.
        """
        size = len(event.payload)
        self._pushed_bytes += size
        group = self._group_to_join(stream_id, origin)
        if group is not None and group.on_failure == on_failure:  # this writer's pushes
            group.request.events.append(event)
            group.pushed_bytes += size
            self._arrivals += 1
        else:
            request = AppendRequest(stream_id, [event], origin=origin, separate=True)
            pending = _Pending(request, None, on_failure)
            pending.pushed_bytes = size
            self._enqueue(pending)
        return self._room_for_pushes()

    def _group_to_join(self, stream_id: str, origin: str) -> _Pending | None:
        """The last queued request, when it is a group of chunks queued one by one
        (sends or pushes: each its own append) to this stream and origin, with
        room for one more; a chunk joins no other, so queue order is kept."""
        last = self._pending[-1] if self._pending else None
        if (
            last is None
            or not last.request.separate
            or last.request.stream_id != stream_id
            or last.request.origin != origin
            or len(last.request.events) >= self._max_batch
        ):
            return None
        return last

    def _room_for_pushes(self) -> Awaitable[None]:
        if self._pushed_bytes <= self._manager.push_backlog_bytes:
            return _READY
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        return self._room

    def _settle_pushes(self, batch: list[_Pending]) -> None:
        """Committed or failed, pushed events leave the backlog; waiting producers
        go on once it is down to half the limit (not one chunk at a time)."""
        self._pushed_bytes -= sum(p.pushed_bytes for p in batch)
        room = self._room
        if room is not None and self._pushed_bytes <= self._manager.push_backlog_bytes // 2:
            self._room = None
            if not room.done():
                room.set_result(None)

    def _enqueue(self, pending: _Pending) -> None:
        self._enqueued += 1
        self._arrivals += 1
        self._pending.append(pending)
        if self._idle.is_set():
            self._idle.clear()
        if not self._wake.is_set():
            self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="streamkeep-committer")

    async def _run(self) -> None:
        while True:
            if self._gather:  # started or woken by an append: those on their way join it
                await let_arrivals_join(lambda: self._arrivals)
            while (took := self._take()) is not None:
                taken, batches = took
                if len(batches) == 1 and not self._running:
                    # Alone, it runs in this task: a task of its own would start only
                    # after everything else ready on the loop, and with 16 HTTP
                    # producers that turn cost 5-20 % of the appends per second.
                    await self._commit(batches[0], taken)
                    continue
                for batch in batches:
                    task = asyncio.create_task(self._commit(batch, taken), name="streamkeep-commit")
                    self._running.add(task)
                    task.add_done_callback(self._lane_done)
            if not self._pending and not self._running:
                self._idle.set()
            self._wake.clear()
            await self._wake.wait()

    def _lane_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not self._wake.is_set():
            self._wake.set()

    def _take(self) -> tuple[_Taken, list[list[_Pending]]] | None:
        """The queued appends to commit now, split across the free lanes, or None.

        Taken in order, up to max_batch events (coalesced pushes hold many),
        stopping at a stream that is still being committed. While a commit
        runs, another starts only with LANE_MIN_EVENTS events or more.
        """
        pending = self._pending
        free = self._lanes - len(self._running)
        committing = self._manager._committing
        if not pending or free <= 0 or pending[0].request.stream_id in committing:
            return None
        count, events = 1, len(pending[0].request.events)
        for queued in itertools.islice(pending, 1, None):
            size = len(queued.request.events)
            if events + size > self._max_batch or queued.request.stream_id in committing:
                break
            count, events = count + 1, events + size
        if self._running and events < LANE_MIN_EVENTS:
            return None
        appends = [pending.popleft() for _ in range(count)]
        parts = min(free, events // LANE_MIN_EVENTS)
        batches = split_by_stream(appends, parts) if parts > 1 else [appends]
        taken = _Taken(count, len(batches))
        self._taken.append(taken)
        committing.update(p.request.stream_id for p in appends)
        return taken, batches

    async def _commit(self, batch: list[_Pending], taken: _Taken) -> None:
        manager = self._manager
        streams = {p.request.stream_id for p in batch}
        try:
            outcomes = await manager.store.commit([p.request for p in batch], manager.clock())
        except BaseException as exc:
            manager._commit_finished(streams)
            manager.stats.storage_errors += 1
            error = exc if isinstance(exc, StreamError) else _unexpected(exc)
            for p in batch:
                p.fail(error)
            self._settle(taken)
            self._settle_pushes(batch)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        committed: list[Event] = []
        stats = manager.stats
        stats.commits += 1
        origins: dict[str, list[int]] = {}  # origin -> [appends, bytes], counted once a batch
        for p, outcome in zip(batch, outcomes, strict=True):
            # A request of sent or pushed chunks is that many appends.
            appends = len(p.request.events) if p.request.separate else 1
            if isinstance(outcome, StreamError):
                stats.rejected_appends += appends
                p.fail(outcome)
                continue
            committed.extend(outcome.events)
            counts = origins.setdefault(p.request.origin, [0, 0])
            counts[0] += appends
            counts[1] += sum(len(e.payload) for e in outcome.events)
            p.succeed(outcome)
        for origin, (appends, payload_bytes) in origins.items():
            stats.count_appends(origin, appends, payload_bytes)
        manager._publish(committed)
        manager._commit_finished(streams)
        self._settle(taken)
        self._settle_pushes(batch)

    async def drain(self) -> None:
        await self._idle.wait()

    async def settle_queued(self) -> None:
        """Wait until everything queued so far is settled (later appends do not delay it)."""
        target = self._enqueued
        if self._settled >= target:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settle_waiters.append((target, future))
        await future

    def _settle(self, taken: _Taken) -> None:
        """One of `taken`'s commits is done: count what is now settled in queue order."""
        taken.left -= 1
        queue = self._taken
        while queue and queue[0].left == 0:
            self._settled += queue.popleft().appends
        if self._settle_waiters:
            waiting = []
            for target, future in self._settle_waiters:
                if target <= self._settled:
                    if not future.done():
                        future.set_result(None)
                else:
                    waiting.append((target, future))
            self._settle_waiters = waiting

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None


def _unexpected(exc: BaseException) -> StreamError:
    if isinstance(exc, asyncio.CancelledError):
        return StreamError(Status.UNAVAILABLE, "the service is shutting down")
    log.error("append failed", exc_info=exc)
    return StreamError(Status.INTERNAL, f"storage failure ({type(exc).__name__})")


FIRST_PAGE_EVENTS = 256


def _within_bytes(events: list[Event], budget: int) -> list[Event]:
    """The longest prefix of `events` whose payloads fit `budget` (never empty).

    What a reader holds at a time: a reader that stops reading keeps one batch,
    its encoded frames and the unsent part of them until the stall timeout.
    """
    total = 0
    for i, event in enumerate(events):
        total += len(event.payload)
        if total > budget and i > 0:
            return events[:i]
    return events


def _page_limit(page: list[Event], budget: int, page_size: int) -> int:
    """How many events the next read should ask for: about `budget` bytes of them.

    Sized from the events just read, so that a stream of large events is not
    read page_size at a time and then cut down (50 readers of 2 KB events read
    2 MB pages each and held hundreds of MB between them).
    """
    average = sum(len(event.payload) for event in page) / len(page)
    return max(1, min(page_size, int(budget / max(average, 1.0))))


class _IdleTimer:
    """Ends a reader's wait with False once `seconds` pass from its start without a change.

    One timer per idle period, not one per wait: a wait that ends with an event
    leaves the timer armed, and when it fires it only moves itself to the
    current wait's deadline. Arming and cancelling a timer for every event of
    every reader was most of the 20 % of the service's event loop that waits
    took with 1,000 SSE readers of one stream (5 % with this).
    """

    __slots__ = ("_deadline", "_loop", "_seconds", "_timer", "_waiter")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._deadline = 0.0
        self._waiter: asyncio.Future[bool] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, waiter: asyncio.Future[bool]) -> None:
        self._waiter = waiter
        self._deadline = self._loop.time() + self._seconds
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():  # no wait now: the next one arms the timer
            return
        if self._loop.time() >= self._deadline:
            waiter.set_result(False)
        else:
            self._timer = self._loop.call_at(self._deadline, self._fire)

    def cancel(self) -> None:
        self._waiter = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Tail:
    """The newest committed events of one stream, shared by its local readers."""

    def __init__(self, manager: StreamManager, stream_id: str, last_seq: int) -> None:
        self._manager = manager
        self._loop = asyncio.get_running_loop()
        self.stream_id = stream_id
        self.last_seq = last_seq
        self.window: deque[Event] = deque(maxlen=manager.tail_window)
        self.readers = 0
        self.gone = False
        # Set when the producer could not record how the stream ended (storage down):
        # caught-up local readers end with it instead of waiting for the idle sweep.
        self.failure: StreamError | None = None
        # One future per waiting reader: a reader that is cancelled cancels only
        # its own (asyncio.wait on a shared future cost a sixth of fan-out's CPU).
        self._waiters: list[asyncio.Future[bool]] = []
        self._refresh: asyncio.Task[None] | None = None
        # A hint that raced our own commit (NOTIFY can arrive before COMMIT returns).
        self.held_hint = 0
        self._again = False
        self._check_gone = False

    async def wait(self, idle: _IdleTimer | None) -> bool:
        """Until the tail changes (True) or the reader's idle timer ends the wait (False)."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append(waiter)
        if idle is not None:
            idle.watch(waiter)
        changed = False
        try:
            changed = await waiter
            return changed
        finally:
            if not changed:  # cancelled or idle: _notify has not taken it off the list
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    def offer(self, events: list[Event]) -> None:
        """Take committed events in seq order; a gap means another process wrote."""
        if not events or events[-1].seq <= self.last_seq:
            return
        if events[0].seq > self.last_seq + 1:
            self.request_refresh()
            return
        start = self.last_seq + 1 - events[0].seq
        self.window.extend(events[start:] if start > 0 else events)
        self.last_seq = events[-1].seq
        self._notify()

    def after(self, cursor: int) -> list[Event] | None:
        """Events after `cursor` from the window: [] when caught up, None when not held."""
        if cursor >= self.last_seq:
            return []
        if not self.window or cursor < self.window[0].seq - 1:
            return None
        # Taken from the right end: a caught-up reader wants the newest few, and
        # skipping from the left walked the whole window for every reader and event.
        newer = self.window[-1].seq - cursor
        events = list(itertools.islice(reversed(self.window), newer))
        events.reverse()
        return events

    def mark_gone(self) -> None:
        self.gone = True
        self._notify()

    async def stop(self) -> None:
        """Gone, and no read of ours still running (the store is about to close)."""
        self.mark_gone()
        await cancel_and_wait(self._refresh)

    def request_refresh(self, check_gone: bool = False) -> None:
        self._check_gone = self._check_gone or check_gone
        if self._refresh is not None and not self._refresh.done():
            self._again = True
            return
        self._refresh = asyncio.create_task(self._run_refresh(), name="streamkeep-tail-refresh")

    async def _run_refresh(self) -> None:
        while True:
            self._again = False
            check_gone, self._check_gone = self._check_gone, False
            try:
                await self._read_new_rows(check_gone)
            except StreamError as exc:
                # Readers retry on their next wake-up or safety poll.
                log.warning("tail refresh of %r failed: %s", self.stream_id, exc)
            if not self._again:
                return

    async def _read_new_rows(self, check_gone: bool) -> None:
        manager = self._manager
        manager.stats.wakeups += 1
        while True:
            manager.stats.tail_reads += 1
            page = await manager.store.read(
                self.stream_id, self.last_seq, manager.page_size, manager.clock()
            )
            self.offer(page)
            if len(page) < manager.page_size:
                break
        if check_gone and not page:
            info = await manager.store.info(self.stream_id)
            if info is None or info.expired(manager.clock()):
                self.mark_gone()
            elif info.last_seq > self.last_seq:
                self._again = True


class StreamWriter:
    """The producer's handle on one open stream.

    Every call returns once its event is committed. `send` is the pipelined
    form: it queues the chunk and returns a future, so a fast producer can have
    many chunks in one group commit while still learning of every failure.
    """

    def __init__(self, manager: StreamManager, stream_id: str, origin: str = "api") -> None:
        self._manager = manager
        self.stream_id = stream_id
        self.origin = origin
        self._ended: str | None = None
        self._failure: StreamError | None = None

    @property
    def ended(self) -> bool:
        return self._ended is not None

    def _check_open(self) -> None:
        self._raise_failure()
        if self._ended is not None:
            raise StreamError(
                Status.FAILED_PRECONDITION,
                f"stream writer is {self._ended}; nothing more can be written",
            )

    def send(self, chunk: Any, *, type: str | None = None) -> asyncio.Future[list[Event]]:
        self._check_open()
        return self._manager._send(self.stream_id, self.origin, NewEvent.chunk(chunk, type))

    def push(self, chunk: Any, *, type: str | None = None) -> Awaitable[None]:
        """Queue a chunk without waiting and without a future (the fastest way to stream).

        A failure is remembered: the next push, `flush`, `done` or `error`
        raises it. Chunks are committed in the order they were pushed.

        Returns an awaitable a producer may await, or ignore: it is done at once
        unless more than `push_backlog_bytes` of pushed chunks wait for their
        commit, and then once that backlog is down to half. A producer faster than
        the database awaits it to hold its memory bounded.
        """
        self._check_open()
        return self._manager._push(
            self.stream_id, self.origin, NewEvent.chunk(chunk, type), self._remember
        )

    def _remember(self, failure: StreamError) -> None:
        if self._failure is None:
            self._failure = failure

    async def flush(self) -> None:
        """Wait until everything pushed so far is committed; raise the first failure."""
        self._raise_failure()
        await self._manager.settle_queued()
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def send_event(self, event: NewEvent) -> asyncio.Future[list[Event]]:
        self._check_open()
        if event.kind.is_terminal:
            raise StreamError(
                Status.INVALID_ARGUMENT, "use done(), error() or close() to end a stream"
            )
        return self._manager._send(self.stream_id, self.origin, event)

    async def write(self, chunk: Any, *, type: str | None = None) -> Event:
        return (await self.send(chunk, type=type))[0]

    async def done(self, output: Any) -> Event:
        return await self._end("done", NewEvent.done(output))

    async def error(self, err: BaseException | StreamError) -> Event:
        return await self._end("failed", NewEvent.error(as_stream_error(err)))

    async def close(self) -> None:
        """Release the stream without a result: it ends as `closed`, its readers stop."""
        if self._ended is not None:
            return
        try:
            await self._end("closed", NewEvent.closed())
        except StreamError as exc:
            if exc.status is not Status.FAILED_PRECONDITION:
                raise

    async def _end(self, how: str, event: NewEvent) -> Event:
        self._check_open()
        # Refuse further writes at once, before the terminal event is committed.
        self._ended = how
        request = AppendRequest(self.stream_id, [event], origin=self.origin)
        events = await self._manager.submit(request)
        return events[0]


async def _flatten(batches: AsyncIterator[list[Event]]) -> AsyncIterator[Event]:
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        async for batch in batches:
            for event in batch:
                yield event


class StreamManager:
    """Durable streams with Genkit's StreamManager semantics, on any StreamStore."""

    def __init__(
        self,
        store: StreamStore,
        *,
        notifier: Notifier | None = None,
        clock: Clock = utcnow,
        ttl_seconds: int = 300,
        idle_timeout_seconds: int | None = 600,
        page_size: int = 1000,
        # The most payload bytes a subscription yields at once (one event may exceed
        # it). A stalled SSE reader holds about three times this: the events, their
        # frames and the unsent part in the transport. The transport pauses the
        # response above 64 KiB anyway (asyncio's high-water mark).
        batch_bytes: int = 128 * 1024,
        max_batch: int = 1000,
        # Pushed chunks waiting for their commit beyond which what push() returns
        # makes its producer wait (see StreamWriter.push).
        push_backlog_bytes: int = 16 * 1024 * 1024,
        tail_window: int = 1024,
        safety_poll_seconds: float = 30.0,
        sweep_batch_size: int = 5000,
        max_event_bytes: int = 1024 * 1024,
        max_readers_per_stream: int = 10_000,
        max_open_streams: int | None = None,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self.ttl_seconds = ttl_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self.page_size = page_size
        self.batch_bytes = batch_bytes
        self.tail_window = tail_window
        self.safety_poll_seconds = safety_poll_seconds
        self.sweep_batch_size = sweep_batch_size
        self.max_event_bytes = max_event_bytes
        self.max_readers_per_stream = max_readers_per_stream
        self.max_open_streams = max_open_streams
        self.push_backlog_bytes = push_backlog_bytes
        self._max_batch = max_batch
        self._committer: _Committer | None = None
        self._tails: dict[str, _Tail] = {}
        self._committing: set[str] = set()  # streams with a commit in flight
        # Commits and hints this process had no tail for, counted: a reader whose
        # first tail of a stream is made after reading the stream's row learns
        # from it whether something could have been committed meanwhile.
        self._untailed_news = 0
        self._started = False
        self.stats = LogStats()
        self.open_streams_seen = 0
        self._stopped: StreamError | None = None
        self._rechecker: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.notifier is not None:
            await self.notifier.start(self)

    async def close(self) -> None:
        """Commit what is pending, stop listening, release the database."""
        if self._committer is not None:
            await self._committer.stop()
        if self.notifier is not None:
            await self.notifier.stop()
        await cancel_and_wait(self._rechecker)
        for tail in list(self._tails.values()):
            await tail.stop()
        await self.store.close()

    async def __aenter__(self) -> StreamManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- producers ------------------------------------------------------------

    async def open(
        self,
        stream_id: str,
        *,
        content_type: str = JSON_CONTENT_TYPE,
        ttl_seconds: int | None = None,
        idle_timeout_seconds: int | Literal["default"] | None = "default",
        origin: str = "api",
    ) -> StreamWriter:
        """Create a stream and return its writer; an existing id raises ALREADY_EXISTS."""
        await self.create(
            stream_id,
            content_type=content_type,
            ttl_seconds=self.ttl_seconds if ttl_seconds is None else ttl_seconds,
            idle_timeout_seconds=idle_timeout_seconds,
        )
        return StreamWriter(self, stream_id, origin)

    async def create(
        self,
        stream_id: str,
        *,
        content_type: str = JSON_CONTENT_TYPE,
        ttl_seconds: int | Literal["default"] | None = "default",
        idle_timeout_seconds: int | Literal["default"] | None = "default",
        idle_ttl_seconds: int | None = None,
        expires_at: datetime | None = None,
        fork: ForkSpec | None = None,
        attributes: dict[str, Any] | None = None,
        initial: tuple[tuple[NewEvent, ...], ...] = (),
    ) -> StreamInfo:
        """Create a stream, with its first events, in one transaction.

        `ttl_seconds=None` keeps a finished stream until it is deleted or its
        other retention ends; `idle_ttl_seconds` is a sliding retention renewed
        by every read (`touch`) and write; `expires_at` an absolute one. A `fork`
        starts as a view of its source's first events. An existing id raises
        ALREADY_EXISTS; a fork raises NOT_FOUND, FAILED_PRECONDITION or
        OUT_OF_RANGE for a missing, deleted or too short source.
        """
        validate_stream_id(stream_id)
        if self.max_open_streams is not None:
            open_now = await self.count_open_streams()
            if open_now >= self.max_open_streams:
                raise StreamError(
                    Status.RESOURCE_EXHAUSTED,
                    f"{open_now} streams are open, the limit is {self.max_open_streams}",
                )
        for name, value in (("ttl_seconds", ttl_seconds), ("idle_ttl_seconds", idle_ttl_seconds)):
            if isinstance(value, int) and value < 0:
                raise StreamError(Status.INVALID_ARGUMENT, f"{name} must not be negative")
        events = [e for batch in initial for e in batch]
        if any(not batch for batch in initial) or any(e.kind.is_terminal for e in events[:-1]):
            raise StreamError(
                Status.INVALID_ARGUMENT, "initial batches must not be empty; only the last ends"
            )
        self._check_sizes(events)
        spec = NewStream(
            id=stream_id,
            content_type=content_type,
            ttl_seconds=self.ttl_seconds if ttl_seconds == "default" else ttl_seconds,
            idle_timeout_seconds=(
                self.idle_timeout_seconds
                if idle_timeout_seconds == "default"
                else idle_timeout_seconds
            ),
            idle_ttl_seconds=idle_ttl_seconds,
            hard_expires_at=expires_at,
            fork=fork,
            attributes=attributes,
            initial=initial,
        )
        return await self.store.create(spec, self.clock())

    def writer(self, stream_id: str, origin: str = "api") -> StreamWriter:
        """A writer for a stream opened elsewhere (another request, another process)."""
        validate_stream_id(stream_id)
        return StreamWriter(self, stream_id, origin)

    def submit(self, request: AppendRequest) -> asyncio.Future[list[Event]]:
        """Queue an append for the next group commit."""
        future: asyncio.Future[list[Event]] = self._queue(request, detailed=False)
        return future

    def _queue(self, request: AppendRequest, detailed: bool) -> asyncio.Future[Any]:
        events = request.events
        if len(events) == 1:  # the usual case: nothing else to check
            self._check_size(events[0])
            return self._committer_started().submit(request, detailed)
        if not events and request.reject is None:
            raise StreamError(Status.INVALID_ARGUMENT, "an append needs at least one event")
        if any(e.kind.is_terminal for e in events[:-1]):
            raise StreamError(Status.INVALID_ARGUMENT, "only the last event may end the stream")
        self._check_sizes(events)
        return self._committer_started().submit(request, detailed)

    def _check_sizes(self, events: Iterable[NewEvent]) -> None:
        for event in events:
            self._check_size(event)

    def _check_size(self, event: NewEvent) -> None:
        if len(event.payload) > self.max_event_bytes:
            raise too_large("the event", len(event.payload), self.max_event_bytes)

    def _send(self, stream_id: str, origin: str, event: NewEvent) -> asyncio.Future[list[Event]]:
        self._check_size(event)
        return self._committer_started().send(stream_id, origin, event)

    def _push(
        self, stream_id: str, origin: str, event: NewEvent, on_failure: FailureSink
    ) -> Awaitable[None]:
        self._check_size(event)  # pushed chunks too (a flow's send_chunk)
        return self._committer_started().push(stream_id, origin, event, on_failure)

    def _committer_started(self) -> _Committer:
        if self._committer is None:
            store = self.store
            self._committer = _Committer(
                self, self._max_batch, store.commit_lanes, store.commits_on_loop
            )
        return self._committer

    async def settle_queued(self) -> None:
        """Wait until every append queued so far in this process is settled."""
        if self._committer is not None:
            await self._committer.settle_queued()

    async def append(self, stream_id: str, events: list[NewEvent]) -> list[Event]:
        """Append events to a stream atomically; returns them numbered."""
        return await self.submit(AppendRequest(stream_id, events))

    async def apply(self, request: AppendRequest) -> AppendResult:
        """Append with every option (producer, writer seq, reject) and a detailed result.

        A producer's retry of an append already stored returns a result with
        `duplicate` set and no events; refusals raise StreamError with a
        `Problem` in details["reason"].
        """
        result: AppendResult = await self._queue(request, detailed=True)
        return result

    # -- readers --------------------------------------------------------------

    async def info(self, stream_id: str) -> StreamInfo:
        """The stream's metadata; NOT_FOUND when unknown or expired."""
        info = await self.store.info(stream_id)
        if info is None or info.expired(self.clock()):
            raise not_found(stream_id)
        return info

    async def find(self, stream_id: str) -> StreamInfo | None:
        """The stream's row as stored, also when it is gone (expired, or deleted
        but still read by forks: `fork_count` > 0); None when there is none."""
        return await self.store.info(stream_id)

    async def touch(self, info: StreamInfo) -> None:
        """A read of the stream: renews its sliding retention, if it has one."""
        renewed = renewed_expiry(info, self.clock())
        if renewed is not None:
            await self.store.renew(info.id, renewed, self.clock())

    async def read(
        self,
        stream_id: str,
        after: int = 0,
        limit: int | None = None,
        *,
        info: StreamInfo | None = None,
    ) -> list[Event]:
        """One page of events after the cursor; NOT_FOUND when the stream is gone.

        A fork's page may start with events it inherited from its source chain.
        """
        limit = limit or self.page_size
        if info is not None and after < info.fork_seq:
            return await self._read_through(info, after, limit)
        events = await self.store.read(stream_id, after, limit, self.clock())
        if events and events[0].seq == after + 1:
            return events  # the usual case: one query
        info = await self.info(stream_id)
        if after < info.fork_seq:
            return await self._read_through(info, after, limit)
        return events

    async def _read_through(self, info: StreamInfo, after: int, limit: int) -> list[Event]:
        """A fork's events after `after`: inherited ones up to fork_seq, then its own."""
        events: list[Event] = []
        if after < info.fork_seq and info.forked_from is not None:
            inherited = await self._inherited(info.forked_from, after, info.fork_seq, limit)
            # Readers see the fork's events, whichever row holds them.
            events = [replace(e, stream_id=info.id) for e in inherited]
            after = events[-1].seq if events else info.fork_seq
        if len(events) < limit and after >= info.fork_seq:
            events += await self.store.read(info.id, after, limit - len(events), self.clock())
        return events

    async def _inherited(self, source_id: str, after: int, upto: int, limit: int) -> list[Event]:
        # A fork holds a reference on its source, so the rows are there even
        # when the source itself is gone.
        source = await self.store.info(source_id)
        if source is None:
            raise StreamError(Status.DATA_LOSS, f"fork source {source_id!r} is missing")
        events: list[Event] = []
        if after < source.fork_seq and source.forked_from is not None:
            events = await self._inherited(
                source.forked_from, after, min(upto, source.fork_seq), limit
            )
            after = events[-1].seq if events else min(upto, source.fork_seq)
        if len(events) < limit and after >= source.fork_seq and after < upto:
            events += await self.store.read_range(source_id, after, upto, limit - len(events))
        return events

    async def subscribe(self, stream_id: str, after: int | None = None) -> AsyncIterator[Event]:
        """Every event after the cursor, then live ones, ending after the terminal event.

        Raises NOT_FOUND here, before anything is yielded, so that a protocol can
        still answer 404 or 204. Use it with `contextlib.aclosing` (or run it to
        the end) so the reader is unregistered at once.
        """
        batches = await self.subscribe_batches(stream_id, after)
        return _flatten(batches)

    async def subscribe_batches(
        self, stream_id: str, after: int | None = None, idle_seconds: float | None = None
    ) -> AsyncIterator[list[Event]]:
        """Like `subscribe`, but yields whatever is available at once as one list.

        Protocols use it to put many events into one network write. With
        `idle_seconds`, an empty list comes whenever that long passes without
        an event: the SSE protocols' keepalive tick, at no cost per event.
        """
        news = self._untailed_news
        info = await self.info(stream_id)
        self._check_reader_capacity(stream_id)
        return self._follow(info, news, after or 0, idle_seconds)

    async def _follow(
        self, info: StreamInfo, news: int, cursor: int, idle_seconds: float | None = None
    ) -> AsyncIterator[list[Event]]:
        stream_id = info.id
        tail = self._attach(stream_id, info.last_seq, news)
        idle = None if idle_seconds is None else _IdleTimer(idle_seconds)
        # A first page of unknown event sizes is kept small; the next ones are
        # sized from the events read so far.
        limit = min(self.page_size, FIRST_PAGE_EVENTS)
        try:
            while True:
                events = tail.after(cursor)
                if events is None:
                    page = await self.read(stream_id, cursor, limit, info=info)
                    if not page:
                        raise not_found(stream_id)  # rows vanished below us: deleted
                    tail.offer(page)
                    events = _within_bytes(page, self.batch_bytes)
                    limit = _page_limit(page, self.batch_bytes, self.page_size)
                else:
                    events = _within_bytes(events, self.batch_bytes)
                if events:
                    yield events
                    # A batch is a run of the stream's events: only its last
                    # can be the terminal one.
                    if events[-1].is_terminal:
                        return
                    cursor = events[-1].seq
                    continue
                if tail.gone:
                    raise not_found(stream_id)
                if tail.failure is not None:
                    raise tail.failure
                # No safety timer per reader: one check for all tails runs in
                # _recheck_tails. The idle timeout is the caller's keepalive.
                if not await tail.wait(idle):
                    yield []
        finally:
            if idle is not None:
                idle.cancel()
            self._detach(tail)

    def _attach(self, stream_id: str, known_last: int, news: int) -> _Tail:
        """The stream's tail, made if it has none; `known_last` is the stream's
        last seq as read when `self._untailed_news` was `news`."""
        if self._rechecker is None or self._rechecker.done():
            self._rechecker = asyncio.create_task(self._recheck_tails(), name="streamkeep-recheck")
        tail = self._tails.get(stream_id)
        if tail is None or tail.gone:
            tail = _Tail(self, stream_id, known_last)
            tail.failure = self._stopped
            self._tails[stream_id] = tail
            if self._untailed_news != news:
                # Committed here, or hinted from elsewhere, while no tail could
                # take it: the row read may be older than that. Without this a
                # reader caught up at that row waited for the next commit or the
                # safety recheck (30 s) for events already stored.
                tail.request_refresh()
        elif known_last > tail.last_seq:
            tail.request_refresh()
        tail.readers += 1
        return tail

    def _check_reader_capacity(self, stream_id: str) -> None:
        tail = self._tails.get(stream_id)
        if tail is not None and tail.readers >= self.max_readers_per_stream:
            raise StreamError(
                Status.RESOURCE_EXHAUSTED,
                f"stream {stream_id!r} has {tail.readers} readers here, "
                f"the limit is {self.max_readers_per_stream}",
            )

    async def _recheck_tails(self) -> None:
        """Every safety_poll_seconds, every tail re-reads its rows and checks the stream
        still exists, whatever the wake-ups said (they are hints, and can be lost)."""
        while True:
            await asyncio.sleep(self.safety_poll_seconds)
            for tail in list(self._tails.values()):
                tail.request_refresh(check_gone=True)

    def _detach(self, tail: _Tail) -> None:
        tail.readers -= 1
        if tail.readers <= 0 and self._tails.get(tail.stream_id) is tail:
            del self._tails[tail.stream_id]

    # -- wake-ups ---------------------------------------------------------------

    def _publish(self, committed: list[Event]) -> None:
        """Hand freshly committed events to local tails: no read needed."""
        if not committed:
            return
        if not self._tails:
            self._untailed_news += 1
            return
        by_stream: dict[str, list[Event]] = {}
        for event in committed:
            by_stream.setdefault(event.stream_id, []).append(event)
        for stream_id, events in by_stream.items():
            tail = self._tails.get(stream_id)
            if tail is not None:
                tail.offer(events)
            else:
                self._untailed_news += 1

    def _commit_finished(self, streams: Iterable[str]) -> None:
        for stream_id in streams:
            self._committing.discard(stream_id)
            tail = self._tails.get(stream_id)
            if tail is not None and tail.held_hint:
                if tail.held_hint > tail.last_seq:
                    tail.request_refresh()
                tail.held_hint = 0

    @property
    def live_readers(self) -> int:
        return sum(tail.readers for tail in self._tails.values())

    def watched(self) -> dict[str, int]:
        """Streams with local readers and the last seq each has seen."""
        return {stream_id: tail.last_seq for stream_id, tail in self._tails.items()}

    def hint(self, stream_id: str, last_seq: int) -> None:
        """Another process committed up to `last_seq` (negative: deleted; huge: unknown)."""
        tail = self._tails.get(stream_id)
        if tail is None:
            self._untailed_news += 1
            return
        if last_seq < 0:
            tail.request_refresh(check_gone=True)
        elif stream_id in self._committing:
            # Probably our own commit announcing itself: its events are about to
            # be published without a read. Check again once it is.
            tail.held_hint = max(tail.held_hint, last_seq)
        elif last_seq > tail.last_seq:
            tail.request_refresh()

    def wake_all(self) -> None:
        """After a lost connection: every reader re-checks the rows."""
        for tail in self._tails.values():
            tail.request_refresh(check_gone=True)

    def stop_readers(self, error: StreamError | None = None) -> None:
        """End every live reader of this process once it is caught up (shutdown).

        Readers that are behind still get what is stored first; new
        subscriptions end as soon as they catch up.
        """
        self._stopped = error or StreamError(Status.UNAVAILABLE, "the service is shutting down")
        for tail in self._tails.values():
            tail.failure = self._stopped
            tail._notify()

    def fail_readers(self, stream_id: str, error: StreamError) -> None:
        """End this process's caught-up readers of a stream with `error`.

        For a producer whose terminal event could not be committed: its live
        readers learn of the failure now; the stream itself stays as stored.
        """
        tail = self._tails.get(stream_id)
        if tail is not None:
            tail.failure = error
            tail._notify()

    async def list_streams(
        self, status: StreamStatus | None = None, limit: int = 50
    ) -> list[StreamInfo]:
        """The newest streams first (for inspection; expired ones are left out)."""
        now = self.clock()
        found = await self.store.list_streams(status, limit)
        return [info for info in found if not info.expired(now)]

    async def count_open_streams(self) -> int:
        self.open_streams_seen = await self.store.count_streams(StreamStatus.OPEN)
        return self.open_streams_seen

    # -- retention --------------------------------------------------------------

    async def delete(self, stream_id: str) -> bool:
        """Delete a live stream; False if there is none.

        A stream that forks still read is only made gone (readers get NOT_FOUND,
        `find` shows it with `fork_count` > 0) and is deleted with its last fork.
        """
        deleted = await self.store.delete(stream_id, self.clock())
        tail = self._tails.get(stream_id)
        if deleted and tail is not None:
            tail.mark_gone()
        return deleted

    async def sweep(self, now: datetime | None = None) -> SweepReport:
        """End abandoned streams and delete expired ones (one pass, bounded batches)."""
        now = now or self.clock()
        async with self.store.sweep_lock() as granted:
            if not granted:
                return SweepReport(skipped=True)
            report = SweepReport()
            await self._end_abandoned(now, report)
            streams, events = await self.store.purge_expired(now, self.sweep_batch_size)
            report.deleted_streams, report.deleted_events = streams, events
            self.stats.abandoned_streams += report.abandoned
            self.stats.swept_streams += streams
            self.stats.swept_events += events
            return report

    async def _end_abandoned(self, now: datetime, report: SweepReport) -> None:
        abandoned = StreamError(Status.ABORTED, ABANDONED_MESSAGE)
        while ids := await self.store.find_abandoned(now, self.sweep_batch_size):
            futures = [
                self.submit(AppendRequest(i, [NewEvent.error(abandoned)], abandoned_by=now))
                for i in ids
            ]
            results = await asyncio.gather(*futures, return_exceptions=True)
            for stream_id, result in zip(ids, results, strict=True):
                if isinstance(result, list):
                    report.abandoned += 1
                    report.abandoned_ids.append(stream_id)
                elif isinstance(result, StreamError) and result.status in (
                    Status.FAILED_PRECONDITION,
                    Status.NOT_FOUND,
                ):
                    continue  # the producer wrote or finished at the last moment
                else:
                    raise result
            if len(ids) < self.sweep_batch_size:
                return

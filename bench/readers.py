"""Live readers of one stream that measure append-to-receipt latency and count queries.

Used in process by the live scenarios, and as a second process on the same
database (python -m bench.readers URL STREAM READERS), where the readers can
only learn of appends through the wake-ups between processes (SQLite poll,
Postgres NOTIFY). The child prints {"ready": ...} once every reader is
attached, then one JSON line of figures when the stream has ended.

The HTTP versions (bench/sse.py) share `Receipts`: an SSE reader calls
`Receipts.received` for every event it decodes; latency and delivery checks are
the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from app.log import StreamManager, create_manager
from bench.results import percentile

COUNTED_QUERIES = ("read", "info", "heads")


class QueryCounter:
    """Counts the store's read queries (read pages, info, SQLite head polls)."""

    def __init__(self, manager: StreamManager) -> None:
        self.counts = dict.fromkeys(COUNTED_QUERIES, 0)
        store: Any = manager.store
        for name in COUNTED_QUERIES:
            setattr(store, name, self._counted(name, getattr(store, name)))

    def _counted(self, name: str, method: Any) -> Any:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[name] += 1
            return await method(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.counts = dict.fromkeys(COUNTED_QUERIES, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Figures:
    readers: int
    deliveries: int  # chunk events received, summed over readers
    in_order: bool  # every reader saw 1, 2, 3, ... without gap or repeat
    p50_ms: float
    p99_ms: float
    queries: dict[str, int]


class Receipts:
    """What the readers of one stream received: every chunk's latency, and whether in order.

    Chunks carry the time they were handed to the log (bench.workload.stamped).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.latencies: list[float] = []
        self.deliveries = 0
        self.in_order = True
        self._sent_at: dict[int, float] = {}

    def received(self, seq: int, payload: bytes, now: float) -> None:
        sent_at = self._sent_at.get(seq)
        if sent_at is None:  # decode each event once, not once per reader
            sent_at = self._sent_at[seq] = json.loads(payload)["t"]
        self.latencies.append(now - sent_at)
        self.deliveries += 1

    def figures(self, queries: dict[str, int]) -> Figures:
        return Figures(
            readers=self.count,
            deliveries=self.deliveries,
            in_order=self.in_order,
            p50_ms=percentile(self.latencies, 50) * 1000,
            p99_ms=percentile(self.latencies, 99) * 1000,
            queries=queries,
        )


class Readers(Receipts):
    """N subscribers of one stream; each records the latency of every chunk it receives."""

    def __init__(self, manager: StreamManager, stream_id: str, count: int) -> None:
        super().__init__(count)
        self.manager = manager
        self.stream_id = stream_id
        self._subscribed = 0
        self._all_subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Subscribe every reader; returns once all of them wait for events."""
        self._tasks = [asyncio.create_task(self._read()) for _ in range(self.count)]
        await self._all_subscribed.wait()
        await asyncio.sleep(0.05)  # let the last ones reach their wait

    async def _read(self) -> None:
        subscription = await self.manager.subscribe(self.stream_id)
        self._subscribed += 1
        if self._subscribed == self.count:
            self._all_subscribed.set()
        expected = 1
        async with contextlib.aclosing(subscription) as events:  # type: ignore[type-var]
            async for event in events:
                if event.seq != expected:
                    self.in_order = False
                expected = event.seq + 1
                if not event.is_terminal:
                    self.received(event.seq, event.payload, time.monotonic())

    async def finish(self, within: float) -> None:
        await asyncio.wait_for(asyncio.gather(*self._tasks), within)


async def _child(url: str, stream_id: str, count: int, within: float) -> None:
    async with create_manager(url) as manager:
        counter = QueryCounter(manager)
        readers = Readers(manager, stream_id, count)
        await readers.start()
        counter.reset()
        print(json.dumps({"ready": True}), flush=True)
        await readers.finish(within)
        print(json.dumps(asdict(readers.figures(counter.counts))), flush=True)


if __name__ == "__main__":
    url_arg, stream_arg, count_arg, timeout_arg = sys.argv[1:5]
    asyncio.run(_child(url_arg, stream_arg, int(count_arg), float(timeout_arg)))

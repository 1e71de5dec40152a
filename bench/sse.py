"""SSE readers over HTTP, in processes of their own, and the HTTP producer that feeds them.

The HTTP versions of scenarios 3, 4 and 7 read the service's native SSE route,
`GET /v1/streams/{id}/events`, as real clients: each reader is one connection
of aiohttp (its C HTTP parser keeps 1,000 connections cheap, where httpx parses
in Python), decodes every frame and hands the chunks to `Receipts.received`,
so latency, delivery and order are judged exactly as for the log-level readers.

A reader process runs as

    python -m bench.sse BASE_URL PREFIX FIRST STREAMS PER_STREAM TIMEOUT OUT

reading streams PREFIX<FIRST> .. PREFIX<FIRST+STREAMS-1>, PER_STREAM readers
each. It prints {"connected": ...} once every reader has its response (or
failed), then, when every reader has seen the `end` frame, one JSON line of
counts; the latencies go to the file OUT (a JSON line holds 64 KiB at most).
"""

from __future__ import annotations

import array
import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import Child
from bench.readers import Figures, Receipts
from bench.results import percentile
from bench.workload import paced, stamped

END_EVENT = "end"
PRODUCER_CONNECTIONS = 16


# -- the reader process ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    id: int | None
    event: str
    data: bytes


class SseDecoder:
    """Frames from the bytes of an SSE body, fed as they arrive.

    Handles CRLF (what streamkeep sends) and LF line ends; comments and retry
    hints give no frame. A bare CR as line end (allowed, never sent here) is not handled.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[Frame]:
        # A CR at the end of `_rest` meets its LF in the next chunk here.
        *blocks, self._rest = (self._rest + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        frames = []
        for block in blocks:
            frame = self._frame(block)
            if frame is not None:
                frames.append(frame)
        return frames

    @staticmethod
    def _frame(block: bytes) -> Frame | None:
        seq, event, data = None, "message", []
        for line in block.split(b"\n"):
            name, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if name == b"data":
                data.append(value)
            elif name == b"id":
                seq = int(value)
            elif name == b"event":
                event = value.decode()
        if not data and seq is None:
            return None  # retry hint or keepalive comment
        return Frame(seq, event, b"\n".join(data))


class ReaderProcess:
    """The readers of one process: they connect, then read until their stream's end."""

    def __init__(self, base_url: str, stream_ids: list[str], per_stream: int) -> None:
        self.urls = [f"{base_url}/v1/streams/{s}/events" for s in stream_ids] * per_stream
        self.receipts = Receipts(len(self.urls))
        self.failures: list[str] = []
        self._settled = 0  # readers connected or failed
        self._all_settled = asyncio.Event()

    def _settle(self) -> None:
        self._settled += 1
        if self._settled == len(self.urls):
            self._all_settled.set()

    async def run(self, within: float) -> None:
        # No connection limit (aiohttp's default is 100) and no read timeout: idle is normal.
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = [asyncio.create_task(self._guarded(session, url)) for url in self.urls]
            await self._all_settled.wait()
            _message(connected=len(self.urls) - len(self.failures), cpu=_cpu_seconds())
            _, late = await asyncio.wait(tasks, timeout=within)
            for task in late:
                task.cancel()
                self.failures.append(f"still reading after {within:.0f} s")
            if late:
                await asyncio.wait(late)

    async def _guarded(self, session: aiohttp.ClientSession, url: str) -> None:
        connected = False
        try:
            async with session.get(url, headers={"Accept": "text/event-stream"}) as response:
                response.raise_for_status()
                connected = True
                self._settle()
                if not await self._read(response):
                    self.failures.append("the body ended before the end frame")
        except (aiohttp.ClientError, ValueError) as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
            if not connected:
                self._settle()

    async def _read(self, response: aiohttp.ClientResponse) -> bool:
        """Feed every chunk to the receipts; True once the `end` frame came."""
        decoder = SseDecoder()
        expected = 1
        async for chunk in response.content.iter_any():
            now = time.monotonic()  # one network read: every frame in it arrived now
            for frame in decoder.feed(chunk):
                if frame.id != expected:
                    self.receipts.in_order = False
                if frame.event == END_EVENT:
                    return True
                if frame.id is not None:
                    expected = frame.id + 1
                    self.receipts.received(frame.id, frame.data, now)
        return False

    def report(self, out: Path) -> None:
        with out.open("wb") as file:
            array.array("d", self.receipts.latencies).tofile(file)
        _message(
            deliveries=self.receipts.deliveries,
            in_order=self.receipts.in_order,
            failures=len(self.failures),
            first_failure=self.failures[0] if self.failures else "",
            cpu=_cpu_seconds(),
        )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _message(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def _child(argv: list[str]) -> None:
    base_url, prefix, first, streams, per_stream, within, out = argv
    ids = stream_ids(prefix, int(first), int(streams))
    readers = ReaderProcess(base_url, ids, int(per_stream))
    await readers.run(float(within))
    readers.report(Path(out))


def stream_ids(prefix: str, first: int, count: int) -> list[str]:
    return [f"{prefix}{n}" for n in range(first, first + count)]


# -- the scenario's side ---------------------------------------------------------------


@dataclass(frozen=True)
class SseLoad:
    """Streams PREFIX0 .. PREFIX<streams-1>, each read by `per_stream` SSE readers."""

    prefix: str
    streams: int
    per_stream: int

    @property
    def readers(self) -> int:
        return self.streams * self.per_stream

    @property
    def stream_ids(self) -> list[str]:
        return stream_ids(self.prefix, 0, self.streams)

    def shares(self, processes: int) -> list[tuple[int, int, int]]:
        """(first stream, streams, readers per stream) for each reader process."""
        if self.streams == 1:  # one stream: split its readers
            per = [len(range(p, self.per_stream, processes)) for p in range(processes)]
            return [(0, 1, n) for n in per if n]
        cuts = [self.streams * p // processes for p in range(processes + 1)]
        return [(a, b - a, self.per_stream) for a, b in pairwise(cuts) if b > a]


@dataclass
class SseFigures(Figures):
    failures: int
    first_failure: str
    cpu: float  # the reader processes' CPU seconds while the events flowed


class SseReaders:
    """Reader processes (python -m bench.sse) on one service, seen as one set of readers."""

    def __init__(self, children: list[Child], outs: list[Path], load: SseLoad) -> None:
        self.children = children
        self.outs = outs
        self.load = load
        self._cpu_at_connect = 0.0

    @classmethod
    async def start(
        cls, base_url: str, load: SseLoad, processes: int, scratch: Path, within: float
    ) -> SseReaders:
        children, outs = [], []
        for n, (first, streams, per_stream) in enumerate(load.shares(processes)):
            out = scratch / f"sse-{load.prefix}{n}.latencies"
            args = [base_url, load.prefix, str(first), str(streams), str(per_stream)]
            child = await Child.start(
                f"sse-readers-{n}", "-m", "bench.sse", *args, str(within), str(out), python=True
            )
            children.append(child)
            outs.append(out)
        return cls(children, outs, load)

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    async def connected(self, within: float) -> int:
        """Readers whose response started (all of them unless some failed)."""
        replies = await asyncio.gather(*(c.message(within) for c in self.children))
        self._cpu_at_connect = sum(r["cpu"] for r in replies)
        return sum(int(r["connected"]) for r in replies)

    async def finish(self, within: float) -> SseFigures:
        """What every reader received, once all have seen the end (queries: the caller's)."""
        replies = await asyncio.gather(*(c.message(within) for c in self.children))
        latencies: list[float] = []
        for out in self.outs:
            samples = array.array("d")
            samples.frombytes(out.read_bytes())
            latencies.extend(samples)
        failures = [r["first_failure"] for r in replies if r["failures"]]
        return SseFigures(
            readers=self.load.readers,
            deliveries=sum(r["deliveries"] for r in replies),
            in_order=all(r["in_order"] for r in replies),
            p50_ms=percentile(latencies, 50) * 1000,
            p99_ms=percentile(latencies, 99) * 1000,
            queries={},
            failures=sum(r["failures"] for r in replies),
            first_failure=failures[0] if failures else "",
            cpu=sum(r["cpu"] for r in replies) - self._cpu_at_connect,
        )

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.children))


# -- the service: streams, appends and its own counters ------------------------------------


def events_path(stream_id: str) -> str:
    return f"/v1/streams/{stream_id}/events"


def service_session(base_url: str) -> aiohttp.ClientSession:
    """The producer's and the scenario's connections to the service.

    aiohttp here too: httpx's pool fell far behind 500 concurrent POSTs a second
    (5,000 appends took 50 s), which would have measured the producer's queue.
    """
    return aiohttp.ClientSession(
        base_url=base_url,
        connector=aiohttp.TCPConnector(limit=PRODUCER_CONNECTIONS),
        timeout=aiohttp.ClientTimeout(total=60),
        raise_for_status=True,
    )


async def create_streams(session: aiohttp.ClientSession, stream_ids: list[str]) -> None:
    """Create the streams, a few requests at a time; no idle timeout (a bench pauses)."""
    gate = asyncio.Semaphore(PRODUCER_CONNECTIONS)

    async def create(stream_id: str) -> None:
        body = {"idle_timeout_seconds": None}
        async with gate, session.put(f"/v1/streams/{stream_id}", json=body) as response:
            await response.read()

    await asyncio.gather(*(create(s) for s in stream_ids))


async def produce_over_http(
    session: aiohttp.ClientSession, stream_id: str, rate: float, seconds: float
) -> tuple[int, int]:
    """POST stamped events at `rate`, then end the stream; (events appended, failed appends).

    Each append is its own task, so a slow commit delays no later append: the
    stamp is the time the POST is started, whatever is still in flight.
    """
    tasks: list[asyncio.Task[None]] = []

    async def post(body: dict[str, Any]) -> None:
        async with session.post(events_path(stream_id), json=body) as response:
            await response.read()

    async def append(n: int) -> None:
        tasks.append(asyncio.create_task(post({"data": stamped(n)})))

    count = await paced(rate, seconds, append)
    replies = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(1 for r in replies if isinstance(r, BaseException))
    done = {"output": {"events": count}}
    async with session.post(f"/v1/streams/{stream_id}/done", json=done) as response:
        await response.read()
    return count - failed, failed


async def service_metrics(session: aiohttp.ClientSession) -> dict[str, float]:
    """The service's own counters from its Prometheus /metrics (unlabelled ones)."""
    async with session.get("/metrics") as response:
        return unlabelled_metrics(await response.text())


def unlabelled_metrics(text: str) -> dict[str, float]:
    """streamkeep's unlabelled samples in a Prometheus text exposition, by name."""
    values = {}
    for line in text.splitlines():
        if line.startswith("streamkeep_") and "{" not in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def counted_since(
    before: dict[str, float], after: dict[str, float], names: tuple[str, ...]
) -> dict[str, int]:
    """How much each counter streamkeep_<name> grew between two scrapes."""
    keys = {name: f"streamkeep_{name}_total" for name in names}
    return {name: round(after.get(key, 0) - before.get(key, 0)) for name, key in keys.items()}


async def wait_for_live_readers(session: aiohttp.ClientSession, count: int, within: float) -> None:
    """Until the service follows `count` readers: connected is not yet attached."""
    deadline = time.monotonic() + within
    while (await service_metrics(session)).get("streamkeep_live_readers", 0) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service did not attach {count} SSE readers in {within} s")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1:]))

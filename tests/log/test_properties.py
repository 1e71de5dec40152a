"""Property tests of the log: whatever the interleaving of writers, readers, resumes and
sweeps, every reader gets each event exactly once and in order."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.log import EventKind, StreamManager, create_manager
from tests.support import FakeClock, copy_sqlite

STREAMS = ["a", "b", "c"]


@dataclass(frozen=True)
class Op:
    kind: str  # write | burst | finish | read | resume | sweep | tick
    stream: str
    amount: int


ops = st.lists(
    st.builds(
        Op,
        kind=st.sampled_from(["write", "burst", "finish", "read", "resume", "sweep", "tick"]),
        stream=st.sampled_from(STREAMS),
        amount=st.integers(min_value=0, max_value=12),
    ),
    min_size=1,
    max_size=40,
)


async def run_program(manager: StreamManager, clock: FakeClock, program: list[Op]) -> None:
    """Runs the operations with readers as concurrent tasks, then checks what they got."""
    written: dict[str, list[int]] = {s: [] for s in STREAMS}
    finished: set[str] = set()
    readers: list[tuple[str, int, asyncio.Task[list[Any]]]] = []
    for s in STREAMS:
        await manager.open(s, ttl_seconds=10**6, idle_timeout_seconds=None)

    async def read(stream: str, after: int) -> list[Any]:
        events = await manager.subscribe(stream, after=after)
        seen: list[Any] = []
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for event in events:
                seen.append((event.seq, event.kind, event.json()))
        return seen

    for op in program:
        writer = manager.writer(op.stream)
        if op.kind in ("write", "burst") and op.stream not in finished:
            values = list(range(len(written[op.stream]), len(written[op.stream]) + op.amount))
            if op.kind == "write":
                for v in values:
                    await writer.write(v)
            else:
                for v in values:
                    writer.push(v)
                await writer.flush()
            written[op.stream].extend(values)
        elif op.kind == "finish" and op.stream not in finished:
            await writer.done(len(written[op.stream]))
            finished.add(op.stream)
        elif op.kind in ("read", "resume"):
            after = min(op.amount, len(written[op.stream])) if op.kind == "resume" else 0
            readers.append((op.stream, after, asyncio.create_task(read(op.stream, after))))
        elif op.kind == "sweep":
            await manager.sweep()
        elif op.kind == "tick":
            clock.advance(op.amount)  # far below the TTL: finished streams stay readable
        await asyncio.sleep(0)
    for s in STREAMS:
        if s not in finished:
            await manager.writer(s).done(len(written[s]))
    for stream, after, task in readers:
        seen = await asyncio.wait_for(task, 30)
        expected_chunks = written[stream][after:]
        assert [seq for seq, _, _ in seen] == list(range(after + 1, len(written[stream]) + 2))
        assert [v for _, kind, v in seen if kind is EventKind.CHUNK] == expected_chunks
        assert seen[-1][1] is EventKind.DONE


PROPERTY_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(program=ops)
def test_any_interleaving_in_memory(program: list[Op]) -> None:
    clock = FakeClock()

    async def main() -> None:
        async with create_manager("memory", clock=clock) as manager:
            await run_program(manager, clock, program)

    asyncio.run(main())


@PROPERTY_SETTINGS
@given(program=ops)
def test_any_interleaving_on_sqlite(
    program: list[Op], sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    clock = FakeClock()
    url = copy_sqlite(sqlite_template, tmp_path_factory.mktemp("prop") / "p.db")

    async def main() -> None:
        async with create_manager(url, clock=clock, sqlite_poll_seconds=0.01) as manager:
            await run_program(manager, clock, program)

    asyncio.run(main())


@pytest.mark.postgres
@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=ops)
def test_any_interleaving_on_postgres(program: list[Op], pg_server: Any) -> None:
    from tests.support import drop_database, new_database

    clock = FakeClock()
    name, url = new_database(pg_server)

    async def main() -> None:
        async with create_manager(url, clock=clock) as manager:
            await run_program(manager, clock, program)

    try:
        asyncio.run(main())
    finally:
        drop_database(pg_server, name)

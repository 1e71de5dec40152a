"""A writer in one OS process and a reader in another, on one SQLite file or one Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from app.log import Event, EventKind, create_manager
from tests.support import ROOT

pytestmark = pytest.mark.slow


async def test_reader_follows_a_writer_in_another_process(shared_url: str) -> None:
    async with create_manager(shared_url, sqlite_poll_seconds=0.02) as manager:
        await manager.open("x")
        received: list[Event] = []

        async def read() -> None:
            async with contextlib.aclosing(await manager.subscribe("x")) as stream:  # type: ignore[type-var]
                async for event in stream:
                    received.append(event)

        reader = asyncio.create_task(read())
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.log.producer_process",
            shared_url,
            "x",
            "60",
            "5",
            cwd=ROOT,
        )
        assert await asyncio.wait_for(child.wait(), 60) == 0
        await asyncio.wait_for(reader, 30)
    assert [e.seq for e in received] == list(range(1, 62))
    assert [e.json()["n"] for e in received if e.kind is EventKind.CHUNK] == list(range(60))
    assert received[-1].kind is EventKind.DONE
    assert received[-1].json() == {"written": 60}


async def test_two_processes_writing_one_stream_leave_no_gap(shared_url: str) -> None:
    async with create_manager(shared_url) as manager:
        await manager.open("hot")
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "import asyncio, sys\n"
                "from app.log import create_manager\n"
                "async def go():\n"
                "    async with create_manager(sys.argv[1]) as m:\n"
                "        w = m.writer('hot')\n"
                "        for i in range(50):\n"
                "            await w.write([sys.argv[2], i])\n"
                "asyncio.run(go())\n",
                shared_url,
                name,
                cwd=ROOT,
            )
            for name in ("a", "b", "c")
        ]
        local = manager.writer("hot")
        for i in range(50):
            await local.write(["local", i])
        for child in children:
            assert await asyncio.wait_for(child.wait(), 60) == 0
        events = await manager.read("hot", limit=1000)
    assert [e.seq for e in events] == list(range(1, 201))
    values = [tuple(e.json()) for e in events]
    for name in ("a", "b", "c", "local"):
        assert [i for n, i in values if n == name] == list(range(50))

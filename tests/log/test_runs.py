"""Runs: the background producers' table, shared by the flows and the app's proxied calls."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app.log.tasks import Runs


async def test_a_run_is_found_by_its_key_until_it_ends() -> None:
    runs = Runs()
    release = asyncio.Event()
    task = runs.start("s1", _wait(release))
    assert runs.get("s1") is task
    release.set()
    await task
    await asyncio.sleep(0)  # the done callback
    assert runs.get("s1") is None


async def test_a_renamed_run_leaves_under_its_new_key() -> None:
    runs = Runs()
    release = asyncio.Event()
    task = runs.start("pending", _wait(release))
    runs.rename("pending", "s2")
    assert runs.get("pending") is None and runs.get("s2") is task
    release.set()
    await task
    await asyncio.sleep(0)
    assert runs.get("s2") is None


async def test_a_key_started_again_keeps_the_newer_run() -> None:
    runs = Runs()
    first, second = asyncio.Event(), asyncio.Event()
    older = runs.start("s3", _wait(first))
    newer = runs.start("s3", _wait(second))
    first.set()
    await older
    await asyncio.sleep(0)
    assert runs.get("s3") is newer
    second.set()
    await newer


async def test_close_cancels_every_run_and_lets_it_record_its_end() -> None:
    runs = Runs()
    recorded: list[str] = []

    async def producer(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # writing how the stream ended
            recorded.append(name)
            raise

    runs.start("a", producer("a"))
    runs.start("b", producer("b"))
    await asyncio.sleep(0)
    await runs.close(grace_seconds=5)
    assert sorted(recorded) == ["a", "b"]


async def test_a_run_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    runs = Runs()

    async def broken() -> None:
        raise RuntimeError("upstream exploded")

    with caplog.at_level(logging.ERROR, logger="streamkeep.runs"):
        task = runs.start("s4", broken(), name="flow-broken")
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)
    assert "flow-broken failed" in caplog.text
    assert runs.get("s4") is None


async def _wait(event: asyncio.Event) -> None:
    await event.wait()

"""Background-task helpers shared by the log and the service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("streamkeep.runs")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished its cleanup."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Runs:
    """Background producers by key (a stream id), owned by whoever starts them rather
    than by a request: the app's proxied calls and demos (app.protocols.runs), and
    the flows (app.flows.runner)."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Each task's key, so that a run that ends leaves in one step, not a scan
        # (a busy service has thousands of flows running).
        self._keys: dict[asyncio.Task[None], str] = {}

    def start(
        self, key: str, work: Coroutine[Any, Any, None], name: str | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name or f"streamkeep-run-{key}")
        self._tasks[key] = task
        self._keys[task] = key
        task.add_done_callback(self._finished)
        return task

    def rename(self, old: str, new: str) -> None:
        """A proxied call learns its stream id only from its first upstream event."""
        task = self._tasks.pop(old, None)
        if task is not None and not task.done():
            self._tasks[new] = task
            self._keys[task] = new

    def get(self, key: str) -> asyncio.Task[None] | None:
        return self._tasks.get(key)

    def _finished(self, task: asyncio.Task[None]) -> None:
        key = self._keys.pop(task, None)
        if key is not None and self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def close(self, grace_seconds: float) -> None:
        """Cancel every run and give them `grace_seconds` to record how they ended."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_seconds)
            if late:
                log.warning("%d runs did not record their end before shutdown", len(late))

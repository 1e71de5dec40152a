"""Producers that run inside the service, owned by the app rather than by a request.

A proxied LLM call or a demo keeps writing its stream after the client that
started it has gone, so its task cannot belong to that request: Litestar
cancels a request's work when its client disconnects. The app owns these
tasks instead, and at shutdown cancels them while the log is still open, so
each one can still write how its stream ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request

log = logging.getLogger("streamkeep.runs")


class Runs:
    """The app's background producers, by stream id."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, key: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=f"streamkeep-run-{key}")
        self._tasks[key] = task
        task.add_done_callback(self._finished)
        return task

    def rename(self, old: str, new: str) -> None:
        """A proxied call learns its stream id only from its first upstream event."""
        task = self._tasks.pop(old, None)
        if task is not None and not task.done():
            self._tasks[new] = task

    def get(self, key: str) -> asyncio.Task[None] | None:
        return self._tasks.get(key)

    def _finished(self, task: asyncio.Task[None]) -> None:
        for key in [k for k, t in self._tasks.items() if t is task]:
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


def runs_of(request: Request) -> Runs:  # type: ignore[type-arg]
    runs: Runs = request.app.state.runs
    return runs


@asynccontextmanager
async def runs_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Runs entered after the log is up and closed before it shuts down."""
    runs = Runs()
    app.state.runs = runs
    try:
        yield
    finally:
        await runs.close(app.state.settings.shutdown_timeout_seconds)

"""Producers that run inside the service, owned by the app rather than by a request.

A proxied LLM call or a demo keeps writing its stream after the client that
started it has gone, so its task cannot belong to that request: Litestar
cancels a request's work when its client disconnects. The app owns these
tasks instead, and at shutdown cancels them while the log is still open, so
each one can still write how its stream ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Request

from app.log.tasks import Runs


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

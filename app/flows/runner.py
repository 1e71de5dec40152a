"""Running flows durably: every run is a stream of the log, detached from any request.

The run goes on when its client disconnects. Chunks are pipelined into group
commits (a flow never waits a commit per chunk), and the run ends with exactly
one terminal event: done, or error when the flow raises, a chunk could not be
stored, or the service shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import Any

from app.errors import Status, StreamError
from app.flows import Flow
from app.log import StreamManager, StreamWriter
from app.log.tasks import Runs

log = logging.getLogger("streamkeep.flows")

SHUTDOWN_ERROR = StreamError(
    Status.UNAVAILABLE, "the service stopped during this run; start the flow again"
)


class FlowRunner:
    def __init__(self, manager: StreamManager, *, terminal_retry_seconds: float = 60.0) -> None:
        self.manager = manager
        self.terminal_retry_seconds = terminal_retry_seconds
        self._runs = Runs()

    async def start(self, flow: Flow, data: Any) -> str:
        """Open the run's stream (raising if it cannot be stored), then run the flow."""
        stream_id = str(uuid.uuid4())
        writer = await self.manager.open(stream_id, origin="flows")
        self._runs.start(stream_id, self._run(flow, data, writer), name=f"flow-{flow.name}")
        return stream_id

    async def _run(self, flow: Flow, data: Any, writer: StreamWriter) -> None:
        def send_chunk(chunk: Any) -> Awaitable[None]:
            # Raises a storage failure of an earlier chunk: the flow stops there.
            try:
                return writer.push(chunk)
            except TypeError as exc:
                raise StreamError(
                    Status.INVALID_ARGUMENT, f"chunk is not JSON-serialisable: {exc}"
                ) from exc

        try:
            output = await flow.function(data, send_chunk)
            error = None
        except asyncio.CancelledError:
            await self._record(writer, None, SHUTDOWN_ERROR)
            raise
        except StreamError as exc:
            output, error = None, exc
        except Exception:
            log.exception("flow %s failed", flow.name)
            output, error = None, StreamError(Status.INTERNAL, "internal error")
        await self._record(writer, output, error)

    async def _record(self, writer: StreamWriter, output: Any, error: StreamError | None) -> None:
        try:
            # A chunk that could not be stored fails the run: never `done` with a hole.
            await writer.flush()
        except StreamError as failure:
            error = failure
            writer = self.manager.writer(writer.stream_id)
        try:
            if error is None:
                try:
                    await writer.done(output)
                except TypeError:
                    error = StreamError(Status.INTERNAL, "the flow's output is not JSON")
            if error is not None:
                await writer.error(error)
        except StreamError as exc:
            if exc.status is Status.FAILED_PRECONDITION:
                return  # already ended (the idle sweep got there first)
            await self._record_later(writer.stream_id, error or exc)

    async def _record_later(self, stream_id: str, error: StreamError) -> None:
        """Storage refused the terminal event: tell live readers now, store it when we can."""
        self.manager.fail_readers(stream_id, error)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.terminal_retry_seconds
        delay = 0.1
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                await self.manager.writer(stream_id).error(error)
                return
            except StreamError as exc:
                if exc.status in (Status.FAILED_PRECONDITION, Status.NOT_FOUND):
                    return
        log.error("could not record the end of run %s; the idle sweep will end it", stream_id)

    async def shutdown(self, grace_seconds: float = 10.0) -> None:
        """End every running flow with an error, so no run stays open after we stop."""
        await self._runs.close(grace_seconds)

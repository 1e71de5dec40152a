"""The least durable append endpoint: the no-op server, each append committed before its 204.

The no-op endpoint is the framework's ceiling; this is what the same framework
and server reach when every append is also committed, with nothing else done:
the route answered past Litestar's handler pipeline, as streamkeep answers its
Durable Streams appends; the body read; the append queued to a bare group
committer (one queue, one committer task, a future per append: the in-process
same-work ceilings' BareGroupCommit, gathering the appends on their way as the
service does) that moves each stream's row and inserts the event with the
stdlib driver, on the loop's thread, checkpointing off it as the service does.
No protocol, no checks, no log.

What streamkeep does beyond this (the protocol's headers and rules, the log's
planning and checks, the access log, authorization) is its own cost; what
this server costs beyond the no-op is the database's.

    python -m bench.durable_noop PORT DATABASE_URL STREAMS

SQLite only: the Postgres service runs several commits at once on a pool, which
one bare connection would not match. Its streams are `durable-0` ..
`durable-{STREAMS-1}`, created at start-up in a database the server migrates.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

from litestar import Litestar, get, post
from litestar.types import ASGIApp, Receive, Scope, Send

from app.migrate import upgrade
from bench.noop_server import serve
from bench.scenarios.ceilings import BareGroupCommit, sqlite_writer

ANSWER_START = {
    "type": "http.response.start",
    "status": 204,
    "headers": [(b"stream-next-offset", b"0")],
}
ANSWER_END = {"type": "http.response.body", "body": b""}


def stream_ids(count: int) -> list[str]:
    return [f"durable-{i}" for i in range(count)]


def create_app(database_url: str, streams: int) -> Litestar:
    committer: list[BareGroupCommit] = []  # set by the lifespan

    @contextlib.asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        await upgrade(database_url)
        ids = stream_ids(streams)
        async with sqlite_writer(database_url, ids) as commit:
            group = BareGroupCommit(commit, ids, gather=True)
            committer.append(group)
            running = asyncio.create_task(group.run())
            try:
                yield
            finally:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running

    def answer_directly(app: ASGIApp) -> ASGIApp:  # Litestar passes `app=`
        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            more = True
            while more:  # the body, as an append handler reads it
                message = await receive()
                more = bool(message.get("more_body", False))
            await committer[0].append(scope["path_params"]["stream"])
            await send(ANSWER_START)  # type: ignore[arg-type]
            await send(ANSWER_END)  # type: ignore[arg-type]

        return answer

    @post("/durable/{stream:str}", middleware=[answer_directly], status_code=204)
    async def durable_append(stream: str) -> None:
        raise AssertionError("answered by its middleware")

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar(route_handlers=[durable_append, healthz], lifespan=[lifespan])


if __name__ == "__main__":
    serve(create_app(sys.argv[2], int(sys.argv[3])), int(sys.argv[1]))

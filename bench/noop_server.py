"""A Litestar app that does nothing, served exactly the way `streamkeep serve` serves ours.

Its throughput is the ceiling of the framework and server on this machine: an
HTTP scenario of streamkeep is reported as a ratio to it.

    python -m bench.noop_server PORT
"""

from __future__ import annotations

import sys

import uvicorn
from litestar import Litestar, Request, get, post
from litestar.response import Response


@post("/noop/{stream:str}", status_code=204)
async def noop_append(stream: str, request: Request) -> Response[None]:  # type: ignore[type-arg]
    # Read the body like an append handler would, then answer as an append does (204).
    await request.body()
    return Response(None, status_code=204, headers={"Stream-Next-Offset": "0"})


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


app = Litestar(route_handlers=[noop_append, healthz])


def serve(asgi_app: Litestar, port: int) -> None:
    # The same uvicorn settings as app.cli's serve command: one worker, default loop and parser.
    uvicorn.run(
        asgi_app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    serve(app, int(sys.argv[1]))

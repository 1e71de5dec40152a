"""Wire protocols: thin modules that parse a request, call the log, encode the answer.

None of them writes SQL; each exposes a Litestar Router that app.server mounts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from litestar import Litestar, Request, Router

from app.log import StreamManager
from app.protocols.durable_streams_codec import EXPOSED_HEADERS as DURABLE_STREAMS_HEADERS

# Response headers that browsers' scripts may read, whatever the protocol (CORS).
EXPOSED_HEADERS = ["X-Genkit-Stream-Id", "X-Streamkeep-Read-Token", *DURABLE_STREAMS_HEADERS]

Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


BODIES_KEY = "streamkeep.bodies"


def closing_body(request: Request, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:  # type: ignore[type-arg]
    """Register a streaming body so that it is closed when its response ends, however it ends.

    Litestar does not close a body iterator whose client went away while a
    send was pending; app.server's stream guard does, through this list.
    """
    scope: dict[str, Any] = request.scope  # type: ignore[assignment]
    scope.setdefault(BODIES_KEY, []).append(body)
    return body


async def close_bodies(scope: Any) -> None:
    for body in scope.pop(BODIES_KEY, []):
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def manager_of(request: Request) -> StreamManager:  # type: ignore[type-arg]
    """The process's StreamManager, set up by the app's lifespan."""
    manager: StreamManager = request.app.state.manager
    return manager


def protocol_routers() -> list[Router]:
    # Imported here: the protocol modules import manager_of from this package.
    from app.flows import registry
    from app.protocols import events, openai_proxy, page
    from app.protocols.durable_streams import durable_streams_router
    from app.protocols.genkit import flow_router

    return [
        flow_router(registry, lambda request: request.app.state.runner),
        events.router,
        openai_proxy.router,
        page.router,
        durable_streams_router(),
    ]


def protocol_lifespans() -> list[Lifespan]:
    """Set-up and tear-down of protocols: entered after the log is up, left in
    reverse order before it closes (so background runs can record how they ended)."""
    from app.protocols.openai_proxy import upstream_lifespan
    from app.protocols.runs import runs_lifespan

    return [upstream_lifespan, runs_lifespan]

"""The HTTP service: wires the log, its wake-ups and the sweeper into Litestar."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import Authority, KeysFileWatch, auth_middleware, watch_keys_file
from app.config import Settings
from app.errors import Status, StreamError, http_status, retry_headers
from app.flows import load_flow_modules
from app.flows.runner import FlowRunner
from app.log import StreamManager, create_manager
from app.log.db import is_sqlite, normalize_url
from app.log.tasks import cancel_and_wait
from app.migrate import check_at_head, upgrade
from app.observability import Metrics, request_log_middleware
from app.protocols import (
    EXPOSED_HEADERS,
    close_bodies,
    has_bodies,
    protocol_lifespans,
    protocol_routers,
)
from app.protocols.openapi import openapi_config
from app.protocols.ops import ops_router

log = logging.getLogger("streamkeep")


def build_manager(settings: Settings) -> StreamManager:
    return create_manager(
        settings.database_url,
        ttl_seconds=settings.ttl_seconds,
        idle_timeout_seconds=settings.idle_timeout,
        sqlite_poll_seconds=settings.sqlite_poll_seconds,
        sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        sqlite_synchronous=settings.sqlite_synchronous,
        safety_poll_seconds=settings.safety_poll_seconds,
        sweep_batch_size=settings.sweep_batch_size,
        pool_size=settings.pool_size,
        max_event_bytes=settings.max_event_bytes,
        max_readers_per_stream=settings.max_readers_per_stream,
        max_open_streams=settings.max_open_streams or None,
    )


async def prepare_schema(settings: Settings) -> None:
    """Migrate (when allowed) or refuse to run on a schema that is not at head."""
    if settings.database_url == "memory":
        return
    auto = settings.auto_migrate
    if auto is None:
        auto = is_sqlite(normalize_url(settings.database_url))
    if auto:
        await upgrade(settings.database_url)
    await check_at_head(settings.database_url)


async def sweep_forever(manager: StreamManager, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            report = await manager.sweep()
        except Exception:
            log.exception("sweep failed; trying again in %.0f s", interval)
            continue
        if report.abandoned or report.deleted_streams:
            log.info(
                "sweep: ended %d abandoned streams, deleted %d streams (%d events)",
                report.abandoned,
                report.deleted_streams,
                report.deleted_events,
            )


def stream_error_response(_request: Request[Any, Any, Any], exc: StreamError) -> Response[Any]:
    """Any StreamError that reaches the framework: its status, as JSON; 503s say when to retry."""
    status = http_status(exc)
    return Response({"error": exc.to_dict()}, status_code=status, headers=retry_headers(status))


def http_error_response(_request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """The framework's own errors (unknown route, body too large, ...) in the same shape."""
    status = STATUS_FOR_HTTP.get(exc.status_code, Status.UNKNOWN)
    error = StreamError(status, str(exc.detail), getattr(exc, "extra", None) or None)
    return Response(
        {"error": error.to_dict()}, status_code=exc.status_code, headers=exc.headers or {}
    )


STATUS_FOR_HTTP = {
    400: Status.INVALID_ARGUMENT,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.NOT_FOUND,
    405: Status.UNIMPLEMENTED,
    409: Status.ABORTED,
    413: Status.RESOURCE_EXHAUSTED,
    429: Status.RESOURCE_EXHAUSTED,
    500: Status.INTERNAL,
    503: Status.UNAVAILABLE,
}


def stream_guard(timeout: float) -> Any:
    """Bounds what a streaming response can hold on to.

    * A reader that accepts nothing for `timeout` seconds is dropped. The
      server's send waits while the client's socket buffer is full, so until
      then a stalled reader costs only that buffer, not the stream.
    * However a response ends (done, disconnected, dropped), the body
      iterators it registered (app.protocols.closing_body) are closed, so their
      subscriptions end at once instead of whenever the garbage collector runs.
    """
    watch = StallWatch(timeout)

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            task = asyncio.current_task()
            assert task is not None

            # A plain function that hands back an awaitable, as send_with_id does.
            def guarded(message: Message) -> Awaitable[None]:
                if message["type"] == "http.response.body" and message.get("more_body"):
                    return watch.send(task, send, message)
                return send(message)

            try:
                await app(scope, receive, guarded)
            except asyncio.CancelledError:
                if task not in watch.dropped:
                    raise
                task.uncancel()
                log.info("dropped a reader that accepted nothing for %.0f s", timeout)
            finally:
                watch.dropped.discard(task)
                if has_bodies(scope):
                    await close_bodies(scope)

        return handle

    return middleware


class StallWatch:
    """Cancels the responses whose send has been blocked for `timeout` seconds.

    One watchdog for every response, not a timer per send: arming and
    cancelling a timer for each chunk of each SSE reader was a fifth of the
    service's CPU when 500 readers followed one stream.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.sending: dict[asyncio.Task[Any], float] = {}  # response task -> send started
        self.dropped: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def send(self, task: asyncio.Task[Any], send: Send, message: Message) -> None:
        self.sending[task] = time.monotonic()  # the event loop's clock
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="streamkeep-stall-watch")
        try:
            await send(message)
        finally:
            del self.sending[task]

    async def _watch(self) -> None:
        """Checks a few times per timeout; ends when no send is in progress."""
        try:
            while self.sending:
                await asyncio.sleep(self.timeout / 4)
                stalled_since = time.monotonic() - self.timeout
                for task, started in list(self.sending.items()):
                    if started <= stalled_since and task not in self.dropped:
                        self.dropped.add(task)
                        task.cancel()
        finally:
            self._watchdog = None


def begin_shutdown(app: Litestar) -> None:
    """On SIGTERM, before the server waits for connections: end flows and live readers.

    Flows record an UNAVAILABLE error; SSE and long-poll readers end cleanly so
    that their clients reconnect to another replica. Appends already queued
    still commit (the manager drains them when it closes).
    """
    manager: StreamManager | None = getattr(app.state, "manager", None)
    runner: FlowRunner | None = getattr(app.state, "runner", None)
    settings: Settings = app.state.settings
    if manager is None or runner is None:
        return

    async def shut() -> None:
        await runner.shutdown(settings.shutdown_timeout_seconds / 2)
        manager.stop_readers()

    loop = asyncio.get_event_loop()
    app.state.shutdown_task = loop.create_task(shut())


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    metrics = Metrics()
    authority = Authority.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await prepare_schema(settings)
        load_flow_modules(["app.flows.demo", *settings.flow_modules])
        manager = build_manager(settings)
        await manager.start()
        runner = FlowRunner(manager)
        app.state.manager, app.state.runner = manager, runner
        metrics.manager = manager
        sweeper = asyncio.create_task(sweep_forever(manager, settings.sweep_interval_seconds))
        keys_watch = None
        if settings.api_keys_file and settings.api_keys_reload_seconds > 0:
            watch = KeysFileWatch(settings, authority)
            keys_watch = asyncio.create_task(
                watch_keys_file(watch, settings.api_keys_reload_seconds)
            )
        try:
            yield
        finally:
            if keys_watch is not None:
                await cancel_and_wait(keys_watch)
            await cancel_and_wait(sweeper)
            # Runs end with an error before the log closes: none stays open.
            await runner.shutdown(settings.shutdown_timeout_seconds)
            await manager.close()

    prefix = "/" + settings.path_prefix.strip("/")
    app = Litestar(
        # Everything under the configured prefix, so a proxy can pass paths unchanged.
        route_handlers=[Router(path=prefix, route_handlers=[ops_router(), *protocol_routers()])],
        middleware=[
            request_log_middleware(metrics),
            # After the access log (refusals are logged), before anything reads a stream.
            auth_middleware(authority, settings.path_prefix),
            stream_guard(settings.stall_timeout_seconds),
        ],
        exception_handlers={StreamError: stream_error_response, HTTPException: http_error_response},
        request_max_body_size=settings.max_request_bytes,
        # Browsers on other origins may read streams: any origin, any header.
        cors_config=CORSConfig(
            allow_origins=["*"],
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        ),
        lifespan=[lifespan, *protocol_lifespans()],
        openapi_config=openapi_config,
        state=State({"settings": settings, "metrics": metrics, "authority": authority}),
        # Logging is set up once by the command (app.observability), not by Litestar.
        logging_config=None,
    )
    skip_cors_without_origin(app)
    return app


def skip_cors_without_origin(app: Litestar) -> None:
    """Send a request without an Origin header (every producer that is not a
    browser) past Litestar's CORS middleware, which would do nothing with it.

    That middleware builds the request's whole header map to look for Origin:
    8 µs of an append's 78, in process. Requests with an Origin go through it
    as before (tests/test_server.py).
    """
    cors: Any = app.asgi_handler
    behind = getattr(cors, "app", None)
    if type(cors).__name__ != "CORSMiddleware" or behind is None:
        return  # not built as in the Litestar versions we know: leave it as it is

    async def cors_for_browsers(scope: Scope, receive: Receive, send: Send) -> None:
        for name, _ in scope["headers"]:
            if name == b"origin":
                await cors(scope, receive, send)
                return
        await behind(scope, receive, send)

    app.asgi_handler = cors_for_browsers

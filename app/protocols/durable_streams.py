"""The Durable Streams HTTP protocol on the event log, under /v1/stream/{path}.

A Durable Stream is a stream of the log, its id the path after /v1/stream/.
Each message is one chunk event: a binary or text append is one event, a JSON
append one event per element of its top-level array. Closing appends the log's
CLOSED terminal event, which is not a message: the tail offset of a closed
stream is the seq of its last message. Forks, retention, producers and the
writer sequence (Stream-Seq) are the log's (see app.log.store).

Streams the log got from elsewhere (a Genkit flow run: JSON chunks, then done
or error) read as JSON streams: each chunk is a message, and the terminal is
a last message, {"result": output} or {"error": {"status", "message"}}, after
which the stream reads as closed. They are read-only here: PUT, POST and
DELETE answer 409.

This module parses, calls the StreamManager and encodes; it never touches the
store. Every response carries nosniff and CORP; CORS is app-wide (app.server).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from litestar import Request, Router, route
from litestar.exceptions import HTTPException
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import ASGIApp, HTTPResponseBodyEvent, Receive, Scope, Send

from app.errors import Status, StreamError, http_status, retry_headers
from app.log import (
    AppendRequest,
    AppendResult,
    Event,
    EventKind,
    ForkSpec,
    NewEvent,
    Problem,
    ProducerClaim,
    StreamInfo,
    StreamManager,
    StreamStatus,
)
from app.protocols import app_state, closing_body, header_values, manager_of, read_body
from app.protocols.durable_streams_codec import (
    DEFAULT_CONTENT_TYPE,
    PRODUCER_HEADER_KEYS,
    ProtocolError,
    ReadFrom,
    bad_request,
    etag,
    etag_matches,
    format_offset,
    is_json,
    is_textual,
    is_true,
    json_array,
    json_messages,
    media_type,
    next_cursor,
    parse_expires_at,
    parse_fork_offset,
    parse_offset,
    parse_producer,
    parse_sub_offset,
    parse_ttl,
    sse_control,
    sse_event,
    stored_content_type,
)

log = logging.getLogger("streamkeep.durable_streams")

PREFIX = "/v1/stream"
# The protocol reserves /v1/stream/__ds/... for subscription APIs: never a stream.
RESERVED_SEGMENT = "__ds"
# How this protocol's appends are counted in the log's metrics.
ORIGIN = "durable_streams"
# The attributes key that marks a stream created through this protocol.
ATTRIBUTES_KEY = "durable_streams"
# One catch-up response or SSE data event carries at most this much (one
# message more if a single message is larger).
MAX_RESPONSE_BYTES = 1 << 20
# SSE connections end after this long; clients reconnect from their offset.
SSE_MAX_SECONDS = 60.0

ALLOWED_HEADERS = (
    "Content-Type, If-None-Match, Stream-TTL, Stream-Expires-At, Stream-Closed, Stream-Seq, "
    "Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset, "
    "Producer-Id, Producer-Epoch, Producer-Seq"
)
# On every response of this protocol, errors and streams included. CORS is the
# app's (app.server), which exposes our headers (EXPOSED_HEADERS in the codec).
PROTOCOL_HEADERS = {
    "x-content-type-options": "nosniff",
    "cross-origin-resource-policy": "cross-origin",
}
CACHEABLE = "public, max-age=60, stale-while-revalidate=300"


def durable_streams_router() -> Router:
    return Router(path=PREFIX, route_handlers=[stream_endpoint], middleware=[answer_directly])


@route(
    "/{path:path}",
    http_method=["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"],
    include_in_schema=False,
)
async def stream_endpoint(request: Request[Any, Any, Any]) -> ASGIApp:
    """Every operation on one stream; bad input answers 4xx, never 500.

    The route Litestar matches (methods, path parameter, template: what
    authorization reads), answered by answer_directly.
    """
    return await answer_to(request)


def answer_directly(app: ASGIApp) -> ASGIApp:
    """The route's middleware that answers its requests itself, once Litestar
    has routed them and the app's middlewares (access log, authorization,
    stall guard) have run, skipping Litestar's handler pipeline.

    That pipeline (the handler's kwargs checked by a signature model, an
    exit stack, the response conversion) is there for handlers that take
    parameters and return data; this one takes the request and answers with
    an ASGI app already. Skipping it took 16-18 µs off an append's 136-156 in
    process, alternating builds. An ASGI route would be the framework's way,
    but Litestar 2.25's router cannot hand an ASGI route's path parameter to
    an HTTP request: it looks the parameters up by method (KeyError: 'POST').
    """

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        request: Request[Any, Any, Any] = Request(scope, receive, send)
        response = await answer_to(request)
        await response(scope, receive, send)

    return answer


async def answer_to(request: Request[Any, Any, Any]) -> ASGIApp:
    handler = HANDLERS[request.method]
    try:
        return await handler(request, Call.of(request))
    except ProtocolError as exc:
        return respond(exc.status, exc.headers, exc.message.encode(), "text/plain")
    except StreamError as exc:
        if exc.status in (Status.UNAVAILABLE, Status.INTERNAL):
            log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        status = http_status(exc)
        return respond(status, retry_headers(status), exc.message.encode(), "text/plain")
    except HTTPException as exc:  # e.g. a body over the size limit: 413
        return respond(exc.status_code, {}, str(exc.detail).encode(), "text/plain")


@dataclass(frozen=True, slots=True)
class Call:
    """What every handler needs from the request."""

    manager: StreamManager
    stream_id: str
    long_poll_timeout: float

    @classmethod
    def of(cls, request: Request[Any, Any, Any]) -> Call:
        stream_id = request.path_params["path"].lstrip("/")
        if not stream_id:
            raise bad_request("the stream path is empty")
        if stream_id.split("/", 1)[0] == RESERVED_SEGMENT:
            raise ProtocolError(501, "the reserved subscription APIs (__ds) are not implemented")
        timeout = float(app_state(request, "settings").long_poll_timeout)
        return cls(manager_of(request), stream_id, timeout)


# -- responses -------------------------------------------------------------------------


def respond(
    status: int,
    headers: dict[str, str],
    body: bytes = b"",
    content_type: str | None = None,
) -> ASGIApp:
    """A response with the stored Content-Type verbatim (no charset added).

    One without a body or a type (a 204, a producer's 200) is its two ASGI
    messages (Bodiless), as every append's answer is one.
    """
    if not body and content_type is None:
        return Bodiless(status, headers)
    merged = {**PROTOCOL_HEADERS, **headers}
    if content_type is not None:
        merged["content-type"] = content_type
    return ASGIResponse(body=body, status_code=status, headers=merged)


class Bodiless:
    """An answer without a body or a type, as its two ASGI messages: ASGIResponse
    builds a header map and encodes it again when sent, 4 µs of an append's CPU,
    for the same bytes."""

    __slots__ = ("_start",)

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        encoded = [*_PROTOCOL_HEADERS_ENCODED]
        for name, value in headers.items():
            encoded.append((name.encode("latin-1"), value.encode("latin-1")))
        if status != 204:
            encoded.append((b"content-length", b"0"))
        self._start = {"type": "http.response.start", "status": status, "headers": encoded}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self._start)  # type: ignore[arg-type]
        await send(_NO_BODY)


_PROTOCOL_HEADERS_ENCODED = tuple(
    (name.encode("latin-1"), value.encode("latin-1")) for name, value in PROTOCOL_HEADERS.items()
)
_NO_BODY: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}


def tail_seq(info: StreamInfo) -> int:
    """The seq of the stream's last message (CLOSED is not one; done and error are)."""
    return info.last_seq - 1 if info.status is StreamStatus.CLOSED else info.last_seq


def closed_headers(closed: bool) -> dict[str, str]:
    return {"stream-closed": "true"} if closed else {}


def producer_headers(claim: ProducerClaim | None, result: AppendResult | None) -> dict[str, str]:
    if claim is None:
        return {}
    state = result.producer if result is not None else None
    return {
        "producer-epoch": str(state.epoch if state else claim.epoch),
        "producer-seq": str(state.last_seq if state else claim.seq),
    }


def retention_headers(info: StreamInfo) -> dict[str, str]:
    headers: dict[str, str] = {}
    if info.idle_ttl_seconds is not None:
        headers["stream-ttl"] = str(info.idle_ttl_seconds)
    raw = own_attributes(info).get("expires_at")
    if raw is not None:
        headers["stream-expires-at"] = raw
    elif info.hard_expires_at is not None:
        headers["stream-expires-at"] = info.hard_expires_at.isoformat().replace("+00:00", "Z")
    return headers


def own_attributes(info: StreamInfo) -> dict[str, Any]:
    found = (info.attributes or {}).get(ATTRIBUTES_KEY)
    return found if isinstance(found, dict) else {}


def created_here(info: StreamInfo) -> bool:
    return ATTRIBUTES_KEY in (info.attributes or {})


# -- lookups ----------------------------------------------------------------------------


async def existing(call: Call) -> StreamInfo:
    """The live stream, or 404 (unknown, expired) / 410 (deleted, still read by forks)."""
    info = await call.manager.find(call.stream_id)
    if info is None:
        raise ProtocolError(404, f"stream {call.stream_id!r} not found")
    if info.expired(call.manager.clock()):
        if info.fork_count > 0:
            raise ProtocolError(410, f"stream {call.stream_id!r} was deleted")
        raise ProtocolError(404, f"stream {call.stream_id!r} not found")
    return info


def writable(info: StreamInfo) -> None:
    if not created_here(info):
        raise ProtocolError(
            409, f"stream {info.id!r} was not created as a Durable Stream; it is read-only here"
        )


# -- reading -----------------------------------------------------------------------------


@dataclass(slots=True)
class Page:
    """Messages taken from a run of events, and where the reader stands after them."""

    messages: list[bytes]
    next_seq: int  # the offset to hand out: the seq of the last message
    consumed: int  # the last event seq taken (a CLOSED event is consumed, not a message)
    closed: bool  # the stream's end was reached
    truncated: bool  # stopped at the size limit: more events follow


def message_of(event: Event) -> bytes | None:
    if event.kind is EventKind.CHUNK:
        return event.payload
    if event.kind is EventKind.DONE:
        return b'{"result":' + (event.payload or b"null") + b"}"
    if event.kind is EventKind.ERROR:
        return b'{"error":' + event.payload + b"}"
    return None


def take(events: list[Event], start: int, max_bytes: int = MAX_RESPONSE_BYTES) -> Page:
    page = Page([], start, start, False, False)
    size = 0
    for event in events:
        message = message_of(event)
        if message is not None:
            if page.messages and size + len(message) > max_bytes:
                page.truncated = True
                return page
            page.messages.append(message)
            page.next_seq = event.seq
            size += len(message)
        page.consumed = event.seq
        if event.is_terminal:
            page.closed = True
            return page
    return page


async def read_page(call: Call, info: StreamInfo, after: int) -> tuple[Page, bool]:
    """One catch-up page after `after`, and whether it reaches the tail."""
    manager = call.manager
    events = await manager.read(info.id, after, manager.page_size, info=info)
    if not events:
        tail = tail_seq(info)
        at_end = not info.is_open and after >= tail
        return Page([], min(after, tail), after, at_end, False), True
    page = take(events, after)
    up_to_date = not page.truncated and (
        page.closed or len(events) < manager.page_size or events[-1].seq >= info.last_seq
    )
    return page, up_to_date


def body_of(info: StreamInfo, messages: list[bytes]) -> bytes:
    return json_array(messages) if is_json(info.content_type) else b"".join(messages)


def read_from(request: Request[Any, Any, Any], live: str | None) -> ReadFrom:
    return parse_offset(request.query_params.getall("offset", []), required=live is not None)


async def handle_get(request: Request[Any, Any, Any], call: Call) -> ASGIApp:
    info = await existing(call)
    live = request.query_params.get("live")
    if live not in (None, "long-poll", "sse"):
        raise bad_request("live must be long-poll or sse")
    start = read_from(request, live)
    await call.manager.touch(info)  # every read renews a sliding TTL
    after = tail_seq(info) if start.at_tail else start.seq
    cursor = next_cursor(request.query_params.get("cursor"), call.manager.clock())
    if live == "sse":
        return sse_response(request, call, info, after)
    if live == "long-poll":
        return await long_poll(call, info, after, cursor)
    if start.at_tail:
        headers = {
            "stream-next-offset": format_offset(after),
            "stream-up-to-date": "true",
            "cache-control": "no-store",
            **closed_headers(not info.is_open),
        }
        return respond(200, headers, body_of(info, []), info.content_type)
    return catch_up(request, info, *(await read_page(call, info, after)), after, cursor)


def catch_up(
    request: Request[Any, Any, Any],
    info: StreamInfo,
    page: Page,
    up_to_date: bool,
    after: int,
    cursor: str,
) -> ASGIApp:
    closed = page.closed and up_to_date
    tag = etag(info.id, info.created_at, after, page.next_seq, closed)
    headers = {
        "stream-next-offset": format_offset(page.next_seq),
        "stream-cursor": cursor,
        "etag": tag,
        # A page that stops before the tail (or ends a closed stream) never changes.
        "cache-control": CACHEABLE if closed or not up_to_date else "no-cache",
        **closed_headers(closed),
    }
    if up_to_date:
        headers["stream-up-to-date"] = "true"
    if etag_matches(request.headers.get("if-none-match"), tag):
        return respond(304, headers)
    return respond(200, headers, body_of(info, page.messages), info.content_type)


async def long_poll(call: Call, info: StreamInfo, after: int, cursor: str) -> ASGIApp:
    page, up_to_date = await read_page(call, info, after)
    if not page.messages and not page.closed:
        page = await wait_for_events(call, info, page.consumed, call.long_poll_timeout)
        up_to_date = not page.truncated
    headers = {
        "stream-next-offset": format_offset(page.next_seq),
        "stream-cursor": cursor,
        **closed_headers(page.closed and up_to_date),
    }
    if up_to_date:
        headers["stream-up-to-date"] = "true"
    if not page.messages:
        return respond(204, headers)
    headers["etag"] = etag(info.id, info.created_at, after, page.next_seq, page.closed)
    return respond(200, headers, body_of(info, page.messages), info.content_type)


async def wait_for_events(call: Call, info: StreamInfo, after: int, wait_seconds: float) -> Page:
    """Wait (holding no database connection) for events after `after`, up to `wait_seconds`."""
    batches = await call.manager.subscribe_batches(info.id, after)
    next_batch = asyncio.ensure_future(anext(batches))
    try:
        done, _ = await asyncio.wait({next_batch}, timeout=wait_seconds)
        if not done:
            return Page([], after, after, False, False)
        return take(next_batch.result(), after)
    finally:
        next_batch.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, StreamError):
            await next_batch
        await batches.aclose()  # type: ignore[attr-defined]


# -- SSE ---------------------------------------------------------------------------------


def sse_response(
    request: Request[Any, Any, Any], call: Call, info: StreamInfo, after: int
) -> ASGIStreamingResponse:
    headers = {
        **PROTOCOL_HEADERS,
        "content-type": "text/event-stream",
        "cache-control": "no-cache",
        "x-accel-buffering": "no",  # nginx must not hold events back
    }
    if not is_textual(info.content_type):
        headers["stream-sse-data-encoding"] = "base64"
    frames = SseFrames(call, info, request.query_params.get("cursor"))
    # Registered so that the subscription is released however the response ends.
    body = closing_body(request, frames.run(after))
    return ASGIStreamingResponse(iterator=body, headers=headers, status_code=200)


class SseFrames:
    """The events of one SSE response: catch-up, then live, each data event
    followed by its control event, in one write."""

    def __init__(self, call: Call, info: StreamInfo, client_cursor: str | None) -> None:
        self.call = call
        self.info = info
        self.client_cursor = client_cursor
        self.textual = is_textual(info.content_type)
        self.json = is_json(info.content_type)
        # Text may be cut inside a UTF-8 sequence between two events.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def cursor(self) -> str:
        return next_cursor(self.client_cursor, self.call.manager.clock())

    def data(self, messages: list[bytes]) -> str:
        if self.json:
            return sse_event("data", json_array(messages).decode("utf-8", errors="replace"))
        joined = b"".join(messages)
        if self.textual:
            return sse_event("data", self.decoder.decode(joined))
        return sse_event("data", base64.b64encode(joined).decode("ascii"))

    def frames(self, page: Page, up_to_date: bool) -> str:
        out = self.data(page.messages) if page.messages else ""
        if page.messages or page.closed:
            out += sse_control(
                page.next_seq, cursor=self.cursor(), up_to_date=up_to_date, closed=page.closed
            )
        return out

    async def run(self, after: int) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + SSE_MAX_SECONDS
        position = after
        sent_any = False
        while True:  # catch-up, page by page
            page, up_to_date = await read_page(self.call, self.info, position)
            if page.messages or page.closed:
                yield self.frames(page, up_to_date).encode()
                sent_any = True
            if page.closed:
                return
            position = page.consumed
            if up_to_date:
                break
        if not sent_any:
            yield sse_control(position, cursor=self.cursor(), up_to_date=True).encode()
        async for chunk in self.follow(position, deadline):
            yield chunk

    async def follow(self, after: int, deadline: float) -> AsyncIterator[bytes]:
        """Live events until the deadline; the log's idle tick is the keep-alive.

        The tick comes at least every SSE_MAX_SECONDS / 4, so an idle response
        ends at most that long after the deadline. (A task and asyncio.wait per
        batch, as this was before, cost more than the rest of a delivery.)
        """
        idle = min(self.call.long_poll_timeout, SSE_MAX_SECONDS / 4)
        try:
            batches = await self.call.manager.subscribe_batches(
                self.info.id, after, idle_seconds=idle
            )
        except StreamError:
            return  # deleted meanwhile: end the response
        position, next_seq = after, after
        async with contextlib.aclosing(batches):  # type: ignore[type-var]
            try:
                async for events in batches:
                    if not events:  # idle: a keep-alive, so proxies and clients know we are here
                        yield sse_control(next_seq, cursor=self.cursor(), up_to_date=True).encode()
                    out = ""
                    while events:
                        page = take(events, position)
                        out += self.frames(page, up_to_date=not page.truncated)
                        position, next_seq = page.consumed, page.next_seq
                        if page.closed:
                            yield out.encode()
                            return
                        events = [e for e in events if e.seq > position]
                    if out:
                        yield out.encode()
                    if time.monotonic() >= deadline:
                        return
            except StreamError:
                return  # deleted, expired or this replica stopping: the client reconnects


# -- HEAD, DELETE, OPTIONS -------------------------------------------------------------------


async def handle_head(request: Request[Any, Any, Any], call: Call) -> ASGIApp:
    info = await existing(call)  # HEAD does not renew the TTL
    headers = {
        "stream-next-offset": format_offset(tail_seq(info)),
        "cache-control": "no-store",
        **retention_headers(info),
        **closed_headers(not info.is_open),
    }
    return respond(200, headers, b"", info.content_type)


async def handle_delete(request: Request[Any, Any, Any], call: Call) -> ASGIApp:
    info = await existing(call)
    writable(info)
    forget_stream(call.manager, call.stream_id)
    if not await call.manager.delete(call.stream_id):
        raise ProtocolError(404, f"stream {call.stream_id!r} not found")
    return respond(204, {})


async def handle_options(request: Request[Any, Any, Any], call: Call) -> ASGIApp:
    """An OPTIONS that is not a CORS preflight (those the app's CORS answers)."""
    requested = request.headers.get("access-control-request-headers")
    headers = {
        "access-control-allow-methods": "GET, POST, PUT, DELETE, HEAD, OPTIONS",
        "access-control-allow-headers": requested or ALLOWED_HEADERS,
        "access-control-max-age": "86400",
    }
    return respond(204, headers)


# -- PUT: create and fork ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A PUT's configuration, as compared with an existing stream's."""

    content_type: str | None
    ttl: int | None
    expires_raw: str | None
    closed: bool
    forked_from: str | None
    fork_offset: int | None
    sub_offset: int

    @classmethod
    def parse(cls, request: Request[Any, Any, Any]) -> CreateRequest:
        h = request.headers
        ttl, expires_raw = parse_ttl(h.get("stream-ttl")), h.get("stream-expires-at")
        if ttl is not None and expires_raw is not None:
            raise bad_request("give Stream-TTL or Stream-Expires-At, not both")
        parse_expires_at(expires_raw)
        forked_from = h.get("stream-forked-from")
        sub_offset_header = h.get("stream-fork-sub-offset")
        sub_offset = parse_sub_offset(sub_offset_header)
        if forked_from is None and sub_offset_header is not None:
            raise bad_request("Stream-Fork-Sub-Offset needs Stream-Forked-From")
        fork_offset_header = h.get("stream-fork-offset")
        fork_offset = parse_fork_offset(fork_offset_header) if fork_offset_header else None
        return cls(
            content_type=stored_content_type(h.get("content-type")),
            ttl=ttl,
            expires_raw=expires_raw.strip() if expires_raw is not None else None,
            closed=is_true(h.get("stream-closed")),
            forked_from=source_id(forked_from) if forked_from is not None else None,
            fork_offset=fork_offset,
            sub_offset=sub_offset,
        )


def source_id(forked_from: str) -> str:
    """Stream-Forked-From names the source by its path (or URL): [/prefix]/v1/stream/<id>."""
    path = unquote(urlsplit(forked_from.strip()).path)
    _, found, rest = path.partition(PREFIX + "/")
    stream = rest if found else path.lstrip("/")
    if not stream.strip("/"):
        raise bad_request("Stream-Forked-From names no stream")
    return stream


@dataclass(slots=True)
class Plan:
    """What a create will store: resolved type, retention, fork and first events."""

    content_type: str
    ttl: int | None
    expires_raw: str | None
    fork: ForkSpec | None
    initial: tuple[tuple[NewEvent, ...], ...]


async def handle_put(request: Request[Any, Any, Any], call: Call) -> ASGIApp:
    wanted = CreateRequest.parse(request)
    body = await read_body(request)
    plan = await plan_for(call, wanted, body)
    attributes = {ATTRIBUTES_KEY: {"expires_at": plan.expires_raw, "sub_offset": wanted.sub_offset}}
    for _ in range(3):  # a stream found, then gone again, is created on a second try
        try:
            info = await call.manager.create(
                call.stream_id,
                content_type=plan.content_type,
                ttl_seconds=None,  # kept until deleted or its own retention ends
                idle_timeout_seconds=None,  # nothing sweeps a quiet Durable Stream
                idle_ttl_seconds=plan.ttl,
                expires_at=parse_expires_at(plan.expires_raw),
                fork=plan.fork,
                attributes=attributes,
                initial=plan.initial,
            )
        except StreamError as exc:
            if exc.status is not Status.ALREADY_EXISTS:
                raise fork_refusal(exc) from None
            current = await call.manager.find(call.stream_id)
            if current is None:
                continue
            return same_config_or_conflict(call, current, wanted, plan)
        location = str(request.url).split("?", 1)[0]
        return respond(201, {**created_headers(info), "location": location}, b"", info.content_type)
    raise ProtocolError(409, f"stream {call.stream_id!r} is being created and deleted meanwhile")


def created_headers(info: StreamInfo) -> dict[str, str]:
    return {"stream-next-offset": format_offset(tail_seq(info)), **closed_headers(not info.is_open)}


def fork_refusal(exc: StreamError) -> ProtocolError | StreamError:
    reason = exc.details.get("reason") if isinstance(exc.details, dict) else None
    if reason == Problem.SOURCE_RETIRED:
        return ProtocolError(409, exc.message)
    if reason == Problem.FORK_BEYOND_TAIL:
        return bad_request(exc.message)
    return exc


async def plan_for(call: Call, wanted: CreateRequest, body: bytes) -> Plan:
    if wanted.forked_from is None:
        content_type = wanted.content_type or DEFAULT_CONTENT_TYPE
        first = messages_of(content_type, body, allow_empty=True)
        return Plan(
            content_type,
            wanted.ttl,
            wanted.expires_raw,
            None,
            initial_batches([first], wanted.closed),
        )
    source = await fork_source(call, wanted.forked_from)
    content_type = wanted.content_type or source.content_type
    if media_type(content_type) != media_type(source.content_type):
        raise ProtocolError(409, "a fork keeps its source's content type")
    fork_seq = wanted.fork_offset if wanted.fork_offset is not None else source.chunk_tail
    if fork_seq > tail_seq(source):
        raise bad_request("Stream-Fork-Offset is beyond the source's tail")
    prefix = await sub_offset_prefix(call, source, fork_seq, wanted.sub_offset)
    first = messages_of(content_type, body, allow_empty=True)
    inherit = wanted.ttl is None and wanted.expires_raw is None
    return Plan(
        content_type,
        source.idle_ttl_seconds if inherit else wanted.ttl,
        inherited_expiry(source) if inherit else wanted.expires_raw,
        ForkSpec(source.id, fork_seq),
        initial_batches([prefix, first], wanted.closed),
    )


async def fork_source(call: Call, source: str) -> StreamInfo:
    info = await call.manager.find(source)
    if info is None or (info.expired(call.manager.clock()) and info.fork_count == 0):
        raise ProtocolError(404, f"fork source {source!r} not found")
    if info.expired(call.manager.clock()):
        raise ProtocolError(409, f"fork source {source!r} was deleted")
    return info


def inherited_expiry(source: StreamInfo) -> str | None:
    raw = own_attributes(source).get("expires_at")
    if isinstance(raw, str):
        return raw
    if source.hard_expires_at is not None:
        return source.hard_expires_at.isoformat()
    return None


async def sub_offset_prefix(
    call: Call, source: StreamInfo, fork_seq: int, sub_offset: int
) -> list[bytes]:
    """The first `sub_offset` bytes (binary) or messages (JSON) of the source's
    append right after the fork point; it becomes the fork's first append."""
    if sub_offset == 0:
        return []
    events = await call.manager.read(source.id, fork_seq, call.manager.page_size, info=source)
    batch: list[Event] = []
    for event in events:
        if event.kind is not EventKind.CHUNK:
            break
        batch.append(event)
        if event.batch_end:
            break
    if not batch:
        raise bad_request("there is no append after the fork offset to take a sub-offset of")
    if is_json(source.content_type):
        if sub_offset > len(batch):
            raise bad_request(f"the append after the fork offset has {len(batch)} messages")
        return [e.payload for e in batch[:sub_offset]]
    payload = batch[0].payload
    if sub_offset > len(payload):
        raise bad_request(f"the append after the fork offset has {len(payload)} bytes")
    return [payload[:sub_offset]]


def messages_of(content_type: str, body: bytes, *, allow_empty: bool) -> list[bytes]:
    if not body:
        return []
    if is_json(content_type):
        return json_messages(body, allow_empty=allow_empty)
    return [body]


def initial_batches(appends: list[list[bytes]], closed: bool) -> tuple[tuple[NewEvent, ...], ...]:
    batches = [[NewEvent.raw(m) for m in append] for append in appends if append]
    if closed:
        if batches:
            batches[-1].append(NewEvent.closed())
        else:
            batches.append([NewEvent.closed()])
    return tuple(tuple(batch) for batch in batches)


def same_config_or_conflict(
    call: Call, current: StreamInfo, wanted: CreateRequest, plan: Plan
) -> ASGIApp:
    if current.expired(call.manager.clock()):
        raise ProtocolError(409, f"stream {call.stream_id!r} was deleted; its forks still read it")
    attributes = own_attributes(current)
    same = (
        created_here(current)
        and media_type(plan.content_type) == media_type(current.content_type)
        and plan.ttl == current.idle_ttl_seconds
        and plan.expires_raw == attributes.get("expires_at")
        and wanted.closed == (not current.is_open)
        and wanted.forked_from == current.forked_from
        and (wanted.fork_offset is None or wanted.fork_offset == current.fork_seq)
        and wanted.sub_offset == attributes.get("sub_offset", 0)
    )
    if not same:
        raise ProtocolError(409, f"stream {call.stream_id!r} exists with another configuration")
    return respond(200, created_headers(current), b"", current.content_type)


# -- POST: append and close ---------------------------------------------------------------------


# What an append reads of the request's headers (the hottest request of all).
APPEND_HEADERS = PRODUCER_HEADER_KEYS | {b"content-type", b"stream-closed", b"stream-seq"}


async def handle_post(request: Request[Any, Any, Any], call: Call) -> ASGIApp:
    headers = header_values(request, APPEND_HEADERS)
    claim = parse_producer(headers)
    body = await read_body(request)
    closing = is_true(headers.get("stream-closed"))
    content_type = headers.get("content-type")
    if not body and not closing:
        raise bad_request("an append needs a body (or Stream-Closed: true to close)")
    if body and content_type is None:
        raise bad_request("an append with a body needs a Content-Type")
    writer_seq = headers.get("stream-seq")
    known = known_streams(call.manager).get(call.stream_id) if body else None
    if known is not None:
        try:
            return await append_body(call, known, body, content_type, closing, claim, writer_seq)
        except (ProtocolError, StreamError) as exc:
            if isinstance(exc, StreamError) and exc.status in (Status.UNAVAILABLE, Status.INTERNAL):
                raise
            # Refused by a row read earlier (nothing was written): the answer
            # comes from the row as it is now, as for any first append.
            forget_stream(call.manager, call.stream_id)
    for _ in range(2):
        info = await existing(call)
        writable(info)
        if not body:
            request_ = AppendRequest(
                call.stream_id, [NewEvent.closed()], origin=ORIGIN, producer=claim
            )
            request_.writer_seq = writer_seq
            return await close_only(call, info, request_)
        if info.is_open:
            remember_stream(call.manager, info)
        try:
            return await append_body(call, info, body, content_type, closing, claim, writer_seq)
        except StreamError as exc:
            if problem_of(exc) != Problem.REPLACED:
                raise
            # Deleted and created again (another replica) between the lookup
            # and the commit; nothing was written. Once more, by the new row.
            forget_stream(call.manager, call.stream_id)
    raise ProtocolError(
        409, f"stream {call.stream_id!r} was deleted and created again during the append; retry"
    )


# Streams this process appended to, by manager: a producer's appends skip the
# stream lookup. What decides how to append (content type, the protocol that
# created it) never changes in a stream's life, and the append itself is bound
# to the stream created at the row's created_at: an id deleted and created
# again is refused (Problem.REPLACED), as is a stream closed or gone since;
# any refusal is answered from the row as it is now.
KNOWN_STREAMS: weakref.WeakKeyDictionary[StreamManager, dict[str, StreamInfo]] = (
    weakref.WeakKeyDictionary()
)
KNOWN_STREAMS_LIMIT = 4096


def known_streams(manager: StreamManager) -> dict[str, StreamInfo]:
    known = KNOWN_STREAMS.get(manager)
    if known is None:
        known = KNOWN_STREAMS[manager] = {}
    return known


def remember_stream(manager: StreamManager, info: StreamInfo) -> None:
    known = known_streams(manager)
    if len(known) >= KNOWN_STREAMS_LIMIT:
        known.clear()
    known[info.id] = info


def forget_stream(manager: StreamManager, stream_id: str) -> None:
    known_streams(manager).pop(stream_id, None)


async def append_body(
    call: Call,
    info: StreamInfo,
    body: bytes,
    content_type: str | None,
    closing: bool,
    claim: ProducerClaim | None,
    writer_seq: str | None,
) -> ASGIApp:
    if info.is_open and media_type(content_type or "") != media_type(info.content_type):
        raise ProtocolError(409, f"stream {call.stream_id!r} holds {info.content_type}")
    append = payload_append(call.stream_id, info, body, closing)
    append.producer, append.writer_seq, append.created_at = claim, writer_seq, info.created_at
    try:
        result = await call.manager.apply(append)
    except StreamError as exc:
        raise append_refusal(exc, claim) from None
    headers = {
        "stream-next-offset": format_offset(result_tail(result)),
        **producer_headers(claim, result),
        **closed_headers(result.status is not StreamStatus.OPEN and (closing or result.duplicate)),
    }
    if result.duplicate:
        return respond(204, headers)
    return respond(200 if claim else 204, headers)


def payload_append(stream_id: str, info: StreamInfo, body: bytes, closing: bool) -> AppendRequest:
    """The events of a body; a bad JSON body becomes a `reject`, so that the
    stream's own errors (closed, producer, Stream-Seq) take precedence."""
    try:
        messages = messages_of(info.content_type, body, allow_empty=False)
    except ProtocolError as exc:
        return AppendRequest(
            stream_id, [], origin=ORIGIN, reject=StreamError(Status.INVALID_ARGUMENT, exc.message)
        )
    events = [NewEvent.raw(m) for m in messages]
    if closing:
        events.append(NewEvent.closed())
    return AppendRequest(stream_id, events, origin=ORIGIN)


def result_tail(result: AppendResult) -> int:
    return result.last_seq - 1 if result.status is StreamStatus.CLOSED else result.last_seq


async def close_only(call: Call, info: StreamInfo, append: AppendRequest) -> ASGIApp:
    """Stream-Closed with an empty body: idempotent without a producer, sequenced with one."""
    claim = append.producer
    try:
        result = await call.manager.apply(append)
    except StreamError as exc:
        finished = problem_of(exc) == Problem.FINISHED
        if not (finished and claim is None):
            raise append_refusal(exc, claim) from None
        await call.manager.touch(info)  # closing again is still a write's access
        last_seq = exc.details.get("last_seq", info.last_seq)
        headers = {"stream-next-offset": format_offset(last_seq - 1), "stream-closed": "true"}
        return respond(204, headers)
    headers = {
        "stream-next-offset": format_offset(result_tail(result)),
        "stream-closed": "true",
        **producer_headers(claim, result),
    }
    return respond(204, headers)


def problem_of(exc: StreamError) -> str | None:
    return exc.details.get("reason") if isinstance(exc.details, dict) else None


def append_refusal(exc: StreamError, claim: ProducerClaim | None) -> ProtocolError | StreamError:
    details = exc.details if isinstance(exc.details, dict) else {}
    refusals: dict[str | None, Callable[[], ProtocolError]] = {
        Problem.FINISHED: lambda: ProtocolError(
            409,
            exc.message,
            {
                "stream-closed": "true",
                "stream-next-offset": format_offset(details.get("last_seq", 1) - 1),
            },
        ),
        Problem.STALE_EPOCH: lambda: ProtocolError(
            403, exc.message, {"producer-epoch": str(details.get("epoch"))}
        ),
        Problem.EPOCH_NEEDS_SEQ_ZERO: lambda: bad_request(exc.message),
        Problem.SEQ_GAP: lambda: ProtocolError(
            409,
            exc.message,
            {
                "producer-expected-seq": str(details.get("expected")),
                "producer-received-seq": str(details.get("received")),
            },
        ),
        Problem.WRITER_SEQ_REGRESSION: lambda: ProtocolError(409, exc.message),
    }
    make = refusals.get(problem_of(exc))
    if make is not None:
        return make()
    if exc.status is Status.INVALID_ARGUMENT:  # a rejected body
        return bad_request(exc.message)
    return exc


HANDLERS = {
    "GET": handle_get,
    "HEAD": handle_head,
    "PUT": handle_put,
    "POST": handle_post,
    "DELETE": handle_delete,
    "OPTIONS": handle_options,
}

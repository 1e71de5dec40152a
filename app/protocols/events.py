"""Native typed event streams: a small HTTP producer API, and SSE that browsers resume.

Producers create a stream, append typed JSON events (one or a batch, atomically)
and end it with done, error or close. Readers follow any stream of the log,
whichever protocol wrote it, with `GET /v1/streams/{id}/events`:

    id: <seq>            the event's sequence number, so EventSource resumes by itself
    event: <type>        the event's type; untyped events are plain `message`s
    data: <payload>      JSON as stored (text streams: the text; binary: base64)

and a last `event: end` frame whose data says how the stream ended. It is named
`end`, not `error` or `done`, because EventSource fires its own `error` event on
network failures: a listener could not tell the two apart.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

from litestar import Request, Response, Router, get, post, put
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import FromPath, FromQuery, HeaderParameter
from litestar.response import ServerSentEventMessage

from app.auth import authority_of, read_token_headers
from app.config import Settings
from app.errors import Status, StreamError, http_status, retry_headers
from app.log import AppendResult, Event, EventKind, NewEvent, StreamInfo, StreamStatus
from app.log.api import AppendRequest, NotJson, decode_json, encode_json
from app.protocols import app_state, header_values, manager_of, read_body
from app.protocols.durable_streams_codec import (
    PRODUCER_HEADER_KEYS,
    ProtocolError,
    parse_producer,
)
from app.protocols.openapi import PRODUCER_HEADERS, Error, errors, with_request
from app.protocols.sse import KEEPALIVE, SharedFrames, sse_response

log = logging.getLogger("streamkeep.events")

END_EVENT = "end"
# `end` is the name of the terminal frame; a chunk of that type would be mistaken for it.
RESERVED_TYPES = frozenset({END_EVENT})
MAX_TYPE_LENGTH = 256
MAX_BATCH = 1000
MAX_LISTED = 500
# Who appends, for the metrics (appends by origin).
ORIGIN = "events"


# -- errors and input ----------------------------------------------------------------


def stream_error_response(_: Request, exc: StreamError) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    """Every failure of this API as {"status", "message"[, "details"]} with its HTTP code.

    A 503 (the database away or locked) carries Retry-After, as the app's own handler's do.
    """
    status = http_status(exc.status)
    return Response(exc.to_dict(), status_code=status, headers=retry_headers(status))


def invalid(message: str) -> StreamError:
    return StreamError(Status.INVALID_ARGUMENT, message)


async def json_body(request: Request, *, required: bool) -> Any:  # type: ignore[type-arg]
    """The request's JSON body; an empty optional body is None."""
    raw = await read_body(request)
    if not raw.strip():
        if required:
            raise invalid("the request needs a JSON body")
        return None
    try:
        return decode_json(raw)
    except NotJson as exc:
        raise invalid(f"the body is not valid JSON: {exc}") from None


def object_body(body: Any, allowed: set[str]) -> dict[str, Any]:
    """A JSON object with only known keys (a typo must not pass silently)."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(
            f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}"
        )
    return body


def cursor_from(raw: str | None, name: str) -> int | None:
    """A sequence number from a header or query parameter (absent or empty: None)."""
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise invalid(f"{name} must be a non-negative integer, not {raw!r}") from None
    if value < 0:
        raise invalid(f"{name} must be a non-negative integer, not {raw!r}")
    return value


def flag_from(raw: str | None, name: str) -> bool:
    """A true/false query parameter (absent: false)."""
    if raw is None or raw.lower() in ("false", "0", ""):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise invalid(f"{name} must be true or false, not {raw!r}")


def whole_seconds(body: dict[str, Any], key: str, *, nullable: bool, minimum: int) -> Any:
    value = body[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = f"an integer >= {minimum}" + (" or null" if nullable else "")
        raise invalid(f"{key} must be {kind}")
    return value


def event_type(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise invalid("an event type must be a non-empty string")
    if len(value) > MAX_TYPE_LENGTH:
        raise invalid(f"an event type must be at most {MAX_TYPE_LENGTH} characters")
    if any(c in value for c in "\r\n\x00"):
        raise invalid("an event type must not contain line breaks or NUL (SSE cannot carry them)")
    if value in RESERVED_TYPES:
        raise invalid(f"the event type {value!r} is reserved for the terminal frame")
    return value


def new_events(body: Any) -> list[NewEvent]:
    """One event {"type"?, "data"} or a list of them."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise invalid("the list of events is empty")
    if len(items) > MAX_BATCH:
        raise invalid(f"at most {MAX_BATCH} events per request")
    events = []
    for item in items:
        fields = object_body(item, {"type", "data"})
        if "data" not in fields:
            raise invalid('every event needs a "data" field (it may be null)')
        events.append(NewEvent.chunk(fields["data"], type=event_type(fields.get("type"))))
    return events


# -- output ----------------------------------------------------------------------------


def json_or_text(payload: bytes | None) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return payload.decode("utf-8", "replace")


def describe(info: StreamInfo) -> dict[str, Any]:
    """A stream's metadata as JSON."""
    body: dict[str, Any] = {
        "id": info.id,
        "status": str(info.status),
        "content_type": info.content_type,
        "last_seq": info.last_seq,
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
        "finished_at": info.finished_at.isoformat() if info.finished_at else None,
        "expires_at": info.expires_at.isoformat() if info.expires_at else None,
        "ttl_seconds": info.ttl_seconds,
        "idle_timeout_seconds": info.idle_timeout_seconds,
    }
    if info.status is StreamStatus.DONE:
        body["output"] = json_or_text(info.output)
    elif info.status is StreamStatus.ERROR:
        body["error"] = {"status": info.error_status, "message": info.error_message}
    return body


class DataEncoding(StrEnum):
    JSON = "json"
    TEXT = "text"
    BASE64 = "base64"

    @classmethod
    def of(cls, content_type: str) -> DataEncoding:
        media = content_type.split(";")[0].strip().lower()
        if media == "application/json" or media.endswith("+json"):
            return cls.JSON
        if media.startswith("text/"):
            return cls.TEXT
        return cls.BASE64

    def data(self, payload: bytes) -> str:
        if self is DataEncoding.BASE64:
            return base64.b64encode(payload).decode()
        return payload.decode("utf-8", "replace")


def end_body(event: Event) -> dict[str, Any]:
    """What the `end` frame says: how the stream ended, with its output or error."""
    if event.kind is EventKind.DONE:
        return {"status": "done", "output": json_or_text(event.payload)}
    if event.kind is EventKind.ERROR:
        return {"status": "error", "error": json_or_text(event.payload)}
    return {"status": "closed"}


@dataclass(frozen=True, slots=True)
class Framing:
    """How one reader gets events: the stream's data encoding, and whether each
    event is an unnamed message {"type", "data"} (for generic viewers: EventSource
    only dispatches the event names a page listens for, and it cannot know them)."""

    encoding: DataEncoding
    envelope: bool = False

    def frame(self, event: Event) -> bytes:
        if event.is_terminal:
            end = encode_json(end_body(event)).decode()
            return ServerSentEventMessage(id=event.seq, event=END_EVENT, data=end).encode()
        data = self.encoding.data(event.payload)
        if not self.envelope:
            return ServerSentEventMessage(id=event.seq, event=event.type, data=data).encode()
        inner = (data or "null") if self.encoding is DataEncoding.JSON else json.dumps(data)
        wrapped = f'{{"type":{json.dumps(event.type)},"data":{inner}}}'
        return ServerSentEventMessage(id=event.seq, data=wrapped).encode()


@functools.cache
def shared_frames(framing: Framing) -> SharedFrames:
    """The process's frames of one framing (there are six), shared by its readers."""
    return SharedFrames(framing.frame)


async def sse_body(
    stream_id: str,
    batches: AsyncIterator[list[Event]],
    frame: Callable[[Event], bytes],
    settings: Settings,
) -> AsyncIterator[bytes]:
    """The retry hint, then each batch the log has ready as one write, with keepalives."""
    yield ServerSentEventMessage(retry=settings.sse_retry_ms, data=None).encode()
    try:
        async with contextlib.aclosing(batches):  # type: ignore[type-var]
            async for batch in batches:  # empty when idle: a keepalive
                yield b"".join(frame(e) for e in batch) if batch else KEEPALIVE
    except StreamError as exc:
        if exc.status is not Status.NOT_FOUND:
            # A passing failure (the database restarting, this replica shutting
            # down): end the body, and the client reconnects with Last-Event-ID
            # after `retry` ms, here or on another replica.
            log.info("SSE reader of %r stopped: %s", stream_id, exc)
            return
        # Deleted or expired while being read: say so, the client must not retry.
        gone = encode_json({"status": "error", "error": exc.to_dict()}).decode()
        yield ServerSentEventMessage(event=END_EVENT, data=gone).encode()


def settings_of(request: Request) -> Settings:  # type: ignore[type-arg]
    return app_state(request, "settings")  # type: ignore[no-any-return]


# -- handlers ----------------------------------------------------------------------------

# What every failure of this API looks like (see stream_error_response).
ERRORS = errors(Error, 400, 404, 409, 413, 429)

# -- what the OpenAPI document says the writes take ---------------------------------------

ANY_JSON = Schema(description="any JSON value")
EVENT = Schema(
    type=OpenAPIType.OBJECT,
    properties={
        "type": Schema(
            type=OpenAPIType.STRING,
            min_length=1,
            max_length=MAX_TYPE_LENGTH,
            pattern="^[^\\r\\n\\x00]+$",
            description=f"the event's SSE name; {', '.join(sorted(RESERVED_TYPES))} is reserved",
        ),
        "data": ANY_JSON,
    },
    required=["data"],
    additional_properties=False,
)
APPEND_BODY = Schema(
    one_of=[
        EVENT,
        Schema(type=OpenAPIType.ARRAY, items=EVENT, min_items=1, max_items=MAX_BATCH),
    ]
)
CREATE_BODY = Schema(
    type=OpenAPIType.OBJECT,
    properties={
        "ttl_seconds": Schema(type=OpenAPIType.INTEGER, minimum=0),
        "idle_timeout_seconds": Schema(
            one_of=[Schema(type=OpenAPIType.INTEGER, minimum=1), Schema(type=OpenAPIType.NULL)]
        ),
    },
    additional_properties=False,
)
DONE_BODY = Schema(
    type=OpenAPIType.OBJECT, properties={"output": ANY_JSON}, additional_properties=False
)
ERROR_BODY = Schema(
    type=OpenAPIType.OBJECT,
    properties={
        "message": Schema(type=OpenAPIType.STRING, min_length=1),
        "status": Schema(type=OpenAPIType.STRING, enum=list(Status)),
        "details": ANY_JSON,
    },
    required=["message"],
    additional_properties=False,
)


LastEventId = Annotated[str | None, HeaderParameter(name="Last-Event-ID", required=False)]


@get("/", responses=ERRORS)
async def list_streams(
    request: Request,  # type: ignore[type-arg]
    limit: FromQuery[str | None] = None,
    status: FromQuery[str | None] = None,
) -> dict[str, Any]:
    """The newest streams of the log, whichever protocol wrote them, with their status."""
    count = min(cursor_from(limit, "limit") or 50, MAX_LISTED)
    try:
        wanted = StreamStatus(status) if status else None
    except ValueError:
        raise invalid(f"status must be one of {', '.join(StreamStatus)}") from None
    listed = await manager_of(request).list_streams(wanted, count)
    return {"streams": [describe(info) for info in listed]}


@put(
    "/{stream_id:str}",
    responses=ERRORS,
    status_code=201,
    operation_class=with_request(CREATE_BODY),
)
async def create_stream(request: Request, stream_id: FromPath[str]) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    """Create a stream of typed JSON events: {"ttl_seconds"?, "idle_timeout_seconds"?}."""
    body = object_body(
        await json_body(request, required=False), {"ttl_seconds", "idle_timeout_seconds"}
    )
    options: dict[str, Any] = {}
    if "ttl_seconds" in body:
        options["ttl_seconds"] = whole_seconds(body, "ttl_seconds", nullable=False, minimum=0)
    if "idle_timeout_seconds" in body:
        options["idle_timeout_seconds"] = whole_seconds(
            body, "idle_timeout_seconds", nullable=True, minimum=1
        )
    manager = manager_of(request)
    await manager.open(stream_id, origin=ORIGIN, **options)
    info = await manager.info(stream_id)
    # Percent-encoded: a header is latin-1, an id need not be.
    location = quote(request.url.path, safe="/")
    headers = {"Location": location, **read_token_headers(request, stream_id)}
    return Response(describe(info), status_code=201, headers=headers)


@post("/{stream_id:str}/token", responses=ERRORS, status_code=200)
async def read_token(request: Request, stream_id: FromPath[str]) -> dict[str, Any]:  # type: ignore[type-arg]
    """A read token for this stream, to hand to a browser (EventSource takes it as ?token=)."""
    await manager_of(request).info(stream_id)  # 404 for an unknown stream
    authority = authority_of(request)
    token = authority.issue(stream_id)
    return {"token": token, "expires_in": authority.token_seconds}


@get("/{stream_id:str}", responses=ERRORS)
async def stream_info(request: Request, stream_id: FromPath[str]) -> dict[str, Any]:  # type: ignore[type-arg]
    return describe(await manager_of(request).info(stream_id))


@post(
    "/{stream_id:str}/events",
    responses=ERRORS,
    status_code=200,
    operation_class=with_request(APPEND_BODY, required=True, headers=PRODUCER_HEADERS),
)
async def append_events(request: Request, stream_id: FromPath[str]) -> dict[str, Any]:  # type: ignore[type-arg]
    """Append one event {"type"?, "data"} or a list of them, all or nothing."""
    events = new_events(await json_body(request, required=True))
    result = await append(request, stream_id, events)
    if result.duplicate:
        return {"duplicate": True, "stream_last_seq": result.last_seq}
    return {"first_seq": result.events[0].seq, "last_seq": result.events[-1].seq}


@post(
    "/{stream_id:str}/done",
    responses=ERRORS,
    status_code=200,
    operation_class=with_request(DONE_BODY, headers=PRODUCER_HEADERS),
)
async def finish_stream(request: Request, stream_id: FromPath[str]) -> dict[str, Any]:  # type: ignore[type-arg]
    """End the stream with a result: {"output"?}."""
    body = object_body(await json_body(request, required=False), {"output"})
    return await end(request, stream_id, NewEvent.done(body.get("output")), "done")


@post(
    "/{stream_id:str}/error",
    responses=ERRORS,
    status_code=200,
    operation_class=with_request(ERROR_BODY, required=True, headers=PRODUCER_HEADERS),
)
async def fail_stream(request: Request, stream_id: FromPath[str]) -> dict[str, Any]:  # type: ignore[type-arg]
    """End the stream with an error: {"message", "status"? (a status name), "details"?}."""
    body = object_body(await json_body(request, required=True), {"message", "status", "details"})
    message = body.get("message")
    if not isinstance(message, str) or not message:
        raise invalid('"message" must be a non-empty string')
    try:
        status = Status(body.get("status", Status.UNKNOWN))
    except ValueError:
        raise invalid(f'"status" must be one of {", ".join(Status)}') from None
    failure = StreamError(status, message, body.get("details"))
    return await end(request, stream_id, NewEvent.error(failure), "error")


@post(
    "/{stream_id:str}/close",
    responses=ERRORS,
    status_code=200,
    operation_class=with_request(headers=PRODUCER_HEADERS),
)
async def close_stream(request: Request, stream_id: FromPath[str]) -> dict[str, Any]:  # type: ignore[type-arg]
    """End the stream without a result; closing twice fails like any late write."""
    return await end(request, stream_id, NewEvent.closed(), "closed")


async def append(request: Request, stream_id: str, events: list[NewEvent]) -> AppendResult:  # type: ignore[type-arg]
    """Appends as the idempotent producer the request names, if it names one.

    Producer-Id, Producer-Epoch and Producer-Seq work as in the Durable Streams
    protocol: a retry of an append the log already has (the same epoch, a seq
    already accepted) writes nothing and says so; a newer epoch fences older
    ones; a seq must follow the last one accepted.
    """
    try:
        claim = parse_producer(header_values(request, PRODUCER_HEADER_KEYS))
    except ProtocolError as exc:
        raise invalid(exc.message) from None
    appended = AppendRequest(stream_id, events, origin=ORIGIN, producer=claim)
    return await manager_of(request).apply(appended)


async def end(request: Request, stream_id: str, terminal: NewEvent, status: str) -> dict[str, Any]:  # type: ignore[type-arg]
    result = await append(request, stream_id, [terminal])
    if result.duplicate:
        return {"duplicate": True, "stream_last_seq": result.last_seq, "status": str(result.status)}
    return {"seq": result.events[0].seq, "status": status}


@get("/{stream_id:str}/events", responses=ERRORS, media_type="text/event-stream")
async def read_events(
    request: Request,  # type: ignore[type-arg]
    stream_id: FromPath[str],
    after: FromQuery[str | None] = None,
    envelope: FromQuery[str | None] = None,
    last_event_id: LastEventId = None,
) -> Response[Any]:
    """Every event after the cursor, then live ones, then the `end` frame.

    The cursor is Last-Event-ID when present (EventSource sends it when it
    reconnects, repeating the original URL with its stale ?after=), else ?after=.
    With ?envelope=true every event is an unnamed message {"type", "data"}.
    """
    wrapped = flag_from(envelope, "envelope")
    cursor = cursor_from(last_event_id, "Last-Event-ID")
    if cursor is None:
        cursor = cursor_from(after, "after") or 0
    manager = manager_of(request)
    info = await manager.info(stream_id)
    if cursor > info.last_seq:
        raise StreamError(
            Status.OUT_OF_RANGE,
            f"cursor {cursor} is past the last event of stream {stream_id!r} ({info.last_seq})",
        )
    if not info.is_open and cursor >= info.last_seq:
        # Everything including the end was delivered: 204 tells EventSource to stop.
        return Response(None, status_code=204)
    batches = await manager.subscribe_batches(
        stream_id, after=cursor, idle_seconds=settings_of(request).sse_keepalive_seconds
    )
    framing = Framing(DataEncoding.of(info.content_type), wrapped)
    base64_data = framing.encoding is DataEncoding.BASE64
    headers = {"Stream-SSE-Data-Encoding": "base64"} if base64_data else {}
    return sse_response(
        request,
        sse_body(stream_id, batches, shared_frames(framing), settings_of(request)),
        headers,
    )


router = Router(
    path="/v1/streams",
    route_handlers=[
        list_streams,
        create_stream,
        stream_info,
        append_events,
        finish_stream,
        fail_stream,
        close_stream,
        read_events,
        read_token,
    ],
    exception_handlers={StreamError: stream_error_response},
)

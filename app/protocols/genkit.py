"""Genkit's durable-flow protocol on the log, byte for byte what genkit/beta/client expects.

POST /flows/{name}, body {"data": input}. Streaming (Accept contains
text/event-stream, or ?stream=true) answers with frames

    data: {"message":<chunk>}\\n\\n ... then data: {"result":<output>}\\n\\n
                                      or data: {"error":{"status":..,"message":..}}\\n\\n

and an X-Genkit-Stream-Id header sent at once. The same POST with that header
replays the run from the start (or after ?after=N), then follows it live; an
unknown or expired id gets 204. The client rejects anything else: no comments,
no event:/id: lines, LF only, ASCII only, and never a body without a terminal
frame (it would spin forever).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response, Router, post
from litestar.enums import ParamType
from litestar.openapi.spec import OpenAPIType, Parameter, Schema
from litestar.params import FromPath
from litestar.response import Stream

from app.auth import read_token_headers
from app.errors import Status, StreamError, http_status, retry_headers
from app.flows import Flow, FlowRegistry
from app.flows.runner import FlowRunner
from app.log import Event, EventKind, StreamManager
from app.log.api import NotJson, decode_json
from app.protocols import closing_body, manager_of
from app.protocols.openapi import ErrorEnvelope, JsonOrEventStream, errors, with_request

log = logging.getLogger("streamkeep.genkit")

STREAM_ID_HEADER = "X-Genkit-Stream-Id"
CLOSED_WITHOUT_RESULT = StreamError(Status.ABORTED, "the stream was closed without a result")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TRUE_VALUES = {"1", "t", "T", "TRUE", "true", "True"}
FALSE_VALUES = {"0", "f", "F", "FALSE", "false", "False"}


def _json(value: Any) -> bytes:
    # ASCII only: the client decodes each network read separately, so a
    # multi-byte character split across reads would be corrupted.
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode()


def _payload_json(event: Event) -> bytes:
    """The event's JSON payload as ASCII JSON, without re-encoding when it already is."""
    return event.payload if event.payload.isascii() else _json(event.json())


def encode_frame(event: Event) -> bytes:
    if event.kind is EventKind.CHUNK:
        return b'data: {"message":' + _payload_json(event) + b"}\n\n"
    if event.kind is EventKind.DONE:
        return b'data: {"result":' + (_payload_json(event) if event.payload else b"null") + b"}\n\n"
    if event.kind is EventKind.ERROR:
        return error_frame(event.as_error())
    return error_frame(CLOSED_WITHOUT_RESULT)


def error_frame(error: StreamError) -> bytes:
    return b"data: " + _json({"error": error.to_dict()}) + b"\n\n"


async def frames(batches: AsyncIterator[list[Event]]) -> AsyncIterator[bytes]:
    """The response body: every frame, ending with exactly one terminal frame, whatever happens.

    Whatever the log has ready goes out as one write.
    """
    async with contextlib.aclosing(batches):  # type: ignore[type-var]
        try:
            async for batch in batches:
                yield b"".join(encode_frame(event) for event in batch)
                if batch[-1].is_terminal:
                    return
            yield error_frame(StreamError(Status.INTERNAL, "the stream ended without a result"))
        except StreamError as exc:
            yield error_frame(exc)
        except Exception:
            log.exception("streaming a flow failed")
            yield error_frame(StreamError(Status.INTERNAL, "internal error"))


def _error_response(error: StreamError) -> Response[bytes]:
    status = http_status(error.status)
    return Response(
        content=_json({"error": error.to_dict()}),
        status_code=status,
        media_type="application/json",
        headers=retry_headers(status),
    )


def wants_stream(accept: str, flag: str | None) -> bool:
    """Whether a request asks for frames: Accept with text/event-stream, or ?stream=true."""
    if "text/event-stream" in accept.lower():
        return True
    if flag is None:
        return False
    if flag in TRUE_VALUES:
        return True
    if flag in FALSE_VALUES:
        return False
    raise StreamError(Status.INVALID_ARGUMENT, f"stream={flag!r} is not a boolean")


def _parse_input(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        envelope = decode_json(body)
    except NotJson as exc:
        raise StreamError(Status.INVALID_ARGUMENT, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise StreamError(Status.INVALID_ARGUMENT, 'the body must be an object like {"data": ...}')
    return envelope.get("data")


def _resume_cursor(request: Request[Any, Any, Any]) -> int:
    raw = request.query_params.get("after", "0")
    if not raw.isdigit():
        raise StreamError(Status.INVALID_ARGUMENT, f"after={raw!r} is not a sequence number")
    return int(raw)


def _stream_response(
    request: Request[Any, Any, Any],
    batches: AsyncIterator[list[Event]],
    stream_id: str,
    headers: dict[str, str] | None = None,
) -> Stream:
    return Stream(
        closing_body(request, frames(batches)),
        media_type="text/event-stream",
        status_code=200,
        headers={**SSE_HEADERS, STREAM_ID_HEADER: stream_id, **(headers or {})},
    )


async def _reconnect(
    request: Request[Any, Any, Any], manager: StreamManager, stream_id: str, after: int
) -> Response[Any]:
    try:
        batches = await manager.subscribe_batches(stream_id, after=after)
    except StreamError as exc:
        if exc.status is Status.NOT_FOUND:
            return Response(content=b"", status_code=204)
        raise
    return _stream_response(request, batches, stream_id)


async def _run_to_end(
    manager: StreamManager, stream_id: str, headers: dict[str, str]
) -> Response[Any]:
    events = await manager.subscribe(stream_id)
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if event.kind is EventKind.DONE:
                return Response(
                    content=b'{"result":' + (_payload_json(event) or b"null") + b"}",
                    media_type="application/json",
                    headers={STREAM_ID_HEADER: stream_id, **headers},
                )
            if event.is_terminal:
                error = event.as_error() if event.kind is EventKind.ERROR else CLOSED_WITHOUT_RESULT
                return _error_response(error)
    raise StreamError(Status.INTERNAL, "the run ended without a terminal event")


# What the OpenAPI document says a flow call takes.
FLOW_BODY = Schema(
    type=OpenAPIType.OBJECT,
    properties={"data": Schema(description="the flow's input, any JSON value")},
    description="optional; other keys are ignored",
)
RECONNECT_HEADER = Parameter(
    name=STREAM_ID_HEADER,
    param_in=ParamType.HEADER,
    schema=Schema(type=OpenAPIType.STRING),
    description="With a streaming Accept: follow this earlier run instead of starting one.",
)


def flow_router(registry: FlowRegistry, runner_of: Any) -> Router:
    """Routes for the flows of `registry`; `runner_of(request)` gives the FlowRunner."""

    @post(
        "/{name:str}",
        status_code=200,
        responses=errors(ErrorEnvelope, 400, 404, 409),
        operation_class=with_request(FLOW_BODY, headers=[RECONNECT_HEADER], base=JsonOrEventStream),
    )
    async def run_flow(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
        try:
            return await _handle(request, name)
        except StreamError as exc:
            return _error_response(exc)

    async def _handle(request: Request[Any, Any, Any], name: str) -> Response[Any]:
        flow: Flow | None = registry.get(name)
        if flow is None:
            raise StreamError(Status.NOT_FOUND, f"no flow named {name!r}")
        streaming = wants_stream(
            request.headers.get("accept", ""), request.query_params.get("stream")
        )
        data = _parse_input(await request.body())
        manager = manager_of(request)
        reconnect_id = request.headers.get(STREAM_ID_HEADER, "").strip()
        if streaming and reconnect_id:
            return await _reconnect(request, manager, reconnect_id, _resume_cursor(request))
        runner: FlowRunner = runner_of(request)
        stream_id = await runner.start(flow, data)
        # A new run's starter may hand its readers a token for this run only.
        token = read_token_headers(request, stream_id)
        if not streaming:
            return await _run_to_end(manager, stream_id, token)
        batches = await manager.subscribe_batches(stream_id)
        return _stream_response(request, batches, stream_id, token)

    return Router(path="/flows", route_handlers=[run_flow])

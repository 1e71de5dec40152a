"""A durable proxy for OpenAI-compatible LLM streams (OpenAI, vLLM, SGLang, ...).

`POST /v1/responses` and `POST /v1/chat/completions` with `"stream": true` go to
the one configured upstream. A background run owned by the app, not by the
request, reads the upstream's SSE to its end and records every event in a
stream named by the response id (chat: the completion id), its data kept byte
for byte and its SSE event name as the event type. The client is served from
the log, like every reader: it sees an event only once it is durable, and a
dropped client loses nothing. It resumes with
`GET /v1/responses/{id}?stream=true&starting_after=N` (OpenAI's background-mode
resume), or, for chat completions, through the native SSE protocol.

An upstream error, a silence past the timeout or a broken connection ends the
stream with an error; Responses clients first get a `response.failed` event
and chat clients an `{"error": ...}` chunk, as the upstream itself would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import httpx
from litestar import Litestar, Request, Response, Router, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import ServerSentEventMessage, Stream

from app import __version__
from app.auth import read_token_headers
from app.config import Settings
from app.errors import Status, StreamError, http_status, retry_headers
from app.log import Event, EventKind, NewEvent, StreamManager, StreamStatus
from app.log.api import AppendRequest, NotJson, decode_json
from app.protocols import manager_of
from app.protocols.events import cursor_from, flag_from, settings_of
from app.protocols.openapi import JsonOrEventStream, OpenAIErrorEnvelope, errors
from app.protocols.runs import runs_of
from app.protocols.sse import KEEPALIVE, SharedFrames, sse_response

log = logging.getLogger("streamkeep.proxy")

CONNECT_TIMEOUT_SECONDS = 10.0
# Who appends, for the metrics (appends by origin).
ORIGIN = "proxy"
SHUTDOWN_MESSAGE = "streamkeep shut down while the upstream was answering"
CANCELLED_MESSAGE = "cancelled by the client"


class Api(Enum):
    RESPONSES = "/responses"
    CHAT = "/chat/completions"

    def stream_id(self, first: UpstreamEvent) -> str:
        """The durable stream's name: the response id (chat: the completion id)."""
        data = first.json
        owner = data.get("response") if self is Api.RESPONSES else data
        stream_id = owner.get("id") if isinstance(owner, dict) else None
        if not isinstance(stream_id, str) or not stream_id:
            raise upstream_failure(f"the upstream's first event carries no id: {first.data[:200]}")
        return stream_id


@dataclass(slots=True)
class UpstreamEvent:
    """One SSE event as the upstream sent it: its name and its data text."""

    event: str | None
    data: str
    json: Any = None

    @property
    def type(self) -> str | None:
        if isinstance(self.json, dict) and isinstance(self.json.get("type"), str):
            return str(self.json["type"])
        return self.event

    def as_chunk(self) -> NewEvent:
        return NewEvent(EventKind.CHUNK, self.data.encode(), self.event)


CHAT_DONE = "[DONE]"


@dataclass(slots=True)
class UpstreamReply:
    """A plain (non-stream) upstream answer, relayed to the client as it is."""

    status_code: int
    content_type: str
    body: bytes

    def response(self) -> Response[bytes]:
        return Response(self.body, status_code=self.status_code, media_type=self.content_type)


def upstream_failure(message: str, status: Status = Status.UNAVAILABLE) -> StreamError:
    return StreamError(status, message)


def parse_upstream_event(event: str | None, data: str) -> UpstreamEvent:
    if data == CHAT_DONE:
        return UpstreamEvent(event, data)
    try:
        return UpstreamEvent(event, data, json.loads(data))
    except ValueError:
        raise upstream_failure(
            f"the upstream sent an event that is not JSON: {data[:200]}"
        ) from None


async def upstream_events(response: httpx.Response) -> AsyncIterator[UpstreamEvent]:
    """The upstream's SSE events. Its id: and retry: fields are dropped (streamkeep
    does the resuming), and so is an event cut off by the end of the body."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield parse_upstream_event(event, "\n".join(data))
            event, data = None, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


# -- recording one upstream call ---------------------------------------------------------


class ProxyRun:
    """Reads one upstream call to its end and records it; owned by the app's Runs.

    `ready` resolves once the client can be answered: with the stream id, or
    with the upstream's own non-stream answer; it fails if the call failed first.
    """

    def __init__(
        self,
        api: Api,
        manager: StreamManager,
        client: httpx.AsyncClient,
        request: httpx.Request,
        named: Callable[[str], None],
    ) -> None:
        self.api = api
        self.named = named
        self.manager = manager
        self.client = client
        self.request = request
        self.ready: asyncio.Future[str | UpstreamReply] = asyncio.get_running_loop().create_future()
        # The request may have stopped waiting (it timed out): its failure is then nobody's.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.stream_id: str | None = None
        self.snapshot: dict[str, Any] = {}
        self.last_sequence_number = -1
        # The upstream's end was seen (read no further); the stream's end was committed.
        self.upstream_ended = False
        self.recorded_end = False
        # Why the run was cancelled: the app shutting down, unless whoever cancels says.
        self.stop_reason = upstream_failure(SHUTDOWN_MESSAGE)

    async def run(self) -> None:
        try:
            response = await self.client.send(self.request, stream=True)
            try:
                await self._serve(response)
            finally:
                await response.aclose()
        except asyncio.CancelledError:
            await self._end_with_failure(self.stop_reason)
            raise
        except StreamError as exc:
            await self._end_with_failure(exc)
        except httpx.HTTPError as exc:
            await self._end_with_failure(transport_failure(exc))
        except Exception as exc:
            log.exception("proxied call %s failed", self.stream_id or "(not started)")
            await self._end_with_failure(StreamError(Status.INTERNAL, repr(exc)))
        finally:
            self._not_started(upstream_failure("the upstream call ended before it started"))

    def _not_started(self, error: StreamError) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)

    async def _serve(self, response: httpx.Response) -> None:
        if response.is_redirect:
            raise upstream_failure(
                f"the upstream answered {response.status_code} with a redirect; "
                "streamkeep follows none: set STREAMKEEP_UPSTREAM_URL to the final address"
            )
        content_type = response.headers.get("content-type", "")
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            body = await response.aread()
            self.ready.set_result(UpstreamReply(response.status_code, content_type, body))
            return
        events = upstream_events(response)
        first = await anext(events, None)
        if first is None:
            raise upstream_failure("the upstream stream ended before its first event")
        await self._open(self.api.stream_id(first))
        await self._record_until_end(first, events)

    async def _open(self, stream_id: str) -> None:
        await self.manager.open(stream_id, origin=ORIGIN)
        self.stream_id = stream_id
        self.named(stream_id)
        self.ready.set_result(stream_id)

    async def _record_until_end(
        self, first: UpstreamEvent, events: AsyncIterator[UpstreamEvent]
    ) -> None:
        """Append what the upstream sends, one transaction per burst, until it ends.

        A reader task keeps reading while a batch commits, so a fast upstream
        costs one commit per burst, not per token. Each batch is atomic: if one
        fails, nothing after it is written and no event is ever missing in between.
        """
        queue: asyncio.Queue[UpstreamEvent | BaseException | None] = asyncio.Queue()
        queue.put_nowait(first)
        reader = asyncio.create_task(read_into(events, queue))
        try:
            while not self.upstream_ended:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                await self._record(items)
        finally:
            reader.cancel()
            await asyncio.wait({reader})

    async def _record(self, items: list[UpstreamEvent | BaseException | None]) -> None:
        batch: list[NewEvent] = []
        for item in items:
            if isinstance(item, BaseException):
                await self._append(batch)
                raise item
            if item is None:
                await self._append(batch)
                raise upstream_failure("the upstream closed the stream before the response ended")
            batch.extend(self._events_for(item))
            if self.upstream_ended:
                break
        await self._append(batch)

    def _events_for(self, item: UpstreamEvent) -> list[NewEvent]:
        """The log events for one upstream event: its chunk, and the end if it is one."""
        if item.data == CHAT_DONE:
            self.upstream_ended = True
            return [NewEvent.done(None)]
        self._remember(item.json)
        events = [item.as_chunk()]
        end = self._end_of(item)
        if end is not None:
            self.upstream_ended = True
            events.append(end)
        return events

    def _remember(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if isinstance(data.get("response"), dict):
            self.snapshot = data["response"]
        if isinstance(data.get("sequence_number"), int):
            self.last_sequence_number = data["sequence_number"]

    def _end_of(self, item: UpstreamEvent) -> NewEvent | None:
        data, kind = item.json, item.type
        if self.api is Api.CHAT:
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                message = message_of(data["error"], "the upstream failed")
                return NewEvent.error(StreamError(Status.UNKNOWN, message, data["error"]))
            return None
        if kind in ("response.completed", "response.incomplete"):
            return NewEvent.done(self.snapshot)
        if kind == "response.failed":
            message = message_of(self.snapshot.get("error"), "the upstream response failed")
            return NewEvent.error(StreamError(Status.UNKNOWN, message, self.snapshot))
        if kind == "error":
            message = message_of(data, "the upstream failed")
            return NewEvent.error(StreamError(Status.UNKNOWN, message, self.failed(message)))
        return None

    async def _append(self, batch: list[NewEvent]) -> None:
        if batch and self.stream_id is not None:
            await self.manager.submit(AppendRequest(self.stream_id, batch, origin=ORIGIN))
            self.recorded_end = batch[-1].kind.is_terminal

    async def _end_with_failure(self, error: StreamError) -> None:
        """Tell the client in its own dialect, then end the stream with the error."""
        if self.stream_id is None:
            self._not_started(error)
            return
        if self.recorded_end:
            return
        if self.api is Api.RESPONSES:
            failed = self.failed(error.message)
            error = StreamError(error.status, error.message, failed)
            notice = {
                "type": "response.failed",
                "sequence_number": self.last_sequence_number + 1,
                "response": failed,
            }
            chunk = NewEvent.chunk(notice, type="response.failed")
        else:
            chunk = NewEvent.chunk({"error": openai_error(error)})
        try:
            await self._append([chunk, NewEvent.error(error)])
        except StreamError as exc:
            # FAILED_PRECONDITION: it was cancelled (through any replica), which ended it.
            if exc.status is not Status.FAILED_PRECONDITION:
                # The log is down: live readers here end now, and the idle sweep
                # ends the stream itself once the database is back.
                log.warning("could not record the end of %r: %s", self.stream_id, exc)
                self.manager.fail_readers(self.stream_id, error)

    def failed(self, message: str) -> dict[str, Any]:
        return {
            **self.snapshot,
            "status": "failed",
            "error": {"code": "server_error", "message": message},
        }


def message_of(error: Any, fallback: str) -> str:
    """The "message" of an upstream error object, or the fallback."""
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) and message else fallback


async def read_into(
    events: AsyncIterator[UpstreamEvent],
    queue: asyncio.Queue[UpstreamEvent | BaseException | None],
) -> None:
    """Upstream events into the queue; then None at the end, or the failure."""
    try:
        async for event in events:
            queue.put_nowait(event)
        queue.put_nowait(None)
    except (StreamError, httpx.HTTPError) as exc:
        queue.put_nowait(exc)


def transport_failure(exc: httpx.HTTPError) -> StreamError:
    if isinstance(exc, httpx.TimeoutException):
        return upstream_failure(
            f"the upstream stayed silent too long ({type(exc).__name__})", Status.DEADLINE_EXCEEDED
        )
    return upstream_failure(f"the upstream connection failed: {exc!r}")


# -- encoding for OpenAI clients -----------------------------------------------------------


def openai_error(err: StreamError) -> dict[str, Any]:
    return {"message": err.message, "type": err.status.lower(), "param": None, "code": err.status}


def openai_error_response(_: Request, exc: StreamError) -> Response[dict[str, Any]]:  # type: ignore[type-arg]
    status = http_status(exc.status)
    return Response({"error": openai_error(exc)}, status_code=status, headers=retry_headers(status))


def sequence_number(event: Event) -> int:
    """The upstream's sequence_number, or the log's own numbering from 0 if it had none."""
    data = event.json()
    if isinstance(data, dict) and isinstance(data.get("sequence_number"), int):
        return int(data["sequence_number"])
    return event.seq - 1


def openai_frame(event: Event, api: Api) -> bytes:
    """A recorded event as the upstream sent it: event name and data, nothing else."""
    if event.kind is EventKind.CHUNK:
        data = event.payload.decode()
        return ServerSentEventMessage(data=data, event=event.type, sep="\n").encode()
    if event.kind is EventKind.DONE and api is Api.CHAT:
        return ServerSentEventMessage(data=CHAT_DONE, sep="\n").encode()
    return b""


@functools.cache
def shared_openai_frames(api: Api) -> SharedFrames:
    """The process's frames of one API, shared by its readers (see SharedFrames)."""
    return SharedFrames(functools.partial(openai_frame, api=api))


def wanted(event: Event, starting_after: int | None) -> bool:
    """Whether a resuming reader gets this event: chunks after its sequence number."""
    return (
        starting_after is None
        or event.kind is not EventKind.CHUNK
        or sequence_number(event) > starting_after
    )


async def openai_body(
    stream_id: str,
    batches: AsyncIterator[list[Event]],
    api: Api,
    starting_after: int | None,
) -> AsyncIterator[bytes]:
    frame = shared_openai_frames(api)
    try:
        async with contextlib.aclosing(batches):  # type: ignore[type-var]
            async for batch in batches:
                if not batch:  # idle: a keepalive
                    yield KEEPALIVE
                elif body := b"".join(frame(e) for e in batch if wanted(e, starting_after)):
                    yield body
    except StreamError as exc:
        # After the 200 there is no status left to change, and OpenAI's dialect has
        # no frame for "reader stopped" (shutdown, database gone, stream deleted):
        # end the body; the client resumes with starting_after.
        log.info("reader of %r stopped: %s", stream_id, exc)


async def replay(
    request: Request,  # type: ignore[type-arg]
    stream_id: str,
    api: Api,
    starting_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> Stream:
    settings = settings_of(request)
    batches = await manager_of(request).subscribe_batches(
        stream_id, idle_seconds=settings.sse_keepalive_seconds
    )
    body = openai_body(stream_id, batches, api, starting_after)
    return sse_response(request, body, headers)


# -- handlers -------------------------------------------------------------------------------


def upstream_of(request: Request) -> httpx.AsyncClient:  # type: ignore[type-arg]
    client: httpx.AsyncClient | None = request.app.state.upstream
    if client is None:
        raise StreamError(
            Status.UNAVAILABLE, "the proxy is off: set STREAMKEEP_UPSTREAM_URL to enable it"
        )
    return client


def upstream_request(
    client: httpx.AsyncClient, settings: Settings, api: Api, body: bytes, stream: bool
) -> httpx.Request:
    """The call to the one configured upstream: nothing from the client picks the URL."""
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
        "User-Agent": f"streamkeep/{__version__}",
    }
    if settings.upstream_api_key:
        headers["Authorization"] = f"Bearer {settings.upstream_api_key}"
    url = settings.upstream_url.rstrip("/") + api.value
    return client.build_request("POST", url, content=body, headers=headers)


async def proxy(request: Request, api: Api) -> Response[Any]:  # type: ignore[type-arg]
    client = upstream_of(request)
    settings = settings_of(request)
    body = await request.body()
    try:
        parsed = decode_json(body)
    except NotJson:
        raise StreamError(Status.INVALID_ARGUMENT, "the body must be a JSON object") from None
    if not isinstance(parsed, dict):
        raise StreamError(Status.INVALID_ARGUMENT, "the body must be a JSON object")
    if parsed.get("stream") is not True:
        return await relay(client, upstream_request(client, settings, api, body, stream=False))
    runs = runs_of(request)
    # Known by a provisional key until the first upstream event names the stream.
    key = f"upstream-call-{uuid.uuid4()}"
    run = ProxyRun(
        api,
        manager_of(request),
        client,
        upstream_request(client, settings, api, body, stream=True),
        named=lambda stream_id: runs.rename(key, stream_id),
    )
    task = runs.start(key, run.run())
    try:
        # The client's answer waits for the first event (or the upstream's refusal);
        # the run itself goes on without the request. The run's own timeouts bound
        # this wait; this bound is for an upstream that trickles bytes but no event.
        first_event_limit = CONNECT_TIMEOUT_SECONDS + settings.upstream_timeout_seconds
        started = await asyncio.wait_for(asyncio.shield(run.ready), first_event_limit)
    except TimeoutError:
        run.stop_reason = upstream_failure(
            "the upstream sent no event in time", Status.DEADLINE_EXCEEDED
        )
        task.cancel()
        raise run.stop_reason from None
    if isinstance(started, UpstreamReply):
        return started.response()
    # The caller may hand its readers a token for this response's stream only.
    return await replay(request, started, api, headers=read_token_headers(request, started))


async def relay(client: httpx.AsyncClient, upstream: httpx.Request) -> Response[bytes]:
    """A non-stream call, passed through unrecorded (there is nothing to resume)."""
    try:
        response = await client.send(upstream)
    except httpx.HTTPError as exc:
        raise transport_failure(exc) from None
    if response.is_redirect:
        raise upstream_failure(f"the upstream answered {response.status_code}: a redirect")
    content_type = response.headers.get("content-type", "application/json")
    return UpstreamReply(response.status_code, content_type, response.content).response()


# What every failure of this API looks like (see openai_error_response); a refusal by
# the upstream is relayed as it is, in OpenAI's shape too.
ERRORS = errors(OpenAIErrorEnvelope, 400, 404, 409)


@post("/responses", status_code=200, responses=ERRORS, operation_class=JsonOrEventStream)
async def create_response(request: Request) -> Response[Any]:  # type: ignore[type-arg]
    return await proxy(request, Api.RESPONSES)


@post("/chat/completions", status_code=200, responses=ERRORS, operation_class=JsonOrEventStream)
async def create_chat_completion(request: Request) -> Response[Any]:  # type: ignore[type-arg]
    return await proxy(request, Api.CHAT)


@get("/responses/{response_id:str}", responses=ERRORS, operation_class=JsonOrEventStream)
async def retrieve_response(
    request: Request,  # type: ignore[type-arg]
    response_id: FromPath[str],
    stream: FromQuery[str | None] = None,
    starting_after: FromQuery[str | None] = None,
) -> Response[Any]:
    """The response object, or with ?stream=true its events after `starting_after`."""
    after = cursor_from(starting_after, "starting_after")
    if flag_from(stream, "stream"):
        return await replay(request, response_id, Api.RESPONSES, after)
    return Response(await response_object(manager_of(request), response_id))


@post("/responses/{response_id:str}/cancel", status_code=200, responses=ERRORS)
async def cancel_response(request: Request, response_id: FromPath[str]) -> dict[str, Any]:  # type: ignore[type-arg]
    """End the stream as cancelled, and stop its upstream call if it runs here.

    The end is written to the log first: a run on another replica then fails its
    next append and stops reading its upstream too.
    """
    manager = manager_of(request)
    info = await manager.info(response_id)
    if info.is_open:
        cancelled = {**await latest_snapshot(manager, response_id), "status": "cancelled"}
        end = NewEvent.error(StreamError(Status.CANCELLED, CANCELLED_MESSAGE, cancelled))
        try:
            await manager.submit(AppendRequest(response_id, [end], origin=ORIGIN))
        except StreamError as exc:
            if exc.status is not Status.FAILED_PRECONDITION:
                raise  # (FAILED_PRECONDITION: it ended meanwhile; answer with that end)
    run = runs_of(request).get(response_id)
    if run is not None:
        run.cancel()
    return await response_object(manager, response_id)


async def response_object(manager: StreamManager, response_id: str) -> dict[str, Any]:
    """The final response once the stream ended, else the latest one the upstream sent."""
    info = await manager.info(response_id)
    if info.status is StreamStatus.DONE and info.output:
        output = json.loads(info.output)
        if isinstance(output, dict):
            return output
    if info.status is StreamStatus.ERROR:
        last = await manager.read(response_id, after=info.last_seq - 1, limit=1)
        details = last[0].as_error().details if last else None
        if isinstance(details, dict):
            return details
    return await latest_snapshot(manager, response_id)


async def latest_snapshot(manager: StreamManager, response_id: str) -> dict[str, Any]:
    """The last response object any recorded event carried (response.created, ...)."""
    snapshot: dict[str, Any] = {"id": response_id, "object": "response"}
    after = 0
    while page := await manager.read(response_id, after=after):
        for event in page:
            data = event.json() if event.kind is EventKind.CHUNK else None
            if isinstance(data, dict) and isinstance(data.get("response"), dict):
                snapshot = data["response"]
        after = page[-1].seq
        if page[-1].is_terminal:
            break
    return snapshot


@asynccontextmanager
async def upstream_lifespan(app: Litestar) -> AsyncIterator[None]:
    """One HTTP client for the upstream, shared by every proxied call."""
    settings: Settings = app.state.settings
    if not settings.upstream_url:
        app.state.upstream = None
        yield
        return
    if not settings.upstream_url.startswith(("http://", "https://")):
        raise ValueError(
            f"STREAMKEEP_UPSTREAM_URL={settings.upstream_url!r} must be an http(s) URL"
        )
    timeout = settings.upstream_timeout_seconds
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_SECONDS)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
        follow_redirects=False,
        # Only the configured upstream: no proxy or credentials from the environment.
        trust_env=False,
    )
    app.state.upstream = client
    try:
        yield
    finally:
        await client.aclose()


router = Router(
    path="/v1",
    route_handlers=[create_response, create_chat_completion, retrieve_response, cancel_response],
    exception_handlers={StreamError: openai_error_response},
)

"""A Python client for durable flows, the counterpart of Genkit's `streamFlow`.

    from app.client import stream_flow

    async with stream_flow("http://127.0.0.1:4437/flows/countdown", input={"count": 5}) as run:
        async for chunk in run:
            print(chunk)
        print(run.result, run.stream_id)

When the connection drops, it reconnects by itself with the stream id and
resumes after the last chunk it gave, so nothing is repeated or lost. Pass
`stream_id=` to follow a run that someone else started.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx

from app.errors import Status, StreamError

STREAM_ID_HEADER = "X-Genkit-Stream-Id"
_NO_INPUT = object()


class FlowStream:
    """One run's chunks (async iteration), then `result`; raises StreamError on a failed run."""

    def __init__(
        self,
        url: str,
        *,
        input: Any = _NO_INPUT,
        stream_id: str | None = None,
        headers: dict[str, str] | None = None,
        max_reconnects: int = 10,
        reconnect_delay: float = 0.2,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.stream_id = stream_id
        self.chunks_received = 0
        self._input = input
        self._headers = headers or {}
        self._max_reconnects = max_reconnects
        self._reconnect_delay = reconnect_delay
        self._client = client
        self._own_client = client is None
        self._finished = False
        self._result: Any = None
        self._started = False

    @property
    def result(self) -> Any:
        if not self._finished:
            raise RuntimeError("the run has not finished: iterate over its chunks first")
        return self._result

    async def __aenter__(self) -> FlowStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._started:
            raise RuntimeError("a FlowStream can be iterated only once")
        self._started = True
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Any]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None))
        failures = 0
        while not self._finished:
            try:
                async for chunk in self._one_connection(self._client):
                    failures = 0
                    yield chunk
            except (httpx.TransportError, _Incomplete) as exc:
                failures += 1
                if self.stream_id is None or failures > self._max_reconnects:
                    raise StreamError(
                        Status.UNAVAILABLE, f"lost the connection to the flow: {exc}"
                    ) from exc
                await asyncio.sleep(self._reconnect_delay * failures)

    async def _one_connection(self, client: httpx.AsyncClient) -> AsyncIterator[Any]:
        headers = {"Accept": "text/event-stream", **self._headers}
        params: dict[str, str] = {}
        if self.stream_id is None:
            body = {} if self._input is _NO_INPUT else {"data": self._input}
        else:
            body = {}
            headers[STREAM_ID_HEADER] = self.stream_id
            params["after"] = str(self.chunks_received)
        async with client.stream("POST", self.url, json=body, headers=headers, params=params) as r:
            if r.status_code == 204:
                raise StreamError(Status.NOT_FOUND, "stream not found (unknown or expired)")
            if r.status_code != 200:
                raise _http_error(r.status_code, (await r.aread()).decode(errors="replace"))
            self.stream_id = self.stream_id or r.headers.get(STREAM_ID_HEADER)
            buffer = b""
            async for data in r.aiter_bytes():
                buffer += data
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    message = _parse_frame(frame)
                    if "message" in message:
                        self.chunks_received += 1
                        yield message["message"]
                    elif "result" in message:
                        self._result, self._finished = message["result"], True
                        return
                    elif "error" in message:
                        self._finished = True
                        raise StreamError.from_dict(message["error"])
                    else:
                        raise StreamError(Status.INTERNAL, f"unknown frame: {frame[:200]!r}")
        raise _Incomplete("the response ended without a result")


class _Incomplete(Exception):
    pass


def _parse_frame(frame: bytes) -> dict[str, Any]:
    if not frame.startswith(b"data: "):
        raise StreamError(Status.INTERNAL, f"unexpected frame: {frame[:200]!r}")
    parsed = json.loads(frame[6:])
    if not isinstance(parsed, dict):
        raise StreamError(Status.INTERNAL, f"unexpected frame: {frame[:200]!r}")
    return parsed


def _http_error(status_code: int, body: str) -> StreamError:
    try:
        return StreamError.from_dict(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return StreamError(Status.UNKNOWN, f"HTTP {status_code}: {body[:500]}")


def stream_flow(
    url: str,
    *,
    input: Any = _NO_INPUT,
    stream_id: str | None = None,
    headers: dict[str, str] | None = None,
    max_reconnects: int = 10,
    client: httpx.AsyncClient | None = None,
) -> FlowStream:
    """Start a run of the flow at `url` with `input`, or follow run `stream_id`."""
    return FlowStream(
        url,
        input=input,
        stream_id=stream_id,
        headers=headers,
        max_reconnects=max_reconnects,
        client=client,
    )

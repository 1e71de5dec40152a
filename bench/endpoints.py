"""How each wire protocol creates a stream, appends a small JSON event and counts what it holds.

This is the one piece scenario 1 (HTTP appends) needs per protocol. A new
append endpoint is one more AppendEndpoint in APPEND_ENDPOINTS; the scenario
finds out at run time whether the service answers it and reports "pending
endpoint" until it does. The same definition drives the peers (scenario 9).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from bench.workload import SMALL_EVENT_BYTES

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class AppendEndpoint:
    name: str
    path: Callable[[str], str]  # stream name -> URL path
    create_method: str = "PUT"
    create_headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    append_method: str = "POST"
    append_headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    body: bytes = SMALL_EVENT_BYTES
    # GET path of a catch-up read from an offset, returning a JSON array of events;
    # responses are pages, followed through Stream-Next-Offset until up to date.
    read_from: Callable[[str, str], str] | None = None

    async def create(self, client: httpx.AsyncClient, stream: str) -> bool:
        """Create the stream; False when the server has no such route (yet)."""
        response = await client.request(
            self.create_method, self.path(stream), headers=self.create_headers
        )
        if response.status_code in (404, 405):
            return False
        response.raise_for_status()
        return True

    async def count(self, client: httpx.AsyncClient, stream: str) -> int | None:
        """How many events the stream holds (to check acknowledged == committed)."""
        if self.read_from is None:
            return None
        total, offset = 0, "-1"
        while True:
            response = await client.get(self.read_from(stream, offset))
            response.raise_for_status()
            total += len(response.json())
            if response.headers.get("stream-up-to-date") == "true":
                return total
            offset = response.headers["stream-next-offset"]


DURABLE_STREAMS = AppendEndpoint(
    name="Durable Streams",
    path=lambda stream: f"/v1/stream/{stream}",
    read_from=lambda stream, offset: f"/v1/stream/{stream}?offset={offset}",
)

APPEND_ENDPOINTS = [DURABLE_STREAMS]

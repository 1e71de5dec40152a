"""A plain SSE frame reader for tests: shows comments and retry frames, which SDKs hide."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Frame:
    id: str | None = None
    event: str | None = None
    data: list[str] = field(default_factory=list)
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def is_message(self) -> bool:
        """Whether a browser would dispatch it (it has data)."""
        return bool(self.data)

    @property
    def text(self) -> str:
        return "\n".join(self.data)

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def seq(self) -> int:
        assert self.id is not None
        return int(self.id)


def frames(response: httpx.Response) -> Iterator[Frame]:
    """Frames as they arrive (one per blank line)."""
    frame = Frame()
    for line in response.iter_lines():
        if line == "":
            yield frame
            frame = Frame()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            frame.comments.append(value)
        elif name == "id":
            frame.id = value
        elif name == "event":
            frame.event = value
        elif name == "data":
            frame.data.append(value)
        elif name == "retry":
            frame.retry = int(value)


def messages(response: httpx.Response) -> Iterator[Frame]:
    return (f for f in frames(response) if f.is_message)


def until_end(received: Iterator[Frame]) -> Iterator[Frame]:
    """Frames up to and including the `end` frame."""
    for frame in received:
        yield frame
        if frame.event == "end":
            return


def read_until_end(client: httpx.Client, url: str, **kwargs: Any) -> list[Frame]:
    """Every message of one SSE response, through the `end` frame."""
    with client.stream("GET", url, **kwargs) as response:
        assert response.status_code == 200, response.read()
        return list(until_end(messages(response)))

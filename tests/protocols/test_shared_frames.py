"""SharedFrames: readers of one stream share each event's encoding."""

from __future__ import annotations

from datetime import UTC, datetime

from app.log import Event, EventKind
from app.protocols.sse import SharedFrames


def event(seq: int, payload: bytes = b'{"n":1}', stream_id: str = "s") -> Event:
    return Event(stream_id, seq, EventKind.CHUNK, payload, datetime.now(UTC))


class CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, event: Event) -> bytes:
        self.calls += 1
        return b"data: " + event.payload + b"\n\n"


def test_an_event_is_encoded_once_for_every_reader() -> None:
    encode = CountingEncoder()
    frames = SharedFrames(encode)
    first = event(1)
    assert {frames(first) for _reader in range(1000)} == {b'data: {"n":1}\n\n'}
    assert encode.calls == 1


def test_an_equal_event_of_a_recreated_stream_is_encoded_anew() -> None:
    # Keyed by the event object, not (stream, seq): a stream deleted and created
    # again under the same id has other events with the same seqs.
    encode = CountingEncoder()
    frames = SharedFrames(encode)
    old = event(1, b'"old"')
    assert frames(old) == b'data: "old"\n\n'
    new = event(1, b'"new"')
    assert frames(new) == b'data: "new"\n\n'
    assert encode.calls == 2


def test_the_oldest_entry_makes_room() -> None:
    encode = CountingEncoder()
    frames = SharedFrames(encode, entries=2)
    a, b, c = event(1), event(2), event(3)
    for e in (a, b, c):
        frames(e)
    frames(c)
    frames(b)
    assert encode.calls == 3  # b and c are still kept
    frames(a)
    assert encode.calls == 4  # a was evicted when c came


def test_large_events_are_encoded_but_not_kept() -> None:
    encode = CountingEncoder()
    frames = SharedFrames(encode, max_payload=4)
    big = event(1, b'"12345"')
    assert frames(big) == frames(big) == b'data: "12345"\n\n'
    assert encode.calls == 2

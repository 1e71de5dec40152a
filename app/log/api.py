"""The event log's public types: events, stream metadata and append requests.

A stream is an append-only list of events numbered 1..N without gaps. The last
event of a finished stream is its terminal event (done, error or closed); no
event follows it. Payloads are bytes: JSON for flows and typed events, raw
bytes for binary Durable Streams. Nothing here knows about HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import msgspec

from app.errors import StreamError


class EventKind(StrEnum):
    CHUNK = "chunk"
    DONE = "done"
    ERROR = "error"
    CLOSED = "closed"

    @property
    def is_terminal(self) -> bool:
        return self is not EventKind.CHUNK


class StreamStatus(StrEnum):
    OPEN = "open"
    DONE = "done"
    ERROR = "error"
    CLOSED = "closed"


# The status a stream takes when its terminal event is committed.
STATUS_AFTER: dict[EventKind, StreamStatus] = {
    EventKind.DONE: StreamStatus.DONE,
    EventKind.ERROR: StreamStatus.ERROR,
    EventKind.CLOSED: StreamStatus.CLOSED,
}

JSON_CONTENT_TYPE = "application/json"


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, the one encoding of JSON payloads in the log.

    msgspec (already a dependency of Litestar) is about 20 times faster than
    json.dumps here, which mattered: encoding was a quarter of a flow's cost.
    Unsupported types raise TypeError, as with json.
    """
    return _encode(value)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class NotJson(ValueError):
    """A body that is not JSON the log can keep as it was sent (the message says why)."""


def decode_json(data: bytes) -> Any:
    """JSON sent by a client, decoded as encode_json will store it again.

    msgspec, as for encoding: ten times faster than json for a small event.
    It also refuses what json reads as something else, which json let through
    into the log: a number beyond a double's range (json reads infinity,
    stored as null) and an escaped unpaired surrogate (json reads it, UTF-8
    has no encoding for it, and storing it failed with a 500). Nesting too deep
    for the interpreter is refused too. Bodies in the other encodings a JSON
    reader may accept (UTF-16 or -32, a byte order mark) are read as UTF-8
    once converted, as json read them.
    """
    try:
        return _decode_utf8(data)
    except NotJson:
        converted = _as_utf8(data)
        if converted is None:
            raise
        return _decode_utf8(converted)


def _decode_utf8(data: bytes) -> Any:
    try:
        return _decode(data)
    except msgspec.ValidationError:
        raise NotJson("a number is beyond the range of a double") from None
    except msgspec.DecodeError as exc:
        message = str(exc)
        if message == "Input data was truncated":  # msgspec's word for both
            message = "it ends too early, or has an unpaired surrogate escape"
        raise NotJson(message) from None
    except UnicodeDecodeError:
        raise NotJson("a string is not valid UTF-8") from None
    except RecursionError:
        raise NotJson("it is nested too deeply") from None


def _as_utf8(data: bytes) -> bytes | None:
    """Another encoding json.detect_encoding recognises, as UTF-8 (None: it is UTF-8)."""
    encoding = json.detect_encoding(data)
    if encoding == "utf-8":
        return None
    try:
        return data.decode(encoding).encode()
    except UnicodeError:
        return None


# Events are created once per appended event: plain slotted dataclasses, not
# frozen ones, whose __init__ costs four times as much. Treat them as immutable.
@dataclass(slots=True)
class NewEvent:
    """An event before the log has numbered it."""

    kind: EventKind
    payload: bytes = b""
    type: str | None = None

    @classmethod
    def raw(cls, payload: bytes) -> NewEvent:
        """A chunk whose payload is stored as given (binary and text streams)."""
        return cls(EventKind.CHUNK, payload)

    @classmethod
    def chunk(cls, value: Any, type: str | None = None) -> NewEvent:
        return cls(EventKind.CHUNK, encode_json(value), type)

    @classmethod
    def done(cls, output: Any) -> NewEvent:
        return cls(EventKind.DONE, encode_json(output))

    @classmethod
    def error(cls, err: StreamError) -> NewEvent:
        return cls(EventKind.ERROR, encode_json(err.to_dict()))

    @classmethod
    def closed(cls) -> NewEvent:
        return cls(EventKind.CLOSED)


@dataclass(slots=True)
class Event:
    """A committed event."""

    stream_id: str
    seq: int
    kind: EventKind
    payload: bytes
    created_at: datetime
    type: str | None = None
    # False for every event of a multi-event append but its last: readers that
    # care (Durable Streams fork sub-offsets) can find the producer's batches.
    batch_end: bool = True

    @property
    def is_terminal(self) -> bool:
        return self.kind.is_terminal

    def json(self) -> Any:
        """The payload decoded as JSON (chunks, done outputs, errors)."""
        return _decode(self.payload) if self.payload else None

    def as_error(self) -> StreamError:
        return StreamError.from_dict(self.json())


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's row, as the log stores it."""

    id: str
    content_type: str
    status: StreamStatus
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    ttl_seconds: int | None
    expires_at: datetime | None
    idle_timeout_seconds: int | None
    abandon_at: datetime | None
    last_write_at: datetime
    last_seq: int
    output: bytes | None = None
    error_status: str | None = None
    error_message: str | None = None
    # Sliding retention: gone this long after the last read or write (None: off).
    idle_ttl_seconds: int | None = None
    # Absolute retention: gone at this time whatever happens (None: off).
    hard_expires_at: datetime | None = None
    # A fork reads events 1..fork_seq from `forked_from`; its own rows follow.
    forked_from: str | None = None
    fork_seq: int = 0
    # Live forks reading this stream: while > 0 its rows are kept, even once it is gone.
    fork_count: int = 0
    # The last writer sequence token accepted (it must grow, compared byte-wise).
    writer_seq: str | None = None
    # The idempotent producer whose append ended the stream, if one did.
    closed_by: str | None = None
    # Owned by the protocol that created the stream; the log never looks inside.
    attributes: dict[str, Any] | None = None

    @property
    def is_open(self) -> bool:
        return self.status is StreamStatus.OPEN

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    @property
    def chunk_tail(self) -> int:
        """The seq of the last event that is not the terminal one."""
        return self.last_seq if self.is_open else self.last_seq - 1


@dataclass(frozen=True, slots=True)
class ForkSpec:
    """Start a stream as a copy-on-write view of `source`'s events 1..`seq`."""

    source: str
    seq: int


@dataclass(frozen=True, slots=True)
class NewStream:
    id: str
    content_type: str = JSON_CONTENT_TYPE
    # How long a finished stream stays readable (None: until deleted or expired otherwise).
    ttl_seconds: int | None = 300
    idle_timeout_seconds: int | None = 600
    idle_ttl_seconds: int | None = None
    hard_expires_at: datetime | None = None
    fork: ForkSpec | None = None
    attributes: dict[str, Any] | None = None
    # Batches of events committed atomically with the creation (each batch is
    # one append); the last event of the last batch may end the stream.
    initial: tuple[tuple[NewEvent, ...], ...] = ()


@dataclass(frozen=True, slots=True)
class ProducerClaim:
    """An idempotent producer's (id, epoch, seq) on one append."""

    producer_id: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class ProducerState:
    epoch: int
    last_seq: int


class Problem(StrEnum):
    """Why the log refused a write, in StreamError.details["reason"]."""

    NOT_FOUND = "not_found"
    FINISHED = "finished"
    NOT_ABANDONED = "not_abandoned"
    STALE_EPOCH = "stale_epoch"
    EPOCH_NEEDS_SEQ_ZERO = "epoch_needs_seq_zero"
    SEQ_GAP = "seq_gap"
    WRITER_SEQ_REGRESSION = "writer_seq_regression"
    # The stream was deleted and created again since the caller read its row.
    REPLACED = "replaced"
    # Creating a fork:
    SOURCE_RETIRED = "source_retired"
    FORK_BEYOND_TAIL = "fork_beyond_tail"


# Not frozen: one is built per append in the committer's planning, and a
# frozen dataclass sets each field through object.__setattr__ (1.1 µs against
# 0.4). Nothing changes it once built.
@dataclass(slots=True)
class AppendResult:
    """What one append did: its events, and the stream as it was left."""

    events: list[Event]
    last_seq: int
    status: StreamStatus
    # A producer's retry of an append the log already has: nothing was written.
    duplicate: bool = False
    producer: ProducerState | None = None


@dataclass(slots=True)
class AppendRequest:
    """Events to append to one stream atomically.

    `abandoned_by` makes the append conditional: it only applies while the
    stream is still open with an abandon deadline at or before that time.
    The sweeper uses it so that a producer that writes at the last moment wins.

    `created_at` makes it apply only to the stream created at that time: a
    protocol that decided how to append from a stream row it read earlier
    (its content type, say) learns that the id now names another stream
    (Problem.REPLACED) instead of appending to it by the old row's rules.
    """

    stream_id: str
    events: list[NewEvent]
    abandoned_by: datetime | None = None
    created_at: datetime | None = None
    # Who appends (a protocol's name), for the metrics.
    origin: str = "api"
    # Idempotent producer: the log de-duplicates retries and fences stale epochs.
    producer: ProducerClaim | None = None
    # A token that must be greater (byte-wise) than the last one accepted.
    writer_seq: str | None = None
    # Run every check of this append, then fail with this error instead of
    # writing: for a payload the protocol found bad, whose error ranks below
    # the stream's own (closed, producer, sequence).
    reject: StreamError | None = None
    # Every event is an append of its own (pushed chunks queued together, one
    # request instead of one per chunk): each ends its batch.
    separate: bool = False


@dataclass(slots=True)
class LogStats:
    """Counters of one manager, read by the metrics endpoint when it is scraped."""

    appends: dict[str, int] = field(default_factory=dict)
    appended_bytes: dict[str, int] = field(default_factory=dict)
    commits: int = 0
    rejected_appends: int = 0
    storage_errors: int = 0
    wakeups: int = 0
    tail_reads: int = 0
    abandoned_streams: int = 0
    swept_streams: int = 0
    swept_events: int = 0

    def count_appends(self, origin: str, appends: int, payload_bytes: int) -> None:
        self.appends[origin] = self.appends.get(origin, 0) + appends
        self.appended_bytes[origin] = self.appended_bytes.get(origin, 0) + payload_bytes


@dataclass(slots=True)
class SweepReport:
    abandoned: int = 0
    deleted_streams: int = 0
    deleted_events: int = 0
    skipped: bool = False
    abandoned_ids: list[str] = field(default_factory=list)

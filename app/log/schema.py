"""The tables, as SQLAlchemy Core sees them. Alembic revisions create them;
a test checks that the migration head and these definitions agree."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; timestamptz on Postgres, readable text on SQLite.

    SQLite stores naive ISO text, which compares correctly as long as every
    value is UTC; this type makes sure of that in both directions.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the log; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


STATUSES = ("open", "done", "error", "closed")
KINDS = ("chunk", "done", "error", "closed")

streams = Table(
    "streams",
    metadata,
    Column("id", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime, nullable=True),
    # How long a finished stream stays readable (null: until deleted or expired otherwise).
    Column("ttl_seconds", Integer, nullable=True),
    # When the stream is gone for readers; the sweeper deletes it after that.
    Column("expires_at", UtcDateTime, nullable=True),
    # How long an open stream may go without a write before the sweeper ends it.
    Column("idle_timeout_seconds", Integer, nullable=True),
    Column("abandon_at", UtcDateTime, nullable=True),
    Column("last_write_at", UtcDateTime, nullable=False),
    Column("last_seq", BigInteger, nullable=False, server_default=text("0")),
    Column("output", LargeBinary, nullable=True),
    Column("error_status", Text, nullable=True),
    Column("error_message", Text, nullable=True),
    # Sliding retention: gone this long after the last read or write.
    Column("idle_ttl_seconds", Integer, nullable=True),
    # Absolute retention: gone at this time whatever happens.
    Column("hard_expires_at", UtcDateTime, nullable=True),
    # A fork reads events 1..fork_seq of forked_from; its own rows follow.
    Column("forked_from", Text, nullable=True),
    Column("fork_seq", BigInteger, nullable=False, server_default=text("0")),
    # Live forks reading this stream; its rows are kept while this is above 0.
    Column("fork_count", Integer, nullable=False, server_default=text("0")),
    # The last writer sequence token accepted (Durable Streams' Stream-Seq).
    Column("writer_seq", Text, nullable=True),
    # The idempotent producer whose append ended the stream.
    Column("closed_by", Text, nullable=True),
    # JSON owned by the protocol that created the stream.
    Column("attributes", Text, nullable=True),
    PrimaryKeyConstraint("id"),
    CheckConstraint("status IN ('open', 'done', 'error', 'closed')", name="status_known"),
    CheckConstraint("last_seq >= 0", name="last_seq_nonneg"),
    CheckConstraint("ttl_seconds >= 0", name="ttl_nonneg"),
)
Index("ix_streams_expires_at", streams.c.expires_at)
Index("ix_streams_abandon_at", streams.c.abandon_at)

# The streams columns as the hand-written statements of the hot paths name them
# (sqlite_commit, postgres_commit, sql.HotSql).
STREAM_COLUMNS = [column.name for column in streams.c]
TIME_COLUMNS = frozenset(c.name for c in streams.c if isinstance(c.type, UtcDateTime))

# Set by appends; everything else (creation settings, forks, attributes) is not.
APPENDED_COLUMNS = (
    "status",
    "updated_at",
    "finished_at",
    "expires_at",
    "abandon_at",
    "last_write_at",
    "last_seq",
    "output",
    "error_status",
    "error_message",
    "writer_seq",
    "closed_by",
)

events = Table(
    "events",
    metadata,
    # No foreign key to streams (migration 0004): Postgres checked it for every
    # inserted event, most of a flow's commit. Appends lock the stream's row and
    # deletions delete the events themselves, in the same transaction.
    Column("stream_id", Text, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    # An event type name for typed streams (SSE `event:`); null for plain chunks.
    Column("type", Text, nullable=True),
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    # False on every event of a multi-event append but its last.
    Column("batch_end", Boolean, nullable=False, server_default=true()),
    PrimaryKeyConstraint("stream_id", "seq"),
    CheckConstraint("kind IN ('chunk', 'done', 'error', 'closed')", name="kind_known"),
    CheckConstraint("seq > 0", name="seq_positive"),
)

# Idempotent producers: the last (epoch, seq) accepted from each producer of a
# stream, written in the same transaction as the append it accepted.
producers = Table(
    "producers",
    metadata,
    Column("stream_id", Text, ForeignKey("streams.id", ondelete="CASCADE"), nullable=False),
    Column("producer_id", Text, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    PrimaryKeyConstraint("stream_id", "producer_id"),
)

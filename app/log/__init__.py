"""The event log: durable streams as numbered rows. No HTTP in here."""

from __future__ import annotations

from typing import Any

from app.errors import Status, StreamError
from app.log.api import (
    AppendRequest,
    AppendResult,
    Event,
    EventKind,
    ForkSpec,
    NewEvent,
    Problem,
    ProducerClaim,
    ProducerState,
    StreamInfo,
    StreamStatus,
    SweepReport,
)
from app.log.db import asyncpg_dsn, is_sqlite, normalize_url
from app.log.manager import Clock, StreamManager, StreamWriter, utcnow
from app.log.memory import MemoryNotifier, MemoryStore
from app.log.sql import POSTGRES_COMMIT_LANES, SqlStore
from app.log.wakeup import PostgresListener, SqlitePoller

__all__ = [
    "AppendRequest",
    "AppendResult",
    "Clock",
    "Event",
    "EventKind",
    "ForkSpec",
    "MemoryStore",
    "NewEvent",
    "Problem",
    "ProducerClaim",
    "ProducerState",
    "SqlStore",
    "Status",
    "StreamError",
    "StreamInfo",
    "StreamManager",
    "StreamStatus",
    "StreamWriter",
    "SweepReport",
    "create_manager",
    "utcnow",
]


def create_manager(
    database_url: str,
    *,
    sqlite_poll_seconds: float = 0.002,
    sqlite_busy_timeout_ms: int = 5000,
    sqlite_synchronous: str = "NORMAL",
    pool_size: int = 5,
    postgres_commit_lanes: int = POSTGRES_COMMIT_LANES,
    **manager_options: Any,
) -> StreamManager:
    """A manager on `database_url` ("memory" for the in-memory store) with its wake-ups.

    `manager_options` go to StreamManager (clock, ttl_seconds, limits, ...).
    """
    if database_url == "memory":
        memory = MemoryStore()
        return StreamManager(memory, notifier=MemoryNotifier(memory), **manager_options)
    url = normalize_url(database_url)
    store = SqlStore(
        url,
        busy_timeout_ms=sqlite_busy_timeout_ms,
        sqlite_synchronous=sqlite_synchronous,
        pool_size=pool_size,
        postgres_commit_lanes=postgres_commit_lanes,
    )
    notifier: SqlitePoller | PostgresListener = (
        SqlitePoller(store, sqlite_poll_seconds)
        if is_sqlite(url)
        else PostgresListener(asyncpg_dsn(url))
    )
    return StreamManager(store, notifier=notifier, **manager_options)

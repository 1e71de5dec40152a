"""Database URLs and engines, set up the way each backend needs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool


def normalize_url(url: str) -> URL:
    """Accept the URLs people type (postgres://, sqlite:///file) and pick our async drivers."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        return parsed.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///FILE or postgresql://...")


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def sqlite_engine(
    url: URL,
    *,
    writer: bool,
    busy_timeout_ms: int = 5000,
    synchronous: str = "NORMAL",
    foreign_keys: bool = True,
    pool_size: int = 4,
    nullpool: bool = False,
) -> AsyncEngine:
    """An SQLite engine in WAL mode; a writer engine takes the write lock up front.

    The driver's own implicit transactions are switched off: readers run each
    SELECT in autocommit (a consistent snapshot per statement), writers start
    with BEGIN IMMEDIATE so that a read-then-write transaction can never fail
    to upgrade its lock (a deferred BEGIN fails at once with SQLITE_BUSY there,
    and busy_timeout does not help).
    """
    kwargs: dict[str, Any] = {}
    if nullpool:
        kwargs["poolclass"] = NullPool
    elif writer:
        # One connection for what SQLAlchemy writes (creates, deletes, sweeps):
        # a second would only wait on the file lock. Appends commit on their
        # own connection (sqlite_inline).
        kwargs.update(pool_size=1, max_overflow=0, pool_timeout=300)
    else:
        # Readers run every SELECT in autocommit, so a returned connection has no
        # transaction to roll back: skipping the reset saves a thread round trip
        # per read. All connections are kept, none is overflow: opening one costs
        # a thread, the file and the pragmas, too much to do per request.
        kwargs.update(
            pool_size=pool_size, max_overflow=0, pool_timeout=60, pool_reset_on_return=None
        )
    engine = create_async_engine(url, **kwargs)
    pragmas = [f"busy_timeout={int(busy_timeout_ms)}", *sqlite_pragmas(synchronous, foreign_keys)]

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()
        dbapi_conn.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if writer:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def sqlite_pragmas(synchronous: str = "NORMAL", foreign_keys: bool = True) -> list[str]:
    """What every connection to the file sets, besides its busy_timeout."""
    return [
        "journal_mode=WAL",
        f"synchronous={synchronous}",
        f"foreign_keys={'ON' if foreign_keys else 'OFF'}",
    ]


def postgres_engine(
    url: URL, *, pool_size: int = 5, commit_lanes: int = 1, nullpool: bool = False
) -> AsyncEngine:
    kwargs: dict[str, Any] = {
        "connect_args": {"server_settings": {"application_name": "streamkeep"}},
    }
    if nullpool:
        kwargs["poolclass"] = NullPool
    else:
        # No pre-ping: on asyncpg it is three round trips (BEGIN, ";", ROLLBACK) per
        # checkout. A connection lost while in use is discarded when it fails
        # (SQLAlchemy's statements; DriverPool for ours): an append
        # gets one 503, a read runs again on a new connection.
        # No overflow connections: they were closed as soon as returned, and a
        # new asyncpg connection costs its setup and type introspection queries
        # (a burst of 16 requests spent more time there than in its commits).
        # Up to three times pool_size are opened as needed and then kept, and one
        # more per commit lane, which the committer keeps (sql.SqlStore._commit_pool):
        # the read pool keeps up to two thirds, and SQLAlchemy's own statements
        # (creates, deletes, sweeps) need the rest even with pool_size 1.
        kwargs.update(pool_size=pool_size * 3 + commit_lanes, max_overflow=0)
    return create_async_engine(url, **kwargs)


def asyncpg_dsn(url: URL) -> str:
    """The URL in the form asyncpg.connect() takes, for the LISTEN connection."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)

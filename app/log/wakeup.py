"""Wake-ups from other processes: Postgres LISTEN/NOTIFY, or an SQLite poll.

Both only hint that rows may have changed; the manager's tails re-read the
rows themselves, so a lost or duplicated hint costs latency, never data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import asyncpg

from app.errors import StreamError
from app.log.sql import NOTIFY_CHANNEL, SqlStore

if TYPE_CHECKING:
    from app.log.manager import StreamManager

log = logging.getLogger("streamkeep.wakeup")


class SqlitePoller:
    """Finds appends by other processes on the same SQLite file.

    One query per interval for all watched streams together, and only while
    some local reader is waiting; local appends wake readers directly.
    """

    def __init__(self, store: SqlStore, interval: float = 0.1) -> None:
        self._store = store
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, manager: StreamManager) -> None:
        self._task = asyncio.create_task(self._run(manager), name="streamkeep-sqlite-poll")

    async def _run(self, manager: StreamManager) -> None:
        while True:
            await asyncio.sleep(self._interval)
            watched = manager.watched()
            if not watched:
                continue
            try:
                heads = await self._store.heads(list(watched))
            except StreamError as exc:
                log.warning("sqlite poll failed: %s", exc)
                continue
            for stream_id, seen in watched.items():
                head = heads.get(stream_id)
                if head is None:
                    manager.hint(stream_id, -1)
                elif head > seen:
                    manager.hint(stream_id, head)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class PostgresListener:
    """One LISTEN connection per process, outside the pool, reconnecting on loss.

    Notifications sent while it is disconnected are lost, so after every
    (re)connect all local readers re-check their rows.
    """

    def __init__(
        self, dsn: str, *, retry_seconds: float = 1.0, probe_seconds: float = 15.0
    ) -> None:
        self._dsn = dsn
        self._retry_seconds = retry_seconds
        self._probe_seconds = probe_seconds
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self, manager: StreamManager) -> None:
        self._task = asyncio.create_task(self._run(manager), name="streamkeep-pg-listen")
        # Give the first connection a moment so readers start with a live listener;
        # if Postgres is away the loop keeps retrying in the background.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout=10)

    async def _run(self, manager: StreamManager) -> None:
        def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            for stream_id, last_seq in _parse(payload):
                manager.hint(stream_id, last_seq)

        while True:
            try:
                self._lost.clear()
                self._conn = await asyncpg.connect(
                    self._dsn, server_settings={"application_name": "streamkeep-listen"}
                )
                self._conn.add_termination_listener(lambda _c: self._lost.set())
                await self._conn.add_listener(NOTIFY_CHANNEL, on_notify)
                self._connected.set()
                manager.wake_all()
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means: reconnect
                log.warning("postgres listener lost (%s); reconnecting", exc)
            finally:
                await self._close_connection()
            await asyncio.sleep(self._retry_seconds)

    async def _watch(self) -> None:
        """Return when the connection is lost; a periodic probe catches silent deaths."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=self._probe_seconds)
                return
            await asyncio.wait_for(self._conn.fetchval("SELECT 1"), timeout=self._probe_seconds)

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _parse(payload: str) -> list[tuple[str, int]]:
    try:
        entries = json.loads(payload)
        return [(str(stream_id), int(seq)) for stream_id, seq in entries]
    except (ValueError, TypeError):
        log.warning("ignoring malformed notification %r", payload[:200])
        return []

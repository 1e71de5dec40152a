"""Wake-ups from other processes: Postgres LISTEN/NOTIFY, or an SQLite poll.

Both only hint that rows may have changed; the manager's tails re-read the
rows themselves, so a lost or duplicated hint costs latency, never data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import TYPE_CHECKING, Any

import asyncpg

from app.errors import StreamError
from app.log.api import decode_json
from app.log.sql import NOTIFY_CHANNEL, SqlStore
from app.log.tasks import cancel_and_wait

if TYPE_CHECKING:
    from app.log.manager import StreamManager

log = logging.getLogger("streamkeep.wakeup")


# With this many watched streams or fewer, another process's change is checked
# by reading their rows directly (one query each) rather than asking for all
# heads first. Not when this process committed too: the heads let readers
# skip the rows this process published to them itself.
FEW_STREAMS = 2
UNKNOWN_HEAD = 2**62


class SqlitePoller:
    """Finds appends by other processes on the same SQLite file.

    It watches `PRAGMA data_version` on the connection this process appends
    with: the number changes when any other connection commits to the file
    (not with our own appends, which the manager publishes to its readers
    itself), and reading it costs microseconds (no table is read, no lock is
    taken), so it can be checked every few milliseconds. Only when it changed,
    and only while some local reader waits, does one query read the heads of
    all watched streams. While data_version cannot be read, a full check runs
    every `safety_seconds` instead. (When it can, it misses no commit, and a
    full check on a timer only cost a process with waiting readers a read of
    every watched stream each second for nothing.)
    """

    def __init__(
        self, store: SqlStore, interval: float = 0.002, safety_seconds: float = 1.0
    ) -> None:
        self._store = store
        self._interval = interval
        self._safety_seconds = safety_seconds
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # data_version could not be read at the last poll

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, manager: StreamManager) -> None:
        self._task = asyncio.create_task(self._run(manager), name="streamkeep-sqlite-poll")

    def _data_version(self) -> int | None:
        try:
            version = self._store.data_version()
        except sqlite3.Error as exc:
            # Said once: until it reads again, only the safety check finds
            # other processes' appends.
            if not self._failing:
                log.warning(
                    "sqlite poll: data_version failed (%s); checking every %.0f s",
                    exc,
                    self._safety_seconds,
                )
            self._failing = True
            return None
        self._failing = False
        return version

    async def _run(self, manager: StreamManager) -> None:
        loop = asyncio.get_running_loop()
        last_version = self._data_version()
        last_full_check = loop.time()
        own_commits = manager.stats.commits
        while True:
            await asyncio.sleep(self._interval)
            if not manager.watched():
                continue
            version = self._data_version()
            due = version is None and loop.time() - last_full_check >= self._safety_seconds
            # None: not readable now (the connection is on a worker thread for a
            # checkpoint or a commit that waits); the next poll compares again.
            if (version is None or version == last_version) and not due:
                continue
            last_version, last_full_check = version, loop.time()
            committed_here = manager.stats.commits != own_commits
            own_commits = manager.stats.commits
            await self._check_heads(manager, ask_heads=committed_here)

    async def _check_heads(self, manager: StreamManager, ask_heads: bool) -> None:
        watched = manager.watched()
        if len(watched) <= FEW_STREAMS and not ask_heads:
            # Cheaper to let each tail read its new rows than to ask for heads first.
            for stream_id in watched:
                manager.hint(stream_id, UNKNOWN_HEAD)
            return
        try:
            heads = await self._store.heads(list(watched))
        except StreamError as exc:
            log.warning("sqlite poll failed: %s", exc)
            return
        for stream_id, seen in watched.items():
            head = heads.get(stream_id)
            if head is None:
                manager.hint(stream_id, -1)
            elif head > seen:
                manager.hint(stream_id, head)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
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
        await cancel_and_wait(self._task)
        self._task = None


def _parse(payload: str) -> list[tuple[str, int]]:
    try:
        entries = decode_json(payload.encode())
        return [(str(stream_id), int(seq)) for stream_id, seq in entries]
    except (ValueError, TypeError):  # NotJson is a ValueError
        log.warning("ignoring malformed notification %r", payload[:200])
        return []

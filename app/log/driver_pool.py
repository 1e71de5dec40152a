"""Driver connections for the one-statement reads, kept out of SQLAlchemy's pool.

Every request starts with a stream lookup, a single statement. Checking a
connection out of SQLAlchemy's async pool and returning it cost three
greenlet switches and the pool's bookkeeping, more than the statement itself:
a lookup on SQLite cost 160-196 µs of main-thread CPU with them, 60-94 without. Here the
connections are checked out of the engine once, as they are first needed,
and kept: taking one is a list pop.

On SQLite these reads run on the event loop's own connection
(sqlite_inline); the pool serves only those that must wait for a lock.

SQLAlchemy still owns them: they go back to its pool when this one closes,
and one lost under a statement (`lost`) is invalidated there and replaced.
The engine keeps connections of its own beyond `size` for the statements
SQLAlchemy runs (sweeps, creates, deletes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


class DriverPool:
    def __init__(self, engine: AsyncEngine, size: int, lost: tuple[type[BaseException], ...]):
        self._engine = engine
        self._size = size
        self._lost = lost
        self._idle: list[tuple[AsyncConnection, Any]] = []
        self._open = 0  # checked out of the engine: idle or in use
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A driver connection (aiosqlite or asyncpg) for the duration of the block."""
        held = await self._take()
        try:
            yield held[1]
        except self._lost as exc:
            await self._drop(held, exc)
            raise
        except BaseException:
            await self._give_back(held)
            raise
        await self._give_back(held)

    async def _take(self) -> tuple[AsyncConnection, Any]:
        woken = False
        while True:
            if self._idle:
                return self._idle.pop()
            if self._open < self._size:
                return await self._check_out()
            waiter = asyncio.get_running_loop().create_future()
            # Woken, but a newcomer took the connection first: wait at the front.
            (self._waiters.appendleft if woken else self._waiters.append)(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():
                    self._wake_one()  # it was our turn: pass it on
                elif waiter in self._waiters:  # (_wake_one may have dropped it)
                    self._waiters.remove(waiter)
                raise
            woken = True

    async def _check_out(self) -> tuple[AsyncConnection, Any]:
        self._open += 1
        try:
            connection = await self._engine.connect()
            raw = await connection.get_raw_connection()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        return connection, raw.driver_connection

    async def _give_back(self, held: tuple[AsyncConnection, Any]) -> None:
        if self._closed:
            self._open -= 1
            await held[0].close()
            return
        self._idle.append(held)
        self._wake_one()

    async def _drop(self, held: tuple[AsyncConnection, Any], exc: BaseException) -> None:
        self._open -= 1
        with contextlib.suppress(Exception):
            await held[0].invalidate(exc)
            await held[0].close()
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Return every idle connection to the engine; ones in use follow when given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for connection, _driver in idle:
            with contextlib.suppress(Exception):
                await connection.close()

"""The driver pools: bounded, fair to waiters (also cancelled ones), they give back,
and Postgres commits keep theirs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.log import create_manager
from app.log.db import normalize_url, sqlite_engine
from app.log.driver_pool import DriverPool


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = sqlite_engine(normalize_url(sqlite_url), writer=False, pool_size=4)
    yield engine
    await engine.dispose()


async def hold(pool: DriverPool, release: asyncio.Event, holding: list[int]) -> None:
    async with pool.connection() as driver:
        holding.append(1)
        assert (await driver.execute_fetchall("SELECT 1", ())) == [(1,)]
        await release.wait()
        holding.pop()


async def test_at_most_size_connections_and_waiters_get_them_in_turn(engine: AsyncEngine) -> None:
    pool = DriverPool(engine, 2, (OSError,))
    release, holding = asyncio.Event(), list[int]()
    users = [asyncio.create_task(hold(pool, release, holding)) for _ in range(5)]
    await asyncio.sleep(0.1)
    assert len(holding) == 2 and engine.pool.checkedout() == 2  # type: ignore[attr-defined]
    release.set()
    await asyncio.wait_for(asyncio.gather(*users), 5)
    assert engine.pool.checkedout() == 2  # type: ignore[attr-defined]  # kept
    await pool.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "turn_reached_it",
    [
        pytest.param(True, id="cancelled-after-its-turn-came"),
        # Regression: the turn skipped the cancelled waiter and dropped it from the
        # queue; the waiter then removed itself again and raised ValueError.
        pytest.param(False, id="cancelled-before-its-turn-came"),
    ],
)
async def test_a_cancelled_waiter_just_ends_and_the_next_one_is_served(
    engine: AsyncEngine, turn_reached_it: bool
) -> None:
    pool = DriverPool(engine, 1, (OSError,))
    release, holding = asyncio.Event(), list[int]()
    holder = asyncio.create_task(hold(pool, release, holding))
    await asyncio.sleep(0.05)
    cancelled = asyncio.create_task(hold(pool, asyncio.Event(), []))
    waiting = asyncio.create_task(hold(pool, release, holding))
    await asyncio.sleep(0.05)
    release.set()  # the holder gives back when it runs ...
    if turn_reached_it:
        await asyncio.sleep(0)  # ... now: the turn goes to `cancelled`
    cancelled.cancel()  # (otherwise the holder runs after this and skips it)
    await asyncio.wait_for(asyncio.gather(holder, waiting), 5)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await pool.close()


async def test_a_lost_connection_is_dropped_and_replaced(engine: AsyncEngine) -> None:
    pool = DriverPool(engine, 1, (ConnectionResetError,))
    with pytest.raises(ConnectionResetError):
        async with pool.connection():
            raise ConnectionResetError("the server went away")
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]  # invalidated
    async with pool.connection() as driver:
        assert (await driver.execute_fetchall("SELECT 2", ())) == [(2,)]
    await pool.close()


@pytest.mark.postgres
async def test_postgres_commits_keep_their_connection(pg_url: str) -> None:
    """Guards the committer's kept connection: checking one out of SQLAlchemy's
    pool for every commit cost a third of a commit's main-thread CPU."""
    async with create_manager(pg_url) as manager:
        writer = await manager.open("s")
        await writer.write("first")  # the committer takes its connection
        checkouts: list[object] = []
        engine = manager.store.writer.sync_engine  # type: ignore[attr-defined]
        event.listen(engine, "checkout", lambda *_: checkouts.append(1))
        for n in range(50):
            await writer.write(n)
        assert checkouts == []
        assert [e.json() for e in await manager.read("s")][-1] == 49


@pytest.mark.postgres
async def test_with_pool_size_1_the_kept_connections_leave_room_for_creates(pg_url: str) -> None:
    """The read pool keeps up to two connections and the committer one: with
    an engine of three, a create (SQLAlchemy's own statement) waited for a
    connection that nobody would give back."""
    async with create_manager(pg_url, pool_size=1) as manager:
        writer = await manager.open("s")
        await writer.write("first")
        # Two reads at once: the read pool opens and keeps its two connections.
        await asyncio.gather(manager.read("s"), manager.read("s"))
        await asyncio.wait_for(manager.open("another"), timeout=10)

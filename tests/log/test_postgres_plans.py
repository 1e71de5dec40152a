"""The plans Postgres picks for the hot reads and the append statement, on
tables it has no statistics for.

A new deployment, or a stream that grew since the last ANALYZE, is exactly
that. A plan is judged by the rows it touches, not by time.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from app.log import NewEvent, create_manager
from app.log.postgres_commit import LOCK_STREAMS, PostgresCommit, WriteShape, write_statement
from app.log.sql import POSTGRES_HOT_SQL

pytestmark = pytest.mark.postgres

EVENTS = 5_000
PAGE = 100


def most_rows_of_any_node(plan: dict[str, Any]) -> int:
    """The most rows any node of an EXPLAIN ANALYZE plan produced (per loop, times loops)."""
    own = int(plan["Actual Rows"]) * int(plan.get("Actual Loops", 1))
    return max([own, *(most_rows_of_any_node(child) for child in plan.get("Plans", []))])


async def test_bug_a_page_of_a_catch_up_read_sorted_every_event_after_the_cursor(
    pg_url: str,
) -> None:
    """On a table without statistics, Postgres read a page by a bitmap scan of
    every event after the cursor and a sort of them all: each page of a 100,000
    event catch-up cost up to 100,000 rows (16 ms), and catch-up was 250,000
    events/s where 450,000 were possible. The page's upper bound caps it."""
    async with create_manager(pg_url) as manager:
        await manager.open("long", idle_timeout_seconds=None)
        for start in range(0, EVENTS, 500):
            chunks = [NewEvent.chunk({"n": n, "text": "x" * 40}) for n in range(start, start + 500)]
            await manager.append("long", chunks)
    db = await asyncpg.connect(pg_url)
    try:
        explain = await db.prepare(f"EXPLAIN (ANALYZE, FORMAT JSON) {POSTGRES_HOT_SQL.read_events}")
        now = datetime.now(UTC)
        for after in (0, EVENTS // 2):
            (raw,) = await explain.fetchrow("long", after, now, PAGE, after + PAGE)
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
            assert most_rows_of_any_node(plan) <= PAGE, json.dumps(plan, indent=1)
    finally:
        await db.close()


FILLER_STREAMS = 20_000
HOT_STREAMS = 16


async def test_an_append_touches_only_the_rows_of_its_own_streams(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write statement joins its arrays to `streams` (and, guarded, checks
    their versions). In a table of many streams each batch must find its rows
    by the primary key, not scan the table: a scan would cost every commit
    the whole table."""
    batches: list[tuple[WriteShape, list[Any]]] = []
    write_args = PostgresCommit._write_args

    def keep_args(self: PostgresCommit, plans: Any, now: Any) -> tuple[WriteShape, list[Any]]:
        shape, args = write_args(self, plans, now)
        batches.append((shape, args))
        return shape, args

    monkeypatch.setattr(PostgresCommit, "_write_args", keep_args)
    db = await asyncpg.connect(pg_url)
    try:
        await db.execute(
            "INSERT INTO streams (id, content_type, status, created_at, updated_at, ttl_seconds, "
            "last_write_at, last_seq) SELECT 'filler-' || g, 'application/json', 'open', now(), "
            f"now(), 300, now(), 0 FROM generate_series(1, {FILLER_STREAMS}) AS g"
        )
        # One lane: every stream in one batch, which is what is measured.
        async with create_manager(pg_url, postgres_commit_lanes=1) as manager:
            writers = [
                await manager.open(f"hot-{i}", idle_timeout_seconds=None)
                for i in range(HOT_STREAMS)
            ]
            for n in range(3):
                await asyncio.gather(*(w.write({"n": n}) for w in writers))
        shape, args = batches[-1]
        ids = sorted(args[0])
        assert len(ids) == HOT_STREAMS  # one batch held every stream
        versions = [
            version
            for (version,) in await db.fetch(
                "SELECT xmin::text FROM streams WHERE id = ANY($1::text[]) ORDER BY id", ids
            )
        ]
        statements = [
            (LOCK_STREAMS, [ids]),
            (write_statement(shape, guarded=False), args),
            (write_statement(shape, guarded=True), [*args, ids, versions]),
        ]
        for statement, params in statements:
            transaction = db.transaction()
            await transaction.start()
            try:
                # The batch's events are stored already: make room to insert them again.
                await db.execute("DELETE FROM events WHERE stream_id = ANY($1::text[])", ids)
                (raw,) = await db.fetchrow(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", *params)
            finally:
                await transaction.rollback()
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
            assert most_rows_of_any_node(plan) <= HOT_STREAMS, json.dumps(plan, indent=1)
    finally:
        await db.close()

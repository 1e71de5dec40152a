"""The plans Postgres picks for the hot reads, on tables it has no statistics for.

A new deployment, or a stream that grew since the last ANALYZE, is exactly
that. A plan is judged by the rows it touches, not by time.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from app.log import NewEvent, create_manager
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

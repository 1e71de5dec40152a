"""Revision 0002 keeps the data of 0001 going up and coming back down.

On SQLite it rebuilds the streams table (batch mode): the events, which refer
to streams with ON DELETE CASCADE, must survive that.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

from app.log.db import normalize_url
from app.migrate import downgrade, migration_engine, upgrade


async def sql(url: str, statement: str, **params: Any) -> list[Any]:
    engine = migration_engine(normalize_url(url))
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


NOW = datetime(2026, 1, 1, tzinfo=UTC)


async def test_0002_keeps_streams_and_events_both_ways(empty_url: str) -> None:
    await upgrade(empty_url, "0001")
    await sql(
        empty_url,
        "INSERT INTO streams (id, content_type, status, created_at, updated_at, ttl_seconds, "
        "last_write_at, last_seq) VALUES ('s', 'application/json', 'open', :t, :t, 300, :t, 2)",
        t=NOW,
    )
    for seq in (1, 2):
        await sql(
            empty_url,
            "INSERT INTO events (stream_id, seq, kind, payload, created_at) "
            "VALUES ('s', :seq, 'chunk', :payload, :t)",
            seq=seq,
            payload=b"1",
            t=NOW,
        )
    await upgrade(empty_url)
    assert await sql(empty_url, "SELECT seq, batch_end FROM events ORDER BY seq") == [
        (1, True),
        (2, True),
    ]
    assert await sql(empty_url, "SELECT fork_seq, fork_count, ttl_seconds FROM streams") == [
        (0, 0, 300)
    ]
    await downgrade(empty_url, "0001")
    assert await sql(empty_url, "SELECT count(*) FROM events") == [(2,)]
    assert await sql(empty_url, "SELECT id, last_seq FROM streams") == [("s", 2)]

"""Alembic owns the schema: the head matches the tables, and migrations go both ways."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from app.log.db import normalize_url
from app.log.schema import metadata
from app.migrate import (
    SchemaNotAtHead,
    check_at_head,
    current_revision,
    downgrade,
    head_revision,
    migration_engine,
    upgrade,
)
from tests.support import ROOT


async def _inspect(url: str, fn: Any) -> Any:
    engine = migration_engine(normalize_url(url))
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_migration_head_matches_the_tables(empty_url: str) -> None:
    await upgrade(empty_url)
    assert await _inspect(empty_url, _diff) == []
    assert await current_revision(empty_url) == head_revision()


async def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    await upgrade(empty_url)
    await downgrade(empty_url, "base")
    assert await _inspect(empty_url, _tables) == {"alembic_version"}
    assert await current_revision(empty_url) is None
    await upgrade(empty_url)
    assert await _inspect(empty_url, _diff) == []
    await upgrade(empty_url)  # a second upgrade is a no-op


async def test_service_refuses_a_database_not_at_head(empty_url: str) -> None:
    with pytest.raises(SchemaNotAtHead, match="streamkeep migrate"):
        await check_at_head(empty_url)


async def test_concurrent_migrate_commands_do_no_harm(empty_url: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.cli",
            "--database-url",
            empty_url,
            "migrate",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(3)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    for proc, (out, _) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out.decode()
    assert await current_revision(empty_url) == head_revision()
    assert await _inspect(empty_url, _diff) == []


async def test_stream_summary_view_for_people(shared_url: str) -> None:
    from sqlalchemy import text

    from app.log import create_manager

    async with create_manager(shared_url) as manager:
        writer = await manager.open("summarised")
        await writer.write("ab")
        await writer.write("cde")
        await writer.done(None)

    def summary(conn: Connection) -> Any:
        return conn.execute(
            text("SELECT status, events, bytes, age_seconds FROM stream_summary WHERE id = :id"),
            {"id": "summarised"},
        ).one()

    status, events, size, age = await _inspect(shared_url, summary)
    assert (status, events) == ("done", 3)
    assert size == len(b'"ab"') + len(b'"cde"') + len(b"null")
    assert 0 <= age < 3600

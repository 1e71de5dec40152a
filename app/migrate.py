"""Running Alembic from streamkeep: upgrade, downgrade, and "is the schema at head?".

Several replicas may start at once. On Postgres the upgrade runs under a
transaction-scoped advisory lock, so the others wait and then find nothing to
do. On SQLite the migration transaction starts with BEGIN IMMEDIATE, which
holds the file's write lock from the version check to the commit.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.log.db import is_sqlite, normalize_url, postgres_engine, sqlite_engine

ROOT = Path(__file__).resolve().parent.parent
ALEMBIC_INI = ROOT / "alembic.ini"
MIGRATE_LOCK_KEY = 0x534B4D47  # "SKMG"


class SchemaNotAtHead(RuntimeError):
    pass


def alembic_config() -> Config:
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def migration_engine(url: URL) -> AsyncEngine:
    """A short-lived engine for migrations.

    On SQLite, foreign keys are OFF here: a batch migration rebuilds a table by
    dropping it, and with foreign keys on, dropping `streams` would cascade and
    delete every event.
    """
    if is_sqlite(url):
        return sqlite_engine(url, writer=True, foreign_keys=False, nullpool=True)
    return postgres_engine(url, nullpool=True)


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK_KEY})
    else:
        # Takes the write lock (BEGIN IMMEDIATE) before Alembic reads its version.
        connection.execute(text("SELECT 1"))


def _run(connection: Connection, action: str, revision: str) -> None:
    _lock(connection)
    config = alembic_config()
    config.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def _migrate(database_url: str, action: str, revision: str) -> None:
    url = normalize_url(database_url)
    engine = migration_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run, action, revision)
            await connection.commit()
            if is_sqlite(url):
                problems = (await connection.exec_driver_sql("PRAGMA foreign_key_check")).all()
                if problems:
                    raise RuntimeError(f"foreign key violations after migration: {problems[:5]}")
    finally:
        await engine.dispose()


async def upgrade(database_url: str, revision: str = "head") -> None:
    await _migrate(database_url, "upgrade", revision)


async def downgrade(database_url: str, revision: str) -> None:
    await _migrate(database_url, "downgrade", revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(database_url: str) -> str | None:
    url = normalize_url(database_url)
    engine = (
        sqlite_engine(url, writer=False, nullpool=True)
        if is_sqlite(url)
        else postgres_engine(url, nullpool=True)
    )
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current)
    finally:
        await engine.dispose()


async def check_at_head(database_url: str) -> None:
    current, head = await current_revision(database_url), head_revision()
    if current != head:
        raise SchemaNotAtHead(
            f"the database schema is at {current or 'nothing (empty database)'}, "
            f"not at {head}: run `streamkeep migrate` (or start with --auto-migrate)"
        )

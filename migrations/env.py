"""Alembic environment: async engines, and a connection handed in by the app.

`streamkeep migrate` (app.migrate) passes its own connection through
config.attributes["connection"], already holding the right locks; the plain
`alembic` CLI builds an engine from STREAMKEEP_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from app.config import DEFAULT_DATABASE_URL
from app.log.db import normalize_url
from app.log.schema import metadata
from app.migrate import migration_engine

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    url = normalize_url(os.environ.get("STREAMKEEP_DATABASE_URL", DEFAULT_DATABASE_URL))
    engine = migration_engine(url)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
        await connection.commit()
    await engine.dispose()


def run_migrations_offline() -> None:
    url = normalize_url(os.environ.get("STREAMKEEP_DATABASE_URL", DEFAULT_DATABASE_URL))
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif (shared := config.attributes.get("connection")) is not None:
    do_run_migrations(shared)
else:
    asyncio.run(run_async_migrations())

"""The databases a benchmark run needs: a fresh migrated one per scenario.

Postgres is a throwaway server from scripts/pg-throwaway.sh started with
PG_DURABLE=1: fsync, synchronous_commit and full_page_writes stay on, as in
production, so that the figures are those of the durability we ship. SQLite is
a file in the run's scratch directory, in WAL mode with synchronous=NORMAL as
the service opens it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Protocol

import asyncpg

from app.migrate import upgrade
from bench.context import ROOT
from bench.procs import free_port

PG_SCRIPT = ROOT / "scripts" / "pg-throwaway.sh"
TEMPLATE = "bench_template"


class Databases(Protocol):
    def fresh(self, name: str) -> str:
        """A new migrated database called after `name`; returns its URL."""

    def drop(self, name: str) -> None: ...

    def close(self) -> None: ...


class SqliteDatabases:
    def __init__(self, scratch: Path) -> None:
        self._dir = scratch / "sqlite"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._template = self._dir / "template.db"
        asyncio.run(upgrade(f"sqlite:///{self._template}"))

    def _path(self, name: str) -> Path:
        return self._dir / f"{name}.db"

    def fresh(self, name: str) -> str:
        shutil.copyfile(self._template, self._path(name))
        return f"sqlite:///{self._path(name)}"

    def drop(self, name: str) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self._path(name)}{suffix}").unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class PostgresDatabases:
    """Databases on a throwaway durable server (or on a server given by URL)."""

    def __init__(self, server_url: str | None = None) -> None:
        self._env: dict[str, str] | None = None
        if server_url is None:
            server_url = self._start_server()
        self.server_url = server_url
        self._admin(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        self._admin(f"CREATE DATABASE {TEMPLATE}")
        asyncio.run(upgrade(self._url(TEMPLATE)))

    def _start_server(self) -> str:
        port = free_port()
        # Under /tmp: the `postgres` user must be able to reach the directory.
        base = Path("/tmp") / f"streamkeep-bench-pg-{port}"
        self._env = {**os.environ, "PGPORT": str(port), "PGBASE": str(base), "PG_DURABLE": "1"}
        started = subprocess.run(
            ["bash", str(PG_SCRIPT), "start"], env=self._env, capture_output=True, text=True
        )
        if started.returncode != 0:
            raise RuntimeError(f"could not start the benchmark Postgres:\n{started.stderr}")
        return started.stdout.strip()

    def _url(self, name: str) -> str:
        return f"{self.server_url.rpartition('/')[0]}/{name}"

    def _admin(self, sql: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self.server_url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    def fresh(self, name: str) -> str:
        self.drop(name)
        self._admin(f'CREATE DATABASE "bench_{name}" TEMPLATE {TEMPLATE}')
        return self._url(f"bench_{name}")

    def drop(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "bench_{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._env is not None:
            subprocess.run(["bash", str(PG_SCRIPT), "stop"], env=self._env, capture_output=True)


def open_databases(kind: str, scratch: Path, postgres_url: str | None) -> Databases:
    if kind == "sqlite":
        return SqliteDatabases(scratch)
    return PostgresDatabases(postgres_url)

"""Helpers shared by the tests: a controllable clock, a throwaway Postgres, databases."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
PG_SCRIPT = ROOT / "scripts" / "pg-throwaway.sh"


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for fuzzing a live server: the same examples every run
    (derandomized, no example database), no deadline (the network is in the loop),
    and no health checks (a function-scoped server is shared by the examples)."""
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


class FakeClock:
    """A clock the test moves by hand (the log never reads the real time itself)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class CallCounter:
    """Counts the calls of an async method, e.g. store.read, by wrapping it in place;
    `calls` keeps each call's positional arguments."""

    def __init__(self, target: object, method: str) -> None:
        self.count = 0
        self.calls: list[tuple[Any, ...]] = []
        original = getattr(target, method)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            self.calls.append(args)
            return await original(*args, **kwargs)

        setattr(target, method, counted)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A Postgres server started for this test session, stopped at its end."""

    url: str
    env: dict[str, str] = field(default_factory=dict)
    owned: bool = False

    @classmethod
    def start(cls) -> PostgresServer:
        if os.environ.get("TEST_DATABASE_URL"):
            return cls(os.environ["TEST_DATABASE_URL"])
        port = free_port()
        # Under /tmp, not pytest's 0700 dirs: the `postgres` user must reach it.
        base = Path(tempfile.gettempdir()) / f"streamkeep-test-pg-{port}"
        env = {**os.environ, "PGPORT": str(port), "PGBASE": str(base)}
        result = subprocess.run(
            ["bash", str(PG_SCRIPT), "start"], env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(
                "could not start the test Postgres server (the Postgres tests never skip):\n"
                + result.stderr
            )
        return cls(result.stdout.strip(), env, owned=True)

    def stop(self) -> None:
        if self.owned:
            subprocess.run(["bash", str(PG_SCRIPT), "stop"], env=self.env, capture_output=True)

    def database_url(self, name: str) -> str:
        base, _, _ = self.url.rpartition("/")
        return f"{base}/{name}"

    def admin(self, sql: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    def pg_ctl(self, action: str) -> None:
        """Stop or start the server in place (fault tests)."""
        data = Path(self.env["PGBASE"]) / "data"
        port = self.env["PGPORT"]
        bindir = pg_bindir()
        cmd = [f"{bindir}/pg_ctl", "-D", str(data), "-w", "-m", "fast", action]
        if action == "start":
            cmd += [
                "-l",
                str(Path(self.env["PGBASE"]) / "server.log"),
                "-o",
                f"-p {port} -k {self.env['PGBASE']} -c listen_addresses=127.0.0.1 "
                "-c max_connections=300 -c fsync=off",
            ]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)


def pg_bindir() -> str:
    """Where the server binaries are (Debian keeps them off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return str(found[-1].parent)
    located = shutil.which("initdb")
    if located:
        return str(Path(located).parent)
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql-15")


TEMPLATE_DB = "streamkeep_template"


def new_database(server: PostgresServer) -> tuple[str, str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.admin(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE_DB}')
    return name, server.database_url(name)


def drop_database(server: PostgresServer, name: str) -> None:
    server.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def copy_sqlite(template: Path, target: Path) -> str:
    shutil.copyfile(template, target)
    return f"sqlite:///{target}"


class CuttingProxy:
    """A TCP proxy on loopback that cuts its first connection after `cut_after` response bytes.

    Stands for a dropped network: the client sees a body that ends mid-stream.
    """

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        limit = self.cut_after if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, cap: int | None
        ) -> None:
            sent = 0
            try:
                while data := await src.read(256 if cap is not None else 65536):
                    if cap is not None and sent + len(data) > cap:
                        dst.write(data[: cap - sent])
                        await dst.drain()
                        raise ConnectionResetError("cut")
                    dst.write(data)
                    await dst.drain()
                    sent += len(data)
            finally:
                dst.close()

        await asyncio.gather(
            pipe(reader, up_writer, None), pipe(up_reader, writer, limit), return_exceptions=True
        )
        for w in (writer, up_writer):
            w.close()

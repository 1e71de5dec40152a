from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.log import MemoryStore, StreamManager, create_manager
from app.log.memory import MemoryNotifier
from app.migrate import upgrade
from tests.live import LiveServer
from tests.protocols.fake_upstream import FakeUpstream
from tests.support import (
    TEMPLATE_DB,
    FakeClock,
    PostgresServer,
    copy_sqlite,
    drop_database,
    new_database,
)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    server.admin(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
    server.admin(f"CREATE DATABASE {TEMPLATE_DB}")
    asyncio.run(upgrade(server.database_url(TEMPLATE_DB)))
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, migrated database on the session's Postgres server."""
    name, url = new_database(pg_server)
    yield url
    drop_database(pg_server, name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema) on SQLite and on Postgres."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = f"empty_{abs(hash(request.node.name)) % 10**8}"
    server.admin(f'DROP DATABASE IF EXISTS "{name}"')
    server.admin(f'CREATE DATABASE "{name}"')
    yield server.database_url(name)
    drop_database(server, name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(upgrade(f"sqlite:///{path}"))
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh, migrated SQLite file."""
    return copy_sqlite(sqlite_template, tmp_path / "streams.db")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest) -> str:
    """A fresh database that several processes (or managers) can share: SQLite or Postgres."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """The database of this test's backend ("memory" for the in-memory store)."""
    if backend == "memory":
        return "memory"
    return str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))


ManagerFactory = Callable[..., StreamManager]


@pytest.fixture
async def make_manager(database_url: str, clock: FakeClock) -> AsyncIterator[ManagerFactory]:
    """Builds started managers on this test's database; closes them all afterwards.

    In memory, every manager shares one store: they stand for several
    "processes" the way several SQL managers share one database.
    """
    made: list[StreamManager] = []
    # Two commit lanes, as on Postgres: its commits never wait, but the
    # committer takes and settles as it does there (and splits what it takes
    # from 64 events on; tests/log/test_commit_lanes.py checks the lanes).
    shared_store = MemoryStore(commit_lanes=2)

    def factory(commit_lanes: int | None = None, **kwargs: Any) -> StreamManager:
        """`commit_lanes` (Postgres and memory; SQLite has one) gives the manager
        a store of its own in memory."""
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("sqlite_poll_seconds", 0.02)
        if database_url == "memory":
            kwargs.pop("sqlite_poll_seconds")
            store = shared_store if commit_lanes is None else MemoryStore(commit_lanes)
            manager = StreamManager(store, notifier=MemoryNotifier(store), **kwargs)
        else:
            if commit_lanes is not None:
                kwargs["postgres_commit_lanes"] = commit_lanes
            manager = create_manager(database_url, **kwargs)
        made.append(manager)
        return manager

    yield factory
    for manager in made:
        await manager.close()


ServerFactory = Callable[..., LiveServer]


@pytest.fixture
def live_server(database_url: str) -> Iterator[ServerFactory]:
    """Starts real streamkeep servers on this test's database (settings as keywords)."""
    started: list[LiveServer] = []

    def factory(**overrides: Any) -> LiveServer:
        overrides.setdefault("database_url", database_url)
        overrides.setdefault("sqlite_poll_seconds", 0.02)
        server = LiveServer(Settings(**overrides)).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """A fake OpenAI-compatible server (tests/protocols/fake_upstream.py) on loopback."""
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
async def manager(make_manager: ManagerFactory) -> StreamManager:
    m = make_manager()
    await m.start()
    return m

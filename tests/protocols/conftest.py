from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest) -> str:
    """A fresh database that several processes (or managers) can share: SQLite or Postgres."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))

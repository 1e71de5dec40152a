"""The `streamkeep` command, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, free_port


def streamkeep(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_healthy(port: int, proc: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.communicate()[0]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def test_serve_defaults_to_an_sqlite_file_in_the_working_directory(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKEEP_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        response = wait_healthy(port, proc)
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
        assert (tmp_path / "streamkeep.db").exists()  # auto-migrated at start-up
    finally:
        proc.terminate()
        proc.wait(20)


def test_migrate_and_gc(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert streamkeep("--database-url", url, "migrate").returncode == 0
    result = streamkeep("--database-url", url, "gc")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["deleted_streams"] == 0


def test_gc_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    result = streamkeep("--database-url", f"sqlite:///{tmp_path / 'new.db'}", "gc")
    assert result.returncode != 0
    assert "streamkeep migrate" in result.stderr


@pytest.mark.postgres
def test_serve_refuses_postgres_not_at_head(pg_server: object) -> None:
    from tests.support import PostgresServer

    assert isinstance(pg_server, PostgresServer)
    pg_server.admin('DROP DATABASE IF EXISTS "unmigrated"')
    pg_server.admin('CREATE DATABASE "unmigrated"')
    url = pg_server.database_url("unmigrated")
    result = streamkeep("--database-url", url, "serve", "--port", str(free_port()))
    assert result.returncode != 0
    assert "streamkeep migrate" in result.stdout + result.stderr


def clean_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment without any STREAMKEEP_ setting but these (and an SQLite file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKEEP_")}
    env["PYTHONPATH"] = str(ROOT)
    env["STREAMKEEP_DATABASE_URL"] = f"sqlite:///{tmp_path / 'auth.db'}"
    env.update({f"STREAMKEEP_{k.upper()}": v for k, v in settings.items()})
    return env


def test_serve_refuses_other_hosts_without_keys(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "refusing to serve on 0.0.0.0 without authentication" in result.stderr
    assert "STREAMKEEP_API_KEYS" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_malformed_key_list(tmp_path: Path) -> None:
    env = clean_env(tmp_path, api_keys="short:read")
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "STREAMKEEP_API_KEYS: a key must be at least 16 characters" in result.stderr


@pytest.mark.parametrize(
    ("args", "settings", "said"),
    [
        ([], {}, "authentication off: no API keys configured, so listening on loopback only"),
        (["--host", "0.0.0.0", "--allow-unauthenticated"], {}, "authentication OFF"),
        (
            ["--host", "0.0.0.0"],
            {"api_keys": "admin-key-0123456789abcdef:admin", "token_secret": "t" * 32},
            "authentication on: API keys required",
        ),
    ],
    ids=["loopback", "allowed", "keys"],
)
def test_serve_says_at_start_up_who_may_reach_it(
    tmp_path: Path, args: list[str], settings: dict[str, str], said: str
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
        cwd=tmp_path,
        env=clean_env(tmp_path, **settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_healthy(port, proc).status_code == 200  # /healthz: always open
        readyz = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert readyz.status_code == (401 if settings else 200)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert said in output


def test_serve_refuses_a_setting_out_of_range_in_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path, long_poll_timeout="0")
    result = streamkeep("serve", "--port", str(free_port()), cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "streamkeep: STREAMKEEP_LONG_POLL_TIMEOUT=0.0: must be more than 0"
    )

"""Deployment: compose.yaml and the Dockerfile as files; the repository's proxy configs for real.

No container engine runs here, so compose.yaml is checked as data; nginx
(Debian's nginx-light) runs with the very location config compose mounts, and
Caddy (Debian's caddy) with deploy/caddy/Caddyfile, its addresses made loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.config import Settings
from tests.live import LiveServer
from tests.protocols import flows_for_tests
from tests.support import ROOT, free_port

NGINX_DIR = ROOT / "deploy" / "nginx"
CADDY_DIR = ROOT / "deploy" / "caddy"
SSE = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_has_postgres_migration_replicas_and_proxy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])
    assert services["migrate"]["command"] == ["streamkeep", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    replicas = [name for name in services if name.startswith("streamkeep-")]
    assert len(replicas) == 2
    for name in replicas:
        service = services[name]
        assert service["build"] == "."
        assert service["command"][:2] == ["streamkeep", "serve"]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        url = service["environment"]["STREAMKEEP_DATABASE_URL"]
        assert url.startswith("postgresql://") and "@postgres:5432/" in url
        shutdown = float(service["environment"]["STREAMKEEP_SHUTDOWN_TIMEOUT_SECONDS"])
        assert _seconds(service["stop_grace_period"]) > shutdown


def test_compose_proxy_mounts_the_config_the_nginx_test_uses(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    assert proxy["image"].startswith("nginx")
    mounts = {v.split(":")[0]: v.split(":")[1] for v in proxy["volumes"]}
    assert mounts["./deploy/nginx/streamkeep.conf"] == "/etc/nginx/streamkeep/streamkeep.conf"
    assert mounts["./deploy/nginx/nginx.conf"] == "/etc/nginx/nginx.conf"
    main = (NGINX_DIR / "nginx.conf").read_text()
    assert "include /etc/nginx/streamkeep/streamkeep.conf;" in main
    for replica in ("streamkeep-1:4437", "streamkeep-2:4437"):
        assert f"server {replica};" in main


def test_dockerfile_runs_streamkeep_in_exec_form() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY migrations ./migrations" in dockerfile
    assert 'CMD ["streamkeep", "serve"]' in dockerfile  # exec form: SIGTERM reaches us


def _seconds(duration: str) -> float:
    return float(duration.rstrip("s"))


# -- the proxies for real ---------------------------------------------------------------------


@dataclass(frozen=True)
class Proxied:
    """streamkeep behind a proxy started from the repository's config."""

    proxy: str
    base: str


def _proxied_service(sqlite_url: str) -> LiveServer:
    return LiveServer(
        Settings(
            database_url=sqlite_url,
            flows="tests.protocols.flows_for_tests",
            sse_keepalive_seconds=0.5,
        )
    ).start()


def _nginx_command(tmp_path: Path, port: int, upstream: str) -> list[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        raise RuntimeError("nginx is not installed: apt-get install nginx-light (.ci/run does)")
    (tmp_path / "nginx.conf").write_text(
        f"""
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    upstream streamkeep {{ server {upstream}; keepalive 8; }}
    # Short on purpose: streams must outlive it by their keepalives.
    proxy_read_timeout 2s;
    server {{
        listen 127.0.0.1:{port};
        include {NGINX_DIR}/streamkeep.conf;
    }}
}}
"""
    )
    return [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]


def _replaced_once(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced; it must be there once (the config's shape is tested too)."""
    assert text.count(old) == 1, f"deploy/caddy/Caddyfile no longer has {old!r} once"
    return text.replace(old, new)


def _caddy_command(tmp_path: Path, port: int, upstream: str) -> list[str]:
    binary = shutil.which("caddy")
    if binary is None:
        raise RuntimeError("caddy is not installed: apt-get install caddy (.ci/run does)")
    # The repository's Caddyfile with a loopback address for its site and its
    # replicas, and a read timeout short on purpose: streams must outlive it by
    # their keepalives. No admin endpoint, no certificates.
    site = (CADDY_DIR / "Caddyfile").read_text()
    site = _replaced_once(site, "streams.example.com {", f"http://127.0.0.1:{port} {{")
    site = _replaced_once(site, "streamkeep-1:4437 streamkeep-2:4437", upstream)
    site = _replaced_once(site, "read_timeout 1h", "read_timeout 2s")
    config = tmp_path / "Caddyfile"
    config.write_text("{\n\tadmin off\n\tauto_https off\n}\n\n" + site)
    return [binary, "run", "--adapter", "caddyfile", "--config", str(config)]


PROXY_COMMANDS = {"nginx": _nginx_command, "caddy": _caddy_command}


@pytest.fixture(params=sorted(PROXY_COMMANDS))
def proxied(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Proxied]:
    service = _proxied_service(sqlite_url)
    try:  # the service stops however the proxy fares, a missing binary included
        port = free_port()
        upstream = service.url.removeprefix("http://")
        command = PROXY_COMMANDS[request.param](tmp_path, port, upstream)
        base = f"http://127.0.0.1:{port}"
        process = _start_proxy(request.param, command, tmp_path, base)
        try:
            yield Proxied(request.param, base)
        finally:
            process.terminate()
            process.wait(10)
    finally:
        service.stop()


def _start_proxy(
    name: str, command: list[str], tmp_path: Path, base: str
) -> subprocess.Popen[bytes]:
    """The proxy, once it answers the service's /healthz (killed if it never does)."""
    # Caddy keeps its data and config under the user's directories: here, the test's.
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    # Its output to a file: a pipe nobody reads would stall it once full.
    output = tmp_path / f"{name}.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{base}/healthz", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait(10)
                said = output.read_text(errors="replace")
                raise RuntimeError(f"{name} did not start: {said}") from None
            time.sleep(0.05)


def test_events_pass_the_proxy_unbuffered(proxied: Proxied) -> None:
    flows_for_tests.second_step.clear()
    with httpx.stream(
        "POST", f"{proxied.base}/flows/two_steps", json={}, headers=SSE, timeout=30
    ) as response:
        chunks = response.iter_raw()
        # The second chunk waits for us; if the proxy buffered, the first would wait too.
        assert next(chunks) == b'data: {"message":"first"}\n\n'
        flows_for_tests.second_step.set()
        rest = b"".join(chunks)
    assert rest == b'data: {"message":"second"}\n\ndata: {"result":"two steps done"}\n\n'


def test_reconnect_through_the_proxy_resumes(proxied: Proxied) -> None:
    base = proxied.base
    first = httpx.post(
        f"{base}/flows/countdown", json={"data": {"count": 4}}, headers=SSE, timeout=30
    )
    stream_id = first.headers["x-genkit-stream-id"]
    resumed = httpx.post(
        f"{base}/flows/countdown?after=2",
        content=b"{}",
        headers={**SSE, "X-Genkit-Stream-Id": stream_id},
        timeout=30,
    )
    assert resumed.content == b'data: {"message":2}\n\ndata: {"message":1}\n\n' + (
        b'data: {"result":"countdown from 4 done"}\n\n'
    )


# The ids each proxy makes (nginx's $request_id, Caddy's {http.request.uuid}); the
# service's own are 32 hex digits too, so only Caddy's prove theirs is kept.
PROXY_REQUEST_IDS = {
    "nginx": re.compile(r"[0-9a-f]{32}"),
    "caddy": re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
}


def test_proxy_request_id_reaches_the_service(proxied: Proxied) -> None:
    response = httpx.get(f"{proxied.base}/healthz")
    assert PROXY_REQUEST_IDS[proxied.proxy].fullmatch(response.headers["x-request-id"])


def test_forwarded_headers_are_believed_only_from_trusted_proxies(sqlite_url: str) -> None:
    from tests.test_ops import start_service

    seen = {}
    for trusted in ("", "127.0.0.1"):
        port = free_port()
        process = start_service(
            sqlite_url,
            port,
            env={"STREAMKEEP_TRUSTED_PROXIES": trusted, "STREAMKEEP_LOG_FORMAT": "json"},
        )
        try:
            httpx.get(
                f"http://127.0.0.1:{port}/healthz", headers={"X-Forwarded-For": "203.0.113.9"}
            )
        finally:
            process.terminate()
            output = process.communicate(timeout=30)[0]
        access = [
            json.loads(line)
            for line in output.splitlines()
            if line.startswith("{") and '"streamkeep.access"' in line
        ]
        seen[trusted] = access[-1]["client"]
    assert seen == {"": "127.0.0.1", "127.0.0.1": "203.0.113.9"}


def test_idle_stream_outlives_the_proxy_read_timeout(proxied: Proxied) -> None:
    """A proxy cuts a silent upstream after its read timeout (2 s here); keepalives prevent it."""
    base = proxied.base
    assert httpx.put(f"{base}/v1/streams/idle", json={}).status_code == 201
    with httpx.stream("GET", f"{base}/v1/streams/idle/events", timeout=30) as response:
        lines = response.iter_lines()
        started = time.monotonic()
        keepalives = 0
        while time.monotonic() - started < 4:  # twice the proxy's read timeout, idle
            line = next(lines)
            keepalives += line.startswith(":")
        appended = httpx.post(f"{base}/v1/streams/idle/events", json={"type": "note", "data": 1})
        assert appended.status_code == 200
        seen = [next(lines) for _ in range(8)]
    assert keepalives >= 4
    assert "event: note" in seen and "data: 1" in seen

"""HTTP load: wrk (C, one thread) driven by a generated Lua script, and HTTP servers to aim it at.

wrk is used rather than a Python client so that the load generator is not the
bottleneck: one wrk thread does several times what one uvicorn worker can
answer. Each run also reports how busy wrk and the server were, so a reader of
the table can check that the server, not wrk, was saturated.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.procs import (
    Child,
    busy_cores,
    cpu_seconds,
    free_port,
    machine_cpu_ticks,
    python_env,
)

WRK_MISSING = "wrk is not installed (apt-get install wrk; .ci/run installs it)"


@dataclass(frozen=True)
class HttpLoad:
    """The same small request over and over, round-robin over `paths`."""

    base_url: str
    paths: list[str]
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    connections: int = 16
    seconds: float = 5.0


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    loadgen_cpu: float  # wrk's CPU time over wall time (1.0 = one core busy)
    server_cpu: float | None
    server_cpu_seconds: float | None = None  # the server's CPU time during the run
    # The machine's busy cores during the run: the server, wrk, and a database
    # server where there is one (they share the machine's cores).
    machine_cores: float | None = None

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def server_cpu_per_request_us(self) -> float | None:
        """The server's CPU time per request answered: what a request costs it,
        whatever the machine's speed let the run reach."""
        if self.server_cpu_seconds is None or not self.requests:
            return None
        return self.server_cpu_seconds / self.requests * 1e6

    def extra(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
            "loadgen_cpu": round(self.loadgen_cpu, 2),
            "server_cpu": None if self.server_cpu is None else round(self.server_cpu, 2),
            "server_cpu_per_request_us": _rounded(self.server_cpu_per_request_us),
            "machine_cores": _rounded(self.machine_cores),
        }

    def machine_note(self) -> str:
        """How busy the machine was and who kept it busy, for a note ('' if unknown)."""
        if self.machine_cores is None or self.server_cpu is None:
            return ""
        others = max(0.0, self.machine_cores - self.server_cpu - self.loadgen_cpu)
        return (
            f"; machine {self.machine_cores:.2f} of {os.cpu_count()} cores busy: server "
            f"{self.server_cpu:.2f}, wrk {self.loadgen_cpu:.2f}, the rest {others:.2f}"
        )


def cpu_per_request(*runs: LoadResult) -> str:
    """The server's CPU time per request of each run, for a note: what a case
    costs beyond the no-op, less moved by the machine's drifting speed than a
    throughput is."""
    figures = [run.server_cpu_per_request_us for run in runs]
    if any(us is None for us in figures):
        return ""
    return "; " + " and ".join(f"{us:.0f}" for us in figures) + " µs server CPU per request"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def lua_script(load: HttpLoad) -> str:
    """A wrk script: fixed method, headers and body; paths in turn; JSON summary at the end."""

    def long_string(text: str) -> str:
        return f"[==[{text}]==]"

    lines = [
        f"wrk.method = {long_string(load.method)}",
        f"wrk.body = {long_string(load.body.decode())}",
        *(f"wrk.headers[ {long_string(k)} ] = {long_string(v)}" for k, v in load.headers.items()),
        "local paths = {" + ", ".join(long_string(p) for p in load.paths) + "}",
        "local n = 0",
        "request = function()",
        "  n = n + 1",
        "  return wrk.format(nil, paths[(n % #paths) + 1])",
        "end",
        "done = function(summary, latency, requests)",
        "  local e = summary.errors",
        '  io.write(string.format(\'{"requests":%d,"duration_us":%d,"non_2xx":%d,'
        '"socket_errors":%d,"p50_us":%d,"p99_us":%d}\\n\', summary.requests, '
        "summary.duration, e.status, e.connect + e.read + e.write + e.timeout, "
        "latency:percentile(50), latency:percentile(99)))",
        "end",
    ]
    return "\n".join(lines) + "\n"


async def run_wrk(load: HttpLoad, server_pid: int | None = None) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua_script(load))
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = cpu_seconds(server_pid) if server_pid else 0.0
    machine_before = machine_cpu_ticks()
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{load.connections}",
        f"-d{max(1, round(load.seconds))}s",
        "--timeout",
        "10s",
        "-s",
        script.name,
        load.base_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    wall = time.monotonic() - started
    machine = busy_cores(machine_before, machine_cpu_ticks())
    os.remove(script.name)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = _summary(stdout.decode(), stderr.decode())
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    server_seconds = cpu_seconds(server_pid) - server_before if server_pid else None
    return LoadResult(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        non_2xx=summary["non_2xx"],
        socket_errors=summary["socket_errors"],
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        loadgen_cpu=wrk_cpu / wall,
        server_cpu=None if server_seconds is None else server_seconds / wall,
        server_cpu_seconds=server_seconds,
        machine_cores=machine,
    )


def _summary(stdout: str, stderr: str) -> dict[str, int]:
    for line in stdout.splitlines():
        if line.startswith("{"):
            parsed: dict[str, int] = json.loads(line)
            return parsed
    raise RuntimeError(f"wrk printed no summary:\n{stdout}\n{stderr}")


# -- servers to aim at ------------------------------------------------------------


class HttpServer:
    """A server process on loopback, ready once GET /healthz answers 200."""

    def __init__(self, child: Child, base_url: str) -> None:
        self.child = child
        self.base_url = base_url

    @property
    def pid(self) -> int:
        return self.child.pid

    @classmethod
    async def start(
        cls,
        name: str,
        argv: list[str],
        port: int,
        *,
        python: bool = True,
        env: dict[str, str] | None = None,
        health: str = "/healthz",
    ) -> HttpServer:
        child = await Child.start(name, *argv, python=python, env=env)
        server = cls(child, f"http://127.0.0.1:{port}")
        await server._wait_ready(health)
        return server

    async def _wait_ready(self, health: str, within: float = 60) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.child.process.returncode is not None:
                    raise RuntimeError(f"{self.child.name} exited before it was ready")
                try:
                    if (await client.get(self.base_url + health)).status_code < 500:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.child.name} did not answer within {within} s")

    async def stop(self) -> None:
        await self.child.stop()


async def start_noop_server() -> HttpServer:
    port = free_port()
    return await HttpServer.start("noop-server", ["-m", "bench.noop_server", str(port)], port)


async def start_durable_noop(database_url: str, streams: int) -> HttpServer:
    """The no-op endpoint made durable and nothing more (bench.durable_noop), on SQLite."""
    port = free_port()
    argv = ["-m", "bench.durable_noop", str(port), database_url, str(streams)]
    return await HttpServer.start("durable-noop", argv, port)


async def start_streamkeep(database_url: str) -> HttpServer:
    """The real service, as an operator starts it: `streamkeep serve`, one uvicorn worker."""
    port = free_port()
    argv = ["-m", "app.cli", "--database-url", database_url, "serve", "--port", str(port)]
    # WARNING like the no-op server: at INFO uvicorn logs every request, which
    # would measure the terminal, not the service.
    env = {**python_env(), "STREAMKEEP_LOG_LEVEL": "WARNING"}
    return await HttpServer.start("streamkeep", argv, port, env=env)

"""Peers to compare with, and the Node harnesses that drive them.

* Genkit's own Express server with its in-memory stream manager
  (tests/node/genkit/reference-server.cjs, genkit 1.42.0), driven by Genkit's
  JS client (tests/node/genkit/client.mjs `bench`).
* The Durable Streams reference server, @durable-streams/server, in memory and
  file-backed (tests/node/durable-streams/start-reference-server.mjs).

Both need their node_modules: scripts/test.sh installs Genkit's (`npm ci
--omit=optional`); the Durable Streams harness needs `npm install --no-audit
--no-fund` (see its README). BENCH_DURABLE_STREAMS_DIR points at another copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from bench.context import ROOT
from bench.loadgen import HttpServer
from bench.procs import Child

GENKIT_DIR = ROOT / "tests" / "node" / "genkit"
DURABLE_STREAMS_DIR = Path(
    os.environ.get("BENCH_DURABLE_STREAMS_DIR", ROOT / "tests" / "node" / "durable-streams")
)


def missing_node_harness(directory: Path, entry: str, install: str) -> str | None:
    """Why a Node harness cannot run here, or None if it can."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (directory / entry).exists():
        return f"{directory / entry} is not on this branch yet"
    if not (directory / "node_modules").is_dir():
        return f"run `{install}` in {directory}"
    return None


class NodeServer:
    """A Node server that prints {"ready": true, "url": ...} once listening."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return self.server.base_url

    @property
    def pid(self) -> int:
        return self.server.pid

    @classmethod
    async def start(cls, name: str, script: Path, *args: str) -> NodeServer:
        # Node resolves node_modules from the script's directory, whatever the cwd.
        child = await Child.start(name, "node", str(script), *args, env=dict(os.environ))
        ready = await child.message(within=60)
        return cls(HttpServer(child, str(ready["url"]).rstrip("/")))

    async def stop(self) -> None:
        await self.server.stop()


async def start_genkit_express() -> NodeServer:
    """Genkit's Express flow server with the `countdown` flow, on a free port."""
    return await NodeServer.start("genkit-express", GENKIT_DIR / "reference-server.cjs", "0")


async def start_durable_streams_reference(file_backed: bool) -> NodeServer:
    """The Durable Streams reference server, in memory or with fdatasync'ed files."""
    script = DURABLE_STREAMS_DIR / "start-reference-server.mjs"
    name = f"durable-streams-{'file' if file_backed else 'memory'}"
    return await NodeServer.start(name, script, "0", *(["--file"] if file_backed else []))


async def genkit_client_bench(flow_url: str, count: int, runs: int) -> dict[str, Any]:
    """Genkit's JS client streaming a flow live, then replaying it: chunks per second."""
    request = {"count": count, "input": {"count": count, "delay_ms": 0}, "runs": runs}
    process = await asyncio.create_subprocess_exec(
        "node",
        str(GENKIT_DIR / "client.mjs"),
        "bench",
        flow_url,
        json.dumps(request),
        stdout=asyncio.subprocess.PIPE,
        cwd=GENKIT_DIR,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    for line in reversed(stdout.decode().splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    raise RuntimeError(f"the Genkit client printed no result (exit {process.returncode})")

"""A real `streamkeep serve` process for protocol tests that need one (or two)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import ROOT, free_port

NODE_HARNESS = ROOT / "tests" / "node" / "durable-streams"


class ServerProcess:
    """`python -m app.cli serve` on a free loopback port, stopped by `stop()`."""

    def __init__(self, database_url: str, log_path: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STREAMKEEP_LOG_LEVEL": "WARNING"}
        env.update({f"STREAMKEEP_{k.upper()}": v for k, v in settings.items()})
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [sys.executable, "-m", "app.cli", "--database-url", database_url]
        self.process = subprocess.Popen(
            [*command, "serve", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, seconds: float = 30) -> ServerProcess:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"streamkeep exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"streamkeep did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log.close()


def run_node(args: list[str], seconds: float, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs a Node command in the Durable Streams harness (its node_modules must exist)."""
    if not (NODE_HARNESS / "node_modules" / "@durable-streams").is_dir():
        raise RuntimeError(
            f"{NODE_HARNESS}/node_modules is missing: run `npm install --no-audit --no-fund` "
            "there (scripts/test.sh does)"
        )
    return subprocess.run(
        args,
        cwd=NODE_HARNESS,
        env={**os.environ, "NO_COLOR": "1", **env},
        capture_output=True,
        text=True,
        timeout=seconds,
    )

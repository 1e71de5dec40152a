"""Processes the scenarios start (servers, readers, load generators) and what they cost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from bench.context import ROOT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_ticks() -> tuple[int, int]:
    """The machine's CPU ticks so far, all cores: (busy, all). Idle and
    waiting for I/O are not busy; steal time (the host's) counts as neither."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How many of the machine's cores were busy between two machine_cpu_ticks()."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total * (os.cpu_count() or 1) if total else 0.0


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size in MiB (VmRSS)."""
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int | str = "self") -> float:
    return _status_kb(pid, "VmHWM") / 1024


def _status_kb(pid: int | str, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{name} not in /proc/{pid}/status")


def python_env() -> dict[str, str]:
    """The environment for our own Python children: the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Child:
    """A helper process that prints one JSON line when ready and one when done."""

    def __init__(self, process: asyncio.subprocess.Process, name: str) -> None:
        self.process = process
        self.name = name

    @classmethod
    async def start(
        cls, name: str, *args: str, env: dict[str, str] | None = None, python: bool = False
    ) -> Child:
        argv = [sys.executable, *args] if python else list(args)
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            env=env or python_env(),
            cwd=ROOT,
            start_new_session=True,  # so that stop() can end its children too
        )
        return cls(process, name)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def message(self, within: float = 60) -> dict[str, Any]:
        """The next JSON line on its stdout (other lines are passed through)."""
        assert self.process.stdout is not None
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), within)
            if not line:
                code = await self.process.wait()
                raise RuntimeError(f"{self.name} exited ({code}) before answering")
            text = line.decode().strip()
            if text.startswith("{"):
                parsed: dict[str, Any] = json.loads(text)
                return parsed
            print(f"[{self.name}] {text}", file=sys.stderr)

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    async def stop(self, grace: float = 10) -> None:
        if self.process.returncode is not None:
            return
        self.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            self.send_signal(signal.SIGKILL)
            await self.process.wait()

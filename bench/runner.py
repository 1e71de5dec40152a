"""The parent of a benchmark run: databases, one child process per scenario, the report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.child import RESULTS_MARKER
from bench.context import ROOT, Context
from bench.databases import Databases
from bench.procs import python_env
from bench.profile import py_spy_command
from bench.results import Result, resolve
from bench.scenarios import SCENARIOS


def selected(only: list[str] | None) -> list[str]:
    """Scenario names in registry order, with the ones their ratios refer to."""
    if not only:
        return list(SCENARIOS)
    unknown = [n for n in only if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    wanted = set(only)
    for name in only:
        wanted.update(SCENARIOS[name].requires)
    return [n for n in SCENARIOS if n in wanted]


@dataclass(frozen=True)
class Run:
    """What every scenario of one `python -m bench` invocation shares."""

    db: str
    databases: Databases
    scratch: Path
    smoke: bool
    profile_dir: Path | None = None


def run_scenario(name: str, run: Run) -> list[Result]:
    scenario = SCENARIOS[name]
    databases, smoke = run.databases, run.smoke
    url = databases.fresh(name.replace("-", "_")) if scenario.needs_database else ""
    context = Context(db=run.db, database_url=url, smoke=smoke, workdir=str(run.scratch))
    command = [sys.executable, "-m", "bench.child", name, context.to_json()]
    if run.profile_dir is not None:
        command = py_spy_command(run.profile_dir / f"{name}.txt") + command
    started = time.monotonic()
    try:
        completed = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=python_env(),
            timeout=120 if smoke else 1800,
        )
    except subprocess.TimeoutExpired:
        return [_failed(name, "timed out")]
    finally:
        if scenario.needs_database:
            databases.drop(name.replace("-", "_"))
    print(f"  {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULTS_MARKER):
            return [Result.from_json(r) for r in json.loads(line[len(RESULTS_MARKER) :])]
    return [_failed(name, f"exited with {completed.returncode} and no results (see stderr)")]


def _failed(name: str, note: str) -> Result:
    return Result(name, "(scenario)", f"{name}/failed", status="failed", note=note)


def run_all(names: list[str], run: Run) -> list[Result]:
    results: list[Result] = []
    for name in names:
        print(f"scenario {name} on {run.db}{' (smoke)' if run.smoke else ''}", file=sys.stderr)
        results.extend(run_scenario(name, run))
    resolve(results)
    return results


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        # Other work on the machine skews every figure: a 2-core box with load > 1 is busy.
        "load_average_1m": round(os.getloadavg()[0], 2),
        "postgres": _postgres_version(),
        "sqlite": _sqlite_version(),
    }


def _postgres_version() -> str:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        return ""
    out = subprocess.run([str(found[-1]), "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def _sqlite_version() -> str:
    import sqlite3

    return sqlite3.sqlite_version


def report(db: str, smoke: bool, results: list[Result], started_at: float) -> dict[str, Any]:
    return {
        "db": db,
        "smoke": smoke,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "seconds": round(time.time() - started_at, 1),
        "machine": machine(),
        "results": [r.to_json() for r in results],
    }

"""Runs one scenario in a fresh interpreter: python -m bench.child NAME CONTEXT_JSON.

A fresh process per scenario keeps them from disturbing each other (memory,
garbage, leftover tasks) and makes RSS figures mean something. The results go
to stdout as one line after RESULTS_MARKER.
"""

from __future__ import annotations

import asyncio
import json
import sys

from app.cli import tune_gc
from bench.context import Context
from bench.scenarios import SCENARIOS

RESULTS_MARKER = "BENCH-RESULTS "


def main(argv: list[str]) -> int:
    name, context_json = argv
    context = Context.from_json(context_json)
    # The collector as `streamkeep serve` sets it: in-process appends are what
    # flows do inside the service's process.
    tune_gc()
    results = asyncio.run(SCENARIOS[name].run(context))
    payload = json.dumps([r.to_json() for r in results])
    sys.stdout.write(f"\n{RESULTS_MARKER}{payload}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

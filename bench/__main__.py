"""python -m bench --db sqlite|postgres [--smoke] [--only a,b] [--json out.json] [--markdown]

Starts what the scenarios need (a durable throwaway Postgres, SQLite files,
servers, readers, load generators), runs each scenario in its own process,
prints a table and writes JSON. Exit status 1 if a scenario failed to run;
missed targets are reported, never an error (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.databases import open_databases
from bench.results import markdown_table, text_table
from bench.runner import Run, report, run_all, selected
from bench.scenarios import SCENARIOS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--db", choices=["sqlite", "postgres"], required=True)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: only check that every scenario works"
    )
    parser.add_argument(
        "--only", help=f"comma-separated scenarios (default all): {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as Markdown (for the README)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each scenario with py-spy into DIR/<scenario>.txt (summary: bench.profile)",
    )
    parser.add_argument(
        "--postgres-url",
        help="use this Postgres server instead of starting a durable throwaway one "
        "(its durability settings are then whatever it has)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = selected(args.only.split(",") if args.only else None)
    started_at = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="streamkeep-bench-"))
    try:
        databases = open_databases(args.db, scratch, args.postgres_url)
        try:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            run = Run(args.db, databases, scratch, args.smoke, args.profile)
            results = run_all(names, run)
        finally:
            databases.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document = report(args.db, args.smoke, results, started_at)
    print(markdown_table(results) if args.markdown else text_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

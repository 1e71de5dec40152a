"""Markdown for the README from the JSON of one or more runs:

python -m bench.report bench/results/sqlite.json bench/results/postgres.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.results import Result, markdown_table


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cores']} cores ({machine['cpu']}), {machine['memory_gib']} GiB, "
        f"Python {machine['python']}, SQLite {machine['sqlite']}, {machine['postgres']}"
        + (
            f", load average {machine['load_average_1m']} at the end"
            if "load_average_1m" in machine
            else ""
        )
    )


def section(document: dict[str, Any]) -> str:
    results = [Result.from_json(r) for r in document["results"]]
    title = "SQLite" if document["db"] == "sqlite" else "Postgres"
    return "\n".join(
        [
            f"#### {title} ({document['started_at'][:10]}, {document['seconds']:.0f} s)",
            "",
            f"Machine: {machine_line(document['machine'])}.",
            "",
            markdown_table(results),
            "",
        ]
    )


def main(argv: list[str]) -> int:
    for path in argv:
        print(section(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

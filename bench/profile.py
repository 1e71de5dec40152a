"""Where the time goes: summarise a py-spy profile of a scenario.

`python -m bench --profile DIR` records every scenario process with py-spy
(collapsed stacks, DIR/<scenario>.txt, also readable by speedscope and
flamegraph.pl). This prints the frames that were busy most, leaving out
start-up imports and threads that only wait:

    python -m bench.profile DIR/append.txt [--match SUBSTRING] [--top N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

# Frames that mean "waiting", not working: a profile of where CPU goes skips them.
IDLE_LEAVES = (
    "_connection_worker_thread (aiosqlite/core.py:59)",  # aiosqlite's thread waiting for work
    "EpollSelector.select",  # the event loop waiting for I/O
    "Condition.wait",
    "Thread._wait_for_tstate_lock",
)
STARTUP = ("_find_and_load",)


def py_spy_command(output: Path) -> list[str]:
    """The prefix that runs a command under py-spy (root or ptrace rights needed)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return [py_spy, "record", "--rate", "250", "--format", "raw", "--output", str(output), "--"]


def busy_stacks(path: Path, match: str | None) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(s in f for f in frames for s in STARTUP):
            continue
        if any(frames[-1].startswith(idle) for idle in IDLE_LEAVES):
            continue
        if match and not any(match in f for f in frames):
            continue
        stacks.append((frames, int(count)))
    return stacks


def summary(path: Path, match: str | None, top: int) -> str:
    stacks = busy_stacks(path, match)
    total = sum(n for _, n in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{path.name}: {total} busy samples", "-- own time"]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines.append("-- including callees")
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--match", help="only stacks with a frame containing this text")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    print(summary(args.profile, args.match, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

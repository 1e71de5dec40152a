"""What a scenario reports: one Result per measured case, plus the targets they are held to.

Results travel as JSON from the child process that ran the scenario to the
parent, which fills in ratios (a throughput over a ceiling measured in the same
run), checks the targets and prints the table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypedDict

Status = Literal["ok", "pending", "skipped", "failed"]
Metric = Literal["value", "ratio", "p50_ms", "p99_ms"]


@dataclass
class Target:
    """A bound one metric of a result must respect, e.g. ratio >= 0.5."""

    metric: Metric
    op: Literal[">=", "<="]
    bound: float
    text: str

    def check(self, result: Result) -> bool | None:
        actual = getattr(result, self.metric)
        if actual is None or (isinstance(actual, float) and math.isnan(actual)):
            return None
        return bool(actual >= self.bound if self.op == ">=" else actual <= self.bound)


@dataclass
class Result:
    """One row of the table."""

    scenario: str  # the scenario number and name, e.g. "2 append (in process)"
    case: str  # what exactly ran, e.g. "pipelined send(), 1 stream"
    key: str  # stable id for JSON consumers and ratio references, e.g. "append/pipelined-1"
    value: float | None = None
    unit: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    # The key of another result of this run that `value` is divided by.
    ratio_to: str | None = None
    ratio: float | None = None
    # Another ceiling of the run that does this case's work by hand (e.g. 16
    # writers that each await their commit, with nothing but asyncio around the
    # raw statements): how close the case comes to it is added to the note,
    # beside the target's ratio.
    same_work_to: str | None = None
    same_work_ratio: float | None = None
    # Every target the case missed, its same-work ceiling missed as well in
    # this run: writers of the case's shape, which cannot do less than those
    # bare ones do, are out of reach of it on this machine.
    out_of_reach: bool = False
    targets: list[Target] = field(default_factory=list)
    met: bool | None = None  # all targets met; None when there are none or a figure is missing
    status: Status = "ok"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        targets = [Target(**t) for t in data.pop("targets", [])]
        return cls(**data, targets=targets)


def pending(scenario: str, case: str, key: str, note: str) -> Result:
    """A case that cannot run yet, e.g. because its HTTP endpoint has not landed."""
    return Result(scenario, case, key, status="pending", note=note)


def skipped(scenario: str, case: str, key: str, note: str) -> Result:
    return Result(scenario, case, key, status="skipped", note=note)


def resolve(results: list[Result]) -> None:
    """Fill in ratios from the ceilings of the same run, then check targets."""
    by_key = {r.key: r for r in results}
    for result in results:  # every ratio first: a same-work ceiling's is checked below
        base = by_key.get(result.ratio_to or "")
        if base is not None and base.value and result.value is not None:
            result.ratio = result.value / base.value
    for result in results:
        same = by_key.get(result.same_work_to or "")
        if same is not None and same.value and result.value is not None:
            result.same_work_ratio = result.value / same.value
            mark = f"{result.same_work_ratio:.2f} of {same.key}, the same work by hand"
            result.note = f"{result.note}; {mark}" if result.note else mark
        if result.targets and result.status == "ok":
            verdicts = [t.check(result) for t in result.targets]
            result.met = None if None in verdicts else all(verdicts)
            if result.met is False and same is not None and same.status == "ok":
                reached = _missed_by_hand_too(result, same)
                if reached:
                    result.out_of_reach = True
                    result.note += f"; out of reach: the same work by hand reached {reached}"


def _missed_by_hand_too(result: Result, same: Result) -> str:
    """What the same work by hand reached, if it missed every target the case
    missed (e.g. "ratio 0.42"); empty if it met one of them."""
    missed = [t for t in result.targets if t.check(result) is False]
    if not all(t.check(same) is False for t in missed):
        return ""
    return "; ".join(f"{t.metric} {_number(getattr(same, t.metric))}" for t in missed)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


class Latency(TypedDict):
    p50_ms: float
    p99_ms: float


def latency_fields(seconds: list[float]) -> Latency:
    """p50/p99 in milliseconds from latencies in seconds (for Result(**...))."""
    return {"p50_ms": percentile(seconds, 50) * 1000, "p99_ms": percentile(seconds, 99) * 1000}


# -- the table ----------------------------------------------------------------

COLUMNS = ("scenario", "case", "value", "ratio", "p50 ms", "p99 ms", "target", "note")


def _number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _verdict(met: bool | None, out_of_reach: bool = False) -> str:
    if met is False and out_of_reach:
        return "MISSED, out of reach"
    return {True: "met", False: "MISSED", None: "?"}[met]


def _row(result: Result) -> tuple[str, ...]:
    if result.status != "ok":
        return (result.scenario, result.case, result.status, "", "", "", "", result.note)
    value = f"{_number(result.value)} {result.unit}".strip()
    ratio = f"{result.ratio:.2f}" if result.ratio is not None else ""
    target = "; ".join(
        f"{t.text}: {_verdict(t.check(result), result.out_of_reach)}" for t in result.targets
    )
    return (
        result.scenario,
        result.case,
        value,
        ratio,
        _number(result.p50_ms),
        _number(result.p99_ms),
        target,
        result.note,
    )


def markdown_table(results: list[Result]) -> str:
    rows = [COLUMNS, *(_row(r) for r in results)]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
    return "\n".join(lines)


def text_table(results: list[Result]) -> str:
    rows = [COLUMNS, *(_row(r) for r in results)]
    widths = [min(48, max(len(row[i]) for row in rows)) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

"""A case measured in rounds, each between two runs of its ceiling; the median round reported.

This host's speed drifts by 10-30 % within minutes. One measurement of a
case between two of its ceiling moved the case's ratio by as much: SQLite
HTTP appends on 100 streams read 0.69-0.91 of the no-op in seven runs of
the same build, and a target was met or missed by the spell the run fell
in. Interleaved rounds (ceiling, case, ceiling, case, ceiling, ...) and the
round of median ratio keep one fast or slow spell from deciding it either
way; every round's ratio is in the note and the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

M = TypeVar("M")  # what a round measured of the case
C = TypeVar("C")  # what it measured of the ceiling

# Rounds per case in a full run; the smoke run measures one.
ROUNDS = 3


@dataclass(frozen=True)
class Round(Generic[M, C]):
    """The case measured once, with the ceiling just before and just after it."""

    measured: M
    before: C
    after: C
    rate: float  # the case's throughput
    ceiling: float  # the mean of the ceiling's throughput before and after

    @property
    def ratio(self) -> float:
        return self.rate / self.ceiling if self.ceiling else 0.0


def median_round(rounds: Sequence[Round[M, C]]) -> Round[M, C]:
    """The round of median ratio (of an even number, the lower of the middle two)."""
    if not rounds:
        raise ValueError("no rounds were measured")
    return sorted(rounds, key=lambda r: r.ratio)[(len(rounds) - 1) // 2]


def rounds_note(rounds: Sequence[Round[M, C]], ceiling: str) -> str:
    """What the note of a case measured in rounds says about them ('' for one round)."""
    if len(rounds) < 2:
        return ""
    ratios = ", ".join(f"{r.ratio:.2f}" for r in rounds)
    return (
        f"the median of {len(rounds)} rounds, each between two runs of {ceiling}; "
        f"the rounds' ratios in order: {ratios}"
    )

"""What a scenario gets to run with, and the registry of scenarios."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.results import Result

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """Handed to a scenario in its own process (JSON on the command line)."""

    db: str  # "sqlite" or "postgres"
    database_url: str  # a fresh, migrated database for this scenario alone ("" if none)
    smoke: bool
    workdir: str  # a scratch directory of this run

    def size(self, full: T, smoke: T) -> T:
        """The full benchmark's size, or the tiny one that only checks the scenario works."""
        return smoke if self.smoke else full

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))

    @property
    def scratch(self) -> Path:
        return Path(self.workdir)


ScenarioRun = Callable[[Context], Coroutine[Any, Any, list[Result]]]


@dataclass(frozen=True)
class Scenario:
    name: str
    run: ScenarioRun
    # Scenarios whose results this one's ratios refer to: `--only` pulls them in.
    requires: tuple[str, ...] = ()
    # Most scenarios get a fresh migrated database; ceilings of HTTP need none.
    needs_database: bool = True

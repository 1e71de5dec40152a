"""Every scenario, in the order a run goes through them (ceilings first).

To add one: write `async def run(ctx: Context) -> list[Result]` in a module
here and register it below; `requires` names the scenarios whose results its
ratios refer to, so that `--only` runs them too.
"""

from __future__ import annotations

from bench.context import Scenario
from bench.scenarios import appends, catchup, ceilings, flows, http, live, memory, sweep

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("http-ceiling", ceilings.http_ceiling, needs_database=False),
        Scenario("db-ceiling", ceilings.db_ceiling),
        Scenario("append", appends.run, requires=("db-ceiling",)),
        Scenario("catchup", catchup.run),
        Scenario("live", live.run),
        Scenario("sweep", sweep.run),
        Scenario("memory", memory.run),
        Scenario("http-append", http.run, requires=("http-ceiling",)),
        Scenario("flows", flows.run),
        Scenario("peers", http.peers, requires=("http-ceiling",), needs_database=False),
    ]
}

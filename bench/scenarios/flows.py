"""Scenario 8: a flow streaming 10,000 chunks, read by Genkit's JS client live and on replay.

The peer is Genkit's own Express server with its in-memory stream manager,
measured in the same run. streamkeep's side needs the flow endpoint
(POST /flows/{name}) and a `countdown` flow like the reference's; until the
service answers it, that row is "pending endpoint".
"""

from __future__ import annotations

import httpx

from bench.context import Context
from bench.loadgen import start_streamkeep
from bench.peers import (
    GENKIT_DIR,
    genkit_client_bench,
    missing_node_harness,
    start_genkit_express,
)
from bench.results import Result, Target, pending, skipped

SCENARIO = "8 flows (Genkit JS client)"
PEER_SCENARIO = "9 peer: Genkit Express"
# The streamkeep flow the scenario runs: same name and input as the reference server's.
STREAMKEEP_FLOW_PATH = "/flows/countdown"
PEER_LIVE_KEY = "peer-genkit/live"
PEER_REPLAY_KEY = "peer-genkit/replay"


def _rates(scenario: str, who: str, key: str, figures: dict[str, object]) -> list[Result]:
    chunks = int(str(figures.get("count", 0)))
    ok = bool(figures.get("ok"))
    note = "" if ok else f"client reported a failure: {figures.get('error')}"
    results = []
    for phase, field, peer_key in (
        ("live", "liveChunksPerSec", PEER_LIVE_KEY),
        ("replay", "replayChunksPerSec", PEER_REPLAY_KEY),
    ):
        value = figures.get(field)
        results.append(
            Result(
                scenario,
                f"{who}, {chunks:,} chunks, {phase}",
                f"{key}/{phase}",
                value=float(str(value)) if value is not None else None,
                unit="chunks/s",
                ratio_to=None if key.startswith("peer") else peer_key,
                targets=[] if key.startswith("peer") else [Target("ratio", ">=", 1.0, ">= Genkit")],
                status="ok" if ok else "failed",
                note=note,
            )
        )
    return results


async def _streamkeep_has_flow(base_url: str) -> bool:
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post(
            STREAMKEEP_FLOW_PATH, json={"data": {"count": 1, "delay_ms": 0}}
        )
    return response.status_code not in (404, 405)


async def run(ctx: Context) -> list[Result]:
    why_not = missing_node_harness(GENKIT_DIR, "client.mjs", "npm ci --omit=optional")
    if why_not is not None:
        return [skipped(SCENARIO, "Genkit client vs Genkit Express", "flows/skipped", why_not)]
    count = ctx.size(10_000, 200)
    runs = ctx.size(3, 1)
    peer = await start_genkit_express()
    try:
        results = _rates(
            PEER_SCENARIO,
            "Genkit Express, in-memory manager",
            "peer-genkit",
            await genkit_client_bench(f"{peer.url}/countdown", count, runs),
        )
    finally:
        await peer.stop()
    server = await start_streamkeep(ctx.database_url)
    try:
        if await _streamkeep_has_flow(server.base_url):
            figures = await genkit_client_bench(server.base_url + STREAMKEEP_FLOW_PATH, count, runs)
            results += _rates(SCENARIO, "streamkeep", "flows", figures)
        else:
            why = "pending endpoint: POST /flows/{name} not on this branch"
            results.append(pending(SCENARIO, "streamkeep, live and replay", "flows/pending", why))
    finally:
        await server.stop()
    return results

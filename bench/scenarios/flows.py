"""Scenario 8: a flow streaming 10,000 chunks, read by Genkit's JS client live and on replay.

The peer is Genkit's own Express server with its in-memory stream manager,
measured in the same run. streamkeep's side needs the flow endpoint
(POST /flows/{name}) and a `countdown` flow like the reference's; until the
service answers it, that row is "pending endpoint".
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

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
    runs = ctx.size(5, 1)
    async with contextlib.AsyncExitStack() as running:
        peer = await start_genkit_express()
        running.push_async_callback(peer.stop)
        server = await start_streamkeep(ctx.database_url)
        running.push_async_callback(server.stop)
        if not await _streamkeep_has_flow(server.base_url):
            why = "pending endpoint: POST /flows/{name} not on this branch"
            figures = await genkit_client_bench(f"{peer.url}/countdown", count, runs)
            return [
                *_peer_rates(figures),
                pending(SCENARIO, "streamkeep, live and replay", "flows/pending", why),
            ]
        # One run of each in turn: the machine's speed drifts over a minute,
        # and both sides must see the same drift for their ratio to mean much.
        peer_runs, own_runs = [], []
        for _ in range(runs):
            peer_runs.append(await genkit_client_bench(f"{peer.url}/countdown", count, 1))
            own_runs.append(
                await genkit_client_bench(server.base_url + STREAMKEEP_FLOW_PATH, count, 1)
            )
    return [
        *_peer_rates(_median(peer_runs)),
        *_rates(SCENARIO, "streamkeep", "flows", _median(own_runs)),
    ]


def _peer_rates(figures: dict[str, Any]) -> list[Result]:
    return _rates(PEER_SCENARIO, "Genkit Express, in-memory manager", "peer-genkit", figures)


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The client's figures over several runs: median rates, ok only if every run was."""
    failed = [r for r in runs if not r.get("ok")]
    figures: dict[str, Any] = {
        "count": runs[0].get("count", 0),
        "ok": not failed,
        "error": failed[0].get("error") if failed else None,
    }
    for field in ("liveChunksPerSec", "replayChunksPerSec"):
        rates = [float(r[field]) for r in runs if r.get(field) is not None]
        figures[field] = statistics.median(rates) if rates else None
    return figures

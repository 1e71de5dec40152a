"""Health, readiness and metrics for operators and orchestrators."""

from __future__ import annotations

import contextlib
from typing import Any

from litestar import Request, Response, Router, get
from prometheus_client import CONTENT_TYPE_LATEST

from app import __version__
from app.errors import StreamError
from app.migrate import head_revision
from app.protocols import manager_of


@get("/healthz", sync_to_thread=False, security=[{}])
def healthz() -> dict[str, str]:
    """The process is alive (nothing else is checked)."""
    return {"status": "ok", "version": __version__}


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Ready for traffic: database reachable, schema at head, wake-up listener connected."""
    manager = manager_of(request)
    checks: dict[str, Any] = {}
    try:
        revision = await manager.store.ping()
        checks["database"] = "ok"
        at_head = revision in (head_revision(), "memory")
        checks["schema"] = "ok" if at_head else f"at {revision}, not at {head_revision()}"
    except StreamError as exc:
        checks["database"] = exc.message
        checks["schema"] = "unknown"
    notifier = manager.notifier
    checks["listener"] = "ok" if notifier is None or notifier.connected else "disconnected"
    ready = all(value == "ok" for value in checks.values())
    return Response(
        {"status": "ready" if ready else "unready", "checks": checks},
        status_code=200 if ready else 503,
        headers={} if ready else {"Retry-After": "5"},
    )


@get("/metrics", media_type="text/plain")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Prometheus metrics of this process."""
    manager = manager_of(request)
    # On a database error the gauge keeps its last value (the errors are counted).
    with contextlib.suppress(StreamError):
        await manager.count_open_streams()
    return Response(
        request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST, status_code=200
    )


def ops_router() -> Router:
    return Router(path="/", route_handlers=[healthz, readyz, metrics])

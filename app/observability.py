"""Logs, request ids and Prometheus metrics.

One log line per request (method, route, status, duration, request id), as
JSON when STREAMKEEP_LOG_FORMAT=json. Stream payloads are never logged. The
log's own counters are read from the manager when /metrics is scraped, so
appending costs no metrics call.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.log import StreamManager

REQUEST_ID_HEADER = "x-request-id"
access_log = logging.getLogger("streamkeep.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The access line below replaces uvicorn's own.
    logging.getLogger("uvicorn.access").disabled = True


class Metrics:
    """The service's Prometheus registry: request latencies plus the log's counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "streamkeep_request_duration_seconds",
            "Time from request to the end of the response (streams: until they end).",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        # Children by labels: prometheus_client's labels() takes a lock and
        # validates the labels on every call, a few µs of every request.
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self.manager: StreamManager | None = None
        self.registry.register(_LogCollector(self))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.request_seconds.labels(
                method, route, str(status)
            )
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LogCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        manager = self._metrics.manager
        if manager is None:
            return
        stats = manager.stats
        appends = CounterMetricFamily(
            "streamkeep_appends", "Appends committed, by protocol.", labels=["protocol"]
        )
        appended = CounterMetricFamily(
            "streamkeep_appended_bytes", "Payload bytes committed.", labels=["protocol"]
        )
        for origin, count in stats.appends.items():
            appends.add_metric([origin], count)
            appended.add_metric([origin], stats.appended_bytes.get(origin, 0))
        yield appends
        yield appended
        counters = {
            "commits": ("Group-commit transactions.", stats.commits),
            "rejected_appends": ("Appends refused by a rule.", stats.rejected_appends),
            "database_errors": ("Failed commits.", stats.storage_errors),
            "wakeups": ("Reader wake-ups that read the database.", stats.wakeups),
            "tail_reads": ("Queries run for woken readers.", stats.tail_reads),
            "abandoned_streams": ("Streams ended by the idle sweep.", stats.abandoned_streams),
            "swept_streams": ("Expired streams deleted.", stats.swept_streams),
            "swept_events": ("Events of expired streams deleted.", stats.swept_events),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"streamkeep_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "streamkeep_live_readers", "Readers following a stream.", value=manager.live_readers
        )
        yield GaugeMetricFamily(
            "streamkeep_open_streams",
            "Open streams (as of the last sweep or count).",
            value=manager.open_streams_seen,
        )


def request_log_middleware(metrics: Metrics) -> Any:
    """ASGI middleware: a request id, one access-log line and a latency sample per request."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            method = str(scope.get("method", "GET"))
            started = time.perf_counter()
            request_id = _incoming_request_id(scope) or secrets.token_hex(16)
            status = 500
            sent = 0

            async def send_with_id(message: Message) -> None:
                nonlocal status, sent
                if message["type"] == "http.response.start":
                    status = message["status"]
                    headers = list(message.get("headers", []))
                    headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                    message = {**message, "headers": headers}
                elif message["type"] == "http.response.body":
                    sent += len(message.get("body", b""))
                await send(message)

            try:
                await app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("path_template", "unmatched")
                metrics.observe_request(method, route, status, elapsed)
                # (the line's fields are not even built while it is off)
                if access_log.isEnabledFor(logging.INFO):
                    access_log.info(
                        "%s %s %s %.1fms request_id=%s",
                        method,
                        scope["path"],
                        status,
                        elapsed * 1000,
                        request_id,
                        extra={
                            "fields": {
                                "request_id": request_id,
                                "method": method,
                                "path": scope["path"],
                                "route": route,
                                "status": status,
                                "duration_ms": round(elapsed * 1000, 1),
                                "response_bytes": sent,
                                "client": (scope.get("client") or ("-",))[0],
                            }
                        },
                    )

        return handle

    return middleware


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            # Accept a proxy's id only if it is a sane token (it ends up in our logs).
            if 0 < len(text) <= 128 and text.replace("-", "").replace("_", "").isalnum():
                return text
    return None

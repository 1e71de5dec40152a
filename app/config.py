"""Every setting in one place: environment variables STREAMKEEP_*, overridden by flags."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///streamkeep.db"


@dataclass(frozen=True, slots=True)
class Settings:
    # Where streams live: an SQLite file (the default, in the working directory)
    # or a Postgres server, e.g. postgresql://user:pass@host/db.
    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    # 4437 is the Durable Streams protocol's default port.
    port: int = 4437
    # How long a finished stream stays readable.
    ttl_seconds: int = 300
    # How long an open stream may stay silent before the sweeper ends it (0: never).
    idle_timeout_seconds: int = 600
    sweep_interval_seconds: float = 15.0
    sweep_batch_size: int = 5000
    # How often a waiting reader on SQLite checks PRAGMA data_version for appends
    # by other processes (cheap: the streams are read only when it changed).
    sqlite_poll_seconds: float = 0.002
    sqlite_busy_timeout_ms: int = 5000
    sqlite_synchronous: str = "NORMAL"
    # Readers re-check their rows this often even without a wake-up.
    safety_poll_seconds: float = 30.0
    # How long a Durable Streams long-poll waits for data before answering 204
    # (and how often an idle SSE response sends a keep-alive control event).
    long_poll_timeout: float = 30.0
    pool_size: int = 5
    # Migrate at start-up; None means: yes on SQLite, no on Postgres.
    auto_migrate: bool | None = None
    log_level: str = "INFO"
    # "text" or "json" (one JSON object per line).
    log_format: str = "text"
    # Comma-separated modules whose @flow functions are served at /flows/{name}
    # (the demo flows countdown and fail_midway are always there).
    flows: str = ""
    # How long a SIGTERM'd process may take to end its streams and flows and exit.
    shutdown_timeout_seconds: float = 10.0
    # Limits; a request over one gets a clear 4xx and changes nothing.
    max_event_bytes: int = 1024 * 1024
    max_request_bytes: int = 16 * 1024 * 1024
    max_readers_per_stream: int = 10_000
    max_open_streams: int = 0  # 0: no limit
    # A reader whose connection accepts nothing for this long is dropped.
    stall_timeout_seconds: float = 60.0
    # Addresses (comma-separated, or *) whose X-Forwarded-For/-Proto are believed.
    trusted_proxies: str = ""
    # Serve everything under this path, e.g. /streamkeep (for a shared reverse proxy).
    path_prefix: str = ""
    # Native SSE: a comment frame after this much silence keeps proxies from cutting
    # idle streams; `retry` tells browsers how soon to reconnect.
    sse_keepalive_seconds: float = 15.0
    sse_retry_ms: int = 2000
    # The OpenAI-compatible server behind /v1/responses and /v1/chat/completions: its
    # base URL, ending in /v1 (empty: the proxy is off), and the key streamkeep sends it.
    upstream_url: str = ""
    upstream_api_key: str = field(default="", repr=False)
    # The longest the upstream may stay silent (connecting, or between two bytes)
    # before its call counts as failed.
    upstream_timeout_seconds: float = 300.0
    # Access control (app/auth.py, README "Security"). API keys as
    # "key:scope[,scope];key2:scope" with scopes read, write, admin; or a file of
    # such entries, one a line. With none, the service serves loopback only unless
    # allow_unauthenticated says that something in front of it authenticates.
    api_keys: str = field(default="", repr=False)
    api_keys_file: str = ""
    # How often that file is checked for changes (keys rotate without a restart); 0: never.
    api_keys_reload_seconds: float = 5.0
    # Signs per-stream read tokens (HMAC-SHA256); empty: no tokens are issued.
    token_secret: str = field(default="", repr=False)
    read_token_seconds: int = 3600
    allow_unauthenticated: bool = False

    def __post_init__(self) -> None:
        # A value out of range would not fail later but misbehave: a zero interval
        # turns its loop into a busy loop, a zero pool waits for ever.
        for name, (allowed, what) in RANGES.items():
            value = getattr(self, name)
            if not allowed(value):
                if isinstance(value, float) and not math.isfinite(value):
                    what = "a finite number"
                raise ValueError(f"STREAMKEEP_{name.upper()}={value!r}: must be {what}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"STREAMKEEP_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        settings = cls(**values)
        return settings.with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def flow_modules(self) -> list[str]:
        return [m.strip() for m in self.flows.split(",") if m.strip()]

    @property
    def idle_timeout(self) -> int | None:
        return self.idle_timeout_seconds or None


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _not_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _one_of(*choices: str) -> Callable[[str], bool]:
    return lambda value: value.upper() in choices


POSITIVE = (_positive, "more than 0")
NOT_NEGATIVE = (_not_negative, "0 or more")
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "port": (lambda port: 0 <= port <= 65535, "a TCP port, 0 to 65535"),
    "ttl_seconds": NOT_NEGATIVE,
    "idle_timeout_seconds": NOT_NEGATIVE,
    "sweep_interval_seconds": POSITIVE,
    "sweep_batch_size": POSITIVE,
    "sqlite_poll_seconds": POSITIVE,
    "sqlite_busy_timeout_ms": NOT_NEGATIVE,
    "sqlite_synchronous": (
        _one_of("OFF", "NORMAL", "FULL", "EXTRA"),
        "one of OFF, NORMAL, FULL, EXTRA",
    ),
    "safety_poll_seconds": POSITIVE,
    "long_poll_timeout": POSITIVE,
    "pool_size": POSITIVE,
    "log_level": (
        _one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        "one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    ),
    "log_format": (lambda value: value in ("text", "json"), 'either "text" or "json"'),
    "shutdown_timeout_seconds": NOT_NEGATIVE,
    "max_event_bytes": POSITIVE,
    "max_request_bytes": POSITIVE,
    "max_readers_per_stream": POSITIVE,
    "max_open_streams": NOT_NEGATIVE,
    "stall_timeout_seconds": POSITIVE,
    "sse_keepalive_seconds": POSITIVE,
    "sse_retry_ms": NOT_NEGATIVE,
    "upstream_timeout_seconds": POSITIVE,
    "api_keys_reload_seconds": NOT_NEGATIVE,
    "read_token_seconds": POSITIVE,
}


def _parse(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    try:
        if kind.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"STREAMKEEP_{name.upper()}={raw!r} is not a valid {kind}") from None
    return raw

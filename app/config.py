"""Every setting in one place: environment variables STREAMKEEP_*, overridden by flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
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

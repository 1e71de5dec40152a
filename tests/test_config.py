"""Settings: parsed from the environment, and refused when out of range."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

from app.config import RANGES, Settings


def test_the_environment_sets_and_flags_override() -> None:
    env = {"STREAMKEEP_PORT": "8080", "STREAMKEEP_LONG_POLL_TIMEOUT": "2.5", "STREAMKEEP_FLOWS": ""}
    settings = Settings.from_env(env, port=9090, host=None)
    assert (settings.port, settings.long_poll_timeout, settings.host) == (9090, 2.5, "127.0.0.1")


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        ("PORT", "http", "STREAMKEEP_PORT='http' is not a valid int"),
        ("POOL_SIZE", "0", "STREAMKEEP_POOL_SIZE=0: must be more than 0"),
        ("PORT", "70000", "STREAMKEEP_PORT=70000: must be a TCP port, 0 to 65535"),
        # Regression: 0 made every idle Durable Streams SSE response a busy loop.
        ("LONG_POLL_TIMEOUT", "0", "STREAMKEEP_LONG_POLL_TIMEOUT=0.0: must be more than 0"),
        ("SSE_KEEPALIVE_SECONDS", "-1", "must be more than 0"),
        ("SQLITE_POLL_SECONDS", "nan", "STREAMKEEP_SQLITE_POLL_SECONDS=nan: must be a finite"),
        ("STALL_TIMEOUT_SECONDS", "inf", "must be a finite number"),
        ("TTL_SECONDS", "-5", "STREAMKEEP_TTL_SECONDS=-5: must be 0 or more"),
        ("SQLITE_SYNCHRONOUS", "fast", "must be one of OFF, NORMAL, FULL, EXTRA"),
        ("LOG_FORMAT", "xml", 'must be either "text" or "json"'),
        ("LOG_LEVEL", "verbose", "must be one of DEBUG, INFO"),
    ],
)
def test_a_bad_value_is_refused_with_its_variable_named(
    variable: str, raw: str, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        Settings.from_env({f"STREAMKEEP_{variable}": raw})
    assert str(err.value).startswith(f"STREAMKEEP_{variable}=")
    assert message in str(err.value)


def test_a_flag_out_of_range_is_refused_too() -> None:
    with pytest.raises(ValueError, match="STREAMKEEP_PORT=-1"):
        Settings.from_env({}, port=-1)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("port", 0),
        ("ttl_seconds", 0),
        ("idle_timeout_seconds", 0),
        ("max_open_streams", 0),
        ("api_keys_reload_seconds", 0),
        ("sse_retry_ms", 0),
        ("sqlite_synchronous", "full"),
        ("log_level", "debug"),
    ],
)
def test_documented_zeros_and_any_case_are_accepted(name: str, value: Any) -> None:
    assert getattr(Settings(**{name: value}), name) == value


def test_the_defaults_are_in_range_and_every_range_names_a_setting() -> None:
    names = {f.name for f in fields(Settings)}
    assert set(RANGES) <= names
    Settings()  # the defaults pass their own checks

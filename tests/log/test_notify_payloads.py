"""The Postgres wake-ups: the heads a commit announces, split into NOTIFY
payloads that fit Postgres's limit, and read back by the other replicas."""

from __future__ import annotations

from app.log.sql import NOTIFY_PAYLOAD_LIMIT, _notify_payloads
from app.log.wakeup import _parse


def read_back(payloads: list[str]) -> list[tuple[str, int]]:
    return [head for payload in payloads for head in _parse(payload)]


def test_heads_of_a_large_commit_are_split_into_payloads_within_the_limit() -> None:
    heads = [(f"stream-{i:04d}-" + "x" * 40, i * 7) for i in range(1000)]
    payloads = _notify_payloads(heads)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= NOTIFY_PAYLOAD_LIMIT for p in payloads)
    assert read_back(payloads) == heads


def test_ids_that_json_must_escape_or_that_are_not_ascii_round_trip() -> None:
    heads = [('a "quoted" id', 1), ("back\\slash", 2), ("ünïcødé ✓", 3), ("tab\there", 4)]
    assert read_back(_notify_payloads(heads)) == heads


def test_the_limit_counts_bytes_not_characters() -> None:
    heads = [("é" * 100 + f"-{i}", i) for i in range(200)]  # two bytes a character
    payloads = _notify_payloads(heads)
    assert all(len(p.encode()) <= NOTIFY_PAYLOAD_LIMIT for p in payloads)
    assert read_back(payloads) == heads


def test_an_id_too_long_for_any_payload_is_left_to_the_safety_poll() -> None:
    heads = [("short", 1), ("y" * NOTIFY_PAYLOAD_LIMIT, 2), ("other", 3)]
    assert read_back(_notify_payloads(heads)) == [("short", 1), ("other", 3)]


def test_no_heads_no_payload() -> None:
    assert _notify_payloads([]) == []


def test_a_malformed_notification_is_ignored() -> None:
    assert _parse('[["a", 1]') == []
    assert _parse('{"a": 1}') == []
    assert _parse('[["a", "not a number"]]') == []

"""Parsing and encoding details of the Durable Streams protocol, where the
conformance suite is thin."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from app.log import ProducerClaim
from app.protocols.durable_streams import source_id
from app.protocols.durable_streams_codec import (
    CURSOR_EPOCH,
    ProtocolError,
    ReadFrom,
    etag_matches,
    format_offset,
    json_messages,
    next_cursor,
    parse_expires_at,
    parse_offset,
    parse_producer,
    parse_sub_offset,
    parse_ttl,
    sse_control,
    sse_event,
    stored_content_type,
)


def test_offsets_sort_as_strings_and_parse_back() -> None:
    offsets = [format_offset(n) for n in (0, 9, 10, 123456)]
    assert offsets == sorted(offsets)
    assert offsets[0] == "0000000000000000_0000000000000000"
    assert parse_offset([offsets[3]], required=False) == ReadFrom(seq=123456)
    assert parse_offset(["-1"], required=True) == ReadFrom()
    assert parse_offset(["now"], required=True) == ReadFrom(at_tail=True)
    assert parse_offset([], required=False) == ReadFrom()


@pytest.mark.parametrize(
    "values",
    [["now\n"], ["1_2\n"], [""], ["1_2", "1_3"], ["a_b"], ["1,2"], ["../x"], ["1_2\x00"], ["-2"]],
)
def test_bad_offsets_are_refused(values: list[str]) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_offset(values, required=False)
    assert err.value.status == 400


def test_live_reads_need_an_offset() -> None:
    with pytest.raises(ProtocolError):
        parse_offset([], required=True)


@pytest.mark.parametrize("bad", ["+60", "00060", "60.5", "1e3", "-1", "abc", ""])
def test_ttl_must_be_a_plain_whole_number(bad: str) -> None:
    with pytest.raises(ProtocolError):
        parse_ttl(bad)
    assert parse_ttl("0") == 0 and parse_ttl("3600") == 3600 and parse_ttl(None) is None


def test_expires_at_takes_z_and_offsets_but_needs_a_zone() -> None:
    z = parse_expires_at("2030-01-02T03:04:05.123Z")
    assert z == datetime(2030, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
    assert parse_expires_at("2030-01-02T05:04:05.123+02:00") == z
    for bad in ("2030-01-02T03:04:05", "tomorrow", ""):
        with pytest.raises(ProtocolError):
            parse_expires_at(bad)


@pytest.mark.parametrize("bad", ["-1", "abc", "1.5", "05", "+1"])
def test_sub_offset_must_be_a_plain_whole_number(bad: str) -> None:
    with pytest.raises(ProtocolError):
        parse_sub_offset(bad)


def producer(**headers: str) -> ProducerClaim | None:
    return parse_producer({k.replace("_", "-"): v for k, v in headers.items()})


def test_producer_headers_go_together_as_safe_integers() -> None:
    assert producer() is None
    assert producer(producer_id="p", producer_epoch="1", producer_seq="2") == ProducerClaim(
        "p", 1, 2
    )
    for bad in (
        {"producer_id": "p", "producer_epoch": "1"},
        {"producer_id": "", "producer_epoch": "1", "producer_seq": "0"},
        {"producer_id": "p", "producer_epoch": "1abc", "producer_seq": "0"},
        {"producer_id": "p", "producer_epoch": "0", "producer_seq": "1e3"},
        {"producer_id": "p", "producer_epoch": "0", "producer_seq": str(2**53)},
    ):
        with pytest.raises(ProtocolError):
            producer(**bad)


def test_json_bodies_flatten_one_level_and_store_compact() -> None:
    assert json_messages(b'[{"a": 1}, [1, 2], "x"]', allow_empty=False) == [
        b'{"a":1}',
        b"[1,2]",
        b'"x"',
    ]
    assert json_messages(b" 42 ", allow_empty=False) == [b"42"]
    assert json_messages(b"[]", allow_empty=True) == []
    for bad in (b"[]", b"{", b"NaN", b"[Infinity]", b"\xff"):
        with pytest.raises(ProtocolError):
            json_messages(bad, allow_empty=False)
    # Other encodings a JSON reader may accept, as json accepted them before.
    assert json_messages('["é"]'.encode("utf-16"), allow_empty=False) == ['"é"'.encode()]
    assert json_messages(b'\xef\xbb\xbf{"a":1}', allow_empty=False) == [b'{"a":1}']


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"a":1e400}', id="stored-as-null"),
        pytest.param(b'["\\ud800"]', id="500-unpaired-surrogate"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="500-nested-too-deep"),
    ],
)
def test_json_the_log_cannot_keep_as_sent_is_refused(body: bytes) -> None:
    """Regression: json read 1e400 as infinity, stored as null; an escaped
    unpaired surrogate and deep nesting raised past the 400 into a 500."""
    with pytest.raises(ProtocolError) as refused:
        json_messages(body, allow_empty=False)
    assert refused.value.status == 400


def test_sse_lines_cannot_forge_events() -> None:
    forged = "a\r\nevent: control\rdata:{}\n\nb"
    assert sse_event("data", forged) == (
        "event: data\ndata:a\ndata:event: control\ndata:data:{}\ndata:\ndata:b\n\n"
    )


def test_control_events_drop_the_cursor_once_closed() -> None:
    assert sse_control(3, cursor="7", up_to_date=True) == (
        'event: control\ndata:{"streamNextOffset":"0000000000000000_0000000000000003",'
        '"streamCursor":"7","upToDate":true}\n\n'
    )
    assert '"streamCursor"' not in sse_control(3, cursor="7", up_to_date=True, closed=True)


@pytest.mark.parametrize("cursor", [None, "7", 'odd "cursor"\n'])
@pytest.mark.parametrize("up_to_date", [False, True])
@pytest.mark.parametrize("closed", [False, True])
def test_control_events_are_the_json_of_their_fields(
    cursor: str | None, up_to_date: bool, closed: bool
) -> None:
    """sse_control writes its JSON by hand: it must be what json.dumps would write."""
    event = sse_control(2**40, cursor=cursor, up_to_date=up_to_date, closed=closed)
    head, data, end = event.split("\n", 2)
    assert (head, end) == ("event: control", "\n")
    expected: dict[str, object] = {"streamNextOffset": "0000000000000000_0001099511627776"}
    if closed:
        expected["streamClosed"] = True
    elif cursor is not None:
        expected["streamCursor"] = cursor
    if up_to_date or closed:
        expected["upToDate"] = True
    assert data == "data:" + json.dumps(expected, separators=(",", ":"))


def test_cursor_is_the_interval_or_moves_past_the_clients() -> None:
    now = CURSOR_EPOCH + timedelta(seconds=20 * 100 + 5)
    assert next_cursor(None, now) == "100"
    assert next_cursor("42", now) == "100"  # an old cursor
    assert next_cursor("junk", now) == "100"
    assert int(next_cursor("100", now)) > 100
    assert int(next_cursor("500", now)) > 500


def test_etag_matching() -> None:
    assert etag_matches('"a", W/"b"', '"b"')
    assert not etag_matches('"wrong-etag"', '"b"')
    assert not etag_matches(None, '"b"')


def test_content_types_are_kept_verbatim_or_defaulted() -> None:
    assert stored_content_type("Text/Plain; charset=utf-8") == "Text/Plain; charset=utf-8"
    assert stored_content_type("nonsense") == "application/octet-stream"
    assert stored_content_type(None) is None


def test_fork_sources_are_named_by_path_or_url() -> None:
    assert source_id("/v1/stream/a/b") == "a/b"
    assert source_id("http://host:1/v1/stream/x%20y") == "x y"
    assert source_id("/behind/a/proxy/v1/stream/a") == "a"  # STREAMKEEP_PATH_PREFIX
    with pytest.raises(ProtocolError):
        source_id("/v1/stream/")

"""Authentication and authorisation against a real server on loopback.

Every route of the app is exercised (REQUESTS must cover them all, and the route
table of app/auth.py must classify them all): without a credential, with a wrong
key, with a key lacking the scope, with another stream's read token, with an
expired token, and with the right credential.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar, get

from app.auth import (
    READ_TOKEN_HEADER,
    Access,
    Authority,
    KeysFileWatch,
    parse_keys,
    rule_for,
    strip_prefix,
    unclassified_routes,
)
from app.config import Settings
from app.server import create_app
from tests.conftest import ServerFactory
from tests.live import LiveServer
from tests.protocols.fake_upstream import FakeUpstream

READER = "reader-key-0123456789abcdef"
WRITER = "writer-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
SECRET = "s" * 40
KEYS = f"{READER}:read;{WRITER}:write;{ADMIN}:admin"


@dataclass(frozen=True)
class Call:
    """One request to a route, and what the route needs for it."""

    method: str
    path: str
    access: Access
    stream: str | None = None  # the stream a read token must name to be enough
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None

    def send(self, http: httpx.Client, **headers: str) -> httpx.Response:
        return http.request(
            self.method, self.path, json=self.body, headers={**self.headers, **headers}
        )


S = "s1"
# One request per route and method (template without prefix -> method -> call).
REQUESTS: dict[str, dict[str, Call]] = {
    "/healthz": {"GET": Call("GET", "/healthz", Access.OPEN)},
    "/readyz": {"GET": Call("GET", "/readyz", Access.ADMIN)},
    "/metrics": {"GET": Call("GET", "/metrics", Access.ADMIN)},
    "/": {"GET": Call("GET", "/", Access.OPEN)},
    "/flows/{name}": {"POST": Call("POST", "/flows/countdown", Access.WRITE, body={"data": {}})},
    "/v1/streams": {"GET": Call("GET", "/v1/streams", Access.ADMIN)},
    "/v1/streams/{stream_id}": {
        "GET": Call("GET", f"/v1/streams/{S}", Access.READ, S),
        "PUT": Call("PUT", f"/v1/streams/{S}", Access.WRITE),
    },
    "/v1/streams/{stream_id}/events": {
        "GET": Call("GET", f"/v1/streams/{S}/events", Access.READ, S),
        "POST": Call("POST", f"/v1/streams/{S}/events", Access.WRITE, body={"data": 1}),
    },
    "/v1/streams/{stream_id}/done": {"POST": Call("POST", f"/v1/streams/{S}/done", Access.WRITE)},
    "/v1/streams/{stream_id}/error": {
        "POST": Call("POST", f"/v1/streams/{S}/error", Access.WRITE, body={"message": "x"})
    },
    "/v1/streams/{stream_id}/close": {"POST": Call("POST", f"/v1/streams/{S}/close", Access.WRITE)},
    # Minting a token needs a key: a token must not renew itself.
    "/v1/streams/{stream_id}/token": {"POST": Call("POST", f"/v1/streams/{S}/token", Access.READ)},
    "/v1/responses": {
        "POST": Call("POST", "/v1/responses", Access.WRITE, body={"model": "ok", "input": "hi"})
    },
    "/v1/chat/completions": {
        "POST": Call("POST", "/v1/chat/completions", Access.WRITE, body={"model": "ok"})
    },
    "/v1/responses/{response_id}": {"GET": Call("GET", f"/v1/responses/{S}", Access.READ, S)},
    "/v1/responses/{response_id}/cancel": {
        "POST": Call("POST", f"/v1/responses/{S}/cancel", Access.WRITE)
    },
    "/schema/openapi.json": {"GET": Call("GET", "/schema/openapi.json", Access.ANY_KEY)},
    # Durable Streams: reads of a stream, and writes of any kind.
    "/v1/stream/{path}": {
        "GET": Call("GET", f"/v1/stream/{S}", Access.READ, S),
        "HEAD": Call("HEAD", f"/v1/stream/{S}", Access.READ, S),
        "PUT": Call("PUT", f"/v1/stream/{S}", Access.WRITE),
        "POST": Call("POST", f"/v1/stream/{S}", Access.WRITE, body={"data": 1}),
        "DELETE": Call("DELETE", f"/v1/stream/{S}", Access.WRITE),
    },
}
# A Genkit reconnect is a read of its stream (the same route, other headers).
GENKIT_RECONNECT = Call(
    "POST",
    "/flows/countdown",
    Access.READ,
    S,
    headers={"Accept": "text/event-stream", "X-Genkit-Stream-Id": S},
    body={},
)
ALL_CALLS = [c for methods in REQUESTS.values() for c in methods.values()] + [GENKIT_RECONNECT]
GUARDED = [c for c in ALL_CALLS if c.access is not Access.OPEN]


def ids(call: Call) -> str:
    suffix = " (reconnect)" if "X-Genkit-Stream-Id" in call.headers else ""
    return f"{call.method} {call.path}{suffix}"


@pytest.fixture
def backend() -> str:
    """The routes speak only HTTP: one backend (conftest's is parametrized) is enough."""
    return "memory"


@pytest.fixture
def server(live_server: ServerFactory, upstream: FakeUpstream) -> LiveServer:
    return live_server(api_keys=KEYS, token_secret=SECRET, upstream_url=upstream.url)


@pytest.fixture
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def token_for(stream_id: str, expires_at: int | None = None) -> str:
    """A token signed with the server's secret, by the server's own code."""
    return Authority([], SECRET, 60).issue(stream_id, expires_at)


def assert_refused(response: httpx.Response, code: int) -> None:
    assert response.status_code == code, response.text
    assert response.headers["www-authenticate"].startswith('Bearer realm="streamkeep"')
    if response.request.method == "HEAD":
        return  # no body to explain it
    status = "UNAUTHENTICATED" if code == 401 else "PERMISSION_DENIED"
    error = response.json()["error"]
    assert error["status"] == status
    assert error["message"]


# -- the table -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/streamkeep"])
def test_every_route_of_the_app_is_classified_and_has_a_request_here(prefix: str) -> None:
    app = create_app(Settings(database_url="memory", path_prefix=prefix))
    assert unclassified_routes(app, prefix) == []
    for route in app.routes:
        template = strip_prefix(route.path_format, prefix)
        if template.startswith("/schema/") and template != "/schema/openapi.json":
            continue  # the other OpenAPI viewers share /schema/openapi.json's rule
        if template == "/schema":
            continue
        for method in route.methods - {"OPTIONS"}:
            assert method in REQUESTS.get(template, {}), f"no request for {method} {template}"


def test_a_route_missing_from_the_table_is_reported() -> None:
    @get("/v1/something-new", sync_to_thread=False)
    def something_new() -> str:
        return "new"

    app = Litestar(route_handlers=[something_new])
    assert unclassified_routes(app, "") == ["GET /v1/something-new"]
    assert rule_for("/v1/something-new", "GET") is None


def test_options_is_open_everywhere_for_cors_preflights(http: httpx.Client) -> None:
    response = http.options(
        f"/v1/streams/{S}/events",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET"},
    )
    assert response.status_code in (200, 204)
    exposed = response.headers.get("access-control-expose-headers", "")
    assert READ_TOKEN_HEADER.lower() in exposed.lower() or exposed == ""


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("call", GUARDED, ids=ids)
def test_without_a_credential_every_guarded_route_is_401(http: httpx.Client, call: Call) -> None:
    assert_refused(call.send(http), 401)


@pytest.mark.parametrize("call", GUARDED, ids=ids)
def test_a_wrong_key_is_401(http: httpx.Client, call: Call) -> None:
    response = call.send(http, **bearer("wrong-key-0123456789abcdef"))
    assert_refused(response, 401)
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


@pytest.mark.parametrize("call", GUARDED, ids=ids)
def test_not_bearer_is_401(http: httpx.Client, call: Call) -> None:
    assert_refused(call.send(http, Authorization=f"Basic {ADMIN}"), 401)


@pytest.mark.parametrize("call", [c for c in GUARDED if c.access is Access.WRITE], ids=ids)
def test_a_read_key_on_a_write_route_is_403(http: httpx.Client, call: Call) -> None:
    assert_refused(call.send(http, **bearer(READER)), 403)


@pytest.mark.parametrize("call", [c for c in GUARDED if c.access is Access.READ], ids=ids)
def test_a_write_key_on_a_read_route_is_403(http: httpx.Client, call: Call) -> None:
    assert_refused(call.send(http, **bearer(WRITER)), 403)


@pytest.mark.parametrize("call", [c for c in GUARDED if c.access is Access.ADMIN], ids=ids)
def test_read_and_write_keys_on_an_admin_route_are_403(http: httpx.Client, call: Call) -> None:
    assert_refused(call.send(http, **bearer(READER)), 403)
    assert_refused(call.send(http, **bearer(WRITER)), 403)


@pytest.mark.parametrize("call", GUARDED, ids=ids)
def test_another_streams_token_is_403_everywhere(http: httpx.Client, call: Call) -> None:
    other = token_for("another-stream")
    assert_refused(call.send(http, **bearer(other)), 403)
    if call.method == "GET":
        joiner = "&" if "?" in call.path else "?"
        response = http.get(f"{call.path}{joiner}token={other}")
        assert_refused(response, 403)


@pytest.mark.parametrize("call", GUARDED, ids=ids)
def test_a_token_for_the_stream_itself_allows_reads_only(http: httpx.Client, call: Call) -> None:
    response = call.send(http, **bearer(token_for(S)))
    if call.stream == S:
        assert response.status_code not in (401, 403), response.text
    else:
        assert_refused(response, 403)


@pytest.mark.parametrize("call", [c for c in GUARDED if c.stream], ids=ids)
def test_an_expired_token_is_401(http: httpx.Client, call: Call) -> None:
    # 401, not 403: the credential itself is no longer valid (RFC 6750's invalid_token),
    # and the client's remedy is a new token, not another stream.
    expired = token_for(S, expires_at=int(time.time()) - 1)
    response = call.send(http, **bearer(expired))
    assert_refused(response, 401)
    if call.method != "HEAD":  # a HEAD answer has no body
        assert "expired" in response.json()["error"]["message"]


def test_a_forged_or_mangled_token_is_401(http: httpx.Client) -> None:
    forged = Authority([], "x" * 40, 60).issue(S)
    assert_refused(http.get(f"/v1/streams/{S}", headers=bearer(forged)), 401)
    valid = token_for(S)
    prefix, encoded_id, expiry, signature = valid.split(".")
    longer = f"{prefix}.{encoded_id}.{int(expiry) + 3600}.{signature}"
    assert_refused(http.get(f"/v1/streams/{S}", headers=bearer(longer)), 401)
    for mangled in [valid[:-3], "skr1.", "skr1.a.b.c", "skr1.!!.x.%%", valid + "=="]:
        assert_refused(http.get(f"/v1/streams/{S}", params={"token": mangled}), 401)


def test_an_api_key_is_not_accepted_in_the_url(http: httpx.Client) -> None:
    response = http.get(f"/v1/streams/{S}", params={"token": ADMIN})
    assert_refused(response, 401)
    assert "Authorization header" in response.json()["error"]["message"]


# -- what is allowed ------------------------------------------------------------------------


def test_healthz_and_the_page_are_open(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.get("/healthz", headers=bearer("wrong-key-0123456789abcdef")).status_code == 200
    assert http.get("/").status_code == 200


def test_each_scope_does_what_it_names(http: httpx.Client) -> None:
    assert http.put(f"/v1/streams/{S}", headers=bearer(WRITER)).status_code == 201
    appended = http.post(f"/v1/streams/{S}/events", json={"data": 1}, headers=bearer(WRITER))
    assert appended.status_code == 200
    assert http.get(f"/v1/streams/{S}", headers=bearer(READER)).json()["last_seq"] == 1
    assert http.get("/v1/streams", headers=bearer(ADMIN)).status_code == 200
    assert http.get("/metrics", headers=bearer(ADMIN)).status_code == 200
    assert http.get("/readyz", headers=bearer(ADMIN)).status_code == 200
    # admin implies read and write
    assert http.post(f"/v1/streams/{S}/done", headers=bearer(ADMIN)).status_code == 200
    assert http.get(f"/v1/streams/{S}/events", headers=bearer(ADMIN)).status_code == 200
    # any key reads the OpenAPI document
    assert http.get("/schema/openapi.json", headers=bearer(WRITER)).status_code == 200


def test_a_token_is_taken_from_the_query_and_from_the_header(http: httpx.Client) -> None:
    assert http.put(f"/v1/streams/{S}", headers=bearer(WRITER)).status_code == 201
    http.post(f"/v1/streams/{S}/events", json={"data": "hi"}, headers=bearer(WRITER))
    http.post(f"/v1/streams/{S}/done", headers=bearer(WRITER))
    token = token_for(S)
    by_query = http.get(f"/v1/streams/{S}/events", params={"token": token})
    assert by_query.status_code == 200
    assert "event: end" in by_query.text
    by_header = http.get(f"/v1/streams/{S}/events", headers=bearer(token))
    assert by_header.text == by_query.text
    assert http.get(f"/v1/streams/{S}", params={"token": token}).json()["status"] == "done"


def test_the_token_of_a_created_stream_reads_exactly_that_stream(http: httpx.Client) -> None:
    created = http.put("/v1/streams/mine", headers=bearer(WRITER))
    assert created.status_code == 201
    token = created.headers[READ_TOKEN_HEADER]
    http.put("/v1/streams/theirs", headers=bearer(WRITER))
    http.post("/v1/streams/mine/close", headers=bearer(WRITER))
    assert http.get("/v1/streams/mine/events", params={"token": token}).status_code == 200
    assert_refused(http.get("/v1/streams/theirs/events", params={"token": token}), 403)
    assert_refused(
        http.post("/v1/streams/mine/events", json={"data": 1}, headers=bearer(token)), 403
    )


def test_the_token_of_a_flow_run_reads_exactly_that_run(http: httpx.Client) -> None:
    started = http.post(
        "/flows/countdown",
        json={"data": {"count": 3, "delay_ms": 1}},
        headers={**bearer(WRITER), "Accept": "text/event-stream"},
    )
    assert started.status_code == 200
    run_id = started.headers["X-Genkit-Stream-Id"]
    token = started.headers[READ_TOKEN_HEADER]
    # Genkit's reconnect, with the token as its bearer: replays the run byte for byte.
    reconnect = {"Accept": "text/event-stream", "X-Genkit-Stream-Id": run_id}
    replayed = http.post("/flows/countdown", json={}, headers={**reconnect, **bearer(token)})
    assert replayed.status_code == 200
    assert replayed.text == started.text
    assert http.get(f"/v1/streams/{run_id}/events", params={"token": token}).status_code == 200
    # Not another run, and not a new run.
    other = http.post("/flows/countdown", json={"data": {"count": 1}}, headers=bearer(WRITER))
    other_id = other.headers["X-Genkit-Stream-Id"]
    assert READ_TOKEN_HEADER in other.headers  # non-streaming runs hand one out too
    assert_refused(http.get(f"/v1/streams/{other_id}", params={"token": token}), 403)
    assert_refused(http.post("/flows/countdown", json={}, headers=bearer(token)), 403)


def test_the_token_of_a_proxied_response_reads_exactly_that_response(
    http: httpx.Client,
) -> None:
    body = {"model": "ok", "input": "hi", "stream": True}
    with http.stream("POST", "/v1/responses", json=body, headers=bearer(WRITER)) as started:
        assert started.status_code == 200
        token = started.headers[READ_TOKEN_HEADER]
        started.read()
    response_id = token_stream(token)
    final = http.get(f"/v1/responses/{response_id}", headers=bearer(token))
    assert final.status_code == 200
    assert final.json()["id"] == response_id
    assert_refused(http.post(f"/v1/responses/{response_id}/cancel", headers=bearer(token)), 403)


def token_stream(token: str) -> str:
    return Authority([], SECRET, 60).stream_of(token)


def test_minting_a_token_needs_a_read_key_and_an_existing_stream(http: httpx.Client) -> None:
    assert http.post(f"/v1/streams/{S}/token", headers=bearer(READER)).status_code == 404
    http.put(f"/v1/streams/{S}", headers=bearer(WRITER))
    minted = http.post(f"/v1/streams/{S}/token", headers=bearer(READER))
    assert minted.status_code == 200
    assert minted.json()["expires_in"] == 3600
    token = minted.json()["token"]
    assert http.get(f"/v1/streams/{S}", params={"token": token}).status_code == 200
    assert_refused(http.post(f"/v1/streams/{S}/token", headers=bearer(token)), 403)


def test_without_keys_nothing_is_asked_and_tokens_are_still_handed_out(
    live_server: ServerFactory,
) -> None:
    server = live_server(token_secret=SECRET)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        created = http.put(f"/v1/streams/{S}")
        assert created.status_code == 201
        assert READ_TOKEN_HEADER in created.headers
        assert http.get("/v1/streams").status_code == 200


def test_without_a_secret_no_token_is_handed_out(live_server: ServerFactory) -> None:
    server = live_server(api_keys=KEYS)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        created = http.put(f"/v1/streams/{S}", headers=bearer(WRITER))
        assert created.status_code == 201
        assert READ_TOKEN_HEADER not in created.headers
        refused = http.post(f"/v1/streams/{S}/token", headers=bearer(READER))
        assert refused.status_code == 400
        assert "STREAMKEEP_TOKEN_SECRET" in refused.json()["message"]
        token = Authority([], SECRET, 60).issue(S)
        assert_refused(http.get(f"/v1/streams/{S}", params={"token": token}), 401)


# -- configuration -----------------------------------------------------------------------


def test_key_format() -> None:
    keys = parse_keys(f"# comment\n{READER}:read, write\n{ADMIN}:admin;{WRITER}:write", "t")
    assert keys == [
        (READER, frozenset({Access.READ, Access.WRITE})),
        (ADMIN, frozenset({Access.ADMIN})),
        (WRITER, frozenset({Access.WRITE})),
    ]
    for bad in ["short:read", f"{READER}", f"{READER}:", f"{READER}:root", f"{READER} x:read"]:
        with pytest.raises(ValueError, match="t: "):
            parse_keys(bad, "t")


def test_keys_from_a_file(tmp_path: Any) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{READER}:read\n# revoked: old-key-0123456789abc:admin\n")
    authority = Authority.from_settings(Settings(api_keys_file=str(path)))
    assert authority.scopes_of(READER) == frozenset({Access.READ})
    assert authority.scopes_of("old-key-0123456789abc") is None
    with pytest.raises(ValueError, match="cannot read"):
        Authority.from_settings(Settings(api_keys_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="at least 32"):
        Authority.from_settings(Settings(token_secret="short"))


def rewrite(path: Path, text: str) -> None:
    """New contents with a new mtime (a rewrite within the same clock tick has none)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_a_changed_keys_file_replaces_the_keys_and_a_bad_one_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    rewrite(path, f"{READER}:read\n")
    settings = Settings(api_keys_file=str(path))
    authority = Authority.from_settings(settings)
    watch = KeysFileWatch(settings, authority)
    assert not watch.check()  # unchanged

    rewrite(path, f"{WRITER}:write\n")
    assert watch.check()
    assert authority.scopes_of(WRITER) == frozenset({Access.WRITE})
    assert authority.scopes_of(READER) is None  # rotated out

    for bad in ["not a key entry\n", "", "# every key removed\n"]:
        rewrite(path, bad)
        assert not watch.check(), bad
        assert authority.scopes_of(WRITER) == frozenset({Access.WRITE}), bad
    path.unlink()
    assert not watch.check()
    assert authority.enforced and authority.scopes_of(WRITER) is not None


def test_the_served_app_takes_rotated_keys_without_a_restart(
    live_server: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "keys"
    rewrite(path, f"{READER}:read\n")
    server = live_server(api_keys_file=str(path), api_keys_reload_seconds=0.05)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/v1/streams", headers=bearer(READER)).status_code == 403  # read only
        rewrite(path, f"{ADMIN}:admin\n")
        deadline = time.monotonic() + 10
        while http.get("/v1/streams", headers=bearer(ADMIN)).status_code != 200:
            assert time.monotonic() < deadline, "the new key was not taken"
            time.sleep(0.05)
        assert_refused(http.get("/v1/streams", headers=bearer(READER)), 401)

from __future__ import annotations

import httpx

from tests.conftest import ServerFactory


def test_healthz_on_every_backend(live_server: ServerFactory) -> None:
    server = live_server()
    response = httpx.get(f"{server.url}/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


BROWSER = {"Origin": "https://app.example"}


def test_cors_answers_browsers_on_every_route_and_errors_and_stays_out_of_the_rest(
    live_server: ServerFactory,
) -> None:
    """Requests without an Origin skip Litestar's CORS middleware (app.server):
    browsers must still get CORS on appends, reads and errors, others none."""
    server = live_server()
    ds = f"{server.url}/v1/stream/cors"
    text = {"content-type": "text/plain"}
    assert httpx.put(ds, headers={**text, **BROWSER}).status_code == 201
    for response in (
        httpx.post(ds, content=b"a", headers={**text, **BROWSER}),
        httpx.get(ds, headers=BROWSER),
        httpx.get(f"{server.url}/v1/stream/missing", headers=BROWSER),
        httpx.post(f"{server.url}/v1/streams/missing/events", json={"data": 1}, headers=BROWSER),
    ):
        assert response.headers["access-control-allow-origin"] == "*", response.request.url
        assert "Stream-Next-Offset" in response.headers["access-control-expose-headers"]
    preflight = httpx.options(
        f"{server.url}/v1/streams/cors/events",
        headers={**BROWSER, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    plain = httpx.post(ds, content=b"b", headers=text)
    assert plain.status_code == 204
    assert not [name for name in plain.headers if name.startswith("access-control-")]
    assert httpx.get(ds).content == b"ab"

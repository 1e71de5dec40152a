from __future__ import annotations

import httpx

from tests.conftest import ServerFactory


def test_healthz_on_every_backend(live_server: ServerFactory) -> None:
    server = live_server()
    response = httpx.get(f"{server.url}/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"

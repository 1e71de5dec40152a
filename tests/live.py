"""A real streamkeep HTTP server on loopback, in a thread of the test process.

Streaming responses need a real socket: Litestar's TestClient buffers whole
bodies, so an endless SSE response would never return.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from app.config import Settings
from app.server import create_app


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, lifespan="on", log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    @property
    def manager(self) -> Any:
        return self.app.state.manager

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

"""The built-in page in a real headless Chromium (Debian's package, driven by Playwright).

The page must keep following a stream across a reload: what it showed comes
back from sessionStorage, the rest from ?after=, nothing twice, nothing lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from tests.conftest import ServerFactory
from tests.live import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_LIMIT_MS = 30_000

# The page talks to the server only through HTTP: one backend is enough here.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),
]


@pytest.fixture
def server(live_server: ServerFactory, request: pytest.FixtureRequest) -> LiveServer:
    """A server, under the path prefix given as the test's parameter, if any."""
    return live_server(path_prefix=getattr(request, "param", ""))


@pytest.fixture
def page(server: LiveServer) -> Iterator[Page]:
    """A fresh browser, started after the server: Playwright's sync API keeps an
    event loop running in this thread, so set-up that needs asyncio.run goes first."""
    if not CHROMIUM.exists():
        pytest.fail("Chromium is missing: apt-get install -y chromium (.ci/run does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        opened = browser.new_page()
        opened.set_default_timeout(WAIT_LIMIT_MS)
        yield opened
        browser.close()


def page_text(page: Page) -> str:
    return str(page.locator("#text").text_content())


def wait_for_text_length(page: Page, length: int) -> None:
    page.wait_for_function(
        "n => document.getElementById('text').textContent.length >= n", arg=length
    )


def wait_until_ended(page: Page) -> str:
    page.wait_for_function(
        "() => /^(done|error|closed)/.test(document.getElementById('status').textContent)"
    )
    return str(page.locator("#status").text_content())


def shown_event_seqs(page: Page) -> list[int]:
    return [
        int(v) for v in page.locator("#events li").evaluate_all("items => items.map(i => i.value)")
    ]


def test_page_resumes_a_running_stream_after_reload_without_repeats_or_gaps(
    page: Page, server: LiveServer
) -> None:
    words = [f"word{i} " for i in range(30)]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.put("/v1/streams/story").status_code == 201

        def write(part: list[str]) -> None:
            events = [{"type": "text", "data": word} for word in part]
            assert http.post("/v1/streams/story/events", json=events).status_code == 200

        write(words[:10])
        page.goto(f"{server.url}/#story")
        wait_for_text_length(page, len("".join(words[:10])))
        page.reload()
        write(words[10:20])  # while the page reloads
        wait_for_text_length(page, len("".join(words[:20])))
        write(words[20:])  # while it follows live
        assert http.post("/v1/streams/story/done", json={"output": "the end"}).status_code == 200
        assert wait_until_ended(page) == 'done: "the end"'
    assert page_text(page) == "".join(words)
    assert shown_event_seqs(page) == list(range(1, 31))


@pytest.mark.parametrize("server", ["", "/streamkeep"], indirect=True, ids=["root", "prefixed"])
def test_try_it_starts_a_demo_flow_and_a_reload_midway_loses_and_repeats_nothing(
    page: Page, server: LiveServer
) -> None:
    page.goto(server.url + server.settings.path_prefix)
    page.click("#try")
    # Some of the countdown is on the page: reload while it runs.
    wait_for_text_length(page, len("20\n19\n18\n"))
    page.reload()
    assert wait_until_ended(page) == 'done: "countdown from 20 done"'
    assert page_text(page) == "".join(f"{n}\n" for n in range(20, 0, -1))
    assert shown_event_seqs(page) == list(range(1, 21))
    # The listing shows the demo's stream, finished.
    stream_id = page.evaluate("decodeURIComponent(location.hash.slice(1))")
    page.wait_for_selector(f'#streams li[data-id="{stream_id}"] .badge.done')

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
    """A server, under the path prefix given as the test's parameter (or with its settings)."""
    param = getattr(request, "param", "")
    return live_server(**param) if isinstance(param, dict) else live_server(path_prefix=param)


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


ADMIN_KEY = "admin-key-0123456789abcdef"


@pytest.mark.parametrize(
    "server",
    [{"api_keys": f"{ADMIN_KEY}:admin", "token_secret": "t" * 32}],
    indirect=True,
    ids=["keys"],
)
def test_with_keys_the_page_follows_with_a_url_token_or_a_typed_key(
    page: Page, server: LiveServer
) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        key = {"Authorization": f"Bearer {ADMIN_KEY}"}
        created = http.put("/v1/streams/shared", headers=key)
        token = created.headers["X-Streamkeep-Read-Token"]
        events = [{"type": "text", "data": f"w{i} "} for i in range(5)]
        assert http.post("/v1/streams/shared/events", json=events, headers=key).is_success
        assert http.post("/v1/streams/shared/done", headers=key).is_success
    # A read token in the URL: this stream, and no listing.
    page.goto(f"{server.url}/?token={token}#shared")
    assert wait_until_ended(page) == "done"
    assert page_text(page) == "w0 w1 w2 w3 w4 "
    page.wait_for_selector("#streams li:has-text('needs an admin key')")
    # A typed key: the listing, and the demo flow followed with its run's token.
    page.goto(server.url)
    page.fill("#key", ADMIN_KEY)
    page.click("#key-form button")
    page.wait_for_selector('#streams li[data-id="shared"]')
    page.click("#try")
    assert wait_until_ended(page) == 'done: "countdown from 20 done"'

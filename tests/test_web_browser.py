"""The page in real headless Chromium (Debian's, driven by Playwright): it loads offline without errors,
trains, reacts to its controls, keeps tabs apart and survives bad messages. Never skipped: `make test`
installs Chromium where it is missing. Screenshots of every view go to out/test-artifacts/."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bnlab.web.app import create_app
from bnlab.web.jobs import JobManager
from fakes import fake_dataset
from web_server import CHROMIUM, CHROMIUM_ARGS, running_server

ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    manager = JobManager(max_jobs=4, load=lambda name: fake_dataset(2000, 500, name), threads=1)
    store = tmp_path_factory.mktemp("store") / "runs.sqlite"
    with running_server(create_app(manager, store_path=store)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tab:
    """A page plus what it logged and every request it made (anything not on the test server is blocked)."""

    def __init__(self, browser, url, width=1280, height=800):
        self.url = url
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.errors, self.requests = [], []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))
        self.page.goto(url)
        self.wait("document.getElementById('conn').textContent === 'connected'")

    def _route(self, route):
        self.requests.append(route.request.url)
        if urlsplit(route.request.url).netloc == urlsplit(self.url).netloc:
            route.continue_()
        else:
            route.abort()

    def step(self) -> int:
        return int(self.page.text_content("#step"))

    def wait(self, condition: str, timeout: float = 20.0):
        """Poll a JS expression (wait_for_function evaluates strings in the page, which its CSP forbids)."""
        deadline = time.monotonic() + timeout
        while not self.page.evaluate(condition):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {condition}")
            self.page.wait_for_timeout(25)

    def close(self):
        self.context.close()

    def external_requests(self) -> list[str]:
        host = urlsplit(self.url).netloc
        return [u for u in self.requests if urlsplit(u).netloc != host]


@pytest.fixture
def tab(browser, server):
    t = Tab(browser, server)
    yield t
    t.close()


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def test_every_view_renders_offline_without_errors(tab, browser, server):
    page = tab.page
    page.click("#start")
    tab.wait("bnlab.stats.frames > 5 && document.getElementById('rate').textContent !== '0'")
    tab.wait("document.querySelectorAll('#c-grad .u-series').length > 1")
    shot(page, "view2-live-training")
    page.click("#tab-step")
    tab.wait("document.getElementById('b-numbers').textContent.includes('identity') || "
             "document.getElementById('b-numbers').textContent.includes('Identity')")
    page.select_option("#b-source", "live")
    tab.wait("document.getElementById('b-numbers').textContent.includes('input of the norm layer')")
    shot(page, "view1-bn-step-by-step")
    page.click("#tab-modes")
    tab.wait("document.getElementById('m-info').textContent.includes('running variance')")
    shot(page, "view3-train-vs-inference")
    page.click("#tab-land")
    tab.wait("document.getElementById('l-info').textContent.includes('colour scale')")
    shot(page, "view4-loss-landscape")
    page.click("#tab-results")
    tab.wait("document.querySelectorAll('#r-claims tbody tr').length >= 14")
    shot(page, "view5-results")
    assert tab.errors == []
    assert tab.external_requests() == []
    assert any(u.startswith("ws://") for u in tab.requests)

    phone = Tab(browser, server, width=390, height=844)
    try:
        phone.page.click("#start")
        phone.wait("bnlab.stats.frames > 3")
        assert phone.page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(phone.page, "phone-live-training")
        assert phone.errors == [] and phone.external_requests() == []
    finally:
        phone.close()


def test_start_pause_and_reset(tab):
    assert tab.step() == 0
    tab.page.click("#start")
    tab.wait("Number(document.getElementById('step').textContent) > 20")
    tab.page.click("#pause")
    tab.wait("document.getElementById('state').textContent === 'paused'")
    tab.page.wait_for_timeout(300)
    paused_at = tab.step()
    tab.page.wait_for_timeout(600)
    assert tab.step() == paused_at > 20
    tab.page.click("#reset")
    tab.wait("Number(document.getElementById('step').textContent) === 0")
    tab.page.click("#start")
    tab.wait("Number(document.getElementById('step').textContent) > 5")
    assert tab.errors == []


def test_sliders_change_the_training_and_the_charts(tab):
    page = tab.page
    page.click("#start")
    tab.wait("document.querySelectorAll('#c-grad .u-series').length === 8")  # 2 networks x 4 weight layers
    # a live control: the learning rate changes without a rebuild (training goes on from where it was)
    page.focus("#s-lr")
    for _ in range(10):
        page.keyboard.press("ArrowLeft")
    tab.wait("document.querySelector('output[for=s-lr]').textContent === '0.0501'")
    before = tab.step()
    page.wait_for_timeout(300)
    assert tab.step() > before
    # an architecture control: one hidden layer instead of three rebuilds both networks and the charts
    page.focus("#s-depth")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    tab.wait("document.querySelectorAll('#c-grad .u-series').length === 4")  # 2 x 2 weight layers
    assert page.evaluate("document.getElementById('t-layer').options.length") == 1
    frames = page.evaluate("bnlab.stats.frames")
    tab.wait(f"bnlab.stats.frames > {frames + 5}")
    # view 1: gamma scales y, through the server and the NumPy reference
    page.click("#tab-step")
    tab.wait("document.getElementById('b-numbers').textContent.includes('Identity')")
    page.focus("#b-gamma")
    for _ in range(20):
        page.keyboard.press("ArrowRight")  # 1 -> 2 in steps of 0.05
    tab.wait(r"/y: mean \S+, std 2\s/.test(document.getElementById('b-numbers').textContent)")  # std(y) = |γ| std(x̂)
    assert page.evaluate("bnlab.stats.latencies.length") >= 1
    assert tab.errors == []


def test_two_tabs_train_independently(browser, server):
    a, b = Tab(browser, server), Tab(browser, server)
    try:
        a.page.click("#start")
        a.wait("Number(document.getElementById('step').textContent) > 30")
        assert b.step() == 0
        b.page.select_option("#s-norm", "layer")
        b.wait("document.getElementById('norm-name').textContent === 'with layer norm'")
        assert a.page.text_content("#norm-name") == "with batch norm"
        b.page.click("#start")
        a.page.click("#pause")
        a.wait("document.getElementById('state').textContent === 'paused'")
        b.wait("Number(document.getElementById('step').textContent) > 30")
        assert b.page.text_content("#state") == "running" and a.page.text_content("#state") == "paused"
        assert a.errors == [] and b.errors == []
    finally:
        a.close()
        b.close()


def test_a_malformed_message_gets_an_error_and_the_server_keeps_serving(tab):
    tab.page.click("#start")
    tab.wait("Number(document.getElementById('step').textContent) > 5")
    replies = tab.page.evaluate("""() => new Promise((resolve) => {
        const ws = new WebSocket(`ws://${location.host}/ws`);
        const got = [];
        ws.onopen = () => {
            ws.send("{not json");
            ws.send(JSON.stringify({type: "settings", values: {lr: 1e9}}));
            ws.send(JSON.stringify({type: "view", view: "../../etc/passwd", id: 1, params: {}}));
            ws.send(JSON.stringify({type: "ping", id: 7}));
        };
        ws.onmessage = (e) => {
            const m = JSON.parse(e.data);
            if (m.type === "error" || m.type === "pong") got.push(m);
            if (m.type === "pong") { ws.close(); resolve(got); }
        };
    })""")
    assert [m["type"] for m in replies] == ["error", "error", "error", "pong"]
    assert "not JSON" in replies[0]["message"] and "lr must be in" in replies[1]["message"]
    steps = tab.step()
    tab.wait(f"Number(document.getElementById('step').textContent) > {steps + 10}")  # the first tab trains on
    assert tab.errors == []


def test_tabs_and_controls_work_from_the_keyboard(tab):
    page = tab.page
    page.focus("#tab-train")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-modes"
    assert page.get_attribute("#tab-modes", "aria-selected") == "true"
    assert page.is_hidden("#view-train") and page.is_visible("#view-modes")
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select')]
        .filter((el) => !document.querySelector(`label[for="${el.id}"]`)).map((el) => el.id)""")
    assert unlabelled == []

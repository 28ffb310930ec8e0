"""The playground page (`server/routes_playground.py`, `server/playground/`).

Everything runs on real uvicorn on loopback with the REAL engine on the embedded model. Plain HTTP tests:
`/status`, the page and the static route refusing `..` and other unsafe names. Browser tests: driven through
Debian's chromium (`apt-get install chromium`) by playwright (`pip install playwright`; never `playwright
install`). Every request the page makes is logged and any to a non-loopback host is aborted and fails the
test. `SPARSEDIAL_SCREENSHOT=1` rewrites docs/figures/playground.png.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import MODEL_NAME, REAL_MODEL, SLOTS, TIERS, idle, make_engine, wait_until
from reference import decode, direct, hf_greedy
from sparsedial.server import ServerSettings, create_app
from sparsedial.server.live import LiveServer
from sparsedial.server.routes_playground import router as playground_router
from sparsedial.server.routes_playground import static_path

ROOT = Path(__file__).resolve().parents[2]
MODEL = REAL_MODEL  # conftest: the embedded elastic model, as real_engine loads it
SCREENSHOT = ROOT / "docs" / "figures" / "playground.png"
CHROMIUM = os.environ.get("SPARSEDIAL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "playground-admin-token"
PROMPT = "def fibonacci(n):"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def playground_app(settings: ServerSettings, engine=None, **kw):
    """create_app plus the playground router (unless create_app already registers it)."""
    app = create_app(settings, engine=engine, **kw)
    if not any(getattr(r, "path", None) == "/playground" for r in app.routes):
        app.include_router(playground_router)
    return app


def raw_get(srv: LiveServer, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (no client-side `..` normalisation); (status, body)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ------------------------------------------------------------------------------------ plain HTTP tests
def test_status_reports_load_and_policy(live):
    r = httpx.get(f"{live.url}/status")
    assert r.status_code == 200
    assert r.json() == {"model": MODEL_NAME, "tiers": TIERS, "running": 0, "waiting": 0, "kv_slots_used": 0,
                        "kv_slots_total": SLOTS, "current_auto_tier": "dense", "default_tier": "dense", "mode": "fixed"}
    put = httpx.put(f"{live.url}/admin/tier", headers={"Authorization": f"Bearer {TOKEN}"},
                    json={"default_tier": "50%", "mode": "load", "ladder": [{"threshold": 4, "tier": "2:4"}]})
    assert put.status_code == 200
    s = httpx.get(f"{live.url}/status").json()
    assert (s["default_tier"], s["mode"], s["current_auto_tier"]) == ("50%", "load", "50%")


def test_status_is_503_until_the_engine_loads():
    def failing_factory(_settings):
        raise RuntimeError("no model here")

    with LiveServer(playground_app(ServerSettings(), engine_factory=failing_factory)) as srv:
        r = httpx.get(f"{srv.url}/status")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert httpx.get(f"{srv.url}/playground").status_code == 200  # the page itself needs no engine


def test_page_and_static_files_are_served(live):
    r = httpx.get(f"{live.url}/")
    assert r.status_code == 307 and r.headers["location"] == "/playground"
    page = httpx.get(f"{live.url}/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for name in re.findall(r'"/playground/static/([^"]+)"', page.text):
        r = httpx.get(f"{live.url}/playground/static/{name}")
        assert r.status_code == 200 and r.content == (ROOT / "server" / "playground" / name).read_bytes()
    assert httpx.get(f"{live.url}/playground/static/playground.js").headers["content-type"].startswith(
        "text/javascript")
    assert "http://" not in page.text and "https://" not in page.text  # nothing from another host


@pytest.mark.parametrize("target", [
    "/playground/static/../routes_admin.py", "/playground/static/../../pyproject.toml",
    "/playground/static/..%2Froutes_admin.py", "/playground/static/%2e%2e/deps.py",
    "/playground/static/..%5Cdeps.py", "/playground/static/.hidden.js", "/playground/static/index.html/..",
    "/playground/static//etc/passwd", "/playground/static/%2Fetc%2Fpasswd", "/playground/static/app.py",
    "/playground/static/missing.js",
])
def test_static_route_refuses_unsafe_names(live, target):
    status, body = raw_get(live, target)
    assert status == 404, (target, body[:200])
    assert b"import" not in body and b"root:" not in body and b"[project]" not in body


def test_static_path_check():
    assert static_path("playground.js") is not None
    for name in ("..", "../app.py", "..\\app.py", "a/b.js", "/etc/passwd", ".js", "x.py", "index.html\x00.js",
                 "playground.js/", "PLAYGROUND.JS.."):
        assert static_path(name) is None, name


# ------------------------------------------------------------------------------------ browser tests
def expect(locator):
    from playwright.sync_api import expect as pw_expect  # polls without eval (the page's CSP forbids it)

    return pw_expect(locator)


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("chromium not installed: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def live(real_engine):
    """A server per test over the shared engine; afterwards the engine must be idle and gets its policy back."""
    policy = real_engine.get_policy()
    srv = LiveServer(playground_app(ServerSettings(model=MODEL, admin_token=TOKEN), real_engine), real_engine).start()
    try:
        yield srv
    finally:
        srv.stop()
        left = wait_until(lambda: idle(real_engine), timeout=10)
        real_engine.set_policy(policy)
    assert left, f"requests left in the engine after the test: {real_engine.stats()}"


class Page:
    """A playwright page on the playground plus what it requested, what it was refused and its JS errors."""

    def __init__(self, browser, srv: LiveServer, ready: bool = True) -> None:
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 920})
        self.requests, self.refused, self.errors = [], [], []
        self.ctx.route("**/*", self._guard)
        self.page = self.ctx.new_page()
        self.page.set_default_timeout(30_000)
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self._console)
        self.page.goto(f"{srv.url}/playground")
        if ready:
            self.page.wait_for_selector("body[data-ready='1']")

    def _console(self, msg) -> None:
        # Chromium logs each 4xx/5xx response as "Failed to load resource"; the admin test provokes some.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(msg.text)

    def _guard(self, route) -> None:
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            self.refused.append(route.request.url)
            route.abort()

    def text(self, sel: str) -> str:
        return self.page.text_content(sel) or ""

    def dial(self, pane: str, tier: str) -> None:
        labels = self.page.eval_on_selector_all(f"#dial-{pane}-labels li", "els => els.map(e => e.dataset.tier)")
        self.page.fill(f"#dial-{pane}", str(labels.index(tier)))
        assert self.text(f"#dial-{pane}-name") == tier

    def generate(self, panes: str = "a") -> list[dict]:
        """Click Generate, wait until every pane in `panes` is done; the /generate request bodies sent."""
        before = len(self.requests)
        self.page.click("#generate")
        for p in panes:
            expect(self.page.locator(f"#state-{p}")).to_have_text(re.compile(r"^done"))
        expect(self.page.locator("#generate")).to_be_enabled()
        return [r.post_data_json for r in self.requests[before:] if r.url.endswith("/generate")]

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def ui(browser, live):
    page = Page(browser, live)
    try:
        yield page
    finally:
        page.close()
    assert not page.refused, f"the page asked non-loopback hosts: {page.refused}"
    assert not page.errors, f"JavaScript errors: {page.errors}"


def greedy(srv: LiveServer, tier: str, max_tokens: int = 48) -> list[int]:
    """The page's default request (greedy) at `tier`: transformers for dense, else the engine's own submit."""
    if tier == "dense":
        return hf_greedy(PROMPT, max_tokens)
    return direct(srv.engine, PROMPT, tier, max_tokens=max_tokens, temperature=0).token_ids


def test_page_loads_offline_and_dial_lists_tiers(ui, live):
    assert ui.text("#model-name") == MODEL_NAME
    labels = ui.page.eval_on_selector_all("#dial-a-labels li", "els => els.map(e => e.textContent)")
    assert labels == ["auto", *TIERS]
    assert ui.page.get_attribute("#dial-a", "max") == str(len(TIERS))
    assert ui.page.eval_on_selector_all("#dial-ticks option", "els => els.map(e => e.label)") == labels
    assert ui.text("#dial-a-name") == "auto"
    assert ui.page.is_hidden("#pane-b") and ui.page.is_hidden("#admin-editor")
    urls = [r.url for r in ui.requests]
    assert any(u.endswith("/playground/static/playground.js") for u in urls)
    assert all(u.startswith(live.url + "/") for u in urls), urls


def test_generation_streams_text_and_shows_the_serving_tier(ui, live):
    ui.page.evaluate("""() => {  // every change of the output's text, to see that it grew token by token
        window.outLengths = [];
        new MutationObserver(() => window.outLengths.push(document.getElementById('out-a').textContent.length))
            .observe(document.getElementById('out-a'), {childList: true, characterData: true, subtree: true});
    }""")
    ui.dial("a", "dense")
    ui.page.fill("#max-tokens", "200")  # a longer stream: more chances to render a partial state
    (sent,) = ui.generate()
    assert sent == {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "sparsity": "dense", "stream": True}
    assert ui.text("#served-a") == "dense"
    ref = greedy(live, "dense", max_tokens=200)
    assert ref and ui.text("#out-a") == decode(ref)
    assert ui.text("#tokens-a") == str(len(ref))
    assert re.fullmatch(r"\d+(\.\d+)? m?s", ui.text("#ttft-a")), ui.text("#ttft-a")
    assert float(ui.text("#tps-a")) > 0
    lengths = [n for n in ui.page.evaluate("window.outLengths") if n > 0]
    # at least one partial state before the full text: chunks that arrive together may render together (a
    # 2-core CI run saw [45, 206]), so more than two states is not guaranteed
    assert len(set(lengths)) >= 2 and lengths[0] < lengths[-1], f"output did not stream: {lengths}"


def test_moving_the_dial_changes_the_next_requests_tier(ui, live):
    tiers = TIERS
    for presses in (1, 2, 3):
        ui.page.focus("#dial-a")  # Generate took the focus
        for _ in range(presses):
            ui.page.keyboard.press("ArrowRight")
        shown = ui.text("#dial-a-name")
        (sent,) = ui.generate()
        assert sent["sparsity"] == shown and ui.text("#served-a") == shown
    assert shown == tiers[5]  # 1 + 2 + 3 steps to the right of auto
    ui.page.focus("#dial-a")
    ui.page.keyboard.press("End")
    (sent,) = ui.generate()
    assert ui.text("#dial-a-name") == sent["sparsity"] == ui.text("#served-a") == tiers[-1]
    ui.page.focus("#dial-a")
    ui.page.keyboard.press("Home")
    (sent,) = ui.generate()  # auto: the policy's default tier serves it
    assert sent["sparsity"] == "auto" and ui.text("#served-a") == "dense"


def test_compare_mode_runs_two_tiers_side_by_side(ui, live):
    ui.page.check("#compare")
    assert ui.page.is_visible("#pane-b")
    ui.dial("a", "dense")
    ui.dial("b", "2:4")
    sent = ui.generate("ab")
    assert sorted(s["sparsity"] for s in sent) == sorted(["dense", "2:4"])
    assert (ui.text("#served-a"), ui.text("#served-b")) == ("dense", "2:4")
    assert ui.text("#out-a") == decode(greedy(live, "dense"))
    assert ui.text("#out-b") == decode(greedy(live, "2:4"))
    assert ui.text("#out-a") and ui.text("#out-b")
    if os.environ.get("SPARSEDIAL_SCREENSHOT") == "1":
        ui.page.fill("#admin-token", TOKEN)
        ui.page.click("#admin-connect")
        ui.page.wait_for_selector("#admin-editor", state="visible")
        ui.page.click("#admin-add-step")  # an unsaved ladder row, to show the editor
        expect(ui.page.locator("#live-kv-total")).to_have_text(re.compile(r"^\d+$"))
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        ui.page.set_viewport_size({"width": 1400, "height": 600})
        ui.page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_live_panel_shows_numbers_from_status(ui, live):
    expect(ui.page.locator("#live-kv-total")).to_have_text(str(SLOTS))
    for sel in ("#live-running", "#live-waiting", "#live-kv-used"):
        assert ui.text(sel) == "0", sel  # idle
    assert ui.text("#live-auto") == "dense"
    assert ui.text("#live-mode") == "fixed"
    put = httpx.put(f"{live.url}/admin/tier", headers={"Authorization": f"Bearer {TOKEN}"},
                    json={"default_tier": "70%"})
    assert put.status_code == 200
    expect(ui.page.locator("#live-default")).to_have_text("70%", timeout=5_000)  # polled every second
    expect(ui.page.locator("#live-auto")).to_have_text("70%", timeout=5_000)


def test_admin_section_edits_the_policy(ui, live):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    ui.page.fill("#admin-token", "wrong-token")
    ui.page.click("#admin-connect")
    ui.page.wait_for_selector("#admin-error", state="visible")
    assert "invalid admin token" in ui.text("#admin-error") and ui.page.is_hidden("#admin-editor")

    ui.page.fill("#admin-token", TOKEN)
    ui.page.press("#admin-token", "Enter")
    ui.page.wait_for_selector("#admin-editor", state="visible")
    assert ui.page.is_hidden("#admin-error")
    assert ui.page.input_value("#admin-default") == "dense"
    options = ui.page.eval_on_selector_all("#admin-default option", "els => els.map(e => e.value)")
    assert options == TIERS
    ui.page.select_option("#admin-default", "50%")
    ui.page.click("#admin-save")
    expect(ui.page.locator("#admin-status")).to_have_text(re.compile(r"^saved"))
    got = httpx.get(f"{live.url}/admin/tier", headers=admin).json()
    assert got["default_tier"] == "50%" and got["policy"]["mode"] == "fixed"

    ui.page.select_option("#admin-mode", "load")  # no ladder: the server's error message is shown
    ui.page.click("#admin-save")
    ui.page.wait_for_selector("#admin-error", state="visible")
    assert "needs a non-empty ladder" in ui.text("#admin-error")
    assert httpx.get(f"{live.url}/admin/tier", headers=admin).json()["policy"]["mode"] == "fixed"

    ui.page.click("#admin-add-step")
    ui.page.fill("#ladder-threshold-0", "4")
    ui.page.select_option("#ladder-tier-0", "70%")
    ui.page.click("#admin-save")
    expect(ui.page.locator("#admin-status")).to_have_text(re.compile(r"^saved"))
    assert ui.page.is_hidden("#admin-error")
    policy = httpx.get(f"{live.url}/admin/tier", headers=admin).json()["policy"]
    assert policy["mode"] == "load" and policy["default_tier"] == "50%"
    assert policy["ladder"] == [{"threshold": 4.0, "tier": "70%"}]

    (sent,) = ui.generate()  # dial at auto, load 1 < 4: the new default tier serves it
    assert sent["sparsity"] == "auto" and ui.text("#served-a") == "50%"


def test_api_key_field_and_server_errors(browser, real_engine):
    """With SPARSEDIAL_API_KEY set, a generation without the key shows the server's 401 message; with it, runs."""
    app = playground_app(ServerSettings(model=MODEL, api_key="inference-key"), real_engine)
    with LiveServer(app, real_engine) as srv:
        ui = Page(browser, srv)
        try:
            ui.page.fill("#max-tokens", "8")
            ui.page.click("#generate")
            expect(ui.page.locator("#state-a")).to_have_text(re.compile(r"^error: missing or invalid API key"))
            expect(ui.page.locator("#generate")).to_be_enabled()
            ui.page.fill("#api-key", "inference-key")
            ui.dial("a", "50%")
            (sent,) = ui.generate()
            assert sent["max_tokens"] == 8 and ui.text("#served-a") == "50%" and ui.text("#out-a")
            ui.page.fill("#max-tokens", "0")  # checked in the page, nothing sent
            ui.page.click("#generate")
            expect(ui.page.locator("#request-error")).to_have_text(re.compile("max_tokens"))
        finally:
            ui.close()
        assert not ui.refused and not ui.errors, (ui.refused, ui.errors)


def test_page_waits_for_the_engine_to_load(browser):
    """Served before the engine is ready: the page says so, keeps Generate off, then comes up by itself. The
    engine is a real one (its own: the app shuts it down), loaded once the test says go."""
    release = threading.Event()

    def slow_factory(_settings):
        release.wait(30)
        return make_engine(max_batch=1, resident_tiers=("dense",))  # the other tiers build on first use

    with LiveServer(playground_app(ServerSettings(model=MODEL), engine_factory=slow_factory)) as srv:
        ui = Page(browser, srv, ready=False)
        try:
            expect(ui.page.locator("#health")).to_have_text("engine loading…")
            expect(ui.page.locator("#live-error")).to_have_text(re.compile("engine is loading"))
            expect(ui.page.locator("#generate")).to_be_disabled()
            release.set()
            ui.page.wait_for_selector("body[data-ready='1']", timeout=90_000)
            expect(ui.page.locator("#model-name")).to_have_text(MODEL_NAME)
            expect(ui.page.locator("#live-error")).to_be_hidden()
            labels = ui.page.eval_on_selector_all("#dial-a-labels li", "els => els.map(e => e.textContent)")
            assert labels == ["auto", *TIERS]
        finally:
            release.set()
            ui.close()
        assert not ui.refused and not ui.errors, (ui.refused, ui.errors)

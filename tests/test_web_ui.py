"""The chat page at `/` (forge/server/ui.py, forge/server/static): the served HTML and `--no-ui` over HTTP,
then a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium) against live
`forge serve` subprocesses with the default model. Without the browser those tests skip; .ci/run installs it.

FORGE_UPDATE_SCREENSHOT=1 also writes the screenshot to docs/chat-page.png (the README's picture).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from forge.cli import build_parser
from forge.server.api_server import build_app, default_model_name
from forge.server.async_engine import AsyncEngine
from forge.server.ui import STATIC_DIR

ROOT = Path(__file__).resolve().parents[1]
README_SCREENSHOT = ROOT / "docs" / "chat-page.png"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver") or next(
    (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.access(p, os.X_OK)), None)
NO_BROWSER = ("browser test skipped: needs Debian's chromium and chromium-driver "
              "(apt-get install chromium chromium-driver; .ci/run installs them) and selenium (the test extra)")
# A prompt whose greedy reply (55 tokens with the default model) ends by itself and holds a code block.
CODE_PROMPT = "Show a Python one-liner that reverses a string."
LONG_PROMPT = "Write a long essay about the history of Rome."


# -- the page over plain HTTP (no browser) -----------------------------------------------------------

class _Sources(HTMLParser):
    """Every URL the page makes the browser load: script src, link href, img/iframe/source src."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_script = "src" not in attrs
        for name in ("src", "href"):
            if attrs.get(name) is not None and tag in ("script", "link", "img", "iframe", "source", "embed"):
                self.urls.append(attrs[name])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1


def _client(engine, ui: bool) -> TestClient:
    # No `with`: the lifespan (the engine thread) is not needed to serve static files or a 404.
    return TestClient(build_app(AsyncEngine(engine), default_model_name(engine.model_path), ui=ui),
                      base_url="http://127.0.0.1")  # a Host the loopback server accepts


def test_page_is_served_without_external_urls(default_llm):
    client = _client(default_llm.llm_engine, ui=True)
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in resp.headers["content-security-policy"]
    page = _Sources()
    page.feed(resp.text)
    assert page.inline_scripts == 0  # the CSP allows no inline script
    assert {"ui/app.js", "ui/style.css", "ui/vendor/marked/marked.umd.js",
            "ui/vendor/dompurify/purify.min.js"} <= set(page.urls)
    for url in page.urls:
        if url.startswith("data:"):
            continue
        assert "://" not in url and not url.startswith("//"), f"external URL in the page: {url}"
        assert client.get("/" + url).status_code == 200, url
    assert "http://" not in resp.text and "https://" not in resp.text
    css = client.get("/ui/style.css").text
    assert "url(" not in css and "@import" not in css
    # Each shipped library carries its license.
    for lib in ("marked", "dompurify"):
        assert (STATIC_DIR / "vendor" / lib / "LICENSE").is_file()


def test_no_ui_flag_leaves_root_a_404(default_llm, monkeypatch):
    client = _client(default_llm.llm_engine, ui=False)
    resp = client.get("/")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert client.get("/ui/app.js").status_code == 404
    # The flag reaches serve(): ui=False with --no-ui, True without.
    seen = []
    monkeypatch.setattr("forge.server.api_server.serve", lambda *a, **kw: seen.append(kw["ui"]))
    for argv in (["serve", "--no-ui"], ["serve"]):
        args = build_parser().parse_args(argv)
        args.func(args)
    assert seen == [False, True]


# -- live servers and the browser -------------------------------------------------------------------

class ForgeServer:
    """`forge serve` with the default model in a subprocess, on a free loopback port."""

    def __init__(self, log_dir: Path, api_key: str | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_dir / f"forge-serve-{self.port}.log"
        cmd = [sys.executable, "-m", "forge", "serve", "--port", str(self.port),
               "--max-model-len", "2048", "--num-kv-blocks", "256"]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 120.0) -> "ForgeServer":
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"forge serve exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"forge serve did not start:\n{self.log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        self.model = httpx.get(self.url + "/v1/models", headers=self.headers, timeout=10).json()["data"][0]["id"]
        return self

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def num_running(self) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name == "forge:num_requests_running":
                    return sample.value
        raise KeyError("forge:num_requests_running")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(NO_BROWSER)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(NO_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, selenium-manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", "--window-size=1280,860"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    _viewport(driver, 1120, 660)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    """One server for every browser test (the model load is most of their time), with an API key: the
    key test starts the page without it, the others with it already in local storage."""
    srv = ForgeServer(tmp_path_factory.mktemp("forge-serve"), api_key="sk-forge-test")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-ui-artifacts")


def _viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def _wait(driver, condition, timeout: float = 20.0, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(), message)


def _open(driver, srv: ForgeServer, clear: bool = True, with_key: bool = True) -> None:
    """Load the page, first emptying its local storage (unless clear=False) but for the API key."""
    driver.get(srv.url + "/")
    if clear:
        driver.execute_script("localStorage.clear()")
        if with_key and srv.api_key:
            driver.execute_script("localStorage.setItem('forge.apiKey', JSON.stringify(arguments[0]))", srv.api_key)
        driver.get(srv.url + "/")
    driver.get_log("browser")  # drop what earlier pages logged


def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def _set_field(driver, element_id: str, value: str) -> None:
    field = _by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def _send(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    _by_id(driver, "prompt").send_keys(text, Keys.ENTER)


def _assistant(driver):
    return _all(driver, ".message.assistant")[-1]


def _is_pending(driver) -> bool:
    return bool(_all(driver, ".message.assistant.pending"))


def _stored_chats(driver) -> list[dict]:
    return json.loads(driver.execute_script("return localStorage.getItem('forge.chats')") or "[]")


def _severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_shows_the_model_and_streams_a_reply_sent_with_enter(browser, server, artifacts):
    _open(browser, server)
    _wait(browser, lambda: _by_id(browser, "model-name").text == server.model, message="model name not shown")
    assert not _by_id(browser, "key-dialog").get_attribute("open")
    _set_field(browser, "temperature", "0")
    _set_field(browser, "max-tokens", "64")
    _send(browser, CODE_PROMPT)

    # Streaming: the reply is seen growing while the request is still open.
    _wait(browser, lambda: _all(browser, ".message.assistant"), message="no reply element")
    partial_lengths = set()
    deadline = time.monotonic() + 60
    while _is_pending(browser) and time.monotonic() < deadline:
        text = browser.execute_script(
            "const m = document.querySelector('.message.assistant.pending .content'); return m ? m.textContent : null")
        if text:
            partial_lengths.add(len(text))
        time.sleep(0.03)
    assert not _is_pending(browser), "the reply did not finish"
    assert len(partial_lengths) >= 3, f"no streaming seen, lengths {sorted(partial_lengths)}"

    # The page's reply is exactly the server's greedy reply, and its stats use the server's token count.
    reply = _stored_chats(browser)[0]["messages"][-1]
    expected = httpx.post(server.url + "/v1/chat/completions", timeout=60, headers=server.headers, json={
        "messages": [{"role": "user", "content": CODE_PROMPT}], "temperature": 0, "max_tokens": 64}).json()
    assert reply["content"] == expected["choices"][0]["message"]["content"]
    stats = _assistant(browser).find_element("css selector", ".stats").text
    assert f"{expected['usage']['completion_tokens']} tokens" in stats and "tok/s" in stats and "TTFT" in stats, stats
    assert len(partial_lengths) < expected["usage"]["completion_tokens"] + 2

    # Markdown: the fenced code of the reply is a <pre><code> block; the user's message is plain text.
    assert "```" in reply["content"], "the greedy reply to CODE_PROMPT no longer holds a code block"
    blocks = _assistant(browser).find_elements("css selector", "pre > code")
    assert len(blocks) == (reply["content"].count("```") + 1) // 2
    assert "[::-1]" in blocks[0].text
    assert _all(browser, ".message.user")[0].text == CODE_PROMPT
    assert _severe_console_errors(browser) == []  # no script error, no blocked (CSP) load

    shot = artifacts / "chat-page.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {shot}")
    if os.environ.get("FORGE_UPDATE_SCREENSHOT") == "1":
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)


def test_stop_button_ends_a_long_reply_and_the_server_aborts_it(browser, server):
    _open(browser, server)
    _set_field(browser, "temperature", "0")
    _set_field(browser, "max-tokens", "1500")
    _send(browser, LONG_PROMPT)
    _wait(browser, lambda: len(_assistant(browser).text) > 40, timeout=60, message="the reply did not start")
    assert server.num_running() == 1
    assert _by_id(browser, "stop").is_displayed() and not _by_id(browser, "send").is_displayed()
    _by_id(browser, "stop").click()

    _wait(browser, lambda: not _is_pending(browser), timeout=10, message="the page kept streaming")
    deadline = time.monotonic() + 10
    while server.num_running() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.num_running() == 0, "the server kept generating after the page stopped"
    assert "stopped" in _assistant(browser).find_element("css selector", ".stats").text
    assert _by_id(browser, "send").is_displayed() and not _by_id(browser, "stop").is_displayed()
    reply = _stored_chats(browser)[0]["messages"][-1]
    assert reply["stopped"] and 0 < len(reply["content"]) and "error" not in reply
    time.sleep(0.3)
    assert _stored_chats(browser)[0]["messages"][-1]["content"] == reply["content"]  # nothing more arrived


def test_server_errors_are_shown_in_the_page(browser, server):
    _open(browser, server)
    _set_field(browser, "max-tokens", "100000")
    _send(browser, "Hello")
    _wait(browser, lambda: _assistant(browser).find_element("css selector", ".error").text, message="no error shown")
    expected = httpx.post(server.url + "/v1/chat/completions", timeout=30, headers=server.headers, json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100000, "temperature": 0.7}).json()
    assert _assistant(browser).find_element("css selector", ".error").text == expected["error"]["message"]
    assert _by_id(browser, "send").is_displayed()


# The stream the server sends when the engine fails a request mid-reply (serving._sse): some content,
# then an OpenAI-style error object. A failing engine cannot be provoked from outside, so the page's
# fetch answers with these exact bytes for this one test (and records what the page asked for).
_FAILING_STREAM = """
    window.__requests = [];
    const realFetch = window.fetch;
    window.fetch = async (url, init) => {
      if (!String(url).endsWith('v1/chat/completions')) return realFetch(url, init);
      window.__requests.push(JSON.parse(init.body));
      const events = [
        {choices: [{index: 0, delta: {role: 'assistant', content: ''}, logprobs: null, finish_reason: null}]},
        {choices: [{index: 0, delta: {content: 'Arr, matey'}, logprobs: null, finish_reason: null}]},
        {error: {message: 'the engine failed: out of memory', type: 'server_error', param: null, code: null}},
      ];
      const body = events.map((e) => 'data: ' + JSON.stringify(e) + '\\n\\n').join('') + 'data: [DONE]\\n\\n';
      return new Response(body, {status: 200, headers: {'Content-Type': 'text/event-stream'}});
    };
"""


def test_settings_are_sent_kept_and_a_stream_error_is_shown(browser, server):
    _open(browser, server)
    _wait(browser, lambda: _by_id(browser, "model-name").text == server.model)
    for field, value in (("system-prompt", "You are a pirate."), ("temperature", "0.5"), ("max-tokens", "12"),
                         ("seed", "7")):
        _set_field(browser, field, value)
    browser.execute_script(_FAILING_STREAM)
    _send(browser, "Hello")
    _wait(browser, lambda: _assistant(browser).find_element("css selector", ".error").text, message="no error shown")
    assert _assistant(browser).find_element("css selector", ".error").text == "the engine failed: out of memory"
    assert _assistant(browser).find_element("css selector", ".content").text == "Arr, matey"
    request = browser.execute_script("return window.__requests")[0]
    assert request == {"model": server.model, "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "system", "content": "You are a pirate."},
                                    {"role": "user", "content": "Hello"}],
                       "temperature": 0.5, "max_tokens": 12, "seed": 7}
    _open(browser, server, clear=False)  # settings and the failed turn survive a reload
    values = [_by_id(browser, f).get_attribute("value") for f in ("system-prompt", "temperature", "max-tokens", "seed")]
    assert values == ["You are a pirate.", "0.5", "12", "7"]
    assert _assistant(browser).find_element("css selector", ".error").text == "the engine failed: out of memory"


def test_history_is_kept_in_the_browser_and_rendered_safely(browser, server):
    _open(browser, server)
    reply = ("Here:\n\n```python\nprint('hi')\n```\n\n<img src=x onerror=\"window.__pwned=1\">"
             "<script>window.__pwned=2</script> [click](javascript:window.__pwned=3)")
    chat = {"id": "saved-1", "title": "An older chat", "updated": 1, "messages": [
        {"role": "user", "content": "<b>not bold</b>"}, {"role": "assistant", "content": reply}]}
    browser.execute_script("localStorage.setItem('forge.chats', arguments[0]);"
                           "localStorage.setItem('forge.currentChat', '\"saved-1\"')", json.dumps([chat]))
    _open(browser, server, clear=False)

    assert [e.text for e in _all(browser, ".chat-item .open")] == ["An older chat"]
    assert _all(browser, ".message.user")[0].text == "<b>not bold</b>"  # typed text is never HTML
    assert _assistant(browser).find_element("css selector", "pre > code").text == "print('hi')"
    assert browser.execute_script("return window.__pwned === undefined")
    assert not _all(browser, "#messages script, #messages [onerror]")
    assert all(not (a.get_attribute("href") or "").startswith("javascript:") for a in _all(browser, "#messages a"))

    _by_id(browser, "new-chat").click()
    assert not _all(browser, ".message") and _by_id(browser, "empty").is_displayed()
    _all(browser, ".chat-item .open")[0].click()
    assert len(_all(browser, ".message")) == 2
    _all(browser, ".chat-item .delete")[0].click()
    assert not _all(browser, ".chat-item") and _stored_chats(browser) == []


def test_phone_sized_window(browser, server, artifacts):
    from selenium.webdriver.common.action_chains import ActionChains

    _viewport(browser, 390, 844, mobile=True)
    try:
        _open(browser, server)
        _wait(browser, lambda: _by_id(browser, "model-name").text == server.model)
        width = browser.execute_script("return window.innerWidth")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        send = _by_id(browser, "send").rect
        assert send["x"] + send["width"] <= width and send["y"] + send["height"] <= 844
        sidebar_right = lambda: browser.execute_script(  # noqa: E731
            "return document.getElementById('sidebar').getBoundingClientRect().right")
        assert sidebar_right() <= 0  # the sidebar is out of the way until asked for
        _by_id(browser, "menu").click()
        _wait(browser, lambda: browser.execute_script(
            "return document.getElementById('sidebar').getBoundingClientRect().left") >= 0, timeout=5)
        assert _by_id(browser, "temperature").is_displayed()
        browser.save_screenshot(str(artifacts / "chat-page-phone.png"))
        # Tap the strip of chat the sidebar leaves uncovered, at the window's right edge.
        ActionChains(browser).move_to_element_with_offset(_by_id(browser, "scrim"), width // 2 - 10, 0).click().perform()
        _wait(browser, lambda: sidebar_right() <= 0, timeout=5, message="the sidebar did not close")
    finally:
        _viewport(browser, 1120, 660)


def test_api_key_server_asks_for_the_key_then_works(browser, server):
    from selenium.webdriver.common.keys import Keys

    _open(browser, server, with_key=False)
    dialog = _by_id(browser, "key-dialog")
    _wait(browser, lambda: dialog.get_attribute("open") is not None, message="no key dialog on 401")
    _by_id(browser, "api-key").send_keys("wrong-key", Keys.ENTER)
    _wait(browser, lambda: _by_id(browser, "key-error").text, message="a refused key is not reported")
    assert "incorrect API key" in _by_id(browser, "key-error").text and dialog.get_attribute("open") is not None

    _by_id(browser, "api-key").send_keys(server.api_key, Keys.ENTER)
    _wait(browser, lambda: _by_id(browser, "model-name").text == server.model, message="model name not shown")
    assert dialog.get_attribute("open") is None
    assert json.loads(browser.execute_script("return localStorage.getItem('forge.apiKey')")) == server.api_key

    _set_field(browser, "temperature", "0")
    _set_field(browser, "max-tokens", "8")
    _send(browser, "Hi!")
    _wait(browser, lambda: not _is_pending(browser) and _all(browser, ".message.assistant"), timeout=60)
    reply = _stored_chats(browser)[0]["messages"][-1]
    assert reply["content"] and "error" not in reply
    assert "tok/s" in _assistant(browser).find_element("css selector", ".stats").text

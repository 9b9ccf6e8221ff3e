"""The web chat page (steelworks/serve/static/chat.html): served without the API key, and driven
in headless Chromium against a live uvicorn server, where the streamed reply must equal what the
API answers non-streaming for the same conversation.

Chromium is driven through the DevTools protocol rather than ``--dump-dom``: with
``--virtual-time-budget`` Chromium dumps the DOM while the streaming fetch is still being read,
so the page's ``data-done`` flag is polled instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import uvicorn_in_thread
from fastapi.testclient import TestClient

from steelworks.inference.engine import Engine
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

KEY = "sk-test"
MAX_TOKENS = 24
PREFIX = "/steel"  # a Ray Serve-style route prefix for the plain app
BARE = "/bare"  # the plain app behind a prefix-stripping reverse proxy
LOCKED = "/locked"  # the same engine behind an API key
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def engine(shaken_model_dir: Path) -> Engine:
    eng = Engine.from_dir(shaken_model_dir)
    yield eng
    eng.shutdown()


def test_page_is_served_without_api_key(engine: Engine) -> None:
    client = TestClient(build_app(engine, ServeConfig(api_key=KEY, model_name="steel")))
    for path in ("/", "/chat"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert '<meta charset="utf-8">' in html
        for element in ('id="messages"', 'id="input"', 'id="send"', 'id="stop"', 'id="key"',
                        'id="temperature"', 'id="max-tokens"', 'id="model"', 'id="error"'):
            assert element in html, element
        assert '"v1/chat/completions"' in html and '"v1/models"' in html  # relative URLs
        assert "http://" not in html and "https://" not in html  # self-contained: no CDN
    assert client.get("/v1/models").status_code == 401  # the API itself still needs the key
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --- a live server ---------------------------------------------------------------------------

def route_prefixes(ray_like: dict[str, Any], stripped: dict[str, Any], root: Any) -> Any:
    """An ASGI app mounting apps under prefixes in the two ways the page must cope with:
    ``ray_like`` as Ray Serve's proxy does (the path is kept whole and the prefix appended to
    ``root_path``; Starlette then redirects "/steel" to "/steel/"), ``stripped`` as a reverse
    proxy that cuts the prefix off (nginx ``proxy_pass http://app/``), which serves the page at
    "/bare" itself, without the slash. Everything else goes to ``root``."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        for prefix, app in ray_like.items():
            if path == prefix or path.startswith(prefix + "/"):
                scope = {**scope, "root_path": scope.get("root_path", "") + prefix}
                return await app(scope, receive, send)
        for prefix, app in stripped.items():
            if path == prefix or path.startswith(prefix + "/"):
                return await app({**scope, "path": path[len(prefix):] or "/"}, receive, send)
        await root(scope, receive, send)

    return asgi


@dataclass
class Server:
    url: str  # "http://127.0.0.1:<port>", no trailing slash

    def complete(self, messages: list[dict[str, str]], prefix: str = "") -> str:
        """The non-streaming reply to ``messages`` with the settings the page tests use."""
        body = {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
        req = urllib.request.Request(f"{self.url}{prefix}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)["choices"][0]["message"]["content"]


def model_at(prefix: str) -> str:
    return f"steel{prefix.replace('/', '-')}"  # "steel", "steel-steel", "steel-bare", ...


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Server]:
    """uvicorn in a thread (no Ray): the app at "/", again under PREFIX and BARE, and a keyed
    one under LOCKED. The socket is bound here and handed over, so there is no free-port race."""
    # Each mount names its model after itself, so a page that wrongly called the root app's
    # API (which would answer just as well) shows the wrong name.
    def app(prefix: str, **kw: Any) -> Any:
        return build_app(engine, ServeConfig(model_name=model_at(prefix), **kw))

    asgi = route_prefixes({PREFIX: app(PREFIX), LOCKED: app(LOCKED, api_key=KEY)},
                          {BARE: app(BARE)}, app(""))
    with uvicorn_in_thread(asgi) as url:
        yield Server(url)


# --- headless Chromium over the DevTools protocol --------------------------------------------

class CDPError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium driven over ``--remote-debugging-pipe``: it reads NUL-terminated JSON
    commands on its fd 3 and writes replies and events on fd 4. Standard library only: no port
    to find, no websocket client."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome, self._write_fd = os.pipe()
        self._read_fd, from_chrome = os.pipe()
        self.log = profile / "chromium.log"
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        # posix_spawn puts the child's ends on fds 3 and 4 (subprocess cannot renumber fds, and
        # preexec_fn is unsafe with the server thread running). Sources are raised to >= 10
        # first, so no dup2 overwrites another's source.
        r, w, log = (_raise_fd(fd) for fd in (to_chrome, from_chrome, log))
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        dup2 = os.POSIX_SPAWN_DUP2
        self.pid = os.posix_spawn(binary, args, os.environ, file_actions=[
            (dup2, r, 3), (dup2, w, 4), (dup2, log, 1), (dup2, log, 2)])
        for fd in (r, w, log):
            os.close(fd)
        self._writer = open(self._write_fd, "wb")  # closed in close()
        self._inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._next_id = 0
        threading.Thread(target=self._read_loop, daemon=True).start()

    def _read_loop(self) -> None:
        # Reading in a thread lets call() time out instead of blocking on a hung browser.
        buf = b""
        with open(self._read_fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                *messages, buf = (buf + chunk).split(b"\0")
                for m in messages:
                    self._inbox.put(json.loads(m))
        self._inbox.put(None)  # EOF: the browser is gone

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        try:
            self._writer.write(json.dumps(msg).encode() + b"\0")
            self._writer.flush()
        except BrokenPipeError:
            raise CDPError(f"chromium exited: {self._log_tail()}") from None
        deadline = time.monotonic() + timeout
        while True:  # skip events and stale replies until ours arrives
            try:
                reply = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no reply to {method} in {timeout}s") from None
            if reply is None:
                raise CDPError(f"chromium exited: {self._log_tail()}")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply["result"]

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def open(self, url: str) -> str:
        """A new tab loading ``url``; returns its session id."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session: str, expression: str) -> Any:
        """The JSON value of ``expression`` in the tab; None while the page is not ready."""
        try:
            res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                            session)
        except CDPError:  # e.g. the execution context was replaced by a navigation
            return None
        return None if "exceptionDetails" in res else res["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (CDPError, TimeoutError):
            pass
        deadline = time.monotonic() + 5
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)  # only the browser this test started
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        self._writer.close()


def _raise_fd(fd: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    binary = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if binary is None:
        pytest.skip(f"no headless browser: none of {', '.join(BROWSERS)} is on PATH "
                    "(Debian/Ubuntu: apt-get install chromium)")
    chrome = Chromium(binary, tmp_path_factory.mktemp("chromium"))
    try:
        yield chrome
    finally:
        chrome.close()


# What the tests read off the page: the run flags on <body>, the bubbles, the shown error.
PAGE_STATE = """(() => {
  const $ = (id) => document.getElementById(id);
  if (!$("model")) return null;
  const texts = (sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent);
  return {done: document.body.dataset.done ?? null, error: document.body.dataset.error ?? null,
          model: $("model").textContent, user: texts(".msg.user"),
          assistant: texts(".msg.assistant"), shownError: $("error").hidden ? null :
          $("error").textContent, input: $("input").value, path: location.pathname};
})()"""


def wait_for(chrome: Chromium, session: str, ready: Callable[[dict[str, Any]], bool],
             timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = chrome.evaluate(session, PAGE_STATE)
        if state is not None and ready(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"page not ready after {timeout}s: {state}")


def finished(state: dict[str, Any]) -> bool:
    """The reply has streamed in (or failed) and the model name request has settled."""
    return bool(state["done"] or state["error"]) and state["model"] != "loading…"


def page_url(server: Server, path: str, q: str, **params: Any) -> str:
    query = urllib.parse.urlencode({"q": q, "temperature": 0, "max_tokens": MAX_TOKENS, **params})
    return f"{server.url}/{path}?{query}"


def test_chat_page_streams_the_api_reply(server: Server, browser: Chromium) -> None:
    session = browser.open(page_url(server, "chat", "你好"))
    state = wait_for(browser, session, finished)
    assert state["error"] is None and state["shownError"] is None, state
    assert state["done"] == "1" and state["model"] == model_at("")
    first = [{"role": "user", "content": "你好"}]
    (reply,) = state["assistant"]
    assert state["user"] == ["你好"] and reply and reply == server.complete(first)

    # A second turn typed into the box: the page resends the whole conversation.
    browser.evaluate(session, """document.getElementById("input").value = "What is 北京?";
                                 document.getElementById("send").click();""")
    state = wait_for(browser, session, finished)
    assert state["done"] == "1" and state["user"] == ["你好", "What is 北京?"], state
    second = [*first, {"role": "assistant", "content": reply},
              {"role": "user", "content": "What is 北京?"}]
    assert state["assistant"] == [reply, server.complete(second)]


@pytest.mark.parametrize("path, landed", [
    ("steel/chat", "/steel/chat"), ("steel/", "/steel/"), ("steel", "/steel/"),  # redirected
    ("bare/chat", "/bare/chat"), ("bare", "/bare"),  # the page's "no trailing slash" case
])
def test_chat_page_under_a_route_prefix(server: Server, browser: Chromium, path: str,
                                        landed: str) -> None:
    """The page reaches the API relative to its app root, whatever the prefix and slash."""
    session = browser.open(page_url(server, path, "北京是"))
    state = wait_for(browser, session, finished)
    prefix = "/" + path.split("/")[0]
    assert state["done"] == "1" and state["error"] is None, state
    assert state["path"] == landed and state["model"] == model_at(prefix)
    expected = server.complete([{"role": "user", "content": "北京是"}], prefix=prefix)
    assert state["assistant"] == [expected] and expected


def test_chat_page_shows_api_errors(server: Server, browser: Chromium) -> None:
    # A 400 from the API: the OpenAI error message is shown and the turn is handed back.
    session = browser.open(page_url(server, "chat", "hi", max_tokens=100000))
    state = wait_for(browser, session, finished)
    assert state["done"] is None and state["error"].startswith("HTTP 400: ")
    assert "maximum context length" in state["error"] and state["shownError"] == state["error"]
    assert state["user"] == [] and state["assistant"] == [] and state["input"] == "hi"

    # A keyed server: 401 without the key; once typed in (and remembered), the retry works.
    session = browser.open(page_url(server, LOCKED.strip("/") + "/chat", "你好"))
    state = wait_for(browser, session, finished)
    assert state["error"].startswith("HTTP 401: ") and "API key" in state["error"], state
    assert state["model"] == "(unavailable)"
    browser.evaluate(session, f"""{{ const key = document.getElementById("key");
        key.value = "{KEY}"; key.dispatchEvent(new Event("change"));
        document.getElementById("send").click(); }}""")
    state = wait_for(browser, session, lambda s: finished(s) and s["model"] == model_at(LOCKED))
    assert state["done"] == "1" and state["error"] is None, state
    assert browser.evaluate(session, 'localStorage.getItem("steelworks.apiKey")') == KEY
    assert state["assistant"] == [server.complete([{"role": "user", "content": "你好"}], LOCKED)]

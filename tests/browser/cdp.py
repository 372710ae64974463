"""Drive headless Chromium over the DevTools protocol (aiohttp's websocket client; no Playwright):
open a page, collect console errors, uncaught exceptions, failed and off-machine requests, wait for
the page's `window.__result`, take a screenshot. Used by tests/test_server_vector_browser.py."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
         # WebGL without a GPU: SwiftShader through ANGLE (the SDK's views need WebGL2)
         "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


def chromium() -> str:
    """The Chromium binary (Debian's `chromium`, installed by scripts/install-browser.sh)."""
    for name in (os.environ.get("TILECRATE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise RuntimeError("no Chromium found: run scripts/install-browser.sh (apt-get install chromium)")


@dataclass
class PageRun:
    """What a page did."""

    result: dict | None = None
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    screenshot: bytes = b""
    seconds: float | None = None            # from navigation to the page's result


def run_page(url: str, allowed_hosts: set[str], timeout: float = 90.0, size=(1024, 768)) -> PageRun:
    """Load `url`, wait until `window.__result` is set (or `timeout`), screenshot; Chromium always ends."""
    profile = tempfile.mkdtemp(prefix="tc-chromium-")
    log = open(os.path.join(profile, "chromium.log"), "wb")
    proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             f"--window-size={size[0]},{size[1]}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError("Chromium did not start: " + open(log.name, "rb").read()[-2000:].decode(errors="replace"))
            time.sleep(0.05)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        return asyncio.run(asyncio.wait_for(_drive(ws_url, url, allowed_hosts, timeout, size), timeout + 30))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


async def _drive(ws_url: str, url: str, allowed_hosts: set[str], timeout: float, size) -> PageRun:
    run = PageRun()
    pending: dict[int, asyncio.Future] = {}
    ids = iter(range(1, 1 << 30))
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        async def reader() -> None:
            async for msg in ws:
                data = json.loads(msg.data)
                if "id" in data:
                    fut = pending.pop(data["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(data)
                    continue
                _event(run, data.get("method", ""), data.get("params", {}), allowed_hosts)

        async def call(method: str, **params) -> dict:
            i = next(ids)
            fut = asyncio.get_running_loop().create_future()
            pending[i] = fut
            await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
            reply = await asyncio.wait_for(fut, 60)
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})

        task = asyncio.create_task(reader())
        try:
            for domain in ("Runtime", "Log", "Network", "Page"):
                await call(f"{domain}.enable")
            await call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                       mobile=False)
            t0 = time.monotonic()
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                got = await call("Runtime.evaluate", expression="JSON.stringify(window.__result || null)",
                                 returnByValue=True)
                value = json.loads(got.get("result", {}).get("value") or "null")
                if value is not None and (value.get("ok") or "error" in value):
                    run.result = value
                    run.seconds = time.monotonic() - t0
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(0.5)   # late console output of the last requests
            shot = await call("Page.captureScreenshot", format="png")
            run.screenshot = base64.b64decode(shot["data"])
        finally:
            task.cancel()
    return run


def _event(run: PageRun, method: str, p: dict, allowed_hosts: set[str]) -> None:
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        run.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
    elif method == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        run.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))
    elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        e = p["entry"]
        run.console_errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip())
    elif method == "Network.requestWillBeSent":
        u = p.get("request", {}).get("url", "")
        run.requests.append(u)
        parts = urlsplit(u)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc not in allowed_hosts:
            run.foreign_requests.append(u)
    elif method == "Network.loadingFailed" and not p.get("canceled"):
        run.failed_requests.append(f"{p.get('errorText')} ({p.get('requestId')})")
    elif method == "Network.responseReceived":
        resp = p.get("response", {})
        if resp.get("status", 200) >= 400:
            run.failed_requests.append(f"HTTP {resp.get('status')} {resp.get('url')}")

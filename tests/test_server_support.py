"""Helpers for the server tests: start `tilecrate serve` as a real process, talk to it like a client.

The client side uses urllib only and does what the ArcGIS API for Python 2.4.4 does (FORMATS.md
§11.2): GET to submit, POST form `f=json` to poll, GET results with f=json, GET the folder URL
without `f`, download each file. No tests live here.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Start the real CLI; with a delay, each export progress report (one per bundle written) sleeps,
# which makes a small export last long enough to cancel or kill it midway. With TC_TEST_STUCK_LEVEL
# in the environment, tile reads of that level block for ever. Nothing else changes.
_LAUNCHER = r"""
import sys, time
delay = float(sys.argv[1])
if delay > 0:
    import importlib
    ex = importlib.import_module("tilecrate.export")   # the module: tilecrate.export is also a function
    real = ex.export
    def slow_export(*a, progress=None, **kw):
        def slowed(p):
            time.sleep(delay)
            if progress is not None:
                progress(p)
        return real(*a, progress=slowed, **kw)
    ex.export = slow_export
import os
stuck = os.environ.get("TC_TEST_STUCK_LEVEL")
if stuck is not None:
    # a tile read of this level never returns, as a read from a FIFO or a hung network mount would
    import threading
    from tilecrate.server import service
    real_tile = service.Service.tile
    def stuck_tile(self, level, row, col):
        if level == int(stuck):
            threading.Event().wait()
        return real_tile(self, level, row, col)
    service.Service.tile = stuck_tile
from tilecrate.cli import main
sys.exit(main(sys.argv[2:]))
"""


def child_pids(pid: int) -> list[int]:
    """The pids of a process's children (every thread's /proc children list)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    """An HTTP answer."""

    status: int
    headers: dict
    body: bytes

    def json(self):
        """The body as JSON (fails the test if it is not)."""
        return json.loads(self.body)


def _nofile_setter(limits: tuple):
    """A preexec_fn that sets the child's RLIMIT_NOFILE (soft, hard) before it runs."""
    import resource

    def set_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    return set_limits


@dataclass
class Server:
    """A `tilecrate serve` process."""

    config: Path
    data_dir: Path
    port: int
    delay: float = 0.0
    token: str | None = None
    proc: subprocess.Popen | None = None
    log: Path | None = None
    extra_args: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    nofile: tuple | None = None     # the process's (soft, hard) RLIMIT_NOFILE, set in the child only

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    def svc(self, name: str) -> str:
        """The MapServer URL of a service."""
        return f"{self.base}/arcgis/rest/services/{name}/MapServer"

    def start(self, timeout: float = 30.0) -> "Server":
        """Start the process and wait until it answers."""
        self.log = self.data_dir.parent / f"server-{self.port}.log"
        logf = open(self.log, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            [PYTHON, "-c", _LAUNCHER, str(self.delay), "serve", str(self.config), "--port", str(self.port),
             *self.extra_args], stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(self.data_dir.parent),
            preexec_fn=None if self.nofile is None else _nofile_setter(self.nofile))
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                r = self.get("/arcgis/rest/info", {"f": "json", **({"token": self.token} if self.token else {})})
                if r.status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Ask the process to stop (SIGTERM), wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    # HTTP ------------------------------------------------------------------------------------

    def url(self, path_or_url: str) -> str:
        """Absolute URL."""
        return path_or_url if path_or_url.startswith("http") else self.base + path_or_url

    def get(self, path: str, params: dict | None = None, headers: dict | None = None) -> Reply:
        """GET with query parameters."""
        url = self.url(path)
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        return _send(urllib.request.Request(url, headers=headers or {}))

    def post(self, path: str, data: dict | None = None, headers: dict | None = None) -> Reply:
        """POST a form."""
        body = urllib.parse.urlencode(data or {}).encode()
        req = urllib.request.Request(self.url(path), data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
        return _send(req)

    def with_token(self, params: dict) -> dict:
        """Add the token when the server needs one."""
        return {**params, "token": self.token} if self.token else params

    # the ArcGIS API for Python's flow ---------------------------------------------------------

    def submit(self, service: str, op: str, params: dict) -> dict:
        """GET <svc>/<op>?f=json&...; returns the submit JSON."""
        r = self.get(f"{self.svc(service)}/{op}", self.with_token({"f": "json", **params}))
        assert r.status == 200, (r.status, r.body[:300])
        return r.json()

    def poll(self, service: str, op: str, job_id: str, timeout: float = 30.0, until=None) -> dict:
        """POST <svc>/<op>/jobs/<id> with f=json until the job ends (or `until(job)` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.post(f"{self.svc(service)}/{op}/jobs/{job_id}", self.with_token({"f": "json"}))
            assert r.status == 200, (r.status, r.body[:300])
            job = r.json()
            status = job.get("status") or job["jobStatus"]
            if (until(job) if until else status in ("esriJobSucceeded", "esriJobFailed", "esriJobCancelled",
                                                     "esriJobTimedOut")):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {status} after {timeout}s: {job}")
            time.sleep(0.05)

    def result(self, service: str, op: str, job: dict) -> object:
        """GET <job>/<results.out_service_url.paramUrl>?f=json -> value."""
        url = f"{self.svc(service)}/{op}/jobs/{job['jobId']}/{job['results']['out_service_url']['paramUrl']}"
        r = self.get(url, self.with_token({"f": "json"}))
        assert r.status == 200, (r.status, r.body[:300])
        return r.json()["value"]

    def download_all(self, folder_url: str, dest: Path) -> tuple[dict, list[Path]]:
        """GET the folder URL without f (as the Python API does), then every files[].url."""
        r = self.get(folder_url, self.with_token({}))
        assert r.status == 200 and r.headers.get("Content-Type", "").startswith("application/json"), r.headers
        listing = r.json()
        paths = []
        for f in listing["files"]:
            got = self.get(f["url"], self.with_token({}))
            assert got.status == 200, got.status
            assert len(got.body) == f["size"]
            p = dest / f["name"]
            p.write_bytes(got.body)
            paths.append(p)
        return listing, paths


def _send(req: urllib.request.Request) -> Reply:
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Reply(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, dict(e.headers.items()), e.read())


def write_config(path: Path, data_dir: Path, services: dict[str, dict], limits: dict | None = None,
                 **server) -> Path:
    """A TOML config file."""
    lines = ["[server]", f'data_dir = "{data_dir}"']
    for k, v in server.items():
        lines.append(f"{k} = {json.dumps(v)}")
    if limits:
        lines.append("\n[limits]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in limits.items()]
    for name, opts in services.items():
        lines.append(f"\n[services.{name}]")
        for k, v in opts.items():
            lines.append(f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def read_v2_bundle(data: bytes) -> dict[int, bytes]:
    """Tiles of a compact V2 bundle by row-major index, read by the FORMATS.md §6.3 reference reader."""
    from test_fixtures import reference_v2

    return {r * 128 + c: t for (r, c), t in reference_v2(data).items()}

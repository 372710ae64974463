"""The job API over loopback: job-status requests/s and submit-to-download time of a small export.

Baselines are measured in the same run: a trivial aiohttp handler answering a fixed small JSON
(what the framework alone costs per request), and the same export done in-process with
tilecrate.export() (what the job API adds around the work). Both servers are single processes.

Run: `.venv/bin/pytest benchmarks/bench_server.py --benchmark-enable [--large-sample data/large]`
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import report
from tilecrate.request import ExportRequest
from tilecrate.sample import SampleSpec, make_sample

REQUESTS = 4000
CONCURRENCY = 32
_BASELINE = r"""
import sys
from aiohttp import web
body = '{"jobId":"j00000000000000000000000000000000_et","jobStatus":"esriJobSucceeded","messages":[]}'
async def job(request):
    await request.post()
    return web.Response(text=body, content_type="application/json")
app = web.Application()
app.router.add_route("*", "/job", job)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _start(args: list[str], url: str, cwd: Path) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(cwd))
    _wait_up(url, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _get_json(url: str, params: dict | None = None, post: bool = False) -> dict:
    data = urllib.parse.urlencode(params or {})
    if post:
        req = urllib.request.Request(url, data=data.encode())
    else:
        req = urllib.request.Request(url + ("?" + data if data else ""))
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def servers(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("benchserver")
    sample = root / "sample"
    make_sample(sample, SampleSpec())
    services = {"Sample": sample}
    large = request.config.getoption("--large-sample")
    if large:
        services["Large"] = Path(large).resolve()
    lines = ["[server]", f'data_dir = "{root / "data"}"', "workers = 1"]
    for name, path in services.items():
        lines += [f"[services.{name}]", f'source = "{path}"', "max_export_tiles_count = 1000000"]
    (root / "tilecrate.toml").write_text("\n".join(lines) + "\n")
    port, bport = _free_port(), _free_port()
    ours = _start([sys.executable, "-m", "tilecrate.cli", "serve", str(root / "tilecrate.toml"), "--port", str(port),
                   "--quiet"], f"http://127.0.0.1:{port}/arcgis/rest/info?f=json", root)
    base = _start([sys.executable, "-c", _BASELINE, str(bport)], f"http://127.0.0.1:{bport}/job", root)
    yield {"root": root, "services": services, "ours": f"http://127.0.0.1:{port}",
           "baseline": f"http://127.0.0.1:{bport}/job"}
    _stop(ours)
    _stop(base)


async def _hammer(url: str, n: int, concurrency: int) -> float:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def one() -> None:
            async with session.post(url, data={"f": "json"}) as resp:
                assert resp.status == 200
                await resp.read()

        await asyncio.gather(*(one() for _ in range(concurrency)))        # warm connections
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                await one()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


def _export_flow(base: str, service: str, params: dict, dest: Path) -> int:
    svc = f"{base}/arcgis/rest/services/{service}/MapServer"
    job = _get_json(f"{svc}/exportTiles", {"f": "json", **params})
    job_id = job["jobId"]
    while job["jobStatus"] not in ("esriJobSucceeded", "esriJobFailed", "esriJobCancelled"):
        time.sleep(0.01)
        job = _get_json(f"{svc}/exportTiles/jobs/{job_id}", {"f": "json"}, post=True)
    assert job["jobStatus"] == "esriJobSucceeded", job
    value = _get_json(f"{svc}/exportTiles/jobs/{job_id}/results/out_service_url", {"f": "json"})["value"]
    listing = _get_json(value)
    n = 0
    for f in listing["files"]:
        with urllib.request.urlopen(f["url"], timeout=600) as r, open(dest / f["name"], "wb") as out:
            shutil.copyfileobj(r, out, 1 << 20)
        n += os.path.getsize(dest / f["name"])
    return n


def test_job_status_requests_per_second(benchmark, servers, request):
    svc = f"{servers['ours']}/arcgis/rest/services/Sample/MapServer"
    job = _get_json(f"{svc}/exportTiles", {"f": "json", "levels": "0-1", "tilePackage": "true"})
    _export_flow(servers["ours"], "Sample", {"levels": "0", "tilePackage": "true"}, servers["root"])
    url = f"{svc}/exportTiles/jobs/{job['jobId']}"
    t_base = min(asyncio.run(_hammer(servers["baseline"], REQUESTS, CONCURRENCY)) for _ in range(3))
    runs: list[float] = []
    benchmark.pedantic(lambda: runs.append(asyncio.run(_hammer(url, REQUESTS, CONCURRENCY))), rounds=3, iterations=1)
    t_ours = min(runs)
    report(request, "job status", requests=REQUESTS, concurrency=CONCURRENCY,
           job_status_req_per_s=REQUESTS / t_ours, trivial_aiohttp_req_per_s=REQUESTS / t_base,
           job_status_vs_trivial=t_base / t_ours)


@pytest.mark.parametrize("service,levels", [("Sample", "0-5"), ("Large", "0-8")])
def test_submit_to_download(benchmark, servers, request, tmp_path, service, levels):
    if service not in servers["services"]:
        pytest.skip("no --large-sample PATH given")
    params = {"levels": levels, "tilePackage": "true", "storageFormat": "tpkx"}
    from tilecrate import open_cache
    from tilecrate.export import export

    rounds = 5 if service == "Sample" else 1
    with open_cache(str(servers["services"][service])) as cache:
        t0 = time.perf_counter()
        for i in range(rounds):
            direct = export(cache, ExportRequest.from_params(params), str(tmp_path / f"direct{i}.tpkx")).size
        t_direct = (time.perf_counter() - t0) / rounds
    times = []

    def flow() -> int:
        dest = tmp_path / f"http{len(times)}"
        dest.mkdir()
        t = time.perf_counter()
        size = _export_flow(servers["ours"], service, params, dest)
        times.append(time.perf_counter() - t)
        shutil.rmtree(dest)
        return size

    assert benchmark.pedantic(flow, rounds=rounds, iterations=1) == direct
    t_http = sum(times) / len(times)
    report(request, f"submit to download ({service} {levels})", bytes=direct, http_flow_s=t_http,
           direct_export_s=t_direct, http_flow_vs_direct_export=t_http / t_direct,
           http_MB_per_s=direct / t_http / 1e6)

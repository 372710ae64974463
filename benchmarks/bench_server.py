"""The job API over loopback: hot routes vs a trivial aiohttp handler, and submit-to-download time.

Hot routes (job status, tile, tilemap, service root): requests/s of ours vs a trivial aiohttp
server answering the same bytes on the same paths (one process each, measured in the same run,
rounds alternated). The load generator is `wrk` (Debian package) when installed, else an aiohttp
client in its own process. Submit-to-download: the same export done in-process with
tilecrate.export() as the baseline.

Run: `.venv/bin/pytest benchmarks/bench_server.py --benchmark-enable [--large-sample data/large]`
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
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

CONCURRENCY = 32
SECONDS = 2.0  # per measurement
ROUNDS = 5  # paired rounds (ours, trivial) per route; the median ratio is reported
# the trivial server: each path answers the bytes of a file written by the benchmark (the same bytes
# ours answers there), after reading the query as any handler must
_BASELINE = r"""
import sys
from pathlib import Path
from aiohttp import web
folder = Path(sys.argv[2])
app = web.Application()
for f in folder.iterdir():
    body, ctype = f.read_bytes(), f.suffix[1:].replace("_", "/")
    path = "/" + f.stem.replace("~", "/")
    async def handler(request, body=body, ctype=ctype):
        request.query.get("f")
        return web.Response(body=body, content_type=ctype)
    app.router.add_get(path, handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
_CLIENT = r"""
import asyncio, sys, time
import aiohttp
url, seconds, concurrency = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
async def main():
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        end = time.perf_counter() + seconds
        async def worker():
            nonlocal done
            while time.perf_counter() < end:
                async with session.get(url) as r:
                    assert r.status == 200, r.status
                    await r.read()
                done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        print(done, done / (time.perf_counter() - t0))
asyncio.run(main())
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
    port = _free_port()
    ours = _start([sys.executable, "-m", "tilecrate.cli", "serve", str(root / "tilecrate.toml"), "--port", str(port),
                   "--quiet"], f"http://127.0.0.1:{port}/arcgis/rest/info?f=json", root)
    yield {"root": root, "services": services, "ours": f"http://127.0.0.1:{port}", "ours_pid": ours.pid}
    _stop(ours)


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def requests_in(url: str, seconds: float = SECONDS, concurrency: int = CONCURRENCY) -> tuple[int, float]:
    """(requests answered, requests/s) of GET url for `seconds`: wrk -t1 when installed, else an aiohttp
    client process; an error answer or a socket error under load fails the measurement."""
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run([wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", url],
                             capture_output=True, text=True, check=True).stdout
        if re.search(r"Non-2xx or 3xx responses|Socket errors", out):
            raise AssertionError(f"{url}: errors under load:\n{out}")
        return (int(re.search(r"(\d+) requests in", out).group(1)),
                float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1)))
    out = subprocess.run([sys.executable, "-c", _CLIENT, url, str(seconds), str(concurrency)],
                         capture_output=True, text=True, check=True).stdout
    done, rate = out.split()
    return int(done), float(rate)


def load_cpu(url: str, pid: int) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request): the second holds up on a loaded machine."""
    c0 = _cpu(pid)
    n, rate = requests_in(url)
    return rate, (_cpu(pid) - c0) / max(n, 1) * 1e6


def load(url: str, seconds: float = SECONDS, concurrency: int = CONCURRENCY) -> float:
    """Requests/s of GET url: wrk when installed, else an aiohttp client process."""
    return requests_in(url, seconds, concurrency)[1]


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


def test_hot_routes_vs_trivial_handler(benchmark, servers, request, tmp_path):
    """Job status, tile, tilemap and service root: ours vs a trivial handler serving the same bytes."""
    svc_path = "/arcgis/rest/services/Sample/MapServer"
    svc = servers["ours"] + svc_path
    done = _get_json(f"{svc}/exportTiles", {"f": "json", "levels": "0-1", "tilePackage": "true"})
    _export_flow(servers["ours"], "Sample", {"levels": "0", "tilePackage": "true"}, servers["root"])
    routes = {
        "job status": (f"{svc_path}/exportTiles/jobs/{done['jobId']}", "?f=json"),
        "tile": (f"{svc_path}/tile/2/1/1", ""),
        "tilemap": (f"{svc_path}/tilemap/3/0/0/8/8", "?f=json"),
        "service root": (svc_path, "?f=json"),
    }
    files = tmp_path / "baseline"
    files.mkdir()
    for name, (path, query) in routes.items():
        with urllib.request.urlopen(servers["ours"] + path + query, timeout=30) as r:
            body, ctype = r.read(), r.headers.get_content_type()
            assert r.status == 200 and b'"error"' not in body[:20], body[:200]
        (files / (path.strip("/").replace("/", "~") + "." + ctype.replace("/", "_"))).write_bytes(body)
    bport = _free_port()
    base = _start([sys.executable, "-c", _BASELINE, str(bport), str(files)],
                  f"http://127.0.0.1:{bport}{routes['service root'][0]}", tmp_path)
    try:
        benchmark.pedantic(_measure, (request, servers["ours"], servers["ours_pid"], bport, base.pid, routes),
                           rounds=1, iterations=1)
    finally:
        _stop(base)


def _measure(request, ours_base: str, ours_pid: int, bport: int, base_pid: int, routes: dict) -> None:
    for name, (path, query) in routes.items():
        rates, cpus = [], []
        for _ in range(ROUNDS):
            ours = load_cpu(ours_base + path + query, ours_pid)
            trivial = load_cpu(f"http://127.0.0.1:{bport}{path}{query}", base_pid)
            rates.append((ours[0], trivial[0]))
            cpus.append((ours[1], trivial[1]))
        med = statistics.median
        report(request, name, ours_req_per_s=med(r[0] for r in rates), trivial_req_per_s=med(r[1] for r in rates),
               ours_vs_trivial=med(r[0] / r[1] for r in rates),
               ours_cpu_us_per_req=med(c[0] for c in cpus), trivial_cpu_us_per_req=med(c[1] for c in cpus),
               cpu_efficiency_vs_trivial=med(c[1] / c[0] for c in cpus),
               load_generator="wrk" if shutil.which("wrk") else "aiohttp client process")


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


def test_job_status_with_two_processes(benchmark, tmp_path, request):
    """Job-status requests/s of `serve --processes 2` vs 1 (issue 10's target: >= 1.6x)."""
    sample = tmp_path / "sample"
    make_sample(sample, SampleSpec(levels=(0, 1, 2)))
    rates = {}

    def measure() -> None:
        for n in (1, 2):
            root = tmp_path / f"p{n}"
            root.mkdir()
            (root / "tilecrate.toml").write_text(f'[server]\ndata_dir = "{root / "data"}"\n'
                                                 f'[services.S]\nsource = "{sample}"\n')
            port = _free_port()
            proc = _start([sys.executable, "-m", "tilecrate.cli", "serve", str(root / "tilecrate.toml"),
                           "--port", str(port), "--quiet", "--processes", str(n)],
                          f"http://127.0.0.1:{port}/arcgis/rest/info?f=json", root)
            try:
                svc = f"http://127.0.0.1:{port}/arcgis/rest/services/S/MapServer"
                job = _get_json(f"{svc}/estimateExportTilesSize", {"f": "json", "levels": "0-1"})
                url = f"{svc}/estimateExportTilesSize/jobs/{job['jobId']}?f=json"
                time.sleep(1)
                rates[n] = statistics.median(load(url) for _ in range(ROUNDS))
            finally:
                _stop(proc)
    benchmark.pedantic(measure, rounds=1, iterations=1)
    report(request, "job status, --processes 2 vs 1", one_process_req_per_s=rates[1],
           two_processes_req_per_s=rates[2], two_vs_one=rates[2] / rates[1],
           load_generator="wrk" if shutil.which("wrk") else "aiohttp client process")

"""Exports on a Dask cluster (issue 10): ratios from one run, on a small generated sample.

* re-encoding (optimizeTilesForSize, quality 40) on a LocalCluster of 2 single-thread workers vs
  1 worker (target >= 1.7x on this 2-core machine);
* pass-through .tpkx export on the 2-worker cluster (shared-folder mode) vs the in-process export
  (target >= 0.8x: the fan-out, staging and assembly cost little);
* job-status requests/s of `tilecrate serve --processes 2` vs `--processes 1` (target >= 1.6x), with
  `wrk -t1` on 127.0.0.1 when installed, else an aiohttp client process;
* with each ratio, a CPU-seconds figure, since the machine is shared and loaded: the cores the
  workers got, CPU seconds per tile or per request (these hold when wall-clock ratios cannot);
* with TILECRATE_SCALE=1: the figures behind docs/scale.md (planning a 10^5-bundle cache made of hard
  links, scheduler tasks/s for no-op tasks and for real one-tile bundle tasks).

Run: `[TILECRATE_SCALE=1] .venv/bin/pytest benchmarks/bench_cluster.py --benchmark-enable`.
The source is the sample's level-6 bundle hard-linked to many positions of level 12, so tasks have
real work without generating thousands of tiles.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from tilecrate.export import export
from tilecrate.request import ExportRequest
from tilecrate.runners.dask import DaskRunner, local_cluster
from bench_server import requests_in
from conftest import report

WIDE_LEVEL = 12
ROUNDS = 3


def widen(src: Path, dst: Path, count: int, from_level: int, level: int = WIDE_LEVEL) -> Path:
    """A hard-linked copy of `src` whose `level` holds `count` copies of its `from_level` bundle."""
    shutil.copytree(src, dst, copy_function=os.link)
    top = dst / "_alllayers"
    bundle = next((top / f"L{from_level:02d}").glob("*.bundle"))
    target = top / f"L{level:02d}"
    target.mkdir()
    side = max(1, (1 << level) // 128)
    origin = bundle
    for i in range(count):
        if i and i % 50_000 == 0:       # file systems cap links per inode (ext4: 65 000)
            origin = target / f"copy{i}.bundle.src"
            shutil.copyfile(bundle, origin)
        os.link(origin, target / f"R{(i // side) * 128:04x}C{(i % side) * 128:04x}.bundle")
    return dst


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("bench") / "sample"
    make_sample(out, SampleSpec(levels=tuple(range(0, 7))))
    return out


@pytest.fixture(scope="module")
def wide(sample, tmp_path_factory) -> Path:
    return widen(sample, tmp_path_factory.mktemp("wide") / "wide", 24, 6)


@pytest.fixture(scope="module")
def wider(sample, tmp_path_factory) -> Path:
    """96 level-6 bundles (~380 MB, hard links): a pass-through export long enough that the cluster's
    fixed costs (a few round trips, ~0.2 s here) do not decide the ratio."""
    return widen(sample, tmp_path_factory.mktemp("wider") / "wider", 96, 6)


def _cluster(n: int) -> LocalCluster:
    """The runner's own LocalCluster ([cluster] scheduler = "local"): no dashboard, quiet bookkeeping."""
    return local_cluster(n, 1, silence_logs=50)


def _warm(folder: Path) -> None:
    for p in folder.rglob("*.bundle"):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def _timed(fn, out: Path) -> float:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_reencode_two_workers_vs_one(benchmark, request, wide, tmp_path):
    """Re-encoding export: 2 single-thread workers vs 1 (paired rounds, medians)."""
    req = ExportRequest(levels=str(WIDE_LEVEL), optimize_tiles_for_size=True, compression_quality=40)
    _warm(wide)
    out = tmp_path / "r.tpkx"
    with _cluster(1) as c1, _cluster(2) as c2, Client(c1, set_as_default=False) as k1, \
            Client(c2, set_as_default=False) as k2:
        r1, r2 = DaskRunner(k1), DaskRunner(k2)
        export(str(wide), req, str(out), scheduler=r2)          # warm the workers (imports, caches)
        one, two, cores1, cores2 = [], [], [], []
        for _ in range(ROUNDS):
            for runner, client, times, cores in ((r1, k1, one, cores1), (r2, k2, two, cores2)):
                cpu0 = sum(client.run(time.process_time).values())
                times.append(_timed(lambda: export(str(wide), req, str(out), scheduler=runner), out))
                cores.append((sum(client.run(time.process_time).values()) - cpu0) / times[-1])
        result = benchmark.pedantic(lambda: export(str(wide), req, str(out) + ".b.tpkx", scheduler=r2),
                                    rounds=1, iterations=1)
    t1, t2 = statistics.median(one), statistics.median(two)
    # cores the workers actually got (their CPU seconds / wall seconds): on a machine shared with
    # other work the second worker may get no second core, and the speedup cannot exceed this
    report(request, "cluster re-encode 2 workers vs 1", tiles=result.tiles, one_worker_s=t1, two_workers_s=t2,
           tiles_per_s_two=result.tiles / t2, speedup=t1 / t2, target=1.7,
           cores_used_one=statistics.median(cores1), cores_used_two=statistics.median(cores2),
           # the speedup had each worker had a whole core (CPU seconds per tile, 1 vs 2 workers)
           speedup_projected_two_full_cores=(t1 / t2) * statistics.median(cores1) / statistics.median(cores2) * 2,
           cpu_s_per_ktile_one=statistics.median(cores1) * t1 / result.tiles * 1e3,
           cpu_s_per_ktile_two=statistics.median(cores2) * t2 / result.tiles * 1e3,
           load_avg=os.getloadavg()[0])


def test_pass_through_cluster_vs_in_process(benchmark, request, wider, tmp_path):
    """Pass-through .tpkx: the 2-worker cluster (shared folder) vs the in-process export (paired, medians)."""
    wide = wider
    req = ExportRequest(levels=str(WIDE_LEVEL))
    _warm(wide)
    out = tmp_path / "p.tpkx"
    with _cluster(2) as c2, Client(c2, set_as_default=False) as k2:
        runner = DaskRunner(k2)
        export(str(wide), req, str(out), scheduler=runner)
        here, there, cpu_here, cpu_there = [], [], [], []
        groups = groups_here = 0
        for _ in range(ROUNDS):
            c0 = time.process_time()
            here.append(_timed(lambda: export(str(wide), req, str(out)), out))
            cpu_here.append(time.process_time() - c0)
            # the cluster's CPU: this front end's (assembly) plus every worker's (reads, checks)
            c0, w0 = time.process_time(), sum(k2.run(time.process_time).values())
            there.append(_timed(lambda: export(str(wide), req, str(out), scheduler=runner), out))
            cpu_there.append(time.process_time() - c0 + sum(k2.run(time.process_time).values()) - w0)
            # groups the front end made itself because the cluster had not returned them yet
            groups, groups_here = groups + runner.stats["groups"], groups_here + runner.stats["groups_here"]
        result = benchmark.pedantic(lambda: export(str(wide), req, str(out) + ".b.tpkx", scheduler=runner),
                                    rounds=1, iterations=1)
    th, tc = statistics.median(here), statistics.median(there)
    report(request, "cluster pass-through vs in-process", bytes=result.size, in_process_s=th, cluster_s=tc,
           cluster_MB_s=result.size / tc / 1e6, ratio=th / tc, target=0.8,
           in_process_cpu_s=statistics.median(cpu_here), cluster_cpu_s=statistics.median(cpu_there),
           cpu_ratio=statistics.median(cpu_here) / statistics.median(cpu_there), task_groups=groups,
           groups_made_by_front_end=groups_here, load_avg=os.getloadavg()[0])


# --------------------------------------------------------------------------------------------
# the multi-process front end: job status requests/s, --processes 2 vs 1

STATUS_SECONDS = 2
STATUS_CONCURRENCY = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a front end: the parent and its live children (the forked processes)."""
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            pids += [int(x) for x in f.read().split()]
    total = 0
    for p in pids:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _get(url: str, data: bytes | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as r:
        return json.loads(r.read())


def _front_end(root: Path, sample: Path, processes: int) -> tuple[subprocess.Popen, str]:
    """`tilecrate serve --processes N` with one finished job; returns (process, its job status URL)."""
    cfg = root / f"p{processes}.toml"
    cfg.write_text(f'[server]\ndata_dir = "{root / f"data{processes}"}"\nworkers = 1\n'
                   f'[services.S]\nsource = "{sample}"\n')
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tilecrate.cli", "serve", str(cfg), "--port", str(port),
                             "--processes", str(processes), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/arcgis/rest/services/S/MapServer/exportTiles"
    deadline = time.monotonic() + 60
    while True:
        try:
            job = _get(f"{base}?f=json&levels=0-2&tilePackage=true")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the front end with {processes} processes did not start")
            time.sleep(0.1)
    url = f"{base}/jobs/{job['jobId']}?f=json"
    while _get(url)["jobStatus"] not in ("esriJobSucceeded", "esriJobFailed"):
        time.sleep(0.05)
    assert _get(url)["jobStatus"] == "esriJobSucceeded"
    return proc, url


def _load(url: str) -> int:
    """Requests answered in STATUS_SECONDS (bench_server's load generator)."""
    return requests_in(url, STATUS_SECONDS, STATUS_CONCURRENCY)[0]


def test_job_status_processes_two_vs_one(benchmark, request, sample, tmp_path):
    """Job-status requests/s: `--processes 2` vs 1 (both up at once, rounds alternated, medians)."""
    fronts = {n: _front_end(tmp_path, sample, n) for n in (1, 2)}
    try:
        rates = {1: [], 2: []}
        cpu_per_request = {1: [], 2: []}
        cores = {1: [], 2: []}
        for n, (proc, url) in fronts.items():
            _load(url)                               # warm both (imports, JSON caches)
        for _ in range(ROUNDS):
            for n, (proc, url) in fronts.items():
                c0, t0 = _tree_cpu(proc.pid), time.perf_counter()
                done = _load(url)
                wall, cpu = time.perf_counter() - t0, _tree_cpu(proc.pid) - c0
                rates[n].append(done / wall)
                cpu_per_request[n].append(cpu / done * 1e6)
                cores[n].append(cpu / wall)
        benchmark.pedantic(lambda: _get(fronts[2][1]), rounds=1, iterations=1)
    finally:
        for proc, _ in fronts.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in fronts.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    r1, r2 = statistics.median(rates[1]), statistics.median(rates[2])
    report(request, "job status --processes 2 vs 1", load_generator="wrk" if shutil.which("wrk") else "aiohttp",
           one_rps=r1, two_rps=r2, ratio=r2 / r1, target=1.6,
           # on an idle 2-core machine N processes give N cores; the CPU a request costs shows whether
           # the second process adds overhead (it should not: equal figures mean the ratio is the cores got)
           one_cpu_us_per_request=statistics.median(cpu_per_request[1]),
           two_cpu_us_per_request=statistics.median(cpu_per_request[2]),
           one_cores_used=statistics.median(cores[1]), two_cores_used=statistics.median(cores[2]),
           # requests per CPU-second, times the processes: what two free cores would give vs one
           ratio_projected_full_cores=2 * statistics.median(cpu_per_request[1]) / statistics.median(cpu_per_request[2]),
           load_avg=os.getloadavg()[0])


# --------------------------------------------------------------------------------------------
# docs/scale.md figures (TILECRATE_SCALE=1)


def _noop(x):
    return x


@pytest.fixture
def scale(request):
    if not os.environ.get("TILECRATE_SCALE"):
        pytest.skip("the scale figures run with TILECRATE_SCALE=1 (they take a minute or two)")


def test_scale_planning_and_tasks_per_second(scale, request, sample, tmp_path):
    """Planning time for 10^5 bundles (hard links of one small bundle) and the scheduler's tasks/s."""
    from tilecrate.cache import open_cache
    from tilecrate.plan import make_plan

    n = 100_000
    t0 = time.perf_counter()
    big = widen(sample, tmp_path / "big", n, 3, level=16)
    made = time.perf_counter() - t0
    req = ExportRequest(levels="16")
    t0 = time.perf_counter()
    with open_cache(big) as cache:
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = make_plan(cache, req, tmp_path / "big.tpkx")
        planned = time.perf_counter() - t0
    t0 = time.perf_counter()
    tasks = list(plan.tasks(str(tmp_path / "staging")))
    made_tasks = time.perf_counter() - t0
    report(request, "scale: plan", bundles=plan.bundles, tiles=plan.tiles, links_s=made, open_s=opened,
           plan_s=planned, plan_bundles_per_s=plan.bundles / planned, tasks_s=made_tasks)
    with _cluster(2) as c2, Client(c2, set_as_default=False) as k:
        m = 20_000
        t0 = time.perf_counter()
        futs = []
        for i in range(0, m, 64):     # the runner's pattern: client.map in batches, explicit keys
            futs += k.map(_noop, tasks[i:i + 64], key=[f"noop-{j}" for j in range(i, min(i + 64, m))], pure=False)
        k.gather(futs)
        noop = time.perf_counter() - t0
        del futs
        small = ExportRequest(levels="16")
        sub = widen(sample, tmp_path / "sub", 4000, 3, level=16)
        runner = DaskRunner(k)
        t0 = time.perf_counter()
        result = export(str(sub), small, str(tmp_path / "sub.tpkx"), scheduler=runner)
        real = time.perf_counter() - t0
        t0 = time.perf_counter()
        export(str(sub), small, str(tmp_path / "sub-i.tpkx"))
        inproc = time.perf_counter() - t0
    report(request, "scale: scheduler", noop_tasks=m, noop_tasks_per_s=m / noop, bundle_tasks=4000,
           bundle_tasks_per_s=4000 / real, in_process_bundles_per_s=4000 / inproc, package_bytes=result.size)

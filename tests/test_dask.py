"""Exports on a real Dask LocalCluster (two worker processes): equal to in-process, faults, cancel.

The cluster is started once for the module. Bigger exports use a "wide" cache: the sample's
level-5 bundle hard-linked to many bundle positions of level 12, so tasks have work to do
without generating thousands of tiles.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import zipfile

import numpy as np
import pytest
from distributed import Client, LocalCluster

from tilecrate.cache import open_cache
from tilecrate.errors import Cancelled, ExportError
from tilecrate.export import export
from tilecrate.request import ExportRequest
from tilecrate.runners.dask import DaskRunner

WIDE_LEVEL = 12


def widen(src, dst, count: int, from_level: int = 5):
    """A copy of `src` (hard links) whose level WIDE_LEVEL holds `count` copies of its `from_level` bundle."""
    shutil.copytree(src, dst, copy_function=os.link)
    top = os.path.join(dst, "_alllayers")
    bundle = next(n for n in os.listdir(os.path.join(top, f"L{from_level:02d}")) if n.endswith(".bundle"))
    target = os.path.join(top, f"L{WIDE_LEVEL:02d}")
    os.mkdir(target)
    for i in range(count):
        name = f"R{(i // 8) * 128:04x}C{(i % 8) * 128:04x}"
        os.link(os.path.join(top, f"L{from_level:02d}", bundle), os.path.join(target, name + ".bundle"))
        bx = os.path.join(top, f"L{from_level:02d}", bundle[:-1] + "x")
        if os.path.exists(bx):
            os.link(bx, os.path.join(target, name + ".bundlx"))
    return dst


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      silence_logs=50) as lc:
        yield lc


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="module")
def runner(client):
    return DaskRunner(client)


@pytest.fixture(scope="module")
def wide(sample_v2, tmp_path_factory):
    return widen(sample_v2, tmp_path_factory.mktemp("wide") / "wide", 24)


def package_contents(path) -> dict:
    """{entry: bytes} of a package except what differs between two runs (GUID, time), or {file: bytes} of a folder."""
    if os.path.isdir(path):
        return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
                for d, _, fs in os.walk(path) for f in fs}
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        return {i.filename: zf.read(i) for i in zf.infolist()
                if not i.filename.endswith(("iteminfo.json", "iteminfo.xml", "item.pkinfo"))}


def all_tiles(path) -> dict:
    with open_cache(path) as c:
        return {(lv, r, col): data for lv, r, col, data in c.iter_tiles()}


def leftovers(folder) -> list[str]:
    return [os.path.join(d, n) for d, ds, fs in os.walk(folder) for n in fs + ds
            if ".tmp-" in n]


CASES = [("a.tpkx", {}), ("a.tpk", {}), ("f", {"tile_package": False}),
         ("r.tpkx", {"optimize_tiles_for_size": True, "compression_quality": 40}),
         ("r.tpk", {"optimize_tiles_for_size": True, "compression_quality": 40}),
         ("rf", {"tile_package": False, "storage_format": "Compact", "optimize_tiles_for_size": True,
                 "compression_quality": 40})]


@pytest.mark.parametrize("local_temp", [False, True], ids=["shared", "localtemp"])
@pytest.mark.parametrize("name,opts", CASES, ids=[c[0] for c in CASES])
def test_cluster_export_equals_in_process(runner, sample_v1, tmp_path, name, opts, local_temp):
    req = ExportRequest(levels="0-5", extent="-10,35,25,55", aoi_sr=4326, **opts)
    here = export(str(sample_v1), req, str(tmp_path / ("i-" + name)))
    there = export(str(sample_v1), req, str(tmp_path / ("c-" + name)), scheduler=runner,
                   local_temp_folder=local_temp)
    assert there.path == str(tmp_path / ("c-" + name))
    assert (there.tiles, there.size, there.kind, there.levels, there.quality_used) == \
           (here.tiles, here.size, here.kind, here.levels, here.quality_used)
    assert there.size == (os.path.getsize(there.path) if os.path.isfile(there.path) else
                          sum(len(v) for v in package_contents(there.path).values()))
    assert package_contents(there.path) == package_contents(here.path)
    assert all_tiles(there.path) == all_tiles(here.path)
    assert leftovers(tmp_path) == []


def test_worker_killed_mid_export_still_succeeds(client, runner, wide, tmp_path):
    req = ExportRequest(levels=str(WIDE_LEVEL), optimize_tiles_for_size=True, compression_quality=30)
    expected = export(str(wide), req, str(tmp_path / "i.tpkx"))
    pids = client.run(os.getpid)
    killed = {}

    def kill_a_busy_worker(p) -> None:
        if killed or p.tiles_done == 0:
            return
        busy = [w for w, keys in client.processing().items() if any(str(k).startswith("tilecrate-") for k in keys)]
        if busy:
            killed["worker"] = busy[0]
            os.kill(pids[busy[0]], signal.SIGKILL)

    result = export(str(wide), req, str(tmp_path / "c.tpkx"), scheduler=runner, progress=kill_a_busy_worker)
    assert killed, "no worker was busy with a bundle of the export when the first one was written"
    assert result.tiles == expected.tiles and result.size == expected.size
    assert package_contents(result.path) == package_contents(expected.path)
    assert leftovers(tmp_path) == []
    client.wait_for_workers(2, timeout=30)      # the nanny restarts it for the next tests


@pytest.mark.parametrize("local_temp", [False, True], ids=["shared", "localtemp"])
def test_cancel_is_quick_and_leaves_no_staging(client, wide, tmp_path, local_temp):
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    req = ExportRequest(levels=str(WIDE_LEVEL), optimize_tiles_for_size=True, compression_quality=30)
    cancel = threading.Event()
    when = {}

    def cancel_once_started(p) -> None:
        if p.tiles_done > 0 and not cancel.is_set():
            when["t"] = time.monotonic()
            cancel.set()

    local_runner = DaskRunner(client, local_temp_dir=str(worker_tmp))
    with pytest.raises(Cancelled):
        if local_temp:
            # a local-temp job reports progress from its worker; cancel soon after it starts
            threading.Timer(0.4, lambda: (when.setdefault("t", time.monotonic()), cancel.set())).start()
            export(str(wide), req, str(out_dir / "x.tpkx"), scheduler=local_runner, local_temp_folder=True,
                   cancel=cancel)
        else:
            export(str(wide), req, str(out_dir / "x.tpkx"), scheduler=local_runner, progress=cancel_once_started,
                   cancel=cancel)
    assert time.monotonic() - when["t"] < 1.0
    # the workers' tasks stop within a second too: nothing of the job remains on any of them
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and (os.listdir(out_dir) or os.listdir(worker_tmp)):
        time.sleep(0.05)
    assert os.listdir(out_dir) == [] and os.listdir(worker_tmp) == []
    busy = client.processing()
    assert not [k for keys in busy.values() for k in keys if str(k).startswith("tilecrate-")]


def test_stopped_scheduler_fails_clearly(wide, tmp_path):
    req = ExportRequest(levels=str(WIDE_LEVEL), optimize_tiles_for_size=True, compression_quality=30)
    lc = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None, silence_logs=50)
    address = lc.scheduler_address
    runner = DaskRunner(address)
    stopper = {}

    def stop_scheduler(p) -> None:
        if p.tiles_done > 0 and not stopper:
            stopper["t"] = threading.Thread(target=lc.close)
            stopper["t"].start()

    started = time.monotonic()
    try:
        with pytest.raises(ExportError, match=address.replace(".", r"\.")):
            export(str(wide), req, str(tmp_path / "x.tpkx"), scheduler=runner, progress=stop_scheduler)
        assert time.monotonic() - started < 20
    finally:
        runner.close()
        if stopper:
            stopper["t"].join()
        lc.close()
    assert leftovers(tmp_path) == []
    with pytest.raises(ExportError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        DaskRunner("tcp://127.0.0.1:9", connect_timeout=1)


def test_cli_export_on_the_cluster(cluster, sample_v2, tmp_path, capsys):
    from tilecrate.cli import main

    out = tmp_path / "cli.tpkx"
    assert main(["export", str(sample_v2), "-o", str(out), "--levels", "0-4", "--scheduler",
                 cluster.scheduler_address, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["size"] == out.stat().st_size and doc["tiles"] > 0
    assert all_tiles(out) == all_tiles(export(str(sample_v2), ExportRequest(levels="0-4"),
                                              str(tmp_path / "i.tpkx")).path)
    assert main(["export", str(sample_v2), "-o", str(tmp_path / "lt.tpk"), "--levels", "0-3", "--scheduler",
                 cluster.scheduler_address, "--local-temp-folder", "-q"]) == 0
    assert all_tiles(tmp_path / "lt.tpk") == all_tiles(export(str(sample_v2), ExportRequest(levels="0-3"),
                                                             str(tmp_path / "i.tpk")).path)
    capsys.readouterr()
    assert main(["export", str(sample_v2), "-o", str(tmp_path / "bad.tpkx"), "--levels", "0",
                 "--local-temp-folder", "--json"]) == 1
    assert "scheduler" in json.loads(capsys.readouterr().out)["error"]


def test_bundles_are_grouped_into_few_consecutive_tasks(wide, tmp_path):
    from tilecrate.plan import make_plan
    from tilecrate.runners.dask import GROUP_MAX, group_tasks

    for opts in ({}, {"optimize_tiles_for_size": True, "compression_quality": 30}):
        plan = make_plan(str(wide), ExportRequest(levels="0-12", **opts), tmp_path / "g.tpkx")
        tasks = list(plan.tasks())
        for threads in (1, 2, 64):
            groups = group_tasks(plan, tasks, threads)
            assert [t.index for g in groups for t in g] == list(range(len(tasks)))
            assert all(0 < len(g) <= GROUP_MAX for g in groups)
            # about four groups per worker thread, never one bundle per task when bundles are small
            assert len(groups) <= min(len(tasks), 4 * threads + 4)


def test_cluster_fixes_wrong_size_prefixes_like_in_process(runner, sample_v2, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    with open_cache(src) as cache:
        ref = cache.bundles(5)[0]
        offsets, sizes = cache.index(ref)
    bundle = next((src / "_alllayers" / "L05").glob("*.bundle"))
    with open(bundle, "r+b") as f:
        for cell in [int(c) for c in np.flatnonzero(sizes)[:3]]:
            f.seek(int(offsets[cell]) - 4)
            f.write(b"\0\0\0\0")
    req = ExportRequest(levels="4-5")
    here = export(str(src), req, str(tmp_path / "i.tpkx"))
    there = export(str(src), req, str(tmp_path / "c.tpkx"), scheduler=runner)
    assert package_contents(there.path) == package_contents(here.path)
    assert all_tiles(there.path) == all_tiles(here.path)
    assert leftovers(tmp_path) == []

"""Faults on a real site (issue 10), seen through the server's job API: `dask scheduler` and two
`dask worker` processes (each with its own temp folder) and `tilecrate serve --processes 2`.

- a worker SIGKILLed while it runs a task of the job: the job succeeds, the package is correct;
- cancel: esriJobCancelled within a second, no staging left on any worker or in the output folder;
- the front end SIGKILLed (every process of it) and restarted: its job is failed with the restart message;
- the scheduler SIGKILLed mid-job: the job fails with a message naming the scheduler, in bounded time.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from test_fixtures import reference_tiles
from test_server_support import child_pids
from test_site_support import (WIDE_LEVEL, Site, bundle_files, job_output, logs_on_failure,  # noqa: F401
                               site, site_server, widen)  # (site: the module's fixture)

from tilecrate.export import export
from tilecrate.jobs.runner import RESTART_MESSAGE
from tilecrate.request import ExportRequest

EXPORT = "exportTiles"
# re-encoding 64 hard-linked copies of a level-5 bundle keeps both workers busy for a few seconds
SLOW = {"levels": str(WIDE_LEVEL), "tilePackage": "true", "storageFormat": "tpkx",
        "optimizeTilesForSize": "true", "compressionQuality": "30"}


@pytest.fixture(scope="module")
def wide(sample_v2, tmp_path_factory):
    return widen(sample_v2, tmp_path_factory.mktemp("wide") / "wide", 64)


@pytest.fixture(scope="module")
def client(site):
    with site.client() as c:
        yield c


def _busy_worker(client, timeout: float = 20.0) -> str:
    """The address of a worker running a task of an export (tilecrate-* keys), once there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [w for w, keys in client.processing().items() if any(str(k).startswith("tilecrate-") for k in keys)]
        if busy:
            return busy[0]
        time.sleep(0.02)
    raise AssertionError("no worker ran a task of the export")


def _job_dir(srv, job_id: str):
    return srv.data_dir / "arcgisoutput" / "W_MapServer" / job_id


def test_worker_killed_during_a_job(site, client, wide, tmp_path):
    srv = site_server(tmp_path, "kill", site, {"W": {"source": wide}})
    try:
        srv.start(timeout=60)
        pids = client.run(os.getpid)
        sub = srv.submit("W", EXPORT, SLOW)
        victim = _busy_worker(client)
        os.kill(pids[victim], signal.SIGKILL)
        job = srv.poll("W", EXPORT, sub["jobId"], timeout=60)
        assert job["jobStatus"] == "esriJobSucceeded", job
        got = job_output(srv, "W", job, tmp_path)
        here = export(str(wide), ExportRequest.from_params(SLOW), str(tmp_path / "here.tpkx"))
        assert bundle_files(got) == bundle_files(here.path)
        assert reference_tiles(got) == reference_tiles(type(tmp_path)(here.path))
        assert site.staging() == []
        assert [n for n in os.listdir(_job_dir(srv, sub["jobId"])) if n != got.name] == []
    finally:
        srv.stop()
    client.wait_for_workers(2, timeout=30)       # the nanny restarted it


@pytest.mark.parametrize("local_temp", [False, True], ids=["shared", "localtemp"])
def test_cancel_is_quick_and_leaves_no_staging(site, client, wide, tmp_path, local_temp):
    srv = site_server(tmp_path, "cancel", site, {"W": {"source": wide}}, local_temp=local_temp)
    try:
        srv.start(timeout=60)
        sub = srv.submit("W", EXPORT, SLOW)
        _busy_worker(client)
        if local_temp:      # the worker's staging folder exists: cancelling must remove it
            deadline = time.monotonic() + 10
            while not site.staging() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert site.staging(), "the local-temp job made no staging folder on its worker"
        t0 = time.monotonic()
        r = srv.post(f"{srv.svc('W')}/{EXPORT}/jobs/{sub['jobId']}/cancel", {"f": "json"})
        assert r.json()["jobStatus"] in ("esriJobCancelling", "esriJobCancelled"), r.json()
        job = srv.poll("W", EXPORT, sub["jobId"], timeout=5)
        took = time.monotonic() - t0
        assert job["jobStatus"] == "esriJobCancelled" and took < 1.0, (took, job)
        # the workers' tasks stop within a second too: nothing of the job is left anywhere
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and (site.staging() or _job_dir(srv, sub["jobId"]).exists()):
            time.sleep(0.05)
        assert site.staging() == [] and not _job_dir(srv, sub["jobId"]).exists()
        assert not [k for keys in client.processing().values() for k in keys if str(k).startswith("tilecrate-")]
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()


def test_front_end_killed_and_restarted(site, client, wide, tmp_path):
    srv = site_server(tmp_path, "restart", site, {"W": {"source": wide}})
    srv.start(timeout=60)
    try:
        sub = srv.submit("W", EXPORT, SLOW)
        _busy_worker(client)
        for pid in [*child_pids(srv.proc.pid), srv.proc.pid]:   # the whole front end, as a crash would
            os.kill(pid, signal.SIGKILL)
        srv.proc.wait(10)
        srv.proc = None
        srv.start(timeout=60)
        job = srv.poll("W", EXPORT, sub["jobId"], timeout=10)
        assert job["jobStatus"] == "esriJobFailed", job
        assert RESTART_MESSAGE in [m["description"] for m in job["messages"]], job["messages"]
        # the tasks the dead front end left on the cluster end; nothing of the job stays behind
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (site.staging() or _job_dir(srv, sub["jobId"]).exists()
                                               or any(client.processing().values())):
            time.sleep(0.1)
        assert site.staging() == [] and not any(client.processing().values())
        # the restarted front end runs jobs on the same cluster
        ok = srv.poll("W", EXPORT, srv.submit("W", EXPORT, {"levels": "0-3"})["jobId"], timeout=60)
        assert ok["jobStatus"] == "esriJobSucceeded", ok
    finally:
        srv.stop()


def test_scheduler_killed_fails_the_job(wide, tmp_path):
    """Its own scheduler and worker: the module's site stays up for the tests above."""
    with logs_on_failure(tmp_path):
        lone = Site(tmp_path / "lone", workers=1).start()
        srv = site_server(tmp_path, "lost", lone, {"W": {"source": wide}})
        try:
            srv.start(timeout=60)
            with lone.client() as c:
                sub = srv.submit("W", EXPORT, SLOW)
                _busy_worker(c)
            t0 = time.monotonic()
            lone.kill_scheduler()
            job = srv.poll("W", EXPORT, sub["jobId"], timeout=30)
            assert job["jobStatus"] == "esriJobFailed", job
            assert time.monotonic() - t0 < 30
            errors = [m["description"] for m in job["messages"] if m["type"] == "esriJobMessageTypeError"]
            assert any(lone.address in e for e in errors), job["messages"]
            assert not _job_dir(srv, sub["jobId"]).exists() or os.listdir(_job_dir(srv, sub["jobId"])) == []
            # the front end still answers, and says the same about the next job
            again = srv.poll("W", EXPORT, srv.submit("W", EXPORT, {"levels": "0-2"})["jobId"], timeout=60)
            assert again["jobStatus"] == "esriJobFailed" and lone.address in str(again["messages"]), again
        finally:
            srv.stop()
            lone.stop()

"""Jobs against a real server whose exports are slowed per bundle: tokens, admission, cancel, SIGKILL."""
from __future__ import annotations

import time

import pytest

from test_server_support import Server, free_port, write_config

EXPORT, ESTIMATE = "exportTiles", "estimateExportTilesSize"
TOKEN = "s3cret-token"
DELAY = 0.5  # seconds per bundle written: levels 0-5 of the sample take about 3.5 s


@pytest.fixture(scope="module")
def slow(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("slowserver")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {"Slow": {"source": sample_v2}},
                       token=TOKEN, maximum_outstanding_jobs=1, workers=1)
    srv = Server(cfg, data, free_port(), delay=DELAY, token=TOKEN).start()
    yield srv
    srv.stop()


def job_dir(server: Server, job_id: str):
    return server.data_dir / "arcgisoutput" / "Slow_MapServer" / job_id


def wait_executing(server: Server, job_id: str) -> dict:
    """Poll until the job has written at least one bundle."""
    return server.poll("Slow", EXPORT, job_id, until=lambda j: j["jobStatus"] == "esriJobExecuting"
                       and j.get("progress", {}).get("percent", 0) > 0)


def test_token_required_on_every_route(slow):
    svc = slow.svc("Slow")
    for path in ("/arcgis/rest/services", svc, svc + "/exportTiles", svc + "/jobs/x", svc + "/tilemap/0/0/0/1/1"):
        r = slow.get(path, {"f": "json"})
        assert r.status == 200 and r.json()["error"]["code"] == 499, path
        r = slow.get(path, {"f": "json", "token": "wrong"})
        assert r.json()["error"]["code"] == 498, path
    # byte resources answer with a real status (and the same JSON body)
    for path in (svc + "/tile/0/0/0", "/arcgis/rest/directories/arcgisoutput"):
        r = slow.get(path)
        assert r.status == 401 and r.json()["error"]["code"] == 499, path
    assert slow.get("/arcgis/rest/directories/arcgisoutput", {"token": TOKEN}).json() == {"folders": [], "files": []}
    assert slow.get(svc + "/tile/0/0/0", {"token": TOKEN}).status == 200
    ok = slow.get(svc, {"f": "json"}, headers={"X-Esri-Authorization": f"Bearer {TOKEN}"}).json()
    assert ok["exportTilesAllowed"] is True
    assert "error" not in slow.get(svc, {"f": "json"}, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert "error" not in slow.post(svc, {"f": "json", "token": TOKEN}).json()


def test_token_that_is_not_utf8_is_an_invalid_token(slow):
    # header bytes that are not UTF-8 reach the handler as surrogates: still just a wrong token
    svc = slow.svc("Slow")
    r = slow.get(svc, {"f": "json"}, headers={"Authorization": "Bearer \xff\xfe"})
    assert r.status == 200 and r.json()["error"]["code"] == 498
    r = slow.get(svc + "/tile/0/0/0", headers={"X-Esri-Authorization": "Bearer \xff"})
    assert r.status == 401 and r.json()["error"]["code"] == 498
    assert "unexpected error answering" not in slow.log.read_text()


def test_admission_503_and_cancel_within_a_second(slow):
    sub = slow.submit("Slow", EXPORT, {"tilePackage": "true", "levels": "0-5", "storageFormat": "tpkx"})
    job_id = sub["jobId"]
    running = wait_executing(slow, job_id)
    assert 0 <= running["progress"]["percent"] <= 100
    # maximumOutstandingJobs = 1: the next request is refused, not queued
    for op in (EXPORT, ESTIMATE):
        r = slow.get(f"{slow.svc('Slow')}/{op}", slow.with_token({"f": "json", "levels": "0"}))
        assert r.status == 503 and r.headers["Retry-After"] == "300"
        assert r.json()["error"]["code"] == 503
    before = set(slow.data_dir.joinpath("arcgisoutput", "Slow_MapServer").iterdir())
    assert job_dir(slow, job_id) in before
    c = slow.post(f"{slow.svc('Slow')}/exportTiles/jobs/{job_id}/cancel", slow.with_token({"f": "json"})).json()
    t0 = time.monotonic()
    assert c == {"jobId": job_id, "jobStatus": "esriJobCancelling"}
    job = slow.poll("Slow", EXPORT, job_id, timeout=10)
    took = time.monotonic() - t0
    assert job["jobStatus"] == "esriJobCancelled" and took < 1.0 + DELAY / 2, took
    assert not job_dir(slow, job_id).exists()          # partial output removed
    # the slot is free again
    again = slow.submit("Slow", ESTIMATE, {"tilePackage": "true", "levels": "0"})
    assert slow.poll("Slow", ESTIMATE, again["jobId"])["jobStatus"] == "esriJobSucceeded"


def test_sigkill_during_export_then_restart(slow, tmp_path):
    # jobs that finished before the crash
    done = slow.submit("Slow", EXPORT, {"tilePackage": "true", "levels": "0", "storageFormat": "tpkx"})
    assert slow.poll("Slow", EXPORT, done["jobId"])["jobStatus"] == "esriJobSucceeded"
    done_job = slow.poll("Slow", EXPORT, done["jobId"])
    folder = slow.result("Slow", EXPORT, done_job)
    _, files = slow.download_all(folder, tmp_path)
    package = files[0].read_bytes()
    est = slow.submit("Slow", ESTIMATE, {"tilePackage": "true", "levels": "0-3"})
    est_job = slow.poll("Slow", ESTIMATE, est["jobId"])
    est_value = slow.result("Slow", ESTIMATE, est_job)
    # the victim: killed while it is writing its package
    victim = slow.submit("Slow", EXPORT, {"tilePackage": "true", "levels": "0-5", "storageFormat": "tpkx"})["jobId"]
    wait_executing(slow, victim)
    partial = list(job_dir(slow, victim).iterdir())
    assert partial and all(p.name.startswith(".") for p in partial)   # only the temporary file so far
    slow.kill()
    slow.start()
    job = slow.poll("Slow", EXPORT, victim, timeout=5)
    assert job["jobStatus"] == "esriJobFailed"
    errors = [m["description"] for m in job["messages"] if m["type"] == "esriJobMessageTypeError"]
    assert errors == ["The server stopped while this job was running; submit it again."]
    assert not job_dir(slow, victim).exists()
    folder_url = f"/arcgis/rest/directories/arcgisoutput/Slow_MapServer/{victim}"
    gone = slow.get(folder_url, slow.with_token({"f": "json"}))
    assert gone.status == 404 and gone.json()["error"]["code"] == 404
    r = slow.get(f"{slow.svc('Slow')}/exportTiles/jobs/{victim}/results/out_service_url", slow.with_token({"f": "json"}))
    assert r.json()["error"]["code"] == 400
    # the others are intact
    assert slow.poll("Slow", EXPORT, done["jobId"])["jobStatus"] == "esriJobSucceeded"
    again = tmp_path / "again"
    again.mkdir()
    _, files2 = slow.download_all(slow.result("Slow", EXPORT, done_job), again)
    assert files2[0].read_bytes() == package
    assert slow.result("Slow", ESTIMATE, slow.poll("Slow", ESTIMATE, est["jobId"])) == est_value
    # and the failed job no longer holds the only admission slot
    new = slow.submit("Slow", ESTIMATE, {"tilePackage": "true", "levels": "0"})
    assert slow.poll("Slow", ESTIMATE, new["jobId"])["jobStatus"] == "esriJobSucceeded"


def test_outputs_expire_after_max_file_age(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"Quick": {"source": sample_v2}}, max_file_age=1.0)
    srv = Server(cfg, data, free_port()).start()
    try:
        sub = srv.submit("Quick", EXPORT, {"tilePackage": "true", "levels": "0-1"})
        job = srv.poll("Quick", EXPORT, sub["jobId"])
        folder = srv.result("Quick", EXPORT, job)
        assert srv.get(folder).json()["files"]
        deadline = time.monotonic() + 10
        while srv.get(folder).status != 404:
            assert time.monotonic() < deadline, "output not removed after max_file_age"
            time.sleep(0.2)
        gone = srv.post(f"{srv.svc('Quick')}/exportTiles/jobs/{sub['jobId']}", {"f": "json"}).json()
        assert "does not exist" in gone["error"]["details"][0]
        assert not (data / "arcgisoutput" / "Quick_MapServer" / sub["jobId"]).exists()
    finally:
        srv.stop()


def test_sigterm_during_export_fails_the_job_cleanly(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"Slow": {"source": sample_v2}})
    srv = Server(cfg, data, free_port(), delay=DELAY)
    srv.start()
    try:
        job_id = srv.submit("Slow", EXPORT, {"tilePackage": "true", "levels": "0-5"})["jobId"]
        wait_executing(srv, job_id)
        t0 = time.monotonic()
        srv.stop()                                  # SIGTERM: the running export is stopped, not awaited
        assert time.monotonic() - t0 < 1.0 + DELAY
        srv.start()
        job = srv.poll("Slow", EXPORT, job_id, timeout=5)
        assert job["jobStatus"] == "esriJobFailed"
        assert job["messages"][-2]["description"] == "The server stopped while this job was running; submit it again."
        assert not job_dir(srv, job_id).exists()
    finally:
        srv.stop()


def test_expiry_survives_a_failed_cleanup_pass(tmp_path, sample_v2, monkeypatch):
    """One cleanup pass that fails (any error) must not end expiry for the life of the server."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from tilecrate.jobs import JobRunner
    from tilecrate.server.app import create_app
    from tilecrate.server.config import ServerConfig, ServiceConfig

    real = JobRunner.cleanup
    calls = []

    def flaky(self, now=None):
        calls.append(now)
        if len(calls) == 2:                      # the first periodic pass (the first is at startup)
            raise RuntimeError("a passing failure")
        return real(self, now)
    monkeypatch.setattr(JobRunner, "cleanup", flaky)
    cfg = ServerConfig(services={"Q": ServiceConfig("Q", str(sample_v2))}, data_dir=str(tmp_path / "data"),
                       max_file_age=1.0)

    async def scenario():
        async with TestClient(TestServer(create_app(cfg))) as client:
            deadline = time.monotonic() + 5
            while len(calls) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
    asyncio.run(scenario())
    assert len(calls) >= 4, calls


def test_outputs_download_when_the_data_dir_is_reached_through_a_symlink(tmp_path, sample_v2):
    (tmp_path / "disk").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "disk")       # e.g. a data dir on another mount
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"Quick": {"source": sample_v2}})
    srv = Server(cfg, data, free_port()).start()
    try:
        assert srv.get("/arcgis/rest/directories/arcgisoutput").json() == {"folders": [], "files": []}
        sub = srv.submit("Quick", EXPORT, {"tilePackage": "true", "levels": "0-1"})
        job = srv.poll("Quick", EXPORT, sub["jobId"])
        assert job["jobStatus"] == "esriJobSucceeded", job
        _, files = srv.download_all(srv.result("Quick", EXPORT, job), tmp_path)
        assert len(files) == 1 and files[0].stat().st_size > 0
    finally:
        srv.stop()

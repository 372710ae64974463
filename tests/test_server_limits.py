"""A real server under misbehaving clients: request and input limits, per-client quotas, budgets,
output privacy, forged Host headers, deeply nested JSON, a FIFO where a bundle should be (issue 9)."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.parse
import urllib.request

import pytest

from test_server_support import Server, free_port, write_config

EXPORT, ESTIMATE = "exportTiles", "estimateExportTilesSize"


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("limits")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {"World": {"source": sample_v2}},
                       limits={"max_body_bytes": 65536, "max_input_bytes": 8192},
                       host_names=["maps.example.org:8443"])
    srv = Server(cfg, data, free_port()).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("limits-slow")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {"Slow": {"source": sample_v2}}, workers=1,
                       limits={"job_seconds": 1.5, "max_outstanding_per_client": 1})
    srv = Server(cfg, data, free_port(), delay=0.5).start()
    yield srv
    srv.stop()


def _post_raw(server: Server, path: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(server.url(path), data=body,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_request_body_over_the_limit_is_an_esri_error(server):
    status, body = _post_raw(server, f"{server.svc('World')}/{EXPORT}",
                             urllib.parse.urlencode({"f": "json", "levels": "0", "pad": "x" * 70000}).encode())
    assert status == 413 and json.loads(body)["error"]["code"] == 413


def test_stored_inputs_are_bounded(server):
    ring = [[-10 + i * 1e-4, 40 + (i % 3) * 1e-4] for i in range(700)] + [[-10, 40]]
    aoi = json.dumps({"rings": [ring], "spatialReference": {"wkid": 4326}})
    assert 8192 < len(aoi) < 60000
    r = server.post(f"{server.svc('World')}/{EXPORT}", {"f": "json", "levels": "0", "areaOfInterest": aoi})
    err = r.json()["error"]
    assert r.status == 200 and err["code"] == 400 and "at most 8192 bytes per job" in err["details"][0]
    assert list((server.data_dir / "arcgisoutput").glob("*/*")) == []


@pytest.mark.parametrize("name", ["levels", "areaOfInterest", "exportExtent", "aoiSR"])
def test_deeply_nested_json_is_an_esri_error(server, name):
    params = {"f": "json", "levels": "0", name: "[" * 5000 + "]" * 5000}
    r = server.post(f"{server.svc('World')}/{EXPORT}", params)
    assert r.status == 200, r.status
    err = r.json()["error"]
    assert err["code"] == 400 and err["details"] and len(err["details"][0]) <= 2002
    assert "unexpected error answering" not in server.log.read_text()


def _job_done(server: Server, host: str | None = None) -> dict:
    sub = server.submit("World", EXPORT, {"levels": "0-1", "tilePackage": "true"})
    return server.poll("World", EXPORT, sub["jobId"])


def test_service_output_folder_lists_no_jobs(server):
    job = _job_done(server)
    folder = server.result("World", EXPORT, job)
    out = f"{server.base}/arcgis/rest/directories/arcgisoutput"
    assert server.get(out + "/World_MapServer").json() == {"folders": [], "files": []}
    assert server.get(out + "/World_MapServer", {"f": "html"}).body.count(job["jobId"].encode()) == 0
    assert server.get(out).json()["folders"] == ["World_MapServer"]
    listing = server.get(folder).json()  # the job's own folder, by its id
    assert [f["name"] for f in listing["files"]] == ["World.tpk"]


def test_forged_host_header_is_not_written_into_urls(server):
    job = _job_done(server)
    url = f"{server.svc('World')}/{EXPORT}/jobs/{job['jobId']}/results/out_service_url"

    def result_with(host: str) -> str:
        return server.get(url, {"f": "json"}, headers={"Host": host}).json()["value"]
    assert result_with("evil.example").startswith(f"http://127.0.0.1:{server.port}/arcgis/rest/directories/")
    assert result_with(f"localhost:{server.port}").startswith(f"http://localhost:{server.port}/")
    assert result_with("maps.example.org:8443").startswith("http://maps.example.org:8443/")  # host_names
    for f in server.get(result_with("evil.example")).json()["files"]:
        assert f["url"].startswith(f"http://127.0.0.1:{server.port}/")
    listing = server.get(result_with("x"), headers={"Host": "attacker.example:80"}).json()
    assert all("attacker" not in f["url"] for f in listing["files"])


def test_status_is_the_stored_json_in_every_format(server):
    job = _job_done(server)
    base = f"{server.svc('World')}/{EXPORT}/jobs/{job['jobId']}"
    compact = server.get(base, {"f": "json"})
    assert compact.headers["Content-Type"].startswith("application/json")
    assert b"\n" not in compact.body and compact.json() == job
    assert server.get(base, {"f": "pjson"}).json() == job
    assert job["jobId"].encode() in server.get(base, {"f": "html"}).body
    # another service's URL or a bad id: still the Esri error
    assert server.get(base.replace("jobs/j", "jobs/k"), {"f": "json"}).json()["error"]["code"] == 400


def test_per_client_quota_and_time_budget(slow):
    sub = slow.submit("Slow", EXPORT, {"tilePackage": "true", "levels": "0-5"})
    # one outstanding job per client: the second is refused with a real 429, not queued
    r = slow.get(f"{slow.svc('Slow')}/{ESTIMATE}", {"f": "json", "levels": "0"})
    assert r.status == 429 and r.headers["Retry-After"] == "60"
    assert r.json()["error"]["code"] == 429 and "one client" in r.json()["error"]["details"][0]
    t0 = time.monotonic()
    job = slow.poll("Slow", EXPORT, sub["jobId"], timeout=15)
    assert job["jobStatus"] == "esriJobFailed" and time.monotonic() - t0 < 5
    errors = [m["description"] for m in job["messages"] if m["type"] == "esriJobMessageTypeError"]
    assert len(errors) == 1 and "ran longer than this server allows (1.5 seconds" in errors[0]
    assert not (slow.data_dir / "arcgisoutput" / "Slow_MapServer" / sub["jobId"]).exists()
    # the slot is free again
    est = slow.submit("Slow", ESTIMATE, {"levels": "0"})
    assert slow.poll("Slow", ESTIMATE, est["jobId"])["jobStatus"] == "esriJobSucceeded"


@pytest.mark.parametrize("how", ["fifo", "stuck read"])
def test_a_blocked_cache_read_does_not_stall_the_server(tmp_path, sample_v2, how):
    """Tile reads run on their own bounded pool with a timeout: a read that blocks (a FIFO named like a
    bundle, or a read that never returns) answers an error, and everything else (other tiles,
    submissions, status) keeps answering; the server still stops promptly on SIGTERM."""
    src = tmp_path / "cache"
    shutil.copytree(sample_v2, src)
    env = {}
    if how == "fifo":
        fifo = src / "_alllayers" / "L02" / "R0000C0000.bundle"
        fifo.unlink()
        os.mkfifo(fifo)
    else:
        env["TC_TEST_STUCK_LEVEL"] = "2"
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"F": {"source": src}},
                       limits={"tile_read_threads": 2, "tile_read_timeout": 1})
    srv = Server(cfg, data, free_port(), env=env)
    try:
        srv.start()
        answers: list[int] = []

        def hit() -> None:
            answers.append(srv.get(f"{srv.svc('F')}/tile/2/0/0").status)
        threads = [threading.Thread(target=hit) for _ in range(12)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(0.3)
        # while those wait, the rest of the server answers at once
        assert srv.get("/arcgis/rest/info", {"f": "json"}).status == 200
        assert time.monotonic() - t0 < 2
        est = srv.submit("F", ESTIMATE, {"levels": "0-1"})
        assert srv.poll("F", ESTIMATE, est["jobId"], timeout=10)["jobStatus"] == "esriJobSucceeded"
        for t in threads:
            t.join(15)
        assert len(answers) == 12 and all(a in (400, 404, 503) for a in answers), answers
        assert time.monotonic() - t0 < 12
        if how == "stuck read":
            assert answers.count(503) == 12 and "a cache read took more than 1s" in srv.log.read_text()
        assert srv.get(f"{srv.svc('F')}/tile/1/0/0").status == 200  # other levels still read
    finally:
        t0 = time.monotonic()
        srv.stop()  # SIGTERM: bounded even with reads stuck
        assert time.monotonic() - t0 < 9
        assert srv.log.read_text().count("Traceback") == 0


def test_a_job_never_stays_executing_on_a_full_disk(tmp_path, sample_v2):
    """The data dir (job store and outputs) on a small tmpfs, filled while an export runs: the job ends, never
    stays executing: done (its package's blocks were reserved before its first byte, when that came before
    the filling) or failed with a readable message; an export asked for while the disk is full is refused
    or fails at once ("disk"); new jobs are refused until space is freed, then admitted again."""
    import subprocess
    import uuid

    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs for the full-disk test (run as root): {r.stderr}"
    data = mnt / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"Slow": {"source": sample_v2}}, workers=1)
    srv = Server(cfg, data, free_port(), delay=0.3)
    filler = mnt / f"filler-{uuid.uuid4().hex}"
    try:
        srv.start()
        sub = srv.submit("Slow", EXPORT, {"tilePackage": "true", "levels": "0-5"})
        srv.poll("Slow", EXPORT, sub["jobId"], until=lambda j: j["jobStatus"] == "esriJobExecuting")
        with open(filler, "wb", buffering=0) as f:
            for size in (1 << 20, 4096, 1):
                try:
                    while True:
                        f.write(b"\xa5" * size)
                except OSError:
                    pass
        def ended_on_a_full_disk(job: dict, done_ok: bool) -> None:
            assert job["jobStatus"] in (("esriJobFailed", "esriJobSucceeded") if done_ok else ("esriJobFailed",)), job
            if job["jobStatus"] == "esriJobFailed":
                errors = [m["description"] for m in job["messages"] if m["type"] == "esriJobMessageTypeError"]
                assert len(errors) == 1 and "disk" in errors[0] and str(data) not in errors[0], errors

        ended_on_a_full_disk(srv.poll("Slow", EXPORT, sub["jobId"], timeout=20), True)
        r = srv.get(f"{srv.svc('Slow')}/{EXPORT}", {"f": "json", "levels": "0-5", "tilePackage": "true"})
        if r.status == 503:
            assert "disk" in r.json()["error"]["details"][0], r.body[:300]
        else:
            assert r.status == 200, (r.status, r.body[:300])
            ended_on_a_full_disk(srv.poll("Slow", EXPORT, r.json()["jobId"], timeout=20), False)
        # while the disk is full, a new job is refused (the reserve was used) or, when the store still
        # had free pages, admitted: then it too ends, it never stays executing
        r = srv.get(f"{srv.svc('Slow')}/{ESTIMATE}", {"f": "json", "levels": "0"})
        if r.status == 503:
            assert "disk" in r.json()["error"]["details"][0], r.body[:300]
        else:
            assert r.status == 200, (r.status, r.body[:300])
            end = srv.poll("Slow", ESTIMATE, r.json()["jobId"], timeout=20)
            assert end["jobStatus"] in ("esriJobFailed", "esriJobSucceeded"), end
        filler.unlink()
        deadline = time.monotonic() + 10
        while True:  # the sweep (every 2 s) restores the reserve, then jobs are admitted again
            r = srv.get(f"{srv.svc('Slow')}/{ESTIMATE}", {"f": "json", "levels": "0"})
            if r.status == 200:
                break
            assert time.monotonic() < deadline, r.body[:300]
            time.sleep(0.3)
        assert srv.poll("Slow", ESTIMATE, r.json()["jobId"])["jobStatus"] == "esriJobSucceeded"
    finally:
        srv.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_gate_quarantines_a_hanging_file_and_bounds_its_threads():
    import asyncio

    from tilecrate.server.errors import EsriError
    from tilecrate.server.reads import ReadGate

    release = threading.Event()

    def hang():
        release.wait(30)
        return "late"

    async def main():
        gate = ReadGate(2, 0.2, max_stuck=3, quarantine=60)
        try:
            assert await gate.run("ok", lambda: 42) == 42
            with pytest.raises(EsriError) as e:
                await gate.run("bad", hang)
            assert e.value.code == 503 and gate.stuck == 1
            t0 = time.monotonic()
            with pytest.raises(EsriError, match="did not finish"):  # quarantined: refused at once
                await gate.run("bad", hang)
            assert time.monotonic() - t0 < 0.1 and gate.stuck == 1
            for key in ("b2", "b3"):
                with pytest.raises(EsriError):
                    await gate.run(key, hang)
            assert gate.stuck == 3
            with pytest.raises(EsriError, match="too many cache reads are blocked"):
                await gate.run("ok", lambda: 42)
            release.set()
            for _ in range(100):
                if gate.stuck == 0:
                    break
                await asyncio.sleep(0.02)
            assert gate.stuck == 0 and await gate.run("ok", lambda: 7) == 7
        finally:
            release.set()
            gate.close()
    asyncio.run(main())

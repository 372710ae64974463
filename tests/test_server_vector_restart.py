"""SIGKILL during a .vtpk export and during an elevation export, then restart (as tests/test_server_jobs.py
does for MapServer): the killed job fails with a readable message, its partial output is gone, finished
jobs and their downloads survive, and both service kinds work again."""
from __future__ import annotations

import pytest

from conftest import real_path
from test_server_support import free_port, write_config
from test_server_vector import TypedServer
from test_vtpk import read_vtpk
from tilecrate.sample import SampleSpec, make_sample

EXPORT = "exportTiles"
DELAY = 0.5  # seconds per progress report (one per bundle): the fixture's 6 bundles take ~3 s


@pytest.fixture(scope="module")
def slow(tmp_path_factory, real_dir):
    root = tmp_path_factory.mktemp("slowkinds")
    elev = make_sample(root / "elevation", SampleSpec(levels=(0, 1, 2, 3), tile_format="LERC"))
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {"NE": {"source": real_path("natural-earth.vtpk")},
                                                       "Elev": {"source": elev}}, workers=1)
    srv = TypedServer(cfg, data, free_port(), delay=DELAY, kinds={"NE": "VectorTileServer", "Elev": "ImageServer"})
    srv.start()
    yield srv
    srv.stop()


def _job_dir(srv, job_id):
    found = [p for p in (srv.data_dir / "arcgisoutput").glob(f"*/{job_id}")]
    return found[0] if found else None


def _executing(srv, name, job_id):
    return srv.poll(name, EXPORT, job_id, timeout=30, until=lambda j: j["jobStatus"] == "esriJobExecuting"
                    and j.get("progress", {}).get("percent", 0) > 0)


@pytest.mark.parametrize("name, params", [
    ("NE", {"exportBy": "levelId", "tilePackage": "false", "storageFormatType": "Compact"}),
    ("Elev", {"exportBy": "LevelID", "tilePackage": "true", "storageFormatType": "CompactV2"}),
])
def test_sigkill_during_export_then_restart(slow, tmp_path, name, params):
    levels = "0-5" if name == "NE" else "0-3"
    done = slow.submit(name, EXPORT, {**params, "levels": "0"})
    done_job = slow.poll(name, EXPORT, done["jobId"])
    assert done_job["jobStatus"] == "esriJobSucceeded", done_job
    _, files = slow.download_all(slow.result(name, EXPORT, done_job), tmp_path)
    package = files[0].read_bytes()
    victim = slow.submit(name, EXPORT, {**params, "levels": levels})["jobId"]
    _executing(slow, name, victim)
    partial = list(_job_dir(slow, victim).iterdir())
    assert partial and all(p.name.startswith(".") for p in partial)   # only the temporary file so far
    slow.kill()
    slow.start()
    job = slow.poll(name, EXPORT, victim, timeout=5)
    assert job["jobStatus"] == "esriJobFailed"
    errors = [m["description"] for m in job["messages"] if m["type"] == "esriJobMessageTypeError"]
    assert errors == ["The server stopped while this job was running; submit it again."]
    assert _job_dir(slow, victim) is None
    # the finished job and its download are intact
    again = tmp_path / "again"
    again.mkdir()
    _, files2 = slow.download_all(slow.result(name, EXPORT, slow.poll(name, EXPORT, done["jobId"])), again)
    assert files2[0].read_bytes() == package
    if name == "NE":
        assert files2[0].suffix == ".vtpk" and set(read_vtpk(files2[0])["tiles"]) == {(0, 0, 0)}
    # both kinds serve and export again
    assert slow.get(slow.svc("NE") + "/tile/0/0/0.pbf").status == 200
    assert slow.get(slow.svc("Elev") + "/tile/0/0/0").status == 200
    new = slow.submit(name, EXPORT, {**params, "levels": "0"})
    assert slow.poll(name, EXPORT, new["jobId"])["jobStatus"] == "esriJobSucceeded"

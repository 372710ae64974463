"""`tilecrate serve --processes 2`: two front ends on one port sharing the LMDB job store (issue 10):
admission is exact across them, any of them answers and cancels any job, SIGTERM stops them all."""
from __future__ import annotations

import os
import threading
import time

from test_server_support import Server, free_port, write_config

EXPORT = "exportTiles"


def test_two_front_ends_share_admission_status_and_cancel(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}},
                       maximum_outstanding_jobs=2, workers=2)
    srv = Server(cfg, data, free_port(), delay=0.5, extra_args=["--processes", "2"])
    try:
        srv.start()
        statuses: list[tuple[int, dict]] = []

        def submit() -> None:
            r = srv.get(f"{srv.svc('S')}/{EXPORT}", {"f": "json", "levels": "0-5", "tilePackage": "true"})
            statuses.append((r.status, r.json()))
        burst = [threading.Thread(target=submit) for _ in range(16)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(30)
        admitted = [body["jobId"] for status, body in statuses if status == 200 and "jobId" in body]
        refused = [body for status, body in statuses if status == 503]
        assert len(statuses) == 16 and len(admitted) == 2 and len(refused) == 14, statuses
        # two processes answer (the kernel spreads connections); every answer knows every job
        for _ in range(20):
            for job_id in admitted:
                r = srv.post(f"{srv.svc('S')}/{EXPORT}/jobs/{job_id}", {"f": "json"})
                assert r.status == 200 and r.json()["jobId"] == job_id
        for job_id in admitted:
            srv.poll("S", EXPORT, job_id, until=lambda j: j["jobStatus"] == "esriJobExecuting")
        t0 = time.monotonic()
        for job_id in admitted:  # whichever process takes the cancel, the driving one stops the job
            r = srv.post(f"{srv.svc('S')}/{EXPORT}/jobs/{job_id}/cancel", {"f": "json"})
            assert r.json()["jobStatus"] in ("esriJobCancelling", "esriJobCancelled"), r.json()
        for job_id in admitted:
            assert srv.poll("S", EXPORT, job_id, timeout=10)["jobStatus"] == "esriJobCancelled"
            assert not (data / "arcgisoutput" / "S_MapServer" / job_id).exists()
        assert time.monotonic() - t0 < 3
        pids = _children(srv.proc.pid)
        assert len(pids) == 2
    finally:
        srv.stop()
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)
    assert "Traceback" not in srv.log.read_text()


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

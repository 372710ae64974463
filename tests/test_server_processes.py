"""`tilecrate serve --processes 2`: two front ends on one port sharing the LMDB job store (issue 10):
admission is exact across them, any of them answers and cancels any job, SIGTERM stops them all."""
from __future__ import annotations

import os
import threading
import time

from test_server_support import Server, child_pids, free_port, write_config

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
        pids = child_pids(srv.proc.pid)
        assert len(pids) == 2
    finally:
        srv.stop()
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in pids)
    assert "Traceback" not in srv.log.read_text()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_front_end_process_that_dies_is_replaced_and_a_killed_parent_leaves_none(tmp_path, sample_v2):
    """One of N front ends crashing (SIGKILL here) used to stop the whole site; it is replaced, its job is
    failed with the restart message by the others' sweep, and the site keeps answering. A SIGKILLed
    parent takes its processes with it (none is left holding the port)."""
    import signal

    from tilecrate.commands.serve import RESPAWN_AFTER
    from tilecrate.jobs.runner import RESTART_MESSAGE

    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}}, workers=1)
    srv = Server(cfg, data, free_port(), delay=0.5, extra_args=["--processes", "2"])
    try:
        srv.start()
        time.sleep(RESPAWN_AFTER + 0.5)
        first = child_pids(srv.proc.pid)
        assert len(first) == 2
        job = srv.get(f"{srv.svc('S')}/{EXPORT}", {"f": "json", "levels": "0-5"}).json()["jobId"]
        srv.poll("S", EXPORT, job, until=lambda j: j["jobStatus"] == "esriJobExecuting")
        for pid in first:      # whichever drives the job: kill both, one after the other
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(set(child_pids(srv.proc.pid)) - set(first)) < 2:
            time.sleep(0.1)
        again = child_pids(srv.proc.pid)
        assert len(again) == 2 and not set(again) & set(first), (first, again)
        done = srv.poll("S", EXPORT, job, timeout=20)
        assert done["jobStatus"] == "esriJobFailed"
        assert RESTART_MESSAGE in [m["description"] for m in done["messages"]], done["messages"]
        assert srv.get(f"{srv.svc('S')}", {"f": "json"}).status == 200
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in again):
            time.sleep(0.1)
        assert not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in again)
        srv.proc = None
    finally:
        if srv.proc is not None:
            srv.stop()

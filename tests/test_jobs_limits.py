"""The job store and runner under misbehaving clients and a full disk (issue 9 items 3, 4; budgets).

The full-disk tests put the job store on a small tmpfs of their own (mounted here; the suite runs
as root in CI) and fill it with a real file: LMDB's data file then cannot grow, as on a full disk.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid

import pytest

from tilecrate.cache import open_cache
from tilecrate.errors import Cancelled, RequestError
from tilecrate.jobs import Job, JobRunner, JobService, JobStore
from tilecrate.jobs.model import EXECUTING, EXPORT, FAILED, SUBMITTED, SUCCEEDED, new_job_id
from tilecrate.jobs.runner import RESTART_MESSAGE, Budget
from tilecrate.jobs.store import Quota, QuotaExceeded, StoreError

AOI = json.dumps({"rings": [[[i * 1e-3, (i % 7) * 1e-3] for i in range(12000)] + [[0, 0]]],
                  "spatialReference": {"wkid": 4326}})  # ~200 KB


def test_large_parameters_stay_out_of_the_hot_record(tmp_path):
    store = JobStore(str(tmp_path / "db"))
    job = Job(new_job_id(), EXPORT, "S", {"levels": "0", "areaOfInterest": AOI}, client="10.0.0.1")
    store.admit(job, None)
    with store.env.begin() as txn:
        hot = txn.get(job.id.encode(), db=store._jobs)
    assert len(hot) < 1000 and AOI.encode() not in hot
    service, kind, body = store.public(job.id)
    assert (service, kind) == ("S", EXPORT) and json.loads(body) == {"jobId": job.id, "jobStatus": SUBMITTED,
                                                                     "messages": []}
    assert store.get(job.id, inputs=False).params == {}
    assert store.inputs(job.id)["areaOfInterest"] == AOI and store.get(job.id).params["areaOfInterest"] == AOI
    # every change rewrites the hot record and the ready-made JSON, never the parameters
    store.update(job.id, lambda j: setattr(j, "status", EXECUTING))
    assert json.loads(store.public(job.id)[2])["jobStatus"] == EXECUTING
    assert store.get(job.id).version == 2 and store.inputs(job.id)["areaOfInterest"] == AOI
    assert store.client_usage("10.0.0.1") == (1, 1, len(job.params_bytes()))
    store.update(job.id, lambda j: setattr(j, "status", SUCCEEDED))
    assert store.client_usage("10.0.0.1")[:2] == (1, 0)
    store.delete(job.id)
    assert store.public(job.id) is None and store.inputs(job.id) is None
    assert store.client_usage("10.0.0.1") == (0, 0, 0)
    store.close()


def test_per_client_quotas(tmp_path):
    store = JobStore(str(tmp_path / "db"))
    quota = Quota(max_jobs_per_client=3, max_outstanding_per_client=2, max_input_bytes_per_client=10_000)
    a = [Job(new_job_id(), EXPORT, "S", {"levels": "0"}, client="A") for _ in range(4)]
    store.admit(a[0], None, quota)
    store.admit(a[1], None, quota)
    with pytest.raises(QuotaExceeded, match="2 jobs submitted or executing"):
        store.admit(a[2], None, quota)
    store.admit(Job(new_job_id(), EXPORT, "S", {"levels": "0"}, client="B"), None, quota)  # others are not held up
    store.update(a[0].id, lambda j: setattr(j, "status", SUCCEEDED))
    store.admit(a[2], None, quota)
    store.update(a[1].id, lambda j: setattr(j, "status", FAILED))
    with pytest.raises(QuotaExceeded, match="3 stored jobs"):  # finished jobs count until they expire
        store.admit(a[3], None, quota)
    store.delete(a[0].id)
    store.admit(a[3], None, quota)
    with pytest.raises(QuotaExceeded, match="one client's share"):
        store.admit(Job(new_job_id(), EXPORT, "S", {"levels": "0", "aoi": "x" * 10_000}, client="C"), None, quota)
    store.close()


def test_large_requests_cannot_fill_the_store_for_ordinary_ones(tmp_path):
    """Many clients sending large areas fill only their share: ordinary jobs are still admitted."""
    store = JobStore(str(tmp_path / "db"), map_size=8 << 20)
    quota = Quota(max_jobs_per_client=None, max_outstanding_per_client=None, max_input_bytes_per_client=None)
    big = {"levels": "0", "areaOfInterest": "x" * 100_000}
    with pytest.raises(StoreError, match="too full for a request of"):
        for i in range(100):
            store.admit(Job(new_job_id(), EXPORT, "S", big, client=f"10.0.{i}.1"), None, quota)
    assert 10 < i < 30
    small = [Job(new_job_id(), EXPORT, "S", {"levels": "0-3"}, client=f"10.1.{i}.1") for i in range(200)]
    for job in small:
        store.admit(job, None, quota)
    assert store.count(SUBMITTED) == i + 200
    store.close()


def test_submit_checks_the_size_of_the_stored_parameters(tmp_path, sample_v2):
    cache = open_cache(str(sample_v2))
    store = JobStore(str(tmp_path / "db"))
    runner = JobRunner(store, {"S": JobService("S", cache)}, str(tmp_path / "out"), workers=1,
                       budget=Budget(max_input_bytes=50_000))
    try:
        with pytest.raises(RequestError, match="at most 50000 bytes per job"):
            runner.submit(EXPORT, "S", {"levels": "0", "areaOfInterest": AOI})
        with pytest.raises(RequestError):  # a RequestError, not a RecursionError
            runner.submit(EXPORT, "S", {"levels": "0", "areaOfInterest": "[" * 20_000 + "]" * 20_000})
        assert store.all_ids() == []
    finally:
        runner.close()
        store.close()
        cache.close()


def _waiting_export(allocate: int = 0):
    """An export that holds `allocate` bytes (written, so resident) until it is cancelled."""
    def export(cache, request, target, *, cancel, **kw):
        held = bytearray(b"\1") * allocate if allocate else None
        if not cancel.wait(20):
            raise AssertionError("the job was never stopped")
        del held
        raise Cancelled("cancelled")
    return export


def _wait(runner: JobRunner, job_id: str, timeout: float = 20) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = runner.get(job_id)
        if job.status in (SUCCEEDED, FAILED, "esriJobCancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


@pytest.mark.parametrize("budget,words", [
    (Budget(seconds=0.5, memory_bytes=None), "ran longer than this server allows (0.5 seconds"),
    (Budget(seconds=None, memory_bytes=20 << 20), "used more memory than this server allows (20 MB"),
])
def test_budgets_fail_the_job_with_a_clear_message(tmp_path, sample_v2, monkeypatch, budget, words):
    import tilecrate.jobs.runner as runner_mod

    monkeypatch.setattr(runner_mod, "export", _waiting_export(allocate=200 << 20 if budget.memory_bytes else 0))
    cache = open_cache(str(sample_v2))
    store = JobStore(str(tmp_path / "db"))
    runner = JobRunner(store, {"S": JobService("S", cache)}, str(tmp_path / "out"), workers=1, budget=budget)
    try:
        t0 = time.monotonic()
        job = _wait(runner, runner.submit(EXPORT, "S", {"levels": "0-1", "tilePackage": "true"}).id)
        assert job.status == FAILED and time.monotonic() - t0 < 10
        errors = [m["description"] for m in job.messages if m["type"] == "esriJobMessageTypeError"]
        assert len(errors) == 1 and words in errors[0], errors
        assert not os.path.exists(runner.job_dir(job))
    finally:
        runner.close()
        store.close()
        cache.close()


def test_sweep_fails_jobs_whose_driver_is_gone(tmp_path, sample_v2):
    cache = open_cache(str(sample_v2))
    store = JobStore(str(tmp_path / "db"))
    runner = JobRunner(store, {"S": JobService("S", cache)}, str(tmp_path / "out"), workers=1)
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        orphan = Job(new_job_id(), EXPORT, "S", {"levels": "0"}, status=EXECUTING, driver=f"{dead.pid}:1")
        mine = Job(new_job_id(), EXPORT, "S", {"levels": "0"}, status=EXECUTING, driver=runner.driver)
        other = Job(new_job_id(), EXPORT, "S", {"levels": "0"}, status=EXECUTING,
                    driver=runner_mod_identity(os.getppid()))  # a live process: another front end's job
        for job in (orphan, mine, other):
            store.put(job)
        assert sorted(runner.sweep()) == sorted([orphan.id, mine.id])
        assert store.get(orphan.id).status == FAILED and store.get(mine.id).status == FAILED
        assert store.get(other.id).status == EXECUTING
        # a job whose front-end process is gone says so as a restart does; one this process lost says that
        assert store.get(orphan.id).messages[-2]["description"] == RESTART_MESSAGE
        assert "lost track of this job" in store.get(mine.id).messages[-2]["description"]
    finally:
        runner.close()
        store.close()
        cache.close()


def runner_mod_identity(pid: int) -> str:
    from tilecrate.jobs.runner import _process_identity
    return _process_identity(pid)


# ------------------------------------------------------------------------------------------
# a full disk, for real: a tmpfs of our own


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a tmpfs for the full-disk tests (run as root): {r.stderr}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder) -> str:
    """Fill the file system with one file; returns its path."""
    path = os.path.join(folder, f"filler-{uuid.uuid4().hex}")
    chunk = b"\xa5" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
        while True:  # the last partial megabyte
            try:
                f.write(b"\xa5" * 4096)
            except OSError:
                break
    return path


def test_a_job_end_is_recorded_on_a_full_disk(small_disk):
    store = JobStore(str(small_disk / "db"), reserve_bytes=2 << 20)
    jobs = [Job(new_job_id(), EXPORT, "S", {"levels": "0"}) for _ in range(3)]
    for job in jobs:
        store.admit(job, None)
        store.update(job.id, lambda j: setattr(j, "status", EXECUTING))
    filler = _fill(small_disk)
    big = "m" * 200_000  # a change the free pages of the store cannot hold: the file must grow

    def progress(j: Job) -> None:
        j.progress = {"type": "default", "message": big, "percent": 50}
    with pytest.raises(StoreError, match="cannot be written"):  # ENOSPC, or EIO for a short page write
        store.update(jobs[0].id, progress)  # an ordinary write fails ...

    def end(j: Job) -> None:
        j.status = FAILED
        j.add_message("ERROR: no space left on the disk " + big, "esriJobMessageTypeError")
    store.update(jobs[0].id, end, essential=True)  # ... a job's end lands, on the reserve
    assert store.get(jobs[0].id).status == FAILED and store.degraded
    with pytest.raises(StoreError, match="disk of the job store is full"):
        store.admit(Job(new_job_id(), EXPORT, "S", {"levels": "0"}), None)
    assert not store.restore_reserve()  # still no room
    os.unlink(filler)
    assert store.restore_reserve() and not store.degraded
    store.admit(Job(new_job_id(), EXPORT, "S", {"levels": "0"}), None)
    store.close()
    again = JobStore(str(small_disk / "db"))
    assert again.get(jobs[0].id).status == FAILED and again.get(jobs[1].id).status == EXECUTING
    again.close()


def test_a_job_never_stays_executing_when_the_disk_fills(small_disk, sample_v2):
    """The export's output and the store share a full disk: the job fails, and its end is recorded."""
    cache = open_cache(str(sample_v2))
    store = JobStore(str(small_disk / "db"), reserve_bytes=0)  # no reserve: the sweep must record the end
    gate = threading.Event()
    runner = JobRunner(store, {"S": JobService("S", cache)}, str(small_disk / "out"), workers=1)
    try:
        runner._pool.submit(gate.wait, 20)  # hold the worker until the disk is full
        job = runner.submit(EXPORT, "S", {"levels": "0-5", "tilePackage": "true"})
        # fill the store's free pages too: messages too big for them
        filler = _fill(small_disk)
        gate.set()
        deadline = time.monotonic() + 20
        while job.id not in runner._unrecorded and store.get(job.id).status != FAILED:
            assert time.monotonic() < deadline, store.get(job.id)
            time.sleep(0.05)
        assert runner.get(job.id).status == FAILED  # answered as failed even before it is written
        os.unlink(filler)
        runner.sweep()
        got = store.get(job.id)
        assert got.status == FAILED and job.id not in runner._unrecorded
        errors = [m["description"] for m in got.messages if m["type"] == "esriJobMessageTypeError"]
        assert errors and "disk may be full" in errors[0] and "No space left" in errors[0], errors
        assert store.count(EXECUTING) == 0
    finally:
        runner.close()
        store.close()
        cache.close()


def test_limits_config(tmp_path, sample_v2):
    from tilecrate.server.config import ConfigError, load_config

    path = tmp_path / "t.toml"
    path.write_text(f'[server]\nhost_names = ["maps.example.org:8443"]\n[limits]\nmax_body_bytes = 1000\n'
                    f'jobSeconds = 5\nmax_vertices = 5000\n[services.S]\nsource = "{sample_v2}"\n')
    cfg = load_config(str(path))
    assert cfg.host_names == ["maps.example.org:8443"] and cfg.limits.max_body_bytes == 1000
    assert cfg.limits.job_seconds == 5.0 and cfg.limits.geometry() == {"max_vertices": 5000}
    assert cfg.limits.max_input_bytes == 256 << 10  # the default
    for bad, words in (("max_body_bytes = 0", "at least 1"), ("job_seconds = nan", "finite"),
                       ("max_outputs = 3", "unknown setting"), ("tile_read_timeout = 0", "more than 0"),
                       ("max_rings = -1", "at least 1")):
        path.write_text(f'[limits]\n{bad}\n[services.S]\nsource = "{sample_v2}"\n')
        with pytest.raises(ConfigError, match=words):
            load_config(str(path))
    path.write_text(f'[server]\nhost_names = "x"\n[services.S]\nsource = "{sample_v2}"\n')
    with pytest.raises(ConfigError, match="list of strings"):
        load_config(str(path))


def test_a_bloated_store_is_compacted_when_opened_alone(tmp_path):
    """LMDB's file never shrinks: after a burst of large jobs, opening the store (no other process in
    it) rewrites it without the free pages; kept jobs are intact."""
    path = str(tmp_path / "db")
    store = JobStore(path)
    keep = Job(new_job_id(), EXPORT, "S", {"levels": "0"}, client="k")
    store.admit(keep, None)
    burst = [Job(new_job_id(), EXPORT, "S", {"levels": "0", "aoi": "x" * 50_000}) for _ in range(120)]
    for job in burst:
        store.admit(job, None)
    store.delete(*(j.id for j in burst))
    store.close()
    data = tmp_path / "db" / "data.mdb"
    before = data.stat().st_size
    assert before > 5 << 20
    import sys
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from tilecrate.jobs import JobStore; "
                               "s = JobStore(sys.argv[1]); print('open', flush=True); sys.stdin.read()", path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        shared = JobStore(path, compact_over=1)  # another process has it open: never compacted under it
        assert not shared.compacted and data.stat().st_size == before
        shared.close()
    finally:
        holder.communicate("", timeout=30)
    alone = JobStore(path, compact_over=1 << 20)
    assert alone.compacted and data.stat().st_size < before / 4
    assert alone.get(keep.id).params == {"levels": "0"} and alone.client_usage("k")[0] == 1
    alone.admit(Job(new_job_id(), EXPORT, "S", {"levels": "1"}), None)
    alone.close()


def test_a_cancel_recorded_by_another_front_end_stops_the_job(tmp_path, sample_v2, monkeypatch):
    """Two front ends share the store; B takes the cancel of A's job: A's watcher sees it and stops it."""
    import tilecrate.jobs.runner as runner_mod

    monkeypatch.setattr(runner_mod, "export", _waiting_export())
    cache = open_cache(str(sample_v2))
    store = JobStore(str(tmp_path / "db"))
    services = {"S": JobService("S", cache)}
    a = JobRunner(store, services, str(tmp_path / "out"), workers=1, site_lock=False)
    b = JobRunner(store, services, str(tmp_path / "out"), workers=1, site_lock=False)
    try:
        job = a.submit(EXPORT, "S", {"levels": "0-1", "tilePackage": "true"})
        deadline = time.monotonic() + 10
        while store.get(job.id).status != EXECUTING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not b.is_running(job.id) and b.cancel(job.id).status == "esriJobCancelling"
        t0 = time.monotonic()
        done = _wait(a, job.id, timeout=5)
        assert done.status == "esriJobCancelled" and time.monotonic() - t0 < 1.5
    finally:
        a.close()
        b.close()
        store.close()
        cache.close()

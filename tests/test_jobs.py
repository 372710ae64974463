"""The job layer in-process: LMDB store, runner (real exports of a sample), recovery, expiry, config."""
from __future__ import annotations

import os
import re
import threading
import time

import pytest

from tilecrate.cache import open_cache
from tilecrate.errors import RequestError
from tilecrate.jobs import AdmissionRefused, Job, JobError, JobRunner, JobService, JobStore
from tilecrate.jobs.model import (
    CANCELLED, ESTIMATE, EXECUTING, EXPORT, FAILED, SUBMITTED, SUCCEEDED, esri_time, is_job_id, new_job_id,
)
from tilecrate.jobs.runner import RESTART_MESSAGE, tile_limit_message
from tilecrate.server.config import ConfigError, load_config


def test_job_ids_and_time_format():
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100 and all(re.fullmatch(r"j[0-9a-f]{32}_et", i) and is_job_id(i) for i in ids)
    assert not is_job_id("j" + "g" * 32 + "_et") and not is_job_id("../x")
    assert re.fullmatch(r"[A-Z][a-z]+day, [A-Z][a-z]+ \d{1,2}, \d{4} \d{1,2}:\d\d:\d\d [AP]M", esri_time(0))


def test_store_index_admission_expiry_and_reopen(tmp_path):
    store = JobStore(str(tmp_path / "db"))
    a, b = Job(new_job_id(), EXPORT, "S", {"levels": "0"}), Job(new_job_id(), ESTIMATE, "S", {"levels": "1"})
    store.admit(a, 2)
    store.admit(b, 2)
    with pytest.raises(AdmissionRefused) as e:
        store.admit(Job(new_job_id(), EXPORT, "S", {}), 2)
    assert "maximumOutstandingJobs is 2" in str(e.value)
    assert sorted(store.ids_by_status(SUBMITTED)) == sorted([a.id, b.id])
    store.update(a.id, lambda j: setattr(j, "status", SUCCEEDED))
    assert store.ids_by_status(SUBMITTED) == [b.id] and store.ids_by_status(SUCCEEDED) == [a.id]
    assert store.update(b.id, lambda j: False).status == SUBMITTED      # declined change: nothing written
    store.admit(Job(new_job_id(), EXPORT, "S", {}), 2)                  # a finished job frees its slot
    store.set_expiry(a.id, 100.0)
    store.set_expiry(b.id, 200.0)
    assert store.expired(150.0) == [a.id] and store.expired(250.0) == [a.id, b.id]
    store.close()
    again = JobStore(str(tmp_path / "db"))
    assert again.get(a.id).status == SUCCEEDED and again.get(a.id).params == {"levels": "0"}
    again.delete(a.id)
    assert again.get(a.id) is None and again.ids_by_status(SUCCEEDED) == [] and again.expired(150.0) == []
    assert again.get("j" + "0" * 32 + "_et") is None
    again.close()


def test_full_store_refuses_new_jobs_but_admitted_ones_can_still_finish(tmp_path):
    """A job store filled by submissions must still record the progress and end of the jobs it admitted."""
    from tilecrate.jobs.store import StoreError
    store = JobStore(str(tmp_path / "db"), map_size=1 << 20)
    admitted = []
    with pytest.raises(StoreError, match="full"):
        for _ in range(1000):
            job = Job(new_job_id(), EXPORT, "S", {"levels": "0", "areaOfInterest": "x" * 20000})
            store.admit(job, None)
            admitted.append(job.id)
    assert len(admitted) > 5

    def progress(j: Job) -> None:
        j.status = EXECUTING
        j.progress = {"type": "default", "message": "Exporting", "percent": 50}
        j.add_message("Exporting level 0: 1 tiles")

    def finish(j: Job) -> None:
        j.status, j.finished, j.progress = SUCCEEDED, time.time(), None
        j.add_message("Succeeded at ...")
    for job_id in admitted:           # none may be left executing for ever
        store.update(job_id, progress)
        store.update(job_id, finish, lambda j: j.finished + 60)
    assert sorted(store.ids_by_status(SUCCEEDED)) == sorted(admitted)
    assert sorted(store.expired(time.time() + 120)) == sorted(admitted)
    store.close()


@pytest.fixture
def runner(tmp_path, sample_v2):
    cache = open_cache(str(sample_v2))
    store = JobStore(str(tmp_path / "db"))
    r = JobRunner(store, {"S": JobService("S", cache, 50)}, str(tmp_path / "out"), workers=1, max_file_age=60)
    yield r
    r.close()
    store.close()
    cache.close()


def wait(runner: JobRunner, job_id: str, timeout: float = 20) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = runner.get(job_id)
        if job.status in (SUCCEEDED, FAILED, CANCELLED):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def test_runner_export_estimate_limit_and_expiry(runner):
    job = wait(runner, runner.submit(EXPORT, "S", {"levels": "0-2", "tilePackage": "true", "f": "json"}).id)
    assert job.status == SUCCEEDED, job.messages
    assert "f" not in job.params
    path = os.path.join(runner.job_dir(job), "S.tpk")       # no storageFormatType: ArcGIS's default, Compact
    assert os.path.getsize(path) == job.result["size"] and job.result["folder"] == f"S_MapServer/{job.id}"
    est = wait(runner, runner.submit(ESTIMATE, "S", {"levels": "0-2", "tilePackage": "true"}).id)
    assert est.result["value"]["totalSize"] == job.result["size"]
    over = wait(runner, runner.submit(EXPORT, "S", {"levels": "0-5", "tilePackage": "true"}).id)
    assert over.status == FAILED and over.messages[-2]["description"] == tile_limit_message(123, 50, "S")
    assert not os.path.exists(runner.job_dir(over))
    assert runner.cleanup(time.time()) == []
    removed = runner.cleanup(time.time() + 61)
    assert set(removed) == {job.id, est.id, over.id}, (removed, job.id, est.id, over.id, [(runner.get(i).status, runner.get(i).finished) if runner.get(i) else None for i in (job.id, est.id, over.id)], time.time())
    assert runner.get(job.id) is None and not os.path.exists(runner.job_dir(job))


def test_runner_rejects_bad_parameters_before_queueing(runner):
    from tilecrate.errors import RequestError
    with pytest.raises(RequestError):
        runner.submit(EXPORT, "S", {"levels": "zero"})
    with pytest.raises(JobError):
        runner.submit(EXPORT, "Nope", {"levels": "0"})
    assert runner.store.all_ids() == []


def test_cancel_queued_job_and_finished_job(runner):
    gate = threading.Event()
    runner._pool.submit(gate.wait, 10)                     # occupy the only worker
    queued = runner.submit(EXPORT, "S", {"levels": "0"})
    assert runner.cancel(queued.id).status == CANCELLED   # never started: cancelled at once
    gate.set()
    assert wait(runner, queued.id).status == CANCELLED
    with pytest.raises(JobError, match="already finished"):
        runner.cancel(queued.id)
    with pytest.raises(JobError, match="does not exist"):
        runner.cancel(new_job_id())


def test_recover_after_crash(tmp_path, sample_v2):
    store = JobStore(str(tmp_path / "db"))
    out = tmp_path / "out"
    running = Job(new_job_id(), EXPORT, "S", {"levels": "0"}, status=EXECUTING, started=time.time())
    queued = Job(new_job_id(), EXPORT, "S", {"levels": "0"})
    finished = Job(new_job_id(), EXPORT, "S", {"levels": "0"}, status=SUCCEEDED,
                   result={"folder": "x", "name": "S.tpkx"})
    for j in (running, queued, finished):
        store.put(j)
        (out / "S_MapServer" / j.id).mkdir(parents=True)
    (out / "S_MapServer" / running.id / ".S.tpkx.tmp-1-abc").write_bytes(b"partial")
    (out / "S_MapServer" / finished.id / "S.tpkx").write_bytes(b"package")
    stray = out / "S_MapServer" / new_job_id()
    stray.mkdir()
    os.utime(stray, (time.time() - 120, time.time() - 120))
    fresh = out / "S_MapServer" / new_job_id()  # may be a job another front end is admitting now
    fresh.mkdir()
    with open_cache(str(sample_v2)) as cache:
        r = JobRunner(store, {"S": JobService("S", cache)}, str(out), workers=1)
        assert sorted(r.recover()) == sorted([running.id, queued.id])
        for j in (running, queued):
            got = store.get(j.id)
            assert got.status == FAILED and got.messages[0]["description"] == RESTART_MESSAGE
            assert not (out / "S_MapServer" / j.id).exists()
        assert store.get(finished.id).status == SUCCEEDED
        assert (out / "S_MapServer" / finished.id / "S.tpkx").read_bytes() == b"package"
        assert not stray.exists() and fresh.exists()
        r.close()
    store.close()


def test_config_file(tmp_path, sample_v2):
    (tmp_path / "a.toml").write_text(f"""
[server]
port = 8123
dataDir = "state"
maxFileAge = 30
maximumOutstandingJobs = 3
token = "t"

[services.World]
source = "{sample_v2}"
exportTilesAllowed = false
maxExportTilesCount = 7
""")
    cfg = load_config(str(tmp_path / "a.toml"))
    assert (cfg.port, cfg.max_file_age, cfg.maximum_outstanding_jobs, cfg.token) == (8123, 30.0, 3, "t")
    assert cfg.data_dir == str(tmp_path / "state")
    svc = cfg.services["World"]
    assert (svc.export_tiles_allowed, svc.max_export_tiles_count, svc.source) == (False, 7, str(sample_v2))
    bad = {
        "[services.W]\nsource = 1\n": "must be str",
        "[services.W]\nexport_tiles_allowed = true\n": "source",
        "[services.W]\nsource = 'x'\ncolour = 'red'\n": "unknown setting",
        "[server]\nport = 70000\n[services.W]\nsource = 'x'\n": "not a TCP port",
        "[services.'a b']\nsource = 'x'\n": "service name",
        "[server\n": "not valid TOML",
        "[server]\n": "no services",
    }
    for text, words in bad.items():
        (tmp_path / "b.toml").write_text(text)
        with pytest.raises(ConfigError, match=words):
            load_config(str(tmp_path / "b.toml"))


def test_cancel_stops_a_running_estimate_promptly(runner, monkeypatch):
    """estimateExportTilesSize reads every selected bundle index: a cancel must stop it within about a second."""
    import tilecrate.selection as selection
    real = selection.select_level
    started = threading.Event()

    def slow_level(*a, **kw):              # a level of a big cache: one second of index reads
        started.set()
        time.sleep(1.0)
        return real(*a, **kw)
    monkeypatch.setattr(selection, "select_level", slow_level)
    job = runner.submit(ESTIMATE, "S", {"levels": "0-5", "tilePackage": "true"})
    assert started.wait(10)
    t0 = time.monotonic()
    runner.cancel(job.id)
    done = wait(runner, job.id)
    assert done.status == CANCELLED, done.messages
    assert time.monotonic() - t0 < 2.0     # the level being read, not all six


def test_many_long_level_ranges_fail_fast(runner):
    """A GET can carry thousands of long level ranges off the scheme: refused at submit at once, no job stored."""
    levels = ",".join(f"{24 + i % 7}-{9000 + i % 900}" for i in range(20000))   # ~200 KB of ranges
    t0 = time.monotonic()
    with pytest.raises(RequestError) as e:
        runner.submit(ESTIMATE, "S", {"levels": levels})
    assert time.monotonic() - t0 < 3
    error = str(e.value)
    assert error.startswith("level 24-9000, 25-9001,") and "not in the cache's tiling scheme" in error
    assert len(error) < len(levels)                           # each distinct range named once
    assert runner.store.all_ids() == []


def test_jobs_kept_for_ever_do_not_stop_others_expiring(tmp_path, sample_v2):
    """max_file_age = inf keeps outputs; once the server runs with a finite age again, other jobs still expire."""
    store = JobStore(str(tmp_path / "db"))
    with open_cache(str(sample_v2)) as cache:
        services = {"S": JobService("S", cache, 50)}
        forever = JobRunner(store, services, str(tmp_path / "out"), workers=1, max_file_age=float("inf"))
        kept = wait(forever, forever.submit(ESTIMATE, "S", {"levels": "0"}).id)
        forever.close()
        finite = JobRunner(store, services, str(tmp_path / "out"), workers=1, max_file_age=60)
        gone = wait(finite, finite.submit(ESTIMATE, "S", {"levels": "0"}).id)
        assert finite.cleanup(time.time() + 120) == [gone.id]
        assert store.get(kept.id).status == SUCCEEDED and store.get(gone.id) is None
        finite.close()
    store.close()
    with pytest.raises(ConfigError, match="max_file_age"):
        from tilecrate.server.config import ServerConfig, validate
        validate(ServerConfig(max_file_age=float("nan")))


def test_cleanup_of_many_expired_jobs_is_not_quadratic(runner):
    """Tens of thousands of finished estimates (a busy hour) expire in one quick pass."""
    from tilecrate.jobs.store import _expiry_key
    store, n, done = runner.store, 20000, time.time() - 100
    with store._begin_write() as txn:          # filled in one transaction: fsync per job would be slow
        for i in range(n):
            job = Job(new_job_id(), ESTIMATE, "S", {"levels": "0"}, status=SUCCEEDED, finished=done + i * 1e-3)
            store._write(txn, job, None)
            txn.put(_expiry_key(job.finished + 60, job.id), b"", db=store._expiry)
    keep = Job(new_job_id(), ESTIMATE, "S", {"levels": "0"}, status=SUCCEEDED, finished=time.time())
    store.put(keep)
    store.set_expiry(keep.id, keep.finished + 60)
    t0 = time.monotonic()
    assert len(runner.cleanup(done + 61 + n * 1e-3)) == n
    assert time.monotonic() - t0 < 8
    assert store.all_ids() == [keep.id] and store.expired(keep.finished + 61) == [keep.id]


def test_output_is_on_disk_before_the_job_is_recorded_succeeded(runner, monkeypatch):
    """The store is durable (LMDB, synced): a machine crash must not leave a succeeded job with a torn package."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    seen = {}
    real_finish = runner._finish

    def finish(job_id, status, *a, **kw):
        seen[status] = list(synced)
        return real_finish(job_id, status, *a, **kw)
    monkeypatch.setattr(runner, "_finish", finish)
    job = wait(runner, runner.submit(EXPORT, "S", {"levels": "0-1", "tilePackage": "true"}).id)
    assert job.status == SUCCEEDED, job.messages
    package = os.path.join(runner.job_dir(job), "S.tpk")
    assert package in seen[SUCCEEDED] and runner.job_dir(job) in seen[SUCCEEDED]   # the file and its name
    folder = wait(runner, runner.submit(EXPORT, "S", {"levels": "0-1", "tilePackage": "false"}).id)
    assert folder.status == SUCCEEDED, folder.messages
    files = [os.path.join(d, f) for d, _, fs in os.walk(runner.job_dir(folder)) for f in fs]
    assert files and set(files) <= set(seen[SUCCEEDED])


def test_close_waits_for_a_cleanup_pass_in_progress(runner, monkeypatch):
    """The server closes the store right after runner.close(): no cleanup pass may still be using it."""
    real = runner.store.expired
    entered = threading.Event()

    def slow_expired(now):
        entered.set()
        time.sleep(0.5)
        return real(now)
    monkeypatch.setattr(runner.store, "expired", slow_expired)
    finished = []
    t = threading.Thread(target=lambda: (runner.cleanup(), finished.append(time.monotonic())))
    t.start()
    assert entered.wait(5)
    runner.close()
    closed = time.monotonic()
    t.join(5)
    assert finished and finished[0] <= closed
    assert runner.cleanup() == []                 # and none starts once closed


def test_maximum_outstanding_jobs_minus_one_is_unlimited_and_zero_refuses_every_job(tmp_path, sample_v2):
    """The seed's values for CachingControllers' maximumOutstandingJobs hold in the TOML too."""
    def cfg(value: int):
        (tmp_path / "m.toml").write_text(f'[server]\nmaximumOutstandingJobs = {value}\n'
                                          f'[services.W]\nsource = "{sample_v2}"\n')
        return load_config(str(tmp_path / "m.toml"))

    assert cfg(-1).maximum_outstanding_jobs is None and cfg(0).maximum_outstanding_jobs == 0
    with pytest.raises(ConfigError, match="-1 \\(unlimited"):
        cfg(-2)
    cache = open_cache(str(sample_v2))
    store = JobStore(str(tmp_path / "db"))
    try:
        refuse_all = JobRunner(store, {"S": JobService("S", cache, 50)}, str(tmp_path / "out"), workers=1,
                               max_outstanding=cfg(0).maximum_outstanding_jobs)
        with pytest.raises(AdmissionRefused, match="maximumOutstandingJobs is 0"):
            refuse_all.submit(EXPORT, "S", {"levels": "0"})
        refuse_all.close()
    finally:
        store.close()
        cache.close()

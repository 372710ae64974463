"""JobRunner: runs exportTiles / estimateExportTilesSize jobs on a thread pool, records them in LMDB.

Life of a job: admitted (esriJobSubmitted, refused when maximumOutstandingJobs is reached) ->
a worker picks it up (esriJobExecuting, messages and a throttled progress figure) -> selection,
tile limit, export() or estimate() -> esriJobSucceeded with its output folder, or esriJobFailed
with the error in its messages. Cancel sets a threading.Event that select() and export() check
per bundle (esriJobCancelling -> esriJobCancelled, partial output removed). Finished jobs expire
after max_file_age together with their output. On start, jobs left submitted or executing by a
crash are marked failed and their partial output removed.

A job's end is always recorded: it is an `essential` store write (on a full disk the store gives
up its space reserve for it); if even that fails, the end is kept in memory and the periodic
sweep writes it, and the sweep also fails jobs whose driving process is gone. Budgets: a job
running longer than `job_seconds` is stopped through its cancel event and failed; memory is
watched by sampling the process's resident size (threads share one heap, so a job's own use is
not measurable: a job is failed when the growth since it started exceeds its budget times the
number of jobs running, i.e. when the jobs together pass their budgets and this one took part).
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

from tilecrate.cache import Cache
from tilecrate.estimate import estimate_selection
from tilecrate.geometry import GeometryLimits
from tilecrate.export import export
from tilecrate.errors import Cancelled, TilecrateError
from tilecrate.jobs.model import (
    CANCELLED, CANCELLING, ERROR, ESTIMATE, EXECUTING, EXPORT, FAILED, OUTSTANDING, SUBMITTED,
    SUCCEEDED, TERMINAL, WARNING, Job, esri_time, new_job_id,
)
from tilecrate.jobs.store import JobStore, Quota, StoreError
from tilecrate.package.vtpk import is_vector_source
from tilecrate.request import COMPACT_V2, ExportRequest
from tilecrate.runners.base import fsync_tree
from tilecrate.errors import RequestError
from tilecrate.selection import select
from tilecrate.selection import validate_request as _validate_selection

log = logging.getLogger("tilecrate.jobs")

RESTART_MESSAGE = "The server stopped while this job was running; submit it again."
LOST_MESSAGE = "The server lost track of this job (its worker stopped); submit it again."
_PROGRESS_INTERVAL = 0.5  # seconds between progress writes (status is read far more often than this)
_MEMORY_POLL = 0.2  # seconds between resident-size samples while jobs run
_CLEANUP_BATCH = 1000  # expired jobs removed per store transaction


@dataclass(frozen=True)
class Budget:
    """What one job may use: stored parameter bytes, wall-clock seconds, memory (None: no limit)."""

    max_input_bytes: int | None = 256 << 10
    seconds: float | None = 3600.0
    memory_bytes: int | None = 1 << 30
    geometry: GeometryLimits | None = None  # what an area may cost (None: the geometry module's defaults)


# the service types whose jobs write arcgisoutput folders `<service>_<type>`, as ArcGIS names them
# (`World_MapServer`; image services' outputs are under `<service>_ImageServer` on ArcGIS too)
SERVICE_KINDS = ("MapServer", "VectorTileServer", "ImageServer")


@dataclass
class JobService:
    """What the runner needs to know about a service."""

    name: str
    cache: Cache
    max_export_tiles_count: int = 100000
    kind: str = "MapServer"  # one of SERVICE_KINDS: names the output folder and the tile-limit message

    def __post_init__(self) -> None:
        if self.kind not in SERVICE_KINDS:
            raise ValueError(f"service {self.name}: unknown service type {self.kind!r}; one of {SERVICE_KINDS}")

    @property
    def folder(self) -> str:
        """The arcgisoutput folder of this service's jobs."""
        return service_folder(self.name, self.kind)


def service_folder(service: str, kind: str) -> str:
    """`<service>_<type>`: the arcgisoutput folder of a service's jobs."""
    return f"{service}_{kind}"


def service_of_folder(name: str) -> tuple[str, str] | None:
    """(service, type) an arcgisoutput folder name stands for, or None when it ends in no known type."""
    for kind in SERVICE_KINDS:
        suffix = "_" + kind
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], kind
    return None


class JobError(TilecrateError):
    """A job operation is not possible (unknown job, cancel of a finished job)."""


def tile_limit_message(count: int, limit: int, service: str, kind: str = "MapServer") -> str:
    """ArcGIS's exact tile-limit failure text (FORMATS.md §1.5), with the service's own type."""
    return (f"ERROR 001564: Requested tile count({count}) exceeds the maximum allowed number of "
            f"tiles({limit}) to be exported for service {service}:{kind}.")


def _elapsed(job: Job) -> str:
    return f"(Elapsed Time: {max(0.0, (job.finished or time.time()) - (job.started or job.submitted)):.2f} seconds)"


class JobRunner:
    """Admits, runs, cancels, expires and recovers jobs."""

    def __init__(self, store: JobStore, services: Mapping[str, JobService], output_root: str, *,
                 workers: int = 2, max_outstanding: int | None = None, max_file_age: float = 600.0,
                 export_threads: int | None = None, quota: Quota | None = None, budget: Budget | None = None,
                 scheduler=None, local_temp_folder: bool = False, site_lock: bool = True):
        self.store = store
        self.scheduler = scheduler  # None: exports run here; else a tilecrate.runners.dask.DaskRunner
        self.local_temp_folder = local_temp_folder
        self.quota = quota
        self.budget = budget or Budget()
        self.driver = _process_identity(os.getpid())
        self._unrecorded: dict[str, tuple] = {}  # job id -> _finish arguments the store refused
        self._timed_out: set[str] = set()
        self._running_rss: dict[str, int] = {}  # job id -> resident bytes when it started
        self._over_memory: set[str] = set()
        self._watcher: threading.Thread | None = None
        self.services = dict(services)
        self.output_root = os.path.abspath(output_root)
        self.max_outstanding = max_outstanding
        self.max_file_age = float(max_file_age)
        self.export_threads = export_threads
        self._events: dict[str, threading.Event] = {}
        self._events_lock = threading.Lock()
        self._stopping = False
        self._closed = False
        self._cleanup_lock = threading.Lock()  # close() waits for a cleanup pass in progress
        os.makedirs(self.output_root, exist_ok=True)
        # one server per data dir; front-end processes of one server share it (their parent holds the lock)
        self._lock = site_lock_file(self.output_root) if site_lock else None
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tilecrate-job")

    # paths -----------------------------------------------------------------------------------

    def job_dir(self, job: Job) -> str:
        """`<output root>/<service>_<type>/<jobId>`: a finished job's stored folder, else the one its
        service's type names now (jobs stored before the type was in the name keep `_MapServer`)."""
        return os.path.join(self.output_root, *self.job_folder(job).split("/"))

    def job_folder(self, job: Job) -> str:
        """The job's folder relative to the arcgisoutput root (URL path form)."""
        stored = (job.result or {}).get("folder")
        if isinstance(stored, str) and _is_job_folder(stored, job.id):
            return stored  # read, never recomputed: the service's type may have changed since
        svc = self.services.get(job.service)
        return f"{service_folder(job.service, svc.kind if svc is not None else 'MapServer')}/{job.id}"

    # start and stop --------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """After a crash: fail jobs left outstanding, remove their partial output and stray folders."""
        failed = self._fail_orphans(lambda job: True)
        known = set(self.store.all_ids())
        young = time.time() - 60  # a folder this new may be a job another front end is just admitting
        for svc_dir in self._service_dirs():
            for name in os.listdir(svc_dir):
                path = os.path.join(svc_dir, name)
                if name not in known and not _newer_than(path, young):
                    shutil.rmtree(path, ignore_errors=True)
        if failed:
            log.warning("marked %d interrupted job(s) failed: %s", len(failed), ", ".join(failed))
        return failed

    def _fail_orphans(self, orphaned: Callable[[Job], bool],
                      message: Callable[[Job], str] = lambda job: RESTART_MESSAGE) -> list[str]:
        """Fail outstanding jobs that no live process drives (and that `orphaned` accepts), each
        with `message(job)`: a job whose front-end process stopped gets the restart message."""
        now = time.time()
        failed = []
        outstanding = self.store.ids_by_status(*OUTSTANDING)
        with self._events_lock:  # after the read: a job is registered before it is stored
            mine = set(self._events)
        for job_id in outstanding:
            if job_id in mine:
                continue

            def mark(job: Job) -> bool | None:
                if job.status not in OUTSTANDING or not orphaned(job):
                    return False
                if job.driver and job.driver != self.driver and _process_alive(job.driver):
                    return False  # another front end's job, and that process is running
                job.status = FAILED
                job.finished = now
                job.progress = None
                job.add_message(message(job), ERROR)
                job.add_message(f"Failed at {esri_time(now)} {_elapsed(job)}")
                return None
            try:
                job = self.store.update(job_id, mark, self._expiry, essential=True)
            except StoreError as e:  # the next sweep (or start) tries again
                log.error("job %s: cannot record it failed: %s", job_id, e)
                continue
            if job is None or job.status != FAILED or job.finished != now:
                continue
            self._remove_output(job)
            failed.append(job_id)
        return failed

    def sweep(self) -> list[str]:
        """Periodic repair: restore the disk reserve, record job ends the store refused, fail jobs
        whose driving process is gone (or that this process no longer runs). Returns the ids failed."""
        with self._cleanup_lock:  # like cleanup: never on a closed store
            return [] if self._closed else self._sweep()

    def _sweep(self) -> list[str]:
        self.store.restore_reserve()
        self.store.clear_stale_readers()  # a killed process's read transaction must not pin the file
        for job_id, args in list(self._unrecorded.items()):
            try:
                self._write_end(job_id, *args)
            except StoreError:
                continue
            self._unrecorded.pop(job_id, None)
        pending = set(self._unrecorded)
        orphans = self._fail_orphans(
            lambda job: job.id not in pending and (job.driver == self.driver or not job.driver
                                                  or not _process_alive(job.driver)),
            lambda job: (LOST_MESSAGE if job.driver == self.driver else RESTART_MESSAGE))
        if orphans:
            log.warning("failed %d job(s) nobody was running: %s", len(orphans), ", ".join(orphans))
        return orphans

    def _service_dirs(self) -> list[str]:
        out = []
        for name in os.listdir(self.output_root):
            path = os.path.join(self.output_root, name)
            if service_of_folder(name) is not None and os.path.isdir(path) and not os.path.islink(path):
                out.append(path)
        return out

    def close(self) -> None:
        """Stop: running jobs are cancelled and recorded as failed (the restart message)."""
        self._stopping = True
        with self._events_lock:
            for ev in self._events.values():
                ev.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._events_lock:
            self._events.clear()  # queued jobs that never ran: recover() below fails them
        with self._cleanup_lock:  # the store is closed after this returns: no pass may be running
            self._closed = True
        for job_id, args in list(self._unrecorded.items()):  # ends known but not yet written: last try
            try:
                self._write_end(job_id, *args)
                self._unrecorded.pop(job_id, None)
            except StoreError as e:
                log.error("job %s: its end could not be recorded before stopping: %s", job_id, e)
        self.recover()  # anything still queued
        if self._lock is not None:
            self._lock.close()

    # operations ------------------------------------------------------------------------------

    def submit(self, kind: str, service: str, params: Mapping[str, str], client: str = "") -> Job:
        """Validate, admit (AdmissionRefused, QuotaExceeded, StoreError when full) and queue a job.

        The whole request is checked first (parameters, levels against the cache, the area), so a
        request that would fail gets a RequestError now rather than a failed job. `client` (an
        address or a user name) is what the per-client quotas count by.
        """
        if kind not in (EXPORT, ESTIMATE):
            raise JobError(f"unknown job kind {kind!r}")
        svc = self.services.get(service)
        if svc is None:
            raise JobError(f"service {service!r} does not exist")
        clean = {str(k): str(v) for k, v in params.items()
                 if str(k).lower() not in ("f", "token") and v is not None}
        job = Job(new_job_id(), kind, service, clean, client=client, driver=self.driver)
        limit = self.budget.max_input_bytes
        if limit is not None and len(job.params_bytes()) > limit:
            raise RequestError(f"the request's parameters take {len(job.params_bytes())} bytes; this server "
                               f"accepts at most {limit} bytes per job (simplify the area of interest)")
        validate_request(svc.cache, clean, self.budget.geometry)
        with self._events_lock:  # before the job is stored: the sweep must never take it for an orphan
            self._events[job.id] = threading.Event()
        try:
            self.store.admit(job, self.max_outstanding, self.quota)
        except BaseException:
            with self._events_lock:
                self._events.pop(job.id, None)
            raise
        try:
            self._pool.submit(self._run, job.id)
        except RuntimeError:  # the pool is shutting down
            self._finish(job.id, FAILED, RESTART_MESSAGE)
        return job

    def get(self, job_id: str, *, inputs: bool = True) -> Job | None:
        """The stored job (with its parameters unless inputs=False), or None."""
        job = self.store.get(job_id, inputs=inputs)
        pending = self._unrecorded.get(job_id)
        if job is not None and pending is not None and job.status not in TERMINAL:
            job.status = pending[0]  # the end the store could not take yet; the sweep writes it
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop: esriJobCancelling now, esriJobCancelled once the work has stopped."""
        finished_before: list[bool] = []

        def ask(job: Job) -> bool | None:
            if job.status in TERMINAL or job.status == CANCELLING:
                finished_before.append(job.status in TERMINAL)
                return False
            now = time.time()
            if job.status == SUBMITTED:  # never started: nothing to stop, so cancelled at once
                job.status = CANCELLED
                job.finished = now
                job.add_message(f"Cancelled at {esri_time(now)} (the job had not started)")
            else:
                job.status = CANCELLING
                job.add_message(f"Cancel requested at {esri_time(now)}")
            return None
        job = self.store.update(job_id, ask, self._expiry)
        if job is None:
            raise JobError(f"Job '{job_id}' does not exist or is inaccessible.")
        if finished_before and finished_before[0]:
            raise JobError(f"Job '{job_id}' has already finished ({job.status}); it cannot be cancelled.")
        with self._events_lock:
            ev = self._events.get(job_id)
        if ev is not None:
            ev.set()
        return job

    def cleanup(self, now: float | None = None) -> list[str]:
        """Remove finished jobs whose maxFileAge has passed, with their output (nothing once closed)."""
        with self._cleanup_lock:
            return [] if self._closed else self._cleanup(time.time() if now is None else now)

    def has_pending_end(self, job_id: str) -> bool:
        """Whether this job's end is known but not yet in the store (a full disk; the sweep writes it)."""
        return job_id in self._unrecorded

    def is_running(self, job_id: str) -> bool:
        """Whether this process holds the job (queued or running)."""
        with self._events_lock:
            return job_id in self._events

    def _cleanup(self, now: float) -> list[str]:
        removed: list[str] = []
        batch: list[str] = []
        for job_id in self.store.expired(now):
            job = self.store.get(job_id)
            if job is not None and job.status not in TERMINAL:
                continue
            if job is not None:
                self._remove_output(job)
            batch.append(job_id)
            if len(batch) >= _CLEANUP_BATCH:
                self.store.delete(*batch)
                removed += batch
                batch = []
        self.store.delete(*batch)
        return removed + batch

    # the work --------------------------------------------------------------------------------

    def _run(self, job_id: str) -> None:
        with self._events_lock:
            cancel = self._events.setdefault(job_id, threading.Event())
        timer = None
        if self.budget.seconds is not None:
            timer = threading.Timer(self.budget.seconds, self._out_of_time, (job_id, cancel))
            timer.daemon = True
            timer.start()
        try:
            self._run_job(job_id, cancel)
        except StoreError as e:  # e.g. a full disk under the store: the end still lands (reserve, sweep)
            log.error("job %s: %s", job_id, e)
            self._finish(job_id, FAILED, f"ERROR: the server could not record this job's progress, its disk may "
                                         f"be full ({e}).")
        except BaseException:  # never lose a job to a bug: record it, then log the traceback
            log.exception("job %s failed unexpectedly", job_id)
            self._finish(job_id, FAILED, "ERROR 999999: Something unexpected caused the tool to fail. "
                                         "The server log has the details.")
        finally:
            if timer is not None:
                timer.cancel()
            with self._events_lock:
                self._events.pop(job_id, None)
                self._running_rss.pop(job_id, None)
                self._timed_out.discard(job_id)
                self._over_memory.discard(job_id)

    def _out_of_time(self, job_id: str, cancel: threading.Event) -> None:
        with self._events_lock:
            self._timed_out.add(job_id)
        cancel.set()

    def _budget_message(self, job_id: str) -> str | None:
        """Why a cancelled job was really stopped: its time or memory budget, or None."""
        with self._events_lock:
            if job_id in self._timed_out:
                return (f"ERROR: the job ran longer than this server allows ({self.budget.seconds:g} seconds, "
                        f"[limits] job_seconds); export fewer levels or a smaller area.")
            if job_id in self._over_memory:
                return (f"ERROR: the job used more memory than this server allows "
                        f"({(self.budget.memory_bytes or 0) >> 20} MB, [limits] job_memory_mb); "
                        f"export fewer levels or a smaller or simpler area.")
        return None

    def _watch_start(self, job_id: str) -> None:
        with self._events_lock:
            self._running_rss[job_id] = _rss()
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, name="tilecrate-watch", daemon=True)
                self._watcher.start()

    def _watch(self) -> None:
        """While jobs run: pass on cancels another front-end process recorded in the store, and sample
        the resident size to stop jobs past their memory share (see the module doc)."""
        limit = self.budget.memory_bytes
        while not self._stopping:
            with self._events_lock:
                running = dict(self._running_rss)
            if not running:
                with self._events_lock:
                    if not self._running_rss:
                        self._watcher = None
                        return
                time.sleep(_MEMORY_POLL)
                continue
            for job_id in running:
                found = self.store.public(job_id)
                if found is not None and b'"jobStatus":"esriJobCancelling"' in found[2]:
                    with self._events_lock:
                        ev = self._events.get(job_id)
                    if ev is not None:
                        ev.set()
            rss = _rss() if limit is not None else 0
            for job_id, start in running.items():
                if limit is not None and rss - start > limit * len(running):
                    with self._events_lock:
                        self._over_memory.add(job_id)
                        ev = self._events.get(job_id)
                    if ev is not None:
                        ev.set()
            time.sleep(_MEMORY_POLL)

    def _run_job(self, job_id: str, cancel: threading.Event) -> None:
        start = time.time()

        def begin(job: Job) -> bool | None:
            if job.status != SUBMITTED:
                return False
            job.status = EXECUTING
            job.started = start
            job.driver = self.driver
            job.add_message(f"Start Time: {esri_time(start)}")
            job.progress = {"type": "default", "message": "Selecting tiles", "percent": 0}
            return None
        job = self.store.update(job_id, begin)
        if job is None:
            return
        if job.status == CANCELLING or cancel.is_set():
            self._finish(job_id, CANCELLED, None)
            return
        if job.status != EXECUTING:
            return
        svc = self.services.get(job.service)
        self._watch_start(job_id)
        try:
            if svc is None:
                raise JobError(f"the service {job.service} is no longer configured on this server")
            params = self.store.inputs(job_id)
            if params is None:
                raise JobError("the job's parameters are missing from the job store")
            request = ExportRequest.from_params(params)
            if job.kind == ESTIMATE:
                self._estimate(job, svc, request, cancel)
            else:
                self._export(job, svc, request, cancel)
        except Cancelled:
            self._remove_output(job)
            over = self._budget_message(job_id)
            if over is not None:
                self._finish(job_id, FAILED, over)
            elif self._stopping:
                self._finish(job_id, FAILED, RESTART_MESSAGE)
            else:
                self._finish(job_id, CANCELLED, None)
        except TilecrateError as e:
            self._remove_output(job)
            text = self._scrub(str(e), svc)
            self._finish(job_id, FAILED, text if text.startswith("ERROR ") else f"ERROR: {text}")
        except MemoryError:
            self._remove_output(job)
            self._finish(job_id, FAILED, "ERROR 999998: the server ran out of memory running this job.")
        except RecursionError:
            self._remove_output(job)
            self._finish(job_id, FAILED, "ERROR: a parameter is nested too deeply to be read.")
        except OSError as e:  # e.g. a full disk under the output: say so, without server paths
            self._remove_output(job)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
                raise
            log.error("job %s: %s", job_id, e)
            self._finish(job_id, FAILED, f"ERROR: the output could not be written: {e.strerror or e}. "
                                         f"The server's disk may be full; try again later.")
        except Exception:
            self._remove_output(job)
            raise

    def _estimate(self, job: Job, svc: JobService, request: ExportRequest, cancel: threading.Event) -> None:
        selection = select(svc.cache, request, cancel=cancel, limits=self.budget.geometry)  # cancel per bundle
        if cancel.is_set():
            raise Cancelled("cancelled")
        est = estimate_selection(svc.cache, selection, request)
        if cancel.is_set():  # a cancel that came after the selection
            raise Cancelled("cancelled")
        value = {"totalSize": int(est.total_size), "totalTilesToExport": int(est.total_tiles)}
        notes = [f"Level {lv}: {v.get('tiles', 0)} tiles, {v.get('size', 0)} bytes" for lv, v in sorted(est.levels.items())]
        if est.total_tiles > svc.max_export_tiles_count:
            notes.append(f"{est.total_tiles} tiles exceed this service's maxExportTilesCount "
                         f"({svc.max_export_tiles_count}); an export of this request would fail.")
        self._finish(job.id, SUCCEEDED, None, result={"value": value}, notes=notes)

    def _export(self, job: Job, svc: JobService, request: ExportRequest, cancel: threading.Event) -> None:
        selection = select(svc.cache, request, cancel=cancel, limits=self.budget.geometry)
        if cancel.is_set():
            raise Cancelled("cancelled")
        if selection.tiles > svc.max_export_tiles_count:
            raise JobError(tile_limit_message(selection.tiles, svc.max_export_tiles_count, svc.name, svc.kind))
        per_level = {ls.level: ls.tiles for ls in selection.levels}
        self._note(job.id, f"Exporting {selection.tiles} tiles from {len(per_level)} level(s) "
                           f"({', '.join(str(lv) for lv in per_level)})")
        # ExportRequest.from_params made a package without storageFormatType Compact; a cache
        # folder without one keeps the source's format (as estimate() assumes)
        fmt = request.storage_format or svc.cache.storage_format
        out_dir = self.job_dir(job)
        os.makedirs(out_dir, exist_ok=True)
        if is_vector_source(svc.cache):  # a .vtpk whatever tilePackage says, as ArcGIS (FORMATS.md §12)
            target = os.path.join(out_dir, svc.name + ".vtpk")
        elif request.tile_package:
            target = os.path.join(out_dir, svc.name + (".tpkx" if fmt == COMPACT_V2 else ".tpk"))
        else:
            target = os.path.join(out_dir, svc.name)
        reporter = _ProgressWriter(self, job.id, per_level)
        extra = {}
        if self.scheduler is not None:
            extra = {"scheduler": self.scheduler, "local_temp_folder": self.local_temp_folder}
            self._note(job.id, f"Running on the Dask cluster at {self.scheduler.address}"
                               + (" (in one worker's local temp folder)" if self.local_temp_folder else ""))
        result = export(svc.cache, request, target, progress=reporter, cancel=cancel,
                        threads=self.export_threads, selection=selection, **extra)
        reporter.flush()
        fsync_tree(result.path, out_dir)  # the store is synced: "succeeded" must never outlive the data
        if cancel.is_set():
            raise Cancelled("cancelled")
        notes = [f"Level {lv}: {v.get('tiles', 0)} tiles, {v.get('size', 0)} bytes"
                 for lv, v in sorted(result.levels.items())]
        warnings = list(result.warnings)
        name = os.path.basename(result.path.rstrip(os.sep))
        notes.append(f"Wrote {name}: {result.tiles} tiles, {result.size} bytes"
                     + (f", compression quality {result.quality_used}" if result.quality_used is not None else ""))
        self._finish(job.id, SUCCEEDED, None, notes=notes, warnings=warnings,
                     result={"folder": self.job_folder(job), "name": name, "tiles": result.tiles,
                             "size": result.size, "package": bool(request.tile_package)})

    # recording -------------------------------------------------------------------------------

    def _note(self, job_id: str, text: str, kind: str | None = None) -> None:
        try:
            self.store.update(job_id, lambda j: j.add_message(text, kind) if kind else j.add_message(text))
        except StoreError as e:  # a message is not worth failing the job for; its end is recorded apart
            log.warning("job %s: message not recorded: %s", job_id, e)

    def _finish(self, job_id: str, status: str, error: str | None, *, result: dict | None = None,
                notes: list[str] = (), warnings: list[str] = ()) -> None:
        """Record a job's end; when the store refuses even with its reserve, keep it for the sweep."""
        args = (status, error, result, tuple(notes), tuple(warnings), time.time())
        try:
            self._write_end(job_id, *args)
        except StoreError as e:
            log.error("job %s: its end (%s) could not be recorded yet: %s", job_id, status, e)
            self._unrecorded[job_id] = args

    def _write_end(self, job_id: str, status: str, error: str | None, result: dict | None,
                   notes: tuple, warnings: tuple, now: float) -> None:

        def done(job: Job) -> None:
            for text in notes:
                job.add_message(text)
            for text in warnings:
                job.add_message(text, WARNING)
            if error:
                job.add_message(error, ERROR)
            job.status = status
            job.finished = now
            job.progress = None
            job.result = result
            word = {SUCCEEDED: "Succeeded", FAILED: "Failed", CANCELLED: "Cancelled"}[status]
            job.add_message(f"{word} at {esri_time(now)} {_elapsed(job)}")
        self.store.update(job_id, done, self._expiry, essential=True)

    def _expiry(self, job: Job) -> float | None:
        """When a finished job and its output go: maxFileAge after it finished (never for an infinite age)."""
        if job.status not in TERMINAL or not job.finished or not math.isfinite(self.max_file_age):
            return None
        return job.finished + self.max_file_age

    def _scrub(self, text: str, svc: JobService | None) -> str:
        """Messages are shown to clients: name the service and the output folder, not server paths."""
        if svc is not None and svc.cache.path:
            text = text.replace(svc.cache.path, f"<{svc.name} cache>")
        return text.replace(self.output_root, "arcgisoutput")

    def _remove_output(self, job: Job) -> None:
        # its stored folder, and its id under every type: a job whose service changed type (or is
        # gone) since it was written must not leave its output behind
        paths = {self.job_dir(job)}
        paths.update(os.path.join(self.output_root, service_folder(job.service, k), job.id) for k in SERVICE_KINDS)
        for path in paths:
            if os.path.commonpath([path, self.output_root]) == self.output_root and path != self.output_root:
                shutil.rmtree(path, ignore_errors=True)


def validate_request(cache: Cache, params: Mapping[str, str],
                     limits: GeometryLimits | None = None) -> ExportRequest:
    """The whole request checked against a cache (parameters, levels, area): RequestError if it would fail."""
    try:
        request = ExportRequest.from_params(params)
        _validate_selection(cache, request, limits)
    except RecursionError:
        raise RequestError("a parameter is nested too deeply to be read") from None
    return request


def _is_job_folder(folder: str, job_id: str) -> bool:
    """Whether a stored result folder is `<service folder>/<this job's id>` (nothing else is trusted)."""
    parts = folder.split("/")
    return (len(parts) == 2 and parts[1] == job_id and service_of_folder(parts[0]) is not None
            and not parts[0].startswith(".") and "\\" not in parts[0] and "\0" not in parts[0])


def _rss() -> int:
    """Resident bytes of this process (/proc/self/statm)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _process_identity(pid: int) -> str:
    """pid:start-time, so that a pid reused by another process is not taken for the same one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return f"{pid}:{stat[stat.rindex(b')') + 2:].split()[19].decode()}"
    except (OSError, IndexError, ValueError):
        return str(pid)


def _process_alive(driver: str) -> bool:
    """Whether the process a driver identity names is still running."""
    try:
        pid = int(driver.split(":")[0])
    except ValueError:
        return False
    if pid <= 0:
        return False
    return _process_identity(pid) == driver if ":" in driver else os.path.exists(f"/proc/{pid}")


def _newer_than(path: str, when: float) -> bool:
    try:
        return os.stat(path).st_mtime > when
    except OSError:
        return False


def site_lock_file(output_root: str):
    """The flock that makes one server per data dir, held while it runs (released by the kernel even
    after SIGKILL); a multi-process server's parent holds it for its front-end processes."""
    os.makedirs(output_root, exist_ok=True)
    return _exclusive(os.path.join(os.path.abspath(output_root), ".tilecrate-server.lock"))


def _exclusive(path: str):
    """An flock held for the runner's life (released by the kernel even after SIGKILL)."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise JobError(f"another tilecrate server is using {os.path.dirname(path)}; "
                       f"give each server its own data directory") from None
    return f


class _ProgressWriter:
    """export()'s progress callback: progress and the messages of levels begun, written at most every
    _PROGRESS_INTERVAL (each write is a synced LMDB commit; a small job used to make one per level)."""

    def __init__(self, runner: JobRunner, job_id: str, per_level: dict[int, int]):
        self.runner = runner
        self.job_id = job_id
        self.per_level = per_level
        self.levels_seen: set[int] = set()
        self.levels_unwritten: list[int] = []
        self.last = 0.0
        self.pending = None

    def __call__(self, p) -> None:
        if p.level is not None and p.level not in self.levels_seen:
            self.levels_seen.add(p.level)
            self.levels_unwritten.append(p.level)
        self.pending = p
        now = time.monotonic()
        if now - self.last >= _PROGRESS_INTERVAL:
            self.last = now
            self._write(p)

    def flush(self) -> None:
        """Write the last progress seen and the level messages not written yet."""
        if self.pending is not None:
            self._write(self.pending)

    def _write(self, p) -> None:
        pct = int(100 * p.tiles_done / p.tiles_total) if p.tiles_total else 100
        text = f"Exporting level {p.level}" if p.level is not None else "Exporting"
        levels, self.levels_unwritten = self.levels_unwritten, []

        def change(job: Job) -> bool | None:
            if job.status != EXECUTING:
                return False
            for level in levels:
                job.add_message(f"Exporting level {level}: {self.per_level.get(level, 0)} tiles")
            job.progress = {"type": "default", "message": f"{text}: {p.tiles_done} of {p.tiles_total} tiles",
                            "percent": min(pct, 100)}
            return None
        try:
            self.runner.store.update(self.job_id, change)
        except StoreError as e:  # progress is not worth failing the job for
            log.warning("job %s: progress not recorded: %s", self.job_id, e)

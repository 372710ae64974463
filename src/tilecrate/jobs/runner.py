"""JobRunner: runs exportTiles / estimateExportTilesSize jobs on a thread pool, records them in LMDB.

Life of a job: admitted (esriJobSubmitted, refused when maximumOutstandingJobs is reached) ->
a worker picks it up (esriJobExecuting, messages and a throttled progress figure) -> selection,
tile limit, export() or estimate() -> esriJobSucceeded with its output folder, or esriJobFailed
with the error in its messages. Cancel sets a threading.Event that select() and export() check
per bundle (esriJobCancelling -> esriJobCancelled, partial output removed). Finished jobs expire
after max_file_age together with their output. On start, jobs left submitted or executing by a
crash are marked failed and their partial output removed.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

from tilecrate.cache import Cache
from tilecrate.estimate import estimate
from tilecrate.export import export
from tilecrate.errors import Cancelled, TilecrateError
from tilecrate.jobs.model import (
    CANCELLED, CANCELLING, ERROR, ESTIMATE, EXECUTING, EXPORT, FAILED, OUTSTANDING, SUBMITTED,
    SUCCEEDED, TERMINAL, WARNING, Job, esri_time, new_job_id,
)
from tilecrate.jobs.store import JobStore
from tilecrate.request import COMPACT_V2, ExportRequest
from tilecrate.selection import select

log = logging.getLogger("tilecrate.jobs")

RESTART_MESSAGE = "The server stopped while this job was running; submit it again."
_PROGRESS_INTERVAL = 0.25  # seconds between progress writes to the store
_CLEANUP_BATCH = 1000  # expired jobs removed per store transaction


@dataclass
class JobService:
    """What the runner needs to know about a service."""

    name: str
    cache: Cache
    max_export_tiles_count: int = 100000

    @property
    def folder(self) -> str:
        """The arcgisoutput folder of this service's jobs."""
        return f"{self.name}_MapServer"


class JobError(TilecrateError):
    """A job operation is not possible (unknown job, cancel of a finished job)."""


def tile_limit_message(count: int, limit: int, service: str) -> str:
    """ArcGIS's exact tile-limit failure text (FORMATS.md §1.5)."""
    return (f"ERROR 001564: Requested tile count({count}) exceeds the maximum allowed number of "
            f"tiles({limit}) to be exported for service {service}:MapServer.")


def _elapsed(job: Job) -> str:
    return f"(Elapsed Time: {max(0.0, (job.finished or time.time()) - (job.started or job.submitted)):.2f} seconds)"


class JobRunner:
    """Admits, runs, cancels, expires and recovers jobs."""

    def __init__(self, store: JobStore, services: Mapping[str, JobService], output_root: str, *,
                 workers: int = 2, max_outstanding: int | None = None, max_file_age: float = 600.0,
                 export_threads: int | None = None):
        self.store = store
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
        self._lock = _exclusive(os.path.join(self.output_root, ".tilecrate-server.lock"))
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tilecrate-job")

    # paths -----------------------------------------------------------------------------------

    def job_dir(self, job: Job) -> str:
        """`<output root>/<service>_MapServer/<jobId>`."""
        return os.path.join(self.output_root, f"{job.service}_MapServer", job.id)

    def job_folder(self, job: Job) -> str:
        """The job's folder relative to the arcgisoutput root (URL path form)."""
        return f"{job.service}_MapServer/{job.id}"

    # start and stop --------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """After a crash: fail jobs left outstanding, remove their partial output and stray folders."""
        now = time.time()
        failed = []
        for job_id in self.store.ids_by_status(*OUTSTANDING):
            def mark(job: Job) -> None:
                job.status = FAILED
                job.finished = now
                job.progress = None
                job.add_message(RESTART_MESSAGE, ERROR)
                job.add_message(f"Failed at {esri_time(now)} {_elapsed(job)}")
            job = self.store.update(job_id, mark, self._expiry)
            if job is None:
                continue
            self._remove_output(job)
            failed.append(job_id)
        known = set(self.store.all_ids())
        for svc_dir in self._service_dirs():
            for name in os.listdir(svc_dir):
                if name not in known:
                    shutil.rmtree(os.path.join(svc_dir, name), ignore_errors=True)
        if failed:
            log.warning("marked %d interrupted job(s) failed: %s", len(failed), ", ".join(failed))
        return failed

    def _service_dirs(self) -> list[str]:
        out = []
        for name in os.listdir(self.output_root):
            path = os.path.join(self.output_root, name)
            if name.endswith("_MapServer") and os.path.isdir(path) and not os.path.islink(path):
                out.append(path)
        return out

    def close(self) -> None:
        """Stop: running jobs are cancelled and recorded as failed (the restart message)."""
        self._stopping = True
        with self._events_lock:
            for ev in self._events.values():
                ev.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._cleanup_lock:  # the store is closed after this returns: no pass may be running
            self._closed = True
        self.recover()  # anything still queued
        self._lock.close()

    # operations ------------------------------------------------------------------------------

    def submit(self, kind: str, service: str, params: Mapping[str, str]) -> Job:
        """Validate, admit (AdmissionRefused when full) and queue a job; returns it as stored."""
        if kind not in (EXPORT, ESTIMATE):
            raise JobError(f"unknown job kind {kind!r}")
        if service not in self.services:
            raise JobError(f"service {service!r} does not exist")
        clean = {str(k): str(v) for k, v in params.items()
                 if str(k).lower() not in ("f", "token") and v is not None}
        ExportRequest.from_params(clean)  # RequestError now rather than a failed job
        job = Job(new_job_id(), kind, service, clean)
        self.store.admit(job, self.max_outstanding)
        with self._events_lock:
            self._events[job.id] = threading.Event()
        try:
            self._pool.submit(self._run, job.id)
        except RuntimeError:  # the pool is shutting down
            self._finish(job.id, FAILED, RESTART_MESSAGE)
        return job

    def get(self, job_id: str) -> Job | None:
        """The stored job, or None."""
        return self.store.get(job_id)

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
        try:
            self._run_job(job_id, cancel)
        except BaseException:  # never lose a job to a bug: record it, then log the traceback
            log.exception("job %s failed unexpectedly", job_id)
            self._finish(job_id, FAILED, "ERROR 999999: Something unexpected caused the tool to fail. "
                                         "The server log has the details.")
        finally:
            with self._events_lock:
                self._events.pop(job_id, None)

    def _run_job(self, job_id: str, cancel: threading.Event) -> None:
        start = time.time()

        def begin(job: Job) -> bool | None:
            if job.status != SUBMITTED:
                return False
            job.status = EXECUTING
            job.started = start
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
        try:
            if svc is None:
                raise JobError(f"the service {job.service} is no longer configured on this server")
            request = ExportRequest.from_params(job.params)
            if job.kind == ESTIMATE:
                self._estimate(job, svc, request, cancel)
            else:
                self._export(job, svc, request, cancel)
        except Cancelled:
            self._remove_output(job)
            if self._stopping:
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
        except Exception:
            self._remove_output(job)
            raise

    def _estimate(self, job: Job, svc: JobService, request: ExportRequest, cancel: threading.Event) -> None:
        est = estimate(svc.cache, request, cancel=cancel)  # select() checks the cancel per bundle
        if cancel.is_set():  # a cancel that came after the selection
            raise Cancelled("cancelled")
        value = {"totalSize": int(est.total_size), "totalTilesToExport": int(est.total_tiles)}
        notes = [f"Level {lv}: {v.get('tiles', 0)} tiles, {v.get('size', 0)} bytes" for lv, v in sorted(est.levels.items())]
        if est.total_tiles > svc.max_export_tiles_count:
            notes.append(f"{est.total_tiles} tiles exceed this service's maxExportTilesCount "
                         f"({svc.max_export_tiles_count}); an export of this request would fail.")
        self._finish(job.id, SUCCEEDED, None, result={"value": value}, notes=notes)

    def _export(self, job: Job, svc: JobService, request: ExportRequest, cancel: threading.Event) -> None:
        selection = select(svc.cache, request, cancel=cancel)
        if cancel.is_set():
            raise Cancelled("cancelled")
        if selection.tiles > svc.max_export_tiles_count:
            raise JobError(tile_limit_message(selection.tiles, svc.max_export_tiles_count, svc.name))
        per_level = {ls.level: ls.tiles for ls in selection.levels}
        self._note(job.id, f"Exporting {selection.tiles} tiles from {len(per_level)} level(s) "
                           f"({', '.join(str(lv) for lv in per_level)})")
        # ExportRequest.from_params made a package without storageFormatType Compact; a cache
        # folder without one keeps the source's format (as estimate() assumes)
        fmt = request.storage_format or svc.cache.storage_format
        out_dir = self.job_dir(job)
        os.makedirs(out_dir, exist_ok=True)
        if request.tile_package:
            target = os.path.join(out_dir, svc.name + (".tpkx" if fmt == COMPACT_V2 else ".tpk"))
        else:
            target = os.path.join(out_dir, svc.name)
        reporter = _ProgressWriter(self, job.id, per_level)
        result = export(svc.cache, request, target, progress=reporter, cancel=cancel,
                        threads=self.export_threads, selection=selection)
        reporter.flush()
        _sync_to_disk(result.path, out_dir)  # the store is synced: "succeeded" must never outlive the data
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
        self.store.update(job_id, lambda j: j.add_message(text, kind) if kind else j.add_message(text))

    def _finish(self, job_id: str, status: str, error: str | None, *, result: dict | None = None,
                notes: list[str] = (), warnings: list[str] = ()) -> None:
        now = time.time()

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
        self.store.update(job_id, done, self._expiry)

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
        path = self.job_dir(job)
        if os.path.commonpath([path, self.output_root]) == self.output_root and path != self.output_root:
            shutil.rmtree(path, ignore_errors=True)


def _sync_to_disk(path: str, parent: str) -> None:
    """fsync an output (a file, or every file and folder of a cache folder) and the folder naming it."""
    def sync(p: str, flags: int) -> None:
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if os.path.isdir(path):
        for folder, _, files in os.walk(path):
            for name in files:
                sync(os.path.join(folder, name), os.O_RDONLY)
            sync(folder, os.O_RDONLY | os.O_DIRECTORY)
    else:
        sync(path, os.O_RDONLY)
    sync(parent, os.O_RDONLY | os.O_DIRECTORY)


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
    """export()'s progress callback: throttled progress figure, one message per level begun."""

    def __init__(self, runner: JobRunner, job_id: str, per_level: dict[int, int]):
        self.runner = runner
        self.job_id = job_id
        self.per_level = per_level
        self.levels_seen: set[int] = set()
        self.last = 0.0
        self.pending = None

    def __call__(self, p) -> None:
        new_level = p.level is not None and p.level not in self.levels_seen
        if new_level:
            self.levels_seen.add(p.level)
        self.pending = p
        now = time.monotonic()
        if new_level or now - self.last >= _PROGRESS_INTERVAL:
            self.last = now
            self._write(p, p.level if new_level else None)

    def flush(self) -> None:
        """Write the last progress seen."""
        if self.pending is not None:
            self._write(self.pending, None)

    def _write(self, p, new_level: int | None) -> None:
        pct = int(100 * p.tiles_done / p.tiles_total) if p.tiles_total else 100
        text = f"Exporting level {p.level}" if p.level is not None else "Exporting"

        def change(job: Job) -> bool | None:
            if job.status != EXECUTING:
                return False
            if new_level is not None:
                job.add_message(f"Exporting level {new_level}: {self.per_level.get(new_level, 0)} tiles")
            job.progress = {"type": "default", "message": f"{text}: {p.tiles_done} of {p.tiles_total} tiles",
                            "percent": min(pct, 100)}
            return None
        self.runner.store.update(self.job_id, change)

"""The Dask runner: a plan's bundle tasks on a distributed cluster (a tcp:// scheduler or a LocalCluster).

Two site modes (issue 10; the seed's `exportTilesUsingLocalTempFolder`):

* shared folder (default): every bundle task may run on any worker; each writes its output bundle
  into a staging folder next to the output (shared storage: workers and this process see the same
  path). This process assembles the package from the staged files in order, with the CRCs the tasks
  computed, and removes the staging folder. A cache folder output is built in place.
* local temp folder: the whole job runs as one task on one worker, which builds the package in its
  own temp folder with the in-process writer and then moves it into place (rename, or copy + rename
  across file systems: the output never shows a half-written file).

Faults: a worker killed mid-task makes Dask run the task again elsewhere; tasks write under a
temporary name and rename, so a rerun is harmless. A lost scheduler fails the export with a message
naming it. Cancel is cooperative: a Dask Event the tasks check per bundle, between bands of
re-encoded tiles and before creating a file (future.cancel() does not stop a running task).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import dask
from distributed import Client, Event, LocalCluster, Variable, get_client, get_worker

from tilecrate.cache import Cache, open_cache
from tilecrate.errors import Cancelled, ExportError, TilecrateError
from tilecrate.package.metadata import Stamp
from tilecrate.package.tempfiles import sweep_stale_temps
from tilecrate.package.thumbnail import MAX_TILES_SIDE, render_thumbnail
from tilecrate.package.zipstream import ZipWriter
from tilecrate.plan import BundleTask, ExportPlan
from tilecrate.selection import Selection
from tilecrate.runners.assemble import Assembler
from tilecrate.runners.base import (
    CancelFlag,
    ExportProgress,
    ExportResult,
    check_cancel,
    move_into_place,
    os_error,
    remove,
    sibling_temp,
)
from tilecrate.runners.inprocess import write_plan
from tilecrate.runners.tasks import (BundleOutput, BundleRecipe, bundle_recipe, run_bundle_task, source_cache,
                                     stage_recipes)

CANCEL_WAIT = 0.5          # seconds each long-poll of the cancel Event lasts on a worker
PROGRESS_EVERY = 0.25      # seconds between two progress updates from a local-temp-folder job
# A cluster task takes consecutive bundles up to these totals: the scheduler costs a few ms per task
# (tens of ms on a loaded machine), which would dominate small bundles one per task (docs/scale.md)
GROUP_BYTES = 128 << 20    # source tile bytes per task (pass-through: ~2 ms of worker work per 4 MB)
GROUP_TILES = 4096         # tiles per task when re-encoding (~1 s of one core)
GROUP_MAX = 64             # bundles per task
# pass-through: task groups the front end makes itself when the cluster has not returned them by
# the time its copy needs them (the first group is always so: it was submitted a moment before)
HEAD_START = int(os.environ.get("TILECRATE_HEAD_START", "1"))


class _ClusterCancel:
    """The job's Dask Event seen from a task: a helper thread waits on it (one long-poll RPC a
    second), so is_set() is a local flag however often the re-encoder asks (every ~50 ms).

    Polling the Event from the task instead cost a scheduler round trip per look, which on a
    loaded machine (the scheduler shares the front end's process) starved the workers.
    """

    def __init__(self, name: str):
        self.event = Event(name, client=get_client())
        self.flag = threading.Event()
        self.done = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="tilecrate-cancel-watch", daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        while not self.done.is_set():
            try:
                if self.event.wait(timeout=CANCEL_WAIT):
                    self.flag.set()
                    return
            except Exception:      # the scheduler went away: the front end fails the export
                return

    def is_set(self) -> bool:
        """True once the job was cancelled."""
        return self.flag.is_set()

    def close(self) -> None:
        """Stop watching (the helper ends within CANCEL_WAIT)."""
        self.done.set()

    def __enter__(self) -> "_ClusterCancel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _worker_threads() -> int:
    try:
        return max(1, int(get_worker().state.nthreads))
    except (ValueError, AttributeError):
        return 1


def cluster_bundle_tasks(tasks: list[BundleTask], cancel_name: str,
                         recipes: bool = False) -> list[BundleOutput | BundleRecipe]:
    """A group of consecutive bundle tasks on a worker, run one after the other (one scheduler task).

    With `recipes` (zip outputs), pass-through bundles come back as recipes the front end copies
    straight from the source, so their tiles are read here once and never staged; their header
    blocks are staged together in one file (stage_recipes)."""
    threads = _worker_threads()
    out: list[BundleOutput | BundleRecipe] = []
    with _ClusterCancel(cancel_name) as cancel:
        for task in tasks:
            recipe = bundle_recipe(task, cancel) if recipes else None
            out.append(recipe if recipe is not None else run_bundle_task(task, cancel, threads=threads))
        made = [r for r in out if isinstance(r, BundleRecipe)]
        if made and tasks[0].staging is not None:
            stage_recipes(made, tasks[0].staging, cancel)
    return out


def group_tasks(plan: ExportPlan, tasks: list[BundleTask], threads: int) -> list[list[BundleTask]]:
    """Consecutive bundle tasks in groups, at most GROUP_MAX bundles each.

    Re-encoding (CPU-bound on the workers): groups of about the plan's tiles over 4 x the worker
    threads, at most GROUP_TILES, so every thread gets about four and finishes with the others.
    Pass-through (the workers only read and check; the front end's copy sets the pace): one bundle
    first, then twice as many per group up to GROUP_BYTES, so the front end starts copying after
    one bundle's round trip, and a few large tasks spare the scheduler (its cost is per task)."""
    if plan.policy is not None:
        weight, limit = (lambda t: t.tiles), max(1, min(GROUP_TILES, plan.tiles // (4 * max(1, threads))))
    else:
        weight, limit = (lambda t: t.tile_bytes), GROUP_BYTES
    groups: list[list[BundleTask]] = []
    i = 0
    most = 1 if plan.policy is None else GROUP_MAX
    while i < len(tasks):
        group = [tasks[i]]
        load = weight(tasks[i])
        i += 1
        while i < len(tasks) and len(group) < most and load + weight(tasks[i]) <= limit:
            load += weight(tasks[i])
            group.append(tasks[i])
            i += 1
        groups.append(group)
        most = min(GROUP_MAX, 2 * most) if plan.policy is None else GROUP_MAX
    return groups


def _thumbnail_plan(plan: ExportPlan) -> ExportPlan:
    """The plan with only what the thumbnail looks at: its levels up to the first whose tiles span more
    than MAX_TILES_SIDE (render_thumbnail picks among those), no source sizes. For a worker, so the
    task does not carry every bundle's mask of a big export."""
    levels = []
    for lv in plan.selection.levels:
        levels.append(lv)
        bbox = lv.tile_range() if lv.tiles > 0 else None
        if bbox is not None and (bbox[1] - bbox[0] >= MAX_TILES_SIDE or bbox[3] - bbox[2] >= MAX_TILES_SIDE):
            break
    selection = Selection(levels, sum(lv.tiles for lv in levels), sum(lv.tile_bytes for lv in levels),
                          plan.selection.whole_area)
    return dataclasses.replace(plan, selection=selection, source_sizes={}, _predicted=None)


def cluster_thumbnail(plan: ExportPlan) -> bytes:
    """The package thumbnail, rendered on a worker from its own open source cache."""
    return render_thumbnail(source_cache(plan.source), plan.selection, plan.info)


def cluster_local_job(plan: ExportPlan, cancel_name: str, progress_name: str, local_root: str | None) -> ExportResult:
    """A whole job on one worker: the package built in its local temp folder, then moved to plan.out."""
    with _ClusterCancel(cancel_name) as cancel:
        return _local_job(plan, cancel, progress_name, local_root)


def _local_job(plan: ExportPlan, cancel: _ClusterCancel, progress_name: str, local_root: str | None) -> ExportResult:
    cache = source_cache(plan.source)
    if any(not cache.has_bundle(ref) or cache.bundle_file_size(ref) != size for ref, size in plan.source_sizes.items()):
        cache = source_cache(plan.source, fresh=True)
        for ref, size in plan.source_sizes.items():
            if not cache.has_bundle(ref) or cache.bundle_file_size(ref) != size:
                raise ExportError(f"{plan.source.path}: the bundle of level {ref.level} at row {ref.row0}, "
                                  f"column {ref.col0} changed or vanished since the export was planned")
    var = Variable(progress_name)
    last = [0.0]

    def report(p: ExportProgress) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY or p.tiles_done == p.tiles_total:
            last[0] = now
            var.set((p.tiles_done, p.bytes_done, p.level))

    # named like every temp of ours, so a worker killed mid-job leaves nothing the next job's sweep keeps
    anchor = os.path.join(local_root or tempfile.gettempdir(), "tilecrate-job")
    sweep_stale_temps(anchor)
    folder = sibling_temp(anchor)
    os.mkdir(folder)
    try:
        local = os.path.join(folder, os.path.basename(plan.out))
        try:
            result = write_plan(plan, cache, local, progress=report, cancel=cancel, threads=_worker_threads())
            check_cancel(cancel)
            move_into_place(local, plan.out)
        except OSError as e:
            raise os_error(e, plan.out) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result.path = plan.out
    return result


# What a Dask process does besides our tasks, turned down for the LocalClusters we start: every
# server (scheduler, nanny, worker) checks its event loop every 20 ms, the LocalCluster redraws its
# widget text every 500 ms, Dask's statistical profiler samples every worker thread's stack every
# 10 ms, the nannies ask psutil for each worker's memory every 100 ms and every process reads the
# host's CPU, network and disk counters every 500 ms. Measured on an idle 2-worker LocalCluster
# (2026-12-02): 0.12 cores with Dask's defaults, 0.015 with these; on 2 cores that is CPU taken
# from the workers. An operator's own `dask worker` keeps its config (README, Running a site).
QUIET_CLUSTER = {
    "distributed.admin.tick.interval": "500ms",
    "distributed.deploy.cluster-repr-interval": "10s",
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's sliding
    # mmap threshold: every buffer over 128 KB (a bundle's tiles, a re-encoded bundle) was then
    # mmapped, faulted in page by page and unmapped, per bundle. These are glibc's own limits for
    # a long-running process (the threshold slides up to 32 MB): re-encoding workers' system time
    # went from 0.21-0.22 to 0.06-0.08 s per export of 6 864 tiles (bench_cluster's workload)
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": str(128 << 20),
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": str(32 << 20),
}


def local_cluster(workers: int, threads_per_worker: int = 1, *, silence_logs: int = 40) -> LocalCluster:
    """A LocalCluster of `workers` processes on 127.0.0.1: no dashboard, its HTTP server on a free port
    (no "8787 is in use" warning), and the periodic bookkeeping of QUIET_CLUSTER."""
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        # a value in this process's environment (a nanny of an earlier cluster put Dask's there)
        # would win over the config
        os.environ.pop(name, None)
    with dask.config.set(QUIET_CLUSTER):       # the nannies hand this config to their workers
        return LocalCluster(n_workers=int(workers), threads_per_worker=int(threads_per_worker), processes=True,
                            host="127.0.0.1", dashboard_address=None,
                            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, silence_logs=silence_logs)


def _connect(address: str, timeout: float) -> Client:
    """A Client of the scheduler at `address`, trying again until `timeout` when a connection breaks."""
    # a loaded scheduler sometimes closes a new connection during the handshake ("Stream is
    # closed"): at a front end's start-up that one error stopped every process of it
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, timeout=max(0.5, deadline - time.monotonic()), set_as_default=False)
        except (OSError, TimeoutError):
            if time.monotonic() + 0.25 >= deadline:
                raise
            time.sleep(0.25)


def _clear_event(name: str, client: Client) -> None:
    try:
        Event(name, client=client).clear()
    except Exception:       # the client closed or the scheduler went away: nothing left to drop
        pass


class DaskRunner:
    """Runs export plans on a Dask cluster: `scheduler` is "tcp://host:port", "local" or a Client."""

    def __init__(self, scheduler: str | Client = "local", *, workers: int | None = None,
                 threads_per_worker: int = 1, local_temp_dir: str | None = None, connect_timeout: float = 10.0,
                 lost_after: float = 5.0):
        self._own_cluster: LocalCluster | None = None
        self._own_client = False
        # the last shared-folder run's task groups, and how many of them the front end made itself
        self.stats: dict[str, int] = {"groups": 0, "groups_here": 0}
        self.local_temp_dir = local_temp_dir
        self.lost_after = float(lost_after)
        # results straight from the workers, not relayed by the scheduler (one hop less per gather),
        # when they are this machine's (a LocalCluster made in this process); a remote site's
        # workers may not be reachable from the front end, so there the scheduler relays
        self._direct: bool | None = None
        if isinstance(scheduler, Client):
            self.client = scheduler
            self.address = scheduler.scheduler.address
            self._direct = True if getattr(scheduler, "cluster", None) is not None else None
            return
        self.address = str(scheduler)
        try:
            if self.address == "local":
                self._own_cluster = local_cluster(int(workers or os.cpu_count() or 1), int(threads_per_worker))
                self.address = self._own_cluster.scheduler_address
                self.client = Client(self._own_cluster, set_as_default=False)
                self._direct = True
            else:
                self.client = _connect(self.address, float(connect_timeout))
        except (OSError, TimeoutError) as e:
            self.close()
            raise ExportError(f"cannot reach the Dask scheduler at {self.address}: {e}") from None
        self._own_client = True

    def close(self) -> None:
        """Close the client and the LocalCluster this runner started (a given Client stays open)."""
        if self._own_client:
            self.client.close()
        if self._own_cluster is not None:
            self._own_cluster.close()
            self._own_cluster = None

    def __enter__(self) -> "DaskRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def threads(self) -> int:
        """Worker threads on the cluster now."""
        return sum(self.client.nthreads().values())

    # -- waiting on the cluster

    def _lost(self) -> ExportError:
        return ExportError(f"the Dask scheduler at {self.address} was lost (status {self.client.status}); "
                           "the export stopped")

    def _wait_done(self, fut, cancel: CancelFlag | None, on_wait: Callable[[], None] | None = None) -> None:
        """Wait until a future is done, checking this side's cancel and the scheduler meanwhile.

        Waits on a done-callback rather than result(timeout=): a timed-out result() that races with
        a gather rescheduled after a worker died has been seen to fail inside distributed instead
        of waiting for the rerun.
        """
        if fut.done():          # no callback round through the client's event loop
            return
        down_since = None
        done = threading.Event()
        fut.add_done_callback(lambda _: done.set())
        while not done.wait(0.1) and not fut.done():
            check_cancel(cancel)
            if on_wait is not None:
                on_wait()
            if self.client.status != "running":
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.lost_after:
                    raise self._lost()
            else:
                down_since = None

    def _fetch(self, futs: list) -> list:
        """The results of done futures in one gather (one round trip for many bundles); errors mapped."""
        try:
            return self.client.gather(futs, direct=self._direct)
        except TilecrateError:
            raise
        except Exception as e:
            if self.client.status != "running":
                raise self._lost() from None
            if type(e).__name__ == "KilledWorker":
                raise ExportError(f"Dask workers died running a bundle of this export ({e}); "
                                  "the export stopped") from None
            if type(e).__name__ in ("CancelledError", "FutureCancelledError"):
                raise self._lost() from None
            raise

    def _result(self, fut, cancel: CancelFlag | None, on_wait: Callable[[], None] | None = None):
        """A task's result once it is done."""
        self._wait_done(fut, cancel, on_wait)
        return self._fetch([fut])[0]

    def _stop(self, futures, cancel_name: str, staging: list[str]) -> None:
        """After a failure or cancel: tell running tasks to stop, drop queued ones, remove staging."""
        try:
            if self.client.status == "running":
                Event(cancel_name, client=self.client).set()
                self.client.cancel([f for f in futures if f is not None], force=True)
        except Exception:  # the scheduler may be the thing that failed
            pass
        # a task that saw no cancel yet may still create a file: remove twice, a moment apart
        for _ in range(2):
            for path in staging:
                remove(path)
            time.sleep(0.1)
        for path in staging:
            remove(path)

    # -- running a plan

    def run(self, plan: ExportPlan, *, cache: Cache | None = None,
            progress: Callable[[ExportProgress], None] | None = None,
            cancel: CancelFlag | None = None, local_temp_folder: bool = False) -> ExportResult:
        """Write a plan's output to plan.out on the cluster; the output appears complete or not at all."""
        if plan.out is None:
            raise ExportError("the plan has no output path (it was made for an estimate)")
        if local_temp_folder:
            return self._run_local_temp(plan, progress, cancel)
        if cache is None:
            with open_cache(plan.source.path) as opened:
                return self._run_shared(plan, opened, progress, cancel)
        return self._run_shared(plan, cache, progress, cancel)

    def _run_local_temp(self, plan: ExportPlan, progress, cancel) -> ExportResult:
        token = uuid.uuid4().hex
        cancel_name, progress_name = f"tilecrate-cancel-{token}", f"tilecrate-progress-{token}"
        bytes_total, _ = plan.predicted()
        var = Variable(progress_name, client=self.client)
        if progress is not None:
            progress(ExportProgress(0, plan.tiles, 0, bytes_total, None))

        def poll() -> None:
            if progress is None:
                return
            try:
                tiles, done, level = var.get(timeout=0.01)
            except Exception:          # not set yet
                return
            progress(ExportProgress(tiles, plan.tiles, done, bytes_total, level))

        fut = self.client.submit(cluster_local_job, plan, cancel_name, progress_name, self.local_temp_dir,
                                 key=f"tilecrate-job-{token}", pure=False)
        try:
            result = self._result(fut, cancel, poll)
        except BaseException:
            self._stop([fut], cancel_name, [])
            raise
        finally:
            try:
                var.delete()
            except Exception:
                pass
        if progress is not None:
            progress(ExportProgress(result.tiles, plan.tiles, result.size, bytes_total, None))
        return result

    def _run_shared(self, plan: ExportPlan, cache: Cache, progress, cancel) -> ExportResult:
        layout = plan.layout
        out = plan.out
        token = uuid.uuid4().hex
        cancel_name = f"tilecrate-cancel-{token}"
        sweep_stale_temps(out)
        tmp = sibling_temp(out)
        staging = tmp if not layout.is_package else sibling_temp(out)
        bytes_total, _ = plan.predicted()
        futures: deque = deque()
        others: list = []       # the thumbnail's task, when a worker renders it
        f = None
        try:
            os.mkdir(staging)
            for d in plan.dirs():
                os.makedirs(os.path.join(staging, *d.rstrip("/").split("/")), exist_ok=True)
            if layout.is_package:
                f = open(tmp, "wb", buffering=1 << 16)
                sink = Assembler(writer=ZipWriter(f, zip64_limit=plan.zip64_limit, reserve=bytes_total))
            else:
                sink = Assembler(root=staging)
            result = self._assemble(plan, cache, sink, staging, cancel_name, futures, others, progress, cancel,
                                    bytes_total)
            if f is not None:
                f.close()
                f = None
            check_cancel(cancel)
            if layout.is_package:
                remove(staging)
            move_into_place(tmp, out)
        except BaseException as e:
            if f is not None:
                f.close()
            self._stop(list(futures) + others, cancel_name, [staging, tmp])
            if isinstance(e, OSError):
                raise os_error(e, out) from None
            raise
        # drops the event from the scheduler, off the export's path: a round trip (tens of ms on a
        # loaded machine) the finished export need not wait for
        threading.Thread(target=_clear_event, args=(cancel_name, self.client), name="tilecrate-event-clear",
                         daemon=True).start()
        result.path = out
        return result

    def _assemble(self, plan: ExportPlan, cache: Cache, sink: Assembler, staging: str, cancel_name: str,
                  futures: deque, others: list, progress, cancel, bytes_total: int) -> ExportResult:
        layout, selection, info = plan.layout, plan.selection, plan.info
        threads = self.threads
        groups = iter(group_tasks(plan, list(plan.tasks(staging)), threads))
        ahead = 3 * max(1, threads)      # groups in flight: staging holds at most these bundles
        levels: dict[int, dict] = {lv.level: {"tiles": 0, "size": 0} for lv in selection.levels if lv.tiles > 0}
        warnings: list[str] = []
        tiles_done = 0
        fetched: dict = {}
        outputs: deque = deque()
        token = cancel_name[len("tilecrate-cancel-"):]
        # Pass-through into a zip: the front end's copy sets the pace and would otherwise sit idle
        # for the first round trip, so up to HEAD_START groups the cluster has not returned when
        # the copy needs them are made here, with the same task code (the worker's copy of one is
        # released; a staged file it may still write is the same file). By default that is the
        # first group, one bundle: measured on an idle machine (bench_cluster, 2026-12-02 01:04),
        # pass-through vs in-process 0.82x with none, 0.93x with the first, 1.05x with every
        # group not back in time (5 of 7: the cluster would then do a third less of the work).
        local = layout.is_package and plan.policy is None
        group_of: dict = {}
        self.stats = {"groups": 0, "groups_here": 0}

        def report(level: int | None) -> None:
            if progress is not None:
                progress(ExportProgress(tiles_done, selection.tiles, sink.position, bytes_total, level))

        def top_up() -> None:
            # a few groups per map: each map is one update_graph on the scheduler (front end's CPU)
            if futures and ahead - len(futures) < max(1, threads):
                return
            batch = []
            while len(futures) + len(batch) < ahead:
                group = next(groups, None)
                if group is None:
                    break
                batch.append(group)
            if batch:
                new = self.client.map(cluster_bundle_tasks, batch, [cancel_name] * len(batch),
                                      [layout.is_package] * len(batch),
                                      key=[f"tilecrate-{token}-{g[0].index}" for g in batch], pure=False)
                futures.extend(new)     # held until assembled: a consumed result is released at once
                if local:
                    group_of.update(zip((f.key for f in new), batch))
                self.stats["groups"] += len(batch)

        def make_here(group: list[BundleTask]) -> list:
            out = []
            for task in group:
                recipe = bundle_recipe(task, cancel, cache=cache)
                out.append(recipe if recipe is not None else run_bundle_task(task, cancel, cache=cache, threads=1))
            return out

        # results come back on a helper thread while this one copies: a gather is a round trip
        # through the scheduler (tens of ms on a loaded machine), which in line would stall the copy
        fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilecrate-fetch")
        pending: list = [None, ()]         # the gather in flight and the keys it fetches

        def harvest() -> None:
            fut, keys = pending
            while True:
                try:
                    results = fut.result(timeout=0.1)
                    break
                except FutureTimeout:
                    check_cancel(cancel)
            pending[:] = [None, ()]
            fetched.update(zip(keys, results))

        def prefetch() -> None:
            """Start fetching every finished group not fetched yet (one gather for all of them)."""
            if pending[0] is not None:
                if not pending[0].done():
                    return
                harvest()
            ready = [f for f in (*futures, *others) if f.key not in fetched and f.status == "finished"]
            if ready:
                pending[:] = [fetcher.submit(self._fetch, ready), tuple(f.key for f in ready)]

        def next_output() -> BundleOutput:
            if not outputs:
                head = futures[0]
                if (local and self.stats["groups_here"] < HEAD_START and head.key not in fetched
                        and head.key not in pending[1] and head.status not in ("finished", "error")):
                    outputs.extend(make_here(group_of.pop(head.key)))
                    self.stats["groups_here"] += 1
                    futures.popleft()
                    top_up()
                    prefetch()
                    return outputs.popleft()
                while head.key not in fetched:
                    if pending[0] is not None:
                        harvest()        # the gather in flight: the head's, or of groups after it
                        continue
                    self._wait_done(head, cancel)
                    # nothing to copy meanwhile: fetched in line (a thread hand-off costs latency),
                    # with every other finished group; a failed head raises its error, mapped
                    ready = [f for f in futures if f.key not in fetched and f.status == "finished"]
                    ready = ready if head in ready else [head] + ready
                    fetched.update(zip((f.key for f in ready), self._fetch(ready)))
                outputs.extend(fetched.pop(head.key))
                group_of.pop(head.key, None)
                futures.popleft()
                top_up()
                prefetch()
            return outputs.popleft()

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilecrate-thumbnail")
        try:
            # The thumbnail is Python holding the GIL (~0.1-0.5 s for a level of 100 full bundles):
            # beside the copy loop it stalled the copy's every GIL hand-back (143 ms for one 3.7 MB
            # bundle measured). Pass-through: a worker renders it (workers are mostly idle, the
            # front end's copy sets the pace). Re-encoding: the workers are the busy ones, so the
            # front end renders it, once the first bundle is in (started with the tasks, it held up
            # the client's event loop and so the first results).
            thumb = remote = None
            if layout.thumbnail_path and plan.policy is None:
                # first, and ahead of the groups: done long before the copy ends
                remote = self.client.submit(cluster_thumbnail, _thumbnail_plan(plan), key=f"tilecrate-{token}-thumbnail",
                                            pure=False, priority=1)
                others.append(remote)
            top_up()
            for name, data in layout.metadata_files(info, Stamp.now()):
                sink.add_bytes(name, data)
            report(None)
            for kind, name, _ in plan.entries():
                check_cancel(cancel)
                if kind == "dir":
                    sink.add_dir(name)
                    continue
                out = next_output()
                if thumb is None and remote is None and layout.thumbnail_path:
                    thumb = pool.submit(render_thumbnail, cache, selection, info)
                check_cancel(cancel)
                lv = levels.setdefault(out.level, {"tiles": 0, "size": 0})
                if isinstance(out, BundleRecipe):
                    sink.add_recipe(out)
                    lv["size"] += out.size + (len(out.bundlx) if out.bundlx is not None else out.bundlx_size)
                else:
                    sink.add_output(out)
                    lv["size"] += out.size + (out.bundlx_size if out.bundlx_path else 0)
                lv["tiles"] += out.tiles
                tiles_done += out.tiles
                warnings.extend(out.warnings)
                report(out.level)
            if remote is not None:
                if remote.key not in fetched and remote.key in pending[1]:
                    harvest()
                if remote.key in fetched:
                    data = fetched.pop(remote.key)
                elif remote.status == "finished":
                    data = self._result(remote, cancel)
                else:               # not rendered yet (busy workers): rendered here, as in-process
                    data = render_thumbnail(cache, selection, info)
                sink.add_bytes(layout.thumbnail_path, data)
            elif layout.thumbnail_path:
                sink.add_bytes(layout.thumbnail_path, (thumb or pool.submit(render_thumbnail, cache, selection,
                                                                            info)).result())
            size = sink.close()
            report(None)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            fetcher.shutdown(wait=False, cancel_futures=True)
        return ExportResult(plan.out, tiles_done, size, levels, warnings, plan.quality_used, layout.kind,
                            info.storage_format)


def run_on_cluster(plan: ExportPlan, scheduler, *, cache: Cache | None = None,
                   progress: Callable[[ExportProgress], None] | None = None,
                   cancel: threading.Event | None = None, local_temp_folder: bool = False) -> ExportResult:
    """Run a plan on `scheduler`: a DaskRunner, a distributed.Client, "tcp://host:port" or "local"."""
    if isinstance(scheduler, DaskRunner):
        return scheduler.run(plan, cache=cache, progress=progress, cancel=cancel, local_temp_folder=local_temp_folder)
    with DaskRunner(scheduler) as runner:
        return runner.run(plan, cache=cache, progress=progress, cancel=cancel, local_temp_folder=local_temp_folder)

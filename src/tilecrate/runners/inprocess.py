"""The default runner: a plan's bundle tasks on a thread pool, streamed in order into the sink.

Workers run `prepare_bundle` (plan the output bundle from the source index, or re-encode its JPEG
tiles); the calling thread writes the plans in order into a stored zip (.tpkx / .tpk) or a cache
folder, reading each run of source tiles with one pread (GIL released) and computing the CRC-32
as the bytes pass (isal). Only a few bundles are in flight and one run buffer is in use, so
memory does not grow with the package. Nothing is staged: this is the fast path for one machine.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

from tilecrate.cache import Cache
from tilecrate.package import kcopy
from tilecrate.package.folder import FolderSink
from tilecrate.package.metadata import Stamp
from tilecrate.package.thumbnail import render_thumbnail
from tilecrate.package.zipstream import ZipSink, ZipWriter
from tilecrate.plan import ExportPlan
from tilecrate.runners.base import CancelFlag, ExportProgress, ExportResult, check_cancel
from tilecrate.runners.tasks import Prepared, prepare_bundle


def _wait(fut, cancel: CancelFlag | None):
    """A worker's result, checking for a cancel every 0.1 s meanwhile (re-encoding a bundle takes long)."""
    while True:
        try:
            return fut.result(timeout=0.1)
        except FutureTimeout:
            check_cancel(cancel)


def _release_result(fut) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    prep = fut.result()
    if prep is not None:
        prep.release()


def write_plan(plan: ExportPlan, cache: Cache, tmp: str, *,
               progress: Callable[[ExportProgress], None] | None = None,
               cancel: CancelFlag | None = None, threads: int | None = None) -> ExportResult:
    """Write a plan's output to `tmp` (a file or a new folder) from the open source `cache`."""
    layout, selection, info = plan.layout, plan.selection, plan.info
    stamp = Stamp.now()
    bytes_total, _ = plan.predicted()
    if layout.is_package:
        f = open(tmp, "wb", buffering=1 << 16)     # larger writes bypass the buffer: no extra copy
        try:
            sink = ZipSink(ZipWriter(f, zip64_limit=plan.zip64_limit, reserve=bytes_total))
        except BaseException:
            f.close()           # a disk without room for the package: the descriptor holds no blocks past the error
            raise
    else:
        f = None
        sink = FolderSink(tmp)
    needs_crc = layout.is_package and sink.needs_crc     # only for outputs that cannot seek back
    warnings: list[str] = []
    levels: dict[int, dict] = {lv.level: {"tiles": 0, "size": 0} for lv in selection.levels if lv.tiles > 0}
    tiles_done = 0

    def bytes_done() -> int:
        return sink.writer.position if layout.is_package else sink.size

    def report(level: int | None) -> None:
        if progress is not None:
            progress(ExportProgress(tiles_done, selection.tiles, bytes_done(), bytes_total, level))

    nthreads = max(1, int(threads or os.cpu_count() or 1))
    workers = nthreads
    reencode_threads = None
    tiles_source = plan.policy is None and getattr(cache, "open_tiles", None) is not None
    if tiles_source:
        # a source of separate tiles (SQLite): one thread reads the next block while this one writes the last
        # (a large block is read in two halves when a core is spare); more readers only take the writer's core
        workers = 1
    if plan.policy is not None:
        # re-encoding: one bundle at a time, its tiles spread over every thread by OpenMP inside the
        # compiled core (measured ~20 % faster than one bundle per thread on 2 cores, and it keeps
        # every core busy when an export has fewer bundles than cores)
        reencode_threads = nthreads
        workers = 1

    # a zip entry needs its CRC-32: the planning threads read pass-through runs for it (and check
    # their prefixes) ahead of the writer, which then only copies them in the kernel
    mode = sink.writer.copy_method if layout.is_package else None
    prescan = layout.is_package and not needs_crc and (mode == "auto" or mode in kcopy.METHODS)
    prescan_min = kcopy.KERNEL_MIN if mode == "auto" else 0     # shorter runs: the writer's buffered path

    # on their own thread, never waited for: a bundle the writer reaches before its prescan started
    # (a thread not scheduled on a loaded machine) takes the writer's own read-ahead path instead
    scan_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tilecrate-prescan") if prescan else None
    scans: dict[int, object] = {}
    popped = None           # the bundle taken from `pending` last: released on an error as those still in it

    def prepare(task) -> Prepared | None:
        if cancel is not None and cancel.is_set():
            return None
        prep = prepare_bundle(task, cache, cancel=cancel, threads=reencode_threads, needs_crc=needs_crc)
        if scan_pool is not None and prep.plan.file is not None:
            scans[id(prep.plan)] = scan_pool.submit(kcopy.prescan_plan, prep.plan, prescan_min)
        return prep

    ahead = workers + 1                   # bounded look-ahead keeps memory flat
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tilecrate-export")
    pending: deque = deque()
    # rendered while the bundles are copied, written as the last entry; from a tiles source, queued behind
    # the blocks' reads on the one reader thread so it takes no core from them (it decodes tiles: a few ms)
    thumb = pool.submit(render_thumbnail, cache, selection, info) if layout.thumbnail_path and not tiles_source \
        else None
    try:
        try:
            for name, data in layout.metadata_files(info, stamp):
                sink.add_bytes(name, data)
            report(None)
            tasks = plan.tasks()
            work = plan.entries()
            exhausted = False
            in_flight = 0                 # bundles submitted and not yet taken (directories take no slot)

            def fill() -> None:
                nonlocal exhausted, in_flight, thumb
                # a tiles source's look-ahead counts bundles only (a level's directory entry took a read's slot)
                while not exhausted and (in_flight if tiles_source else len(pending)) < ahead:
                    item = next(work, None)
                    if item is None:
                        exhausted = True
                        if layout.thumbnail_path and thumb is None:
                            thumb = pool.submit(render_thumbnail, cache, selection, info)
                        return
                    kind, name, _ = item
                    pending.append((kind, name, pool.submit(prepare, next(tasks)) if kind == "bundle" else None))
                    in_flight += kind == "bundle"

            while True:
                fill()
                if not pending:
                    break
                kind, name, fut = pending.popleft()
                popped = fut
                check_cancel(cancel)
                if kind == "dir":
                    sink.add_dir(name)
                    continue
                prep = _wait(fut, cancel)
                in_flight -= 1
                if tiles_source:
                    fill()                # the next block's read starts before this one is written
                scan = scans.pop(id(prep.plan), None) if prep is not None else None
                if scan is not None:
                    # not started: the writer reads the runs; started: the writer takes the runs it has not
                    # read yet (kcopy.RUN_CLAIMS), so no run is read twice
                    scan.cancel()
                check_cancel(cancel)
                try:
                    sink.add_bundle(name, prep.plan)
                    lv = levels.setdefault(prep.task.ref.level, {"tiles": 0, "size": 0})
                    lv["tiles"] += prep.plan.tiles
                    lv["size"] += prep.plan.size + (len(prep.plan.bundlx) if prep.plan.bundlx else 0)
                    tiles_done += prep.plan.tiles
                    warnings.extend(prep.warnings)
                finally:
                    prep.release()
                report(prep.task.ref.level)
            if thumb is not None:
                sink.add_bytes(layout.thumbnail_path, thumb.result())
            size = sink.close()
            report(None)              # the final figures: every byte written
        finally:
            if f is not None:
                f.close()
    except BaseException:
        # do not wait for bundles still being planned or re-encoded (a cancel must be quick):
        # their mappings are closed as soon as they finish
        pool.shutdown(wait=False, cancel_futures=True)
        if scan_pool is not None:
            scan_pool.shutdown(wait=False, cancel_futures=True)
        # (released twice at worst: Prepared.release may be; a stream still being read stops)
        for fut in [popped, *(fut for _, _, fut in pending)]:
            if fut is not None:
                fut.add_done_callback(_release_result)
        if thumb is not None:
            thumb.cancel()
        raise
    pool.shutdown(wait=True)
    if scan_pool is not None:
        scan_pool.shutdown(wait=True)
    return ExportResult(tmp, tiles_done, size, levels, warnings, plan.quality_used, layout.kind,
                        info.storage_format)

"""The export pipeline: request -> selection -> per-bundle plans (thread pool) -> package sink, in order.

Workers open a source bundle and plan its output bundle in the compiled core from the index alone
(or re-encode its JPEG tiles first); the calling thread writes the plans in order into a stored
zip (.tpkx / .tpk) or a cache folder, reading each run of source tiles with one pread (GIL
released) and computing the CRC-32 as the bytes pass (isal). Only a few bundles are in flight and
one run buffer is in use, so memory does not grow with the package. The output is built under a temporary name next to `out` and renamed
into place only when complete; an error or a cancel removes it.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

from tilecrate.cache import Cache, open_cache
from tilecrate.errors import Cancelled, ExportError
from tilecrate.package.bundles import BundlePlan, plan_bundle, plan_from_tiles
from tilecrate.package.folder import FolderSink
from tilecrate.package.layout import Layout, entries, resolve_layout
from tilecrate.package.metadata import Stamp, package_info
from tilecrate.package.sizing import predict_package_size
from tilecrate.package.thumbnail import render_thumbnail
from tilecrate.package.zipstream import ZIP64_LIMIT, ZipSink, ZipWriter
from tilecrate.recompress import policy_for, recompress_bundle
from tilecrate.request import ExportRequest
from tilecrate.selection import Selection, select


@dataclass
class ExportProgress:
    """Where an export is: tiles and output bytes written so far, of the totals, and the current level."""

    tiles_done: int
    tiles_total: int
    bytes_done: int
    bytes_total: int
    level: int | None


@dataclass
class ExportResult:
    """What an export wrote."""

    path: str                      # the package file, or the cache folder when tile_package is False
    tiles: int
    size: int                      # bytes written (file size or folder total)
    levels: dict[int, dict] = field(default_factory=dict)   # {level: {"tiles": n, "size": bytes}}
    warnings: list[str] = field(default_factory=list)
    quality_used: int | None = None
    kind: str = ""                 # tpkx | tpk | folder
    storage_format: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        """JSON-ready form (the CLI's --json output)."""
        return {
            "path": self.path, "kind": self.kind, "storageFormat": self.storage_format,
            "tiles": self.tiles, "size": self.size,
            "levels": {str(k): dict(v) for k, v in sorted(self.levels.items())},
            "warnings": list(self.warnings), "qualityUsed": self.quality_used,
            "seconds": round(self.seconds, 3),
        }


def _check_source(cache: Cache) -> None:
    if cache.kind == "vtpk" or cache.tile_format.lower() == "pbf":
        raise ExportError(f"{cache.path}: vector tile packages cannot be exported as raster tile packages or "
                          "caches (their tiles are gzipped vector data, not images)")


def _temp_path(out: str) -> str:
    folder, base = os.path.split(os.path.abspath(out))
    return os.path.join(folder, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _os_error(e: OSError, out: str) -> ExportError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(f"{out}: the disk is full (no space left while writing the export)")
    where = e.filename or out
    return ExportError(f"{where}: cannot write the export ({e.strerror or e})")


def _wait(fut, check_cancel):
    """A worker's result, checking for a cancel every 0.1 s meanwhile (re-encoding a bundle takes long)."""
    while True:
        try:
            return fut.result(timeout=0.1)
        except FutureTimeout:
            check_cancel()


def _release_result(fut) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    prep = fut.result()
    if prep is not None:
        prep.release()


class _Prepared:
    """A planned bundle and the source mapping its segments point into (closed after writing)."""

    __slots__ = ("bsel", "plan", "data", "warnings")

    def __init__(self, bsel, plan: BundlePlan, data, warnings: list[str]):
        self.bsel, self.plan, self.data, self.warnings = bsel, plan, data, warnings

    def release(self) -> None:
        self.plan.source = b""
        if self.data is not None:
            self.data.close()
            self.data = None


def export(cache: Cache | str, request: ExportRequest, out: str, *,
           progress: Callable[[ExportProgress], None] | None = None,
           cancel: threading.Event | None = None, threads: int | None = None,
           selection: Selection | None = None, zip64_limit: int = ZIP64_LIMIT) -> ExportResult:
    """Write the tiles a request selects to `out`: a .tpkx, a .tpk, or a cache folder (tile_package False)."""
    if not isinstance(cache, Cache):
        with open_cache(os.fspath(cache)) as opened:
            return export(opened, request, out, progress=progress, cancel=cancel, threads=threads,
                          selection=selection, zip64_limit=zip64_limit)
    out = os.fspath(out)
    _check_source(cache)
    layout = resolve_layout(cache, request, out)
    if os.path.isdir(out) and (layout.is_package or os.listdir(out)):
        raise ExportError(f"{out}: a folder with this name exists; choose another output or remove it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ExportError(f"{parent}: the output folder does not exist")
    started = time.perf_counter()
    if selection is None:
        selection = select(cache, request, cancel=cancel)
    policy = policy_for(cache, request) if request.optimize_tiles_for_size else None
    active = policy is not None and policy.active
    quality_used = policy.quality_used if policy is not None else None
    tmp = _temp_path(out)
    try:
        result = _write(cache, request, selection, layout, tmp, out, policy if active else None,
                        quality_used, progress, cancel, threads, zip64_limit)
        if cancel is not None and cancel.is_set():
            raise Cancelled("the export was cancelled")
        if os.path.isdir(out):
            os.rmdir(out)      # an empty folder of the same name (checked above)
        os.replace(tmp, out)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError):
            raise _os_error(e, out) from None
        raise
    result.path = os.path.abspath(out)
    result.seconds = time.perf_counter() - started
    return result


def _write(cache: Cache, request: ExportRequest, selection: Selection, layout: Layout, tmp: str, out: str,
           policy, quality_used: int | None, progress, cancel, threads, zip64_limit) -> ExportResult:
    info = package_info(cache, selection, layout.version, quality_used)
    stamp = Stamp.now()
    bytes_total, _ = predict_package_size(cache, selection, request, layout=layout, zip64_limit=zip64_limit,
                                          info=info)
    if layout.is_package:
        f = open(tmp, "wb", buffering=1 << 16)     # larger writes bypass the buffer: no extra copy
        sink = ZipSink(ZipWriter(f, zip64_limit=zip64_limit))
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

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the export was cancelled")

    def prepare(bsel) -> _Prepared:
        if cancel is not None and cancel.is_set():
            return None
        data = cache.open_bundle(bsel.ref)
        label = cache.bundle_label(bsel.ref)
        try:
            found: list[str] = []
            if policy is not None:
                new_tiles, found = recompress_bundle(policy, data, bsel.mask, cache)
                plan = plan_from_tiles(bsel.ref, new_tiles, bsel.mask, layout.version, label)
                data.close()
                data = None
            else:
                plan = plan_bundle(data, bsel.mask, layout.version, label, cache)
                if plan.file is not None:     # the writer reads the file: the mapping is not needed
                    plan.source = b""
                    data.close()
                    data = None
            if needs_crc:
                plan.compute_crc()
            return _Prepared(bsel, plan, data, found)
        except BaseException:
            if data is not None:
                data.close()
            raise

    nthreads = max(1, int(threads or os.cpu_count() or 1))
    workers = nthreads
    if policy is not None:
        # re-encoding: one bundle at a time, its tiles spread over every thread by OpenMP inside the
        # compiled core (measured ~20 % faster than one bundle per thread on 2 cores, and it keeps
        # every core busy when an export has fewer bundles than cores)
        policy = dataclasses.replace(policy, threads=nthreads)
        workers = 1
    ahead = workers + 1                   # bounded look-ahead keeps memory flat
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tilecrate-export")
    pending: deque = deque()
    # rendered while the bundles are copied, written as the last entry
    thumb = pool.submit(render_thumbnail, cache, selection, info) if layout.thumbnail_path else None
    try:
        try:
            for name, data in layout.metadata_files(info, stamp):
                sink.add_bytes(name, data)
            report(None)
            work = entries(layout, selection)
            exhausted = False
            while True:
                while not exhausted and len(pending) < ahead:
                    item = next(work, None)
                    if item is None:
                        exhausted = True
                        break
                    kind, name, bsel = item
                    pending.append((kind, name, pool.submit(prepare, bsel) if kind == "bundle" else None))
                if not pending:
                    break
                kind, name, fut = pending.popleft()
                check_cancel()
                if kind == "dir":
                    sink.add_dir(name)
                    continue
                prep = _wait(fut, check_cancel)
                check_cancel()
                try:
                    sink.add_bundle(name, prep.plan)
                    lv = levels.setdefault(prep.bsel.ref.level, {"tiles": 0, "size": 0})
                    lv["tiles"] += prep.plan.tiles
                    lv["size"] += prep.plan.size + (len(prep.plan.bundlx) if prep.plan.bundlx else 0)
                    tiles_done += prep.plan.tiles
                    warnings.extend(prep.warnings)
                finally:
                    prep.release()
                report(prep.bsel.ref.level)
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
        for _, _, fut in pending:
            if fut is not None:
                fut.add_done_callback(_release_result)
        if thumb is not None:
            thumb.cancel()
        raise
    pool.shutdown(wait=True)
    return ExportResult(out, tiles_done, size, levels, warnings, quality_used, layout.kind,
                        info.storage_format)


"""The per-bundle task every runner runs: a BundleTask -> one planned (or re-encoded) output bundle.

`prepare_bundle` plans the output bundle from the source index (or re-encodes its JPEG tiles);
the in-process writer streams that plan straight into the package, and `run_bundle_task` writes
it as a file into a staging folder under a temporary name renamed into place, so running a task
twice (a Dask worker died mid-task and the task ran again elsewhere) leaves the same file.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from isal import isal_zlib

from tilecrate.cache import BundleData, Cache, open_cache
from tilecrate.errors import BundleError
from tilecrate.package.bundles import BundlePlan, plan_bundle, plan_from_tiles, plan_tiles
from tilecrate.package import kcopy
from tilecrate.package.kcopy import (KernelCopier, RunScanner, check_prefixes, check_unchanged, crc_combine,
                                     open_source_id, plan_parts, remember, write_all, write_parts)
from tilecrate.plan import BundleTask, SourceRef
from tilecrate.recompress import recompress_bundle
from tilecrate.runners.base import CancelFlag, check_cancel

_OPEN_CACHES = 4


@dataclass
class BundleOutput:
    """A task's result: the staged .bundle (and V1 .bundlx) with sizes and CRC-32s, and warnings."""

    index: int
    name: str                      # path inside the package or folder
    path: str                      # the staged .bundle file
    size: int
    crc32: int
    level: int
    tiles: int
    tile_bytes: int
    bundlx_path: str | None = None
    bundlx_size: int = 0
    bundlx_crc32: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class BundleRecipe:
    """A pass-through bundle made without staging: its header block, the source ranges to copy
    after it (already read and checked on the worker: prefixes right, CRC-32 taken) and the totals."""

    index: int
    name: str
    level: int
    tiles: int
    tile_bytes: int
    size: int
    crc32: int
    aux: bytes | None              # header block (V2 header + index, or V1 header + zero table)
    file: str                      # the source file the ranges come from
    file_size: int
    file_id: tuple | None
    ranges: list[tuple[int, int]]  # (offset in `file`, length), in order
    bundlx: bytes | None = None
    warnings: list[str] = field(default_factory=list)
    # staged by stage_recipes (aux and bundlx then None): the header blocks and V1 .bundlx of a task
    # group in one file, at these offsets. Results stay a few hundred bytes, so no 128 KB per bundle
    # is pickled on the worker, relayed by the scheduler and unpickled on the front end, which
    # copies the ranges in the kernel; one file a group, not two per bundle (a file created and
    # removed cost ~0.5 ms of each side here)
    head_path: str | None = None
    head_offset: int = 0
    head_size: int = 0
    bundlx_offset: int = 0
    bundlx_size: int = 0
    bundlx_crc32: int = 0


class Prepared:
    """A planned output bundle and the source mapping its bytes may point into (closed by release)."""

    __slots__ = ("task", "plan", "data", "warnings")

    def __init__(self, task: BundleTask, plan: BundlePlan, data: BundleData | None, warnings: list[str]):
        self.task, self.plan, self.data, self.warnings = task, plan, data, warnings

    def release(self) -> None:
        """Drop the bytes and close the mapping (safe to call twice)."""
        self.plan.release()
        if self.data is not None:
            self.data.close()
            self.data = None


# --------------------------------------------------------------------------------------------
# the source, as a worker process sees it

_caches: OrderedDict[str, Cache] = OrderedDict()
_caches_lock = threading.Lock()


def source_cache(source: SourceRef, *, fresh: bool = False) -> Cache:
    """This process's open Cache of a source (a few kept open); `fresh` reopens it (the files changed)."""
    with _caches_lock:
        cache = _caches.get(source.path)
        if cache is not None and not fresh:
            _caches.move_to_end(source.path)
            return cache
    opened = open_cache(source.path)
    with _caches_lock:
        old = _caches.pop(source.path, None)
        _caches[source.path] = opened
        while len(_caches) > _OPEN_CACHES:
            _, gone = _caches.popitem(last=False)
            gone.close()
    if old is not None:
        old.close()
    return opened


def _checked_cache(task: BundleTask) -> Cache:
    """The source cache, reopened once if the bundle's size differs from the plan's; still different: an error."""
    cache = source_cache(task.source)
    if cache.has_bundle(task.ref) and cache.bundle_file_size(task.ref) == task.source_size:
        return cache
    cache = source_cache(task.source, fresh=True)
    if not cache.has_bundle(task.ref) or cache.bundle_file_size(task.ref) != task.source_size:
        raise BundleError(f"{task.source.path}: the bundle of level {task.ref.level} at row {task.ref.row0}, "
                          f"column {task.ref.col0} changed or vanished since the export was planned")
    return cache


# --------------------------------------------------------------------------------------------
# the work


def _reencode(task: BundleTask, data: BundleData, mask: np.ndarray, cache: Cache,
              cancel: CancelFlag | None, threads: int | None) -> tuple[list[bytes], list[str]]:
    """Re-encode the selected tiles in one call (its OpenMP threads busy to the end of the bundle);
    the compiled core looks at `cancel` between slices of about 50 ms of coding."""
    policy = task.policy
    if threads is not None:
        policy = dataclasses.replace(policy, threads=int(threads))
    return recompress_bundle(policy, data, mask, cache, cancel=cancel)


def _check_count(plan: BundlePlan, task: BundleTask, label: str) -> None:
    """A planned bundle must hold the tiles selection counted: fewer or more means the source changed."""
    if plan.tiles != task.tiles:
        raise BundleError(f"{label}: holds {plan.tiles} of the {task.tiles} selected tiles now; "
                          "the source changed since the export was planned")


def prepare_bundle(task: BundleTask, cache: Cache, *, cancel: CancelFlag | None = None,
                   threads: int | None = None, needs_crc: bool = False) -> Prepared:
    """Plan one output bundle (re-encoding first under an active policy); the runner streams or stages it."""
    check_cancel(cancel)
    label = cache.bundle_label(task.ref)
    mask = task.mask
    listed = getattr(cache, "open_tiles", None)
    lays_out = getattr(cache, "lays_out", None)
    if task.policy is None and lays_out is not None and lays_out(task.ref):
        # a body laid out as it is read: written as runs of it. A small one is read here and its CRC taken here
        # (isal, the GIL released) rather than on the writer's thread; a large one is handed on while its bands
        # are still being read, the writer taking each band (and its CRC) once it is in: streamed through a
        # few reused buffers, unless its CRC is needed before it is written (then laid out whole)
        data, filling = cache.open_body(task.ref, stream=not needs_crc)
        try:
            plan = plan_bundle(data, mask, task.version, label, cache)
            _check_count(plan, task, label)
            plan.filling = filling
            if filling is None or needs_crc:
                plan.compute_crc()
        except BaseException:
            data.close()
            close = getattr(filling, "close", None)
            if close is not None:
                close()             # a stream's reading waits for its writer: stopped here, none will come
            raise
        return Prepared(task, plan, data, [])
    if task.policy is None and listed is not None:
        # a source of separate tiles (MBTiles, GeoPackage, PMTiles, folders): planned from its tiles as read,
        # which the writer gathers into the output (laying out a body would copy every byte once more)
        idx, tiles = listed(task.ref)
        plan = plan_tiles(task.ref, idx, tiles, mask, task.version, label)
        del tiles
        _check_count(plan, task, label)
        if needs_crc:
            plan.compute_crc()
        return Prepared(task, plan, None, [])
    data = cache.open_bundle(task.ref)
    try:
        found: list[str] = []
        if task.policy is not None:
            new_tiles, found = _reencode(task, data, mask, cache, cancel, threads)
            plan = plan_from_tiles(task.ref, new_tiles, mask, task.version, label)
            data.close()
            data = None
        else:
            plan = plan_bundle(data, mask, task.version, label, cache)
            if plan.file is not None:     # the writer reads the file: the mapping is not needed
                plan.source = b""
                data.close()
                data = None
        _check_count(plan, task, label)
        if needs_crc:
            plan.compute_crc()
        return Prepared(task, plan, data, found)
    except BaseException:
        if data is not None:
            data.close()
        raise


_scanners = threading.local()


def _scanner() -> RunScanner:
    """This thread's read-ahead helper (one per worker thread, reused by every bundle it stages)."""
    scanner = getattr(_scanners, "scanner", None)
    if scanner is None:
        scanner = _scanners.scanner = RunScanner()
    return scanner


def _write_plan(fd: int, plan: BundlePlan) -> tuple[int, int]:
    """A plan's .bundle into `fd`: source runs copied in the kernel where the file allows (the CRC-32
    from the helper's read-ahead), else streamed from the plan's buffer; (size, CRC-32)."""
    if plan.file is not None:
        src, file_id = open_source_id(plan.file, plan.file_size, plan.file, getattr(plan, "file_id", None))
        try:
            parts = plan_parts(plan, src, plan.file, file_id)     # remembered run CRCs: no read
            if parts is not None:
                crc, size = write_parts(parts, lambda b: write_all(fd, b), KernelCopier(fd), _scanner(), True)
                check_unchanged(src, plan.file_size, plan.file, file_id)
                remember(parts, file_id)
                return size, crc
        finally:
            os.close(src)
    size = crc = 0
    for chunk in plan.chunks():
        crc = isal_zlib.crc32(chunk, crc)
        write_all(fd, chunk)
        size += len(chunk)
    return size, crc & 0xFFFFFFFF


def _write_file(final: str, write: Callable[[int], tuple[int, int]], cancel: CancelFlag | None) -> tuple[int, int]:
    """Make `final` through a temporary name renamed when complete; `write(fd)` returns (size, CRC-32)."""
    check_cancel(cancel)      # no new file once the job is cancelled (staging is being removed)
    tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            size, crc = write(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return size, crc & 0xFFFFFFFF


def bundle_recipe(task: BundleTask, cancel: CancelFlag | None = None, *,
                  cache: Cache | None = None) -> BundleRecipe | None:
    """A pass-through bundle as a recipe (nothing written), or None when it must be staged: re-encoding,
    an inflated package entry, or source size prefixes that need fixing."""
    if task.policy is not None:
        return None
    if cache is None:
        cache = _checked_cache(task)
    if getattr(cache, "open_tiles", None) is not None:
        return None         # a source of separate tiles has no bundle file to copy from: staged (not read twice)
    prep = prepare_bundle(task, cache, cancel=cancel)
    try:
        plan = prep.plan
        if plan.file is None:
            return None
        file_id = getattr(plan, "file_id", None)
        fd, version = open_source_id(plan.file, plan.file_size, plan.file, file_id)
        try:
            parts = plan_parts(plan, fd, plan.file, version)
            if parts is None:
                return None
            crc = isal_zlib.crc32(parts[0])
            ranges = []
            found = []
            buf = bytearray(max((p.length for p in parts[1:] if p.crc is None), default=0))
            for p in parts[1:]:
                if p.crc is not None:     # remembered for this file version: prefixes right, not read again
                    crc = crc_combine(crc, p.crc, p.length)
                    ranges.append((p.offset, p.length))
                    continue
                view = memoryview(buf)[:p.length]
                got = 0
                while got < p.length:
                    n = os.preadv(fd, [view[got:]], p.offset + got)
                    if n == 0:
                        raise BundleError(f"{plan.file}: the file changed while it was being exported")
                    got += n
                if p.prefix_at is not None and len(p.prefix_at):
                    arr = np.frombuffer(buf, dtype=np.uint8, count=p.length)
                    if not check_prefixes(arr, p.prefix_at.astype(np.int64) - p.prefix_base, p.prefix_sizes):
                        return None      # the package needs fixed prefixes: stage this bundle
                    del arr
                run_crc = isal_zlib.crc32(view)
                crc = crc_combine(crc, run_crc, p.length)
                found.append((p.offset, p.length, run_crc))
                ranges.append((p.offset, p.length))
                del view
            check_unchanged(fd, plan.file_size, plan.file, version)
            for offset, length, run_crc in found:
                kcopy.RUN_CRCS.put(version, offset, length, run_crc)
        finally:
            os.close(fd)
        return BundleRecipe(task.index, task.name, task.ref.level, plan.tiles, plan.tile_bytes, plan.size,
                            crc & 0xFFFFFFFF, bytes(plan.aux), plan.file, plan.file_size, file_id, ranges,
                            None if plan.bundlx is None else bytes(plan.bundlx), list(prep.warnings))
    finally:
        prep.release()


def stage_recipes(recipes: list[BundleRecipe], staging: str, cancel: CancelFlag | None = None) -> None:
    """Move the recipes' header blocks (and V1 .bundlx) into one staged file in `staging` (temp name
    + rename: a rerun makes the same file), each recipe keeping its offsets, sizes and CRC-32."""
    if not recipes:
        return
    blobs: list = []
    at = 0
    for r in recipes:
        r.head_offset, r.head_size = at, len(r.aux)
        blobs.append(r.aux)
        at += len(r.aux)
        if r.bundlx is not None:
            r.bundlx_offset, r.bundlx_size, r.bundlx_crc32 = at, len(r.bundlx), isal_zlib.crc32(r.bundlx) & 0xFFFFFFFF
            blobs.append(r.bundlx)
            at += len(r.bundlx)
    path = os.path.join(staging, f".heads-{recipes[0].index}")

    def write(fd: int) -> tuple[int, int]:
        for b in blobs:
            write_all(fd, b)
        return at, 0

    _write_file(path, write, cancel)
    for r in recipes:
        r.head_path, r.aux = path, None
        if r.bundlx is not None:
            r.bundlx = None


def run_bundle_task(task: BundleTask, cancel: CancelFlag | None = None, *, cache: Cache | None = None,
                    threads: int | None = None) -> BundleOutput:
    """Make one output bundle as a file under task.staging (idempotent: temp name + rename)."""
    if task.staging is None:
        raise ValueError("run_bundle_task needs a task with a staging folder")
    if cache is None:
        cache = _checked_cache(task)
    prep = prepare_bundle(task, cache, cancel=cancel, threads=threads)
    try:
        plan = prep.plan
        final = os.path.join(task.staging, *task.name.split("/"))
        size, crc = _write_file(final, lambda fd: _write_plan(fd, plan), cancel)
        if size != plan.size:
            raise BundleError(f"{cache.bundle_label(task.ref)}: {size} bytes written of {plan.size} planned")
        out = BundleOutput(task.index, task.name, final, size, crc, task.ref.level, plan.tiles, plan.tile_bytes,
                           warnings=list(prep.warnings))
        if plan.bundlx is not None:
            out.bundlx_path = final[:-1] + "x"
            bx = plan.bundlx
            out.bundlx_size, out.bundlx_crc32 = _write_file(
                out.bundlx_path, lambda fd: (write_all(fd, bx), (len(bx), isal_zlib.crc32(bx)))[1], cancel)
        return out
    finally:
        prep.release()

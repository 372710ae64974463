"""export(): a request made into an ExportPlan once, run by a runner, the output renamed into place.

The plan (tilecrate.plan) resolves the request; the in-process runner (tilecrate.runners.inprocess)
streams its bundle tasks in order into the package, a Dask runner (tilecrate.runners.dask, with
`scheduler=`) fans them out over a cluster. The output is built under a temporary name next to
`out` and renamed into place only when complete; an error or a cancel removes it.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from typing import Callable

from tilecrate.cache import Cache, open_cache
from tilecrate.errors import ExportError
from tilecrate.package.layout import is_vector_source
from tilecrate.package.tempfiles import sweep_stale_temps, temp_path
from tilecrate.package.zipstream import ZIP64_LIMIT
from tilecrate.plan import ExportPlan, check_source, make_plan
from tilecrate.request import ExportRequest
from tilecrate.runners.base import ExportProgress, ExportResult, check_cancel, move_into_place, os_error, remove
from tilecrate.runners.inprocess import write_plan
from tilecrate.selection import Selection
from tilecrate.sinks import export_open, prefetch_levels, sink_kind

__all__ = ["ExportProgress", "ExportResult", "export", "export_plan", "check_output"]


def check_output(plan: ExportPlan) -> None:
    """Refuse an output that cannot be written: a taken folder name, a missing parent folder."""
    out = plan.out
    if out is None:
        raise ExportError("the plan has no output path (it was made for an estimate)")
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        # a FIFO, device or symlink would be replaced by the rename (or written through)
        raise ExportError(f"{out} exists and is not a regular file or folder; choose another output")
    if os.path.isdir(out) and (plan.layout.is_package or os.listdir(out)):
        raise ExportError(f"{out}: a folder with this name exists; choose another output or remove it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ExportError(f"{parent}: the output folder does not exist")


def export_plan(plan: ExportPlan, cache: Cache | None = None, *,
                progress: Callable[[ExportProgress], None] | None = None,
                cancel: threading.Event | None = None, threads: int | None = None) -> ExportResult:
    """Run a plan in this process (opening its source unless `cache` is given); the output appears complete or not at all."""
    if cache is None:
        with open_cache(plan.source.path) as opened:
            return export_plan(plan, opened, progress=progress, cancel=cancel, threads=threads)
    check_output(plan)
    out = plan.out
    started = time.perf_counter()
    sweep_stale_temps(out)
    tmp = temp_path(out)
    try:
        result = write_plan(plan, cache, tmp, progress=progress, cancel=cancel, threads=threads)
        check_cancel(cancel)
        move_into_place(tmp, out)
    except BaseException as e:
        remove(tmp)
        if isinstance(e, OSError):
            raise os_error(e, out) from None
        raise
    result.path = out
    result.seconds = time.perf_counter() - started
    return result


def export(cache: Cache | str, request: ExportRequest, out: str, *,
           progress: Callable[[ExportProgress], None] | None = None,
           cancel: threading.Event | None = None, threads: int | None = None,
           selection: Selection | None = None, zip64_limit: int = ZIP64_LIMIT,
           scheduler=None, local_temp_folder: bool = False, format: str | None = None) -> ExportResult:
    """Write the tiles a request selects to `out`: a .tpkx, a .tpk, or a cache folder (tile_package False).

    An `out` ending in .mbtiles, .gpkg or .pmtiles, or `format` "xyz" (a folder), is an open-format
    output written by tilecrate.sinks from the same plan (issue 12).

    `scheduler` runs the bundle tasks on a Dask cluster: "tcp://host:8786", "local" (a LocalCluster
    of worker processes for this call), a distributed.Client or a tilecrate.runners.dask.DaskRunner;
    `local_temp_folder` pins the job to one worker that builds the package in its own temp folder.
    """
    if not isinstance(cache, Cache):
        with open_cache(os.fspath(cache)) as opened:
            return export(opened, request, out, progress=progress, cancel=cancel, threads=threads,
                          selection=selection, zip64_limit=zip64_limit, scheduler=scheduler,
                          local_temp_folder=local_temp_folder, format=format)
    open_kind = sink_kind(out, format)
    if open_kind is not None:
        if scheduler is not None or local_temp_folder:
            raise ExportError(f"a {open_kind} output is written in this process; a Dask scheduler and "
                              "local_temp_folder apply to .tpkx, .tpk and cache folder outputs")
        return export_open(cache, request, out, open_kind, progress=progress, cancel=cancel, selection=selection)
    if is_vector_source(cache):
        # vector tiles: always a .vtpk, written by tilecrate.package.vtpk (issue 13), imported only then
        from tilecrate.package.vtpk import export_vtpk

        return export_vtpk(cache, request, out, progress=progress, cancel=cancel, selection=selection,
                           zip64_limit=zip64_limit)
    check_source(cache)
    if not cache.esri_readable:     # WebP and the like pass through to the open sinks only (issue 12)
        raise ExportError(f"{cache.path}: its tiles are {cache.tile_format}; ArcGIS tile packages and caches hold "
                          "JPEG or PNG tiles its readers decode (export it to .mbtiles, .pmtiles or --format xyz)")
    started = time.perf_counter()
    prefetch_levels(cache, request, selection)      # SQLite sources: levels indexed on a helper thread meanwhile
    plan = make_plan(cache, request, out, cancel=cancel, selection=selection, zip64_limit=zip64_limit)
    check_output(plan)
    if scheduler is None:
        if local_temp_folder:
            raise ExportError("local_temp_folder needs a Dask scheduler (the in-process export writes next to "
                              "the output already)")
        result = export_plan(plan, cache, progress=progress, cancel=cancel, threads=threads)
    else:
        from tilecrate.runners.dask import run_on_cluster     # distributed is imported only for a cluster

        result = run_on_cluster(plan, scheduler, cache=cache, progress=progress, cancel=cancel,
                                local_temp_folder=local_temp_folder)
    result.seconds = time.perf_counter() - started
    return result

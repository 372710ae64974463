"""Open tile formats as export outputs: MBTiles, GeoPackage, PMTiles and XYZ folders.

`export()` hands an output here when its name ends in .mbtiles, .gpkg or .pmtiles, or when the
format "xyz" is asked for. The request is planned exactly as for a package (levels, extent,
polygon, re-encoding: `tilecrate.plan.make_plan`); each sink module writes the plan's per-bundle
selection into a temporary name next to the output, renamed into place when complete, removed
on an error or a cancel. These outputs are not offered by the REST exportTiles operation.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from typing import Callable

from tilecrate.errors import ExportError

KINDS = ("mbtiles", "gpkg", "pmtiles", "xyz")
EXTENSIONS = {".mbtiles": "mbtiles", ".gpkg": "gpkg", ".pmtiles": "pmtiles"}
_APPROXIMATE = {
    "mbtiles": "SQLite page overhead: approximate (tile bytes are exact; pages, row headers and the index are estimated)",
    "gpkg": "SQLite page overhead: approximate (tile bytes are exact; pages, row headers and the index are estimated)",
}
_PAGE = 4096                  # SQLite's default page size, which the writers keep
_SCHEMA_PAGES = {"mbtiles": 6, "gpkg": 12}
_INDEX_ENTRY = 20             # the unique (zoom, column, row) index: key, rowid and cell overhead


def sink_kind(out: str | os.PathLike | None, fmt: str | None = None) -> str | None:
    """The open-format output a name or `fmt` asks for ('mbtiles', 'gpkg', 'pmtiles', 'xyz'), or None."""
    if fmt is not None:
        f = fmt.lower().lstrip(".")
        f = {"geopackage": "gpkg", "tpkx": None, "tpk": None}.get(f, f)
        if f is None:
            return None
        if f not in KINDS:
            raise ExportError(f"unknown output format {fmt!r}; one of {', '.join(KINDS)} (or a .tpkx/.tpk name)")
        if out is not None and f != "xyz":
            ext = os.path.splitext(os.fspath(out))[1].lower()
            if EXTENSIONS.get(ext, f) != f:
                raise ExportError(f"{os.fspath(out)}: a {ext} name does not fit format {f}; rename the output")
        return f
    if out is None:
        return None
    return EXTENSIONS.get(os.path.splitext(os.fspath(out))[1].lower())


def _writer(kind: str):
    if kind == "mbtiles":
        from tilecrate.sinks.mbtiles import write_mbtiles as w
    elif kind == "gpkg":
        from tilecrate.sinks.gpkg import write_gpkg as w
    elif kind == "pmtiles":
        from tilecrate.sinks.pmtiles import write_pmtiles as w
    else:
        from tilecrate.sinks.xyz import write_xyz as w
    return w


def _check_out(out: str, kind: str) -> None:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None:
        if kind == "xyz":
            if not stat.S_ISDIR(st.st_mode) or os.listdir(out):
                raise ExportError(f"{out} exists and is not an empty folder; choose another output or remove it")
        elif not stat.S_ISREG(st.st_mode):
            raise ExportError(f"{out} exists and is not a regular file; choose another output")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ExportError(f"{parent}: the output folder does not exist")


def _size(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def export_open(cache, request, out: str | os.PathLike, kind: str, *,
                progress: Callable | None = None, cancel: threading.Event | None = None, selection=None):
    """Export `request` from the open `cache` to `out` as `kind`; an ExportResult (kind = the format)."""
    from tilecrate.package.tempfiles import sweep_stale_temps, temp_path
    from tilecrate.plan import check_source, make_plan
    from tilecrate.runners.base import ExportProgress, ExportResult, check_cancel, move_into_place, os_error, remove
    from tilecrate.sinks.common import source_meta, tile_kind

    started = time.perf_counter()
    out = os.path.abspath(os.fspath(out))
    tile_kind(cache, False)          # refuse LERC and vector sources before selecting anything
    check_source(cache)
    _check_out(out, kind)
    prefetch_levels(cache, request, selection)
    plan = make_plan(cache, request, None, cancel=cancel, selection=selection)
    total_tiles, total_bytes = plan.tiles, plan.selection.tile_bytes
    meta = source_meta(cache)

    def report(done: int, nbytes: int, level: int | None) -> None:
        if progress is not None:
            progress(ExportProgress(done, total_tiles, nbytes, total_bytes, level))

    sweep_stale_temps(out)
    tmp = temp_path(out)
    try:
        report(0, 0, None)
        tiles, levels, warnings = _writer(kind)(plan, cache, tmp, meta, progress=report, cancel=cancel)
        check_cancel(cancel)
        size = _size(tmp)
        move_into_place(tmp, out)
    except BaseException as e:
        remove(tmp)
        # sqlite3 is imported by the MBTiles/GeoPackage writers only: a package export need not load it
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is not None and isinstance(e, sqlite3.Error):
            if "full" in str(e):
                raise ExportError(f"{out}: the disk is full (no space left while writing the export)") from None
            raise ExportError(f"{out}: cannot write the {kind} output ({e})") from None
        if isinstance(e, OSError):
            raise os_error(e, out) from None
        raise
    report(tiles, size, None)
    result = ExportResult(out, tiles, size, levels, warnings, plan.quality_used, kind, "")
    result.seconds = time.perf_counter() - started
    return result


def prefetch_levels(cache, request, selection=None) -> None:
    """Have a source that can (SQLite) index the request's levels on a helper thread while planning runs."""
    prefetch = getattr(cache, "prefetch_levels", None)
    if prefetch is None or selection is not None:
        return
    from tilecrate.errors import TilecrateError
    from tilecrate.selection import resolve_levels

    try:
        levels = resolve_levels(cache.scheme, request.export_by, request.level_items)
    except TilecrateError:
        return                  # planning reports a bad request itself
    prefetch(levels)


def estimate_open(plan, kind: str, cache=None) -> tuple[int, dict[int, int], str | None]:
    """(bytes, {level: bytes}, None if exact else why approximate) of an open-format output of `plan`
    (`cache`: the plan's open source, else it is opened)."""
    if cache is None:
        from tilecrate.cache import open_cache

        with open_cache(plan.source.path) as opened:
            return estimate_open(plan, kind, opened)
    per_level: dict[int, int] = {}
    note = _APPROXIMATE.get(kind)
    if plan.policy is not None:
        note = "re-encoded tile sizes are not known before the export: approximate (the source tiles' bytes)"
    for level, (tiles, nbytes, sizes) in _written(plan, cache, kind in _APPROXIMATE).items():
        if tiles:
            per_level[level] = sqlite_bytes(sizes) if kind in _APPROXIMATE else nbytes
    total = sum(per_level.values())
    if kind in _APPROXIMATE:
        total += _SCHEMA_PAGES[kind] * _PAGE
    elif kind == "xyz":
        total += _xyz_metadata_size(plan, cache)
    elif kind == "pmtiles":
        total += _pmtiles_overhead(plan, cache)
        note = note or ("identical tiles are stored once: exact when no two selected tiles are identical, "
                        "otherwise an upper bound")
    return total, per_level, note


def sqlite_bytes(sizes) -> int:
    """Bytes SQLite takes for rows of blobs of these sizes (4 KiB pages filled in key order: the local part
    of each payload on leaf pages, the rest on whole overflow pages, as SQLite's file format splits it) and
    their unique index entries. Approximate: interior pages and page headers are not counted exactly."""
    import numpy as np

    usable = _PAGE
    payload = np.asarray(sizes, dtype=np.int64) + 12          # record header and the three key columns
    most, least = usable - 35, (usable - 12) * 32 // 255 - 23
    k = least + (payload - least) % (usable - 4)
    local = np.where(payload <= most, payload, np.where(k <= most, k, least))
    overflow = -(-(payload - local) // (usable - 4))
    leaf = local + 6 + 4 * (overflow > 0)                       # cell header, cell pointer, overflow pointer
    # rows arrive in rowid order: each leaf page takes cells until the next does not fit
    leaf_pages, free = 0, 0
    for cell in leaf.tolist():
        if cell > free:
            leaf_pages += 1
            free = usable - 8
        free -= cell
    index_pages = -(-len(payload) * _INDEX_ENTRY // (usable - 8))
    return (leaf_pages + int(overflow.sum()) + index_pages) * _PAGE


def _written(plan, cache, want_sizes: bool = False) -> dict[int, tuple[int, int, object]]:
    """{level: (tiles, bytes, tile sizes if asked)} a sink writes: the selection, less tiles past a Web
    Mercator world's grid."""
    import numpy as np

    from tilecrate.errors import TilecrateError
    from tilecrate.sinks.common import web_mercator_zooms
    from tilecrate.tiling import PACKET

    try:
        zooms = web_mercator_zooms(cache.scheme, [lv.level for lv in plan.selection.levels])
    except TilecrateError:
        zooms = {}
    out = {}
    for lv in plan.selection.levels:
        rng = lv.tile_range()
        n = 1 << zooms[lv.level] if lv.level in zooms else None
        if not want_sizes and (n is None or rng is None or (rng[1] < n and rng[3] < n)):
            out[lv.level] = (lv.tiles, lv.tile_bytes, None)
            continue
        tiles = nbytes = 0
        parts = []
        for b in lv.bundles:
            if not b.tiles:
                continue
            idx = np.flatnonzero(b.mask.reshape(-1))
            if n is not None:
                idx = idx[(b.ref.row0 + idx // PACKET < n) & (b.ref.col0 + idx % PACKET < n)]
            _, sizes = cache.index(b.ref)
            tiles += len(idx)
            nbytes += int(sizes[idx].sum(dtype=np.uint64))
            parts.append(sizes[idx])
        out[lv.level] = (tiles, nbytes, np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return out


def _xyz_metadata_size(plan, cache) -> int:
    from tilecrate.errors import TilecrateError
    from tilecrate.sinks.common import source_meta, tile_kind, web_mercator_zooms
    from tilecrate.sinks.xyz import metadata_json

    levels = [lv.level for lv in plan.selection.levels]
    try:
        zooms, mercator = web_mercator_zooms(cache.scheme, levels), True
    except TilecrateError:
        zooms, mercator = {lv: lv for lv in levels}, False
    doc = metadata_json(plan, source_meta(cache), tile_kind(cache, plan.policy is not None), zooms, mercator)
    return len(json.dumps(doc, ensure_ascii=False, indent=1).encode())


def _pmtiles_overhead(plan, cache) -> int:
    """Header, room for the root directory, metadata and leaf directories of the archive without
    deduplication, built from the indexes."""
    import numpy as np

    from tilecrate.sinks.common import source_meta, tile_kind, web_mercator_zooms
    from tilecrate.sinks.pmtiles import _gz, addressable, build_directories, data_offset, metadata_json, tile_ids
    from tilecrate.tiling import PACKET

    zooms = web_mercator_zooms(cache.scheme, [lv.level for lv in plan.selection.levels])
    ids, lengths = [], []
    for b in plan.selection.bundles():
        if not b.tiles:
            continue
        idx = np.flatnonzero(b.mask.reshape(-1))
        rows, cols = b.ref.row0 + idx // PACKET, b.ref.col0 + idx % PACKET
        n = 1 << zooms[b.ref.level]
        ok = (rows < n) & (cols < n)            # tiles past the world are left out by the writer
        _, sizes = cache.index(b.ref)
        ids.append(tile_ids(zooms[b.ref.level], cols[ok], rows[ok]))
        lengths.append(sizes[idx[ok]].astype(np.uint64))
    meta = _gz(json.dumps(metadata_json(source_meta(cache), tile_kind(cache, plan.policy is not None)),
                          ensure_ascii=False).encode())
    start = data_offset(addressable(plan, zooms))
    if not ids:
        _, leaves = build_directories(*(np.zeros(0, np.uint64),) * 4)
        return start + len(leaves) + len(meta)
    ids_a = np.concatenate(ids)
    order = np.argsort(ids_a, kind="stable")
    ids_a, len_a = ids_a[order].astype(np.uint64), np.concatenate(lengths)[order]
    offs = np.concatenate(([0], np.cumsum(len_a)[:-1])).astype(np.uint64)
    _, leaves = build_directories(ids_a, np.ones(len(ids_a), np.uint64), len_a, offs)
    return start + len(leaves) + len(meta)

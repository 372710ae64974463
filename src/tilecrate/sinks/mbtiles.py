"""MBTiles 1.3 output: a SQLite file with complete metadata, a tiles table with a unique index, TMS rows.

Written into the export's temporary file with journaling and syncing off (nothing to roll back
to: a failed export removes the file), in large transactions; the unique index is built once at
the end, which is faster than keeping it up to date row by row.
"""
from __future__ import annotations

from typing import Callable

from tilecrate.cache import Cache
from tilecrate.plan import ExportPlan
from tilecrate.results import CancelFlag, check_cancel
from tilecrate.sinks.common import (SourceMeta, Tally, bundle_tiles, commit_when_full, inside_grid, iter_bundles,
                                    open_sqlite, tile_kind, web_mercator_zooms, wgs84_bounds)

APPLICATION_ID = 0x4D504258          # "MPBX"


def _num(v: float) -> str:
    return f"{v:.7f}".rstrip("0").rstrip(".")


def metadata_rows(plan: ExportPlan, meta: SourceMeta, fmt: str, zooms: dict[int, int]) -> list[tuple[str, str]]:
    """The `metadata` table: name, format, bounds, center, minzoom, maxzoom, attribution, description, ..."""
    exported = [zooms[lv.level] for lv in plan.selection.levels if lv.tiles > 0] or sorted(zooms.values())
    zmin, zmax = (min(exported), max(exported)) if exported else (0, 0)
    w, s, e, n = wgs84_bounds(plan)
    rows = [("name", meta.name), ("format", fmt), ("bounds", ",".join(_num(v) for v in (w, s, e, n))),
            ("center", f"{_num((w + e) / 2)},{_num((s + n) / 2)},{zmin}"), ("minzoom", str(zmin)),
            ("maxzoom", str(zmax)), ("attribution", meta.attribution), ("description", meta.description),
            ("type", "baselayer"), ("version", "1")]
    return rows


def write_mbtiles(plan: ExportPlan, cache: Cache, tmp: str, meta: SourceMeta, *,
                  progress: Callable[[int, int, int | None], None] | None = None,
                  cancel: CancelFlag | None = None) -> tuple[int, dict[int, dict], list[str]]:
    """Write the plan's tiles as MBTiles to `tmp`; (tiles, {level: {tiles, size}}, warnings)."""
    fmt = tile_kind(cache, plan.policy is not None)
    zooms = web_mercator_zooms(cache.scheme, [lv.level for lv in plan.selection.levels])
    db = open_sqlite(tmp, APPLICATION_ID)
    warnings: list[str] = []
    tally = Tally()
    try:
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.execute("BEGIN")
        db.executemany("INSERT INTO metadata VALUES (?, ?)", metadata_rows(plan, meta, fmt, zooms))
        pending = 0
        for bsel in iter_bundles(plan):
            rows, cols, tiles, found = bundle_tiles(cache, plan, bsel, cancel)
            warnings.extend(found)
            z = zooms[bsel.ref.level]
            rows, cols, tiles = inside_grid(rows, cols, tiles, 1 << z, cache.bundle_label(bsel.ref), warnings)
            flipped = ((1 << z) - 1 - rows).tolist()
            db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)",
                           zip([z] * len(tiles), cols.tolist(), flipped, tiles))
            pending = commit_when_full(db, pending + tally.add(bsel.ref.level, tiles))
            check_cancel(cancel)
            if progress is not None:
                progress(tally.tiles, tally.size, bsel.ref.level)
        db.execute("CREATE UNIQUE INDEX metadata_index ON metadata (name)")
        db.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
        db.execute("COMMIT")
    finally:
        db.close()
    return tally.tiles, tally.levels, warnings

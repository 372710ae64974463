"""Exact export estimates (estimateExportTilesSize): tile count and package bytes, from bundle indexes only.

An estimate is the export's plan with a dry-run sink: the count is the plan's selection (the same
number the maxExportTilesCount check uses), the size what export() would write, replayed through
the zip writer in dry-run mode (tilecrate.package.sizing). No tile data is read.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tilecrate.cache import Cache, open_cache
from tilecrate.package.vtpk import is_vector_source, predict_vtpk_size
from tilecrate.plan import ExportPlan, make_plan
from tilecrate.presence import PresenceStore
from tilecrate.request import ExportRequest
from tilecrate.selection import Selection, select


@dataclass
class Estimate:
    """Tiles and bytes an export would produce, in total and per level."""

    total_tiles: int
    total_size: int
    levels: dict[int, dict] = field(default_factory=dict)   # {level: {"tiles", "size", "tileBytes"}}
    approximate: str | None = None     # why the size is not exact (open formats: tilecrate.sinks), None if exact

    def to_json(self) -> dict:
        """{"totalTilesToExport", "totalSize", "levels": {"<level>": {"tiles", "size", "tileBytes"}}} (+ "approximate")."""
        out = {
            "totalTilesToExport": self.total_tiles,
            "totalSize": self.total_size,
            "levels": {str(lv): dict(v) for lv, v in sorted(self.levels.items())},
        }
        if self.approximate is not None:
            out["approximate"] = self.approximate
        return out


def estimate_plan(plan: ExportPlan) -> Estimate:
    """The estimate of a plan: its selection's counts and the exact bytes its output will have."""
    total, per_level = plan.predicted()
    levels = {
        ls.level: {"tiles": ls.tiles, "size": int(per_level.get(ls.level, 0)), "tileBytes": ls.tile_bytes}
        for ls in plan.selection.levels
    }
    return Estimate(plan.tiles, int(total), levels)


def estimate_selection(cache: Cache, selection: Selection, request: ExportRequest) -> Estimate:
    """The estimate of an already computed selection."""
    if is_vector_source(cache):
        return _estimate_vtpk(cache, selection, request)
    return estimate_plan(make_plan(cache, request, None, selection=selection))


def _estimate_vtpk(cache: Cache, selection: Selection, request: ExportRequest) -> Estimate:
    """A vector source exports a .vtpk (tilecrate.package.vtpk): its exact size from the same entry list."""
    total, per_level = predict_vtpk_size(cache, selection, request)
    levels = {ls.level: {"tiles": ls.tiles, "size": int(per_level.get(ls.level, 0)), "tileBytes": ls.tile_bytes}
              for ls in selection.levels}
    return Estimate(selection.tiles, int(total), levels)


def _estimate_open(cache: Cache, request: ExportRequest, kind: str, cancel, presence) -> Estimate:
    """An open-format output (tilecrate.sinks): exact for PMTiles/XYZ where knowable, else says why not."""
    from tilecrate.sinks import estimate_open

    plan = make_plan(cache, request, None, cancel=cancel, presence=presence)
    total, per_level, note = estimate_open(plan, kind, cache)
    levels = {ls.level: {"tiles": ls.tiles, "size": int(per_level.get(ls.level, 0)), "tileBytes": ls.tile_bytes}
              for ls in plan.selection.levels}
    return Estimate(plan.tiles, int(total), levels, note)


def estimate(cache: Cache | str, request: ExportRequest, *, cancel: threading.Event | None = None,
             presence: PresenceStore | None = None, format: str | None = None) -> Estimate:
    """Exact totalTilesToExport and totalSize (bytes of the package export() would write; `format`:
    an open-format output, mbtiles|gpkg|pmtiles|xyz, whose size may be approximate)."""
    if not isinstance(cache, Cache):
        with open_cache(str(cache)) as opened:
            return estimate(opened, request, cancel=cancel, presence=presence, format=format)
    if format is not None:
        from tilecrate.sinks import sink_kind

        kind = sink_kind(None, format)
        if kind is not None:
            return _estimate_open(cache, request, kind, cancel, presence)
    if is_vector_source(cache):
        return _estimate_vtpk(cache, select(cache, request, cancel=cancel, presence=presence), request)
    return estimate_plan(make_plan(cache, request, None, cancel=cancel, presence=presence))

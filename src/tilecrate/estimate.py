"""Exact export estimates (estimateExportTilesSize): tile count and package bytes, from bundle indexes only.

The count is the selection's (the same number the maxExportTilesCount check uses); the size is
what export() would write, as tilecrate.package.sizing predicts it. No tile data is read.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tilecrate.cache import Cache, open_cache
from tilecrate.package.sizing import predict_package_size
from tilecrate.presence import PresenceStore
from tilecrate.request import ExportRequest
from tilecrate.selection import Selection, select


@dataclass
class Estimate:
    """Tiles and bytes an export would produce, in total and per level."""

    total_tiles: int
    total_size: int
    levels: dict[int, dict] = field(default_factory=dict)   # {level: {"tiles", "size", "tileBytes"}}

    def to_json(self) -> dict:
        """{"totalTilesToExport", "totalSize", "levels": {"<level>": {"tiles", "size", "tileBytes"}}}."""
        return {
            "totalTilesToExport": self.total_tiles,
            "totalSize": self.total_size,
            "levels": {str(lv): dict(v) for lv, v in sorted(self.levels.items())},
        }


def estimate_selection(cache: Cache, selection: Selection, request: ExportRequest) -> Estimate:
    """The estimate of an already computed selection."""
    total, per_level = predict_package_size(cache, selection, request)
    levels = {
        ls.level: {"tiles": ls.tiles, "size": int(per_level.get(ls.level, 0)), "tileBytes": ls.tile_bytes}
        for ls in selection.levels
    }
    return Estimate(selection.tiles, int(total), levels)


def estimate(cache: Cache | str, request: ExportRequest, *, cancel: threading.Event | None = None,
             presence: PresenceStore | None = None) -> Estimate:
    """Exact totalTilesToExport and totalSize (bytes of the package export() would write)."""
    if isinstance(cache, Cache):
        return estimate_selection(cache, select(cache, request, cancel=cancel, presence=presence), request)
    with open_cache(str(cache)) as opened:
        return estimate_selection(opened, select(opened, request, cancel=cancel, presence=presence), request)

"""Sources: one module per tile format behind one protocol (see `Cache` and `blocks.TileBackend`).

Every source presents a tile scheme, its levels, per 128x128 block the tiles present with their
sizes and a change identity, and tile bytes. Compact caches (`compact`) are read from their bundles;
the open formats (`mbtiles`, `gpkg`, `pmtiles`, `folders` for XYZ/TMS and exploded caches) through
`blocks.BlockCache`.
"""
from __future__ import annotations

import os

from tilecrate.errors import CacheError
from tilecrate.sourcefiles import read_head
from tilecrate.sources.compact import Cache, open_compact

__all__ = ["Cache", "open_cache"]

_SQLITE = b"SQLite format 3\x00"


def open_cache(path: str | os.PathLike, *, table: str | None = None, scheme: str | None = None) -> Cache:
    """Open any source for reading: a compact cache folder, .tpk, .tpkx, .vtpk, exploded cache,
    MBTiles, GeoPackage (`table`: which tile pyramid), PMTiles or XYZ/TMS folder (`scheme`:
    'xyz' or 'tms', detected when not given)."""
    path = os.fspath(path)
    if table is None and scheme is None and not os.path.exists(path) and "#" in os.path.basename(path):
        # 'file.gpkg#table' and 'folder#tms': how such a cache names itself (plans reopen it by path)
        base, name = path.rsplit("#", 1)
        if os.path.isfile(base):
            path, table = base, name
        elif os.path.isdir(base) and name in ("xyz", "tms"):
            path, scheme = base, name
    if not os.path.exists(path):
        raise CacheError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        from tilecrate.sources import folders
        if folders.is_tile_folder(path):
            return folders.open_xyz(path, scheme)
        return open_compact(path)
    magic = read_head(path, 16)
    if magic[:2] == b"PK":
        return open_compact(path)
    if magic == _SQLITE:
        from tilecrate.sources import sqlite
        return sqlite.open_sqlite(path, table)
    if magic[:7] == b"PMTiles":
        from tilecrate.sources import pmtiles
        return pmtiles.open_pmtiles(path)
    raise CacheError(f"{path}: not a tile source tilecrate reads (not a zip package, SQLite "
                     "MBTiles/GeoPackage, PMTiles, or a cache / XYZ folder)")

"""Tile folders: XYZ / TMS (`{z}/{x}/{y}.png|jpg|webp|pbf`) and ArcGIS exploded caches
(`_alllayers/Lnn/Rrrrrrrrr/Ccccccccc.ext` next to conf.xml), read through `blocks.BlockCache`.

A level is listed (names and sizes) at most once per RELIST_SECONDS; a block's identity is the
(device, inode, size, mtime, ctime) of its files, so a tile replaced between planning and export is noticed.
Files whose names are not tiles are skipped with a warning.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time

import numpy as np

from tilecrate.errors import CacheError
from tilecrate.sourcefiles import Gone, changed, file_id, open_regular, pread_exact, read_regular
from tilecrate.sources import compact
from tilecrate.sources.blocks import FORMAT_NAMES, BlockCache, detect_format, parse_bounds, tile_pixel_size
from tilecrate.sources.item import from_metadata, read_item_folder
from tilecrate.tiling import PACKET, TileScheme, parse_level_dir, web_mercator_scheme

TILE_LIMIT = 64 << 20       # one tile file larger than this is refused
_XYZ_FILE = re.compile(r"^(\d{1,10})\.(png|jpg|jpeg|webp|pbf|mvt)$", re.IGNORECASE)
_EXPLODED_ROW = re.compile(r"^R([0-9a-fA-F]{1,8})$")
_EXPLODED_FILE = re.compile(r"^C([0-9a-fA-F]{1,8})\.(png|jpg|jpeg|webp|pbf|mvt|lerc)$", re.IGNORECASE)
_MAX_LEVEL = 30


def _xyz_dir(name: str) -> int | None:
    return int(name) if name.isdigit() and len(name) <= 10 else None


def _level_of(name: str) -> int | None:
    return _xyz_dir(name) if name.isdigit() else parse_level_dir(name)


def is_tile_folder(path: str) -> bool:
    """Whether a folder looks like an XYZ/TMS tree ({z}/{x}/{y}.ext), not an ArcGIS cache."""
    if compact._find_conf(path) is not None or os.path.isfile(os.path.join(path, "root.json")):
        return False
    if any(os.path.isdir(os.path.join(path, sub)) for sub in ("Layers", "layers", "_alllayers")):
        return False
    try:
        with os.scandir(path) as it:
            return any(e.is_dir() and _level_of(e.name) is not None for e in it)
    except OSError:
        return False


class FolderBackend:
    """Tiles as files in a level / outer / inner folder tree; `outer_is_col` says what the middle
    folder names (XYZ: x, the column; exploded: R, the row)."""

    def __init__(self, label: str, level_dirs: dict[int, str], exploded: bool, flip: bool, warn):
        self.label = label
        self._dirs = level_dirs
        self._exploded = exploded
        self._row_first = False         # Lnn/{row}/{col}.ext folders (Esri's Vundler input)
        self._flip = flip               # TMS: row = 2**z - 1 - y
        self._warn = warn
        self._lock = threading.Lock()
        self._listing: dict[int, tuple[float, dict]] = {}

    def _parse_outer(self, name: str) -> int | None:
        if self._exploded:
            m = _EXPLODED_ROW.match(name)
            return int(m.group(1), 16) if m else None
        return _xyz_dir(name)

    def _parse_inner(self, name: str) -> int | None:
        m = (_EXPLODED_FILE if self._exploded else _XYZ_FILE).match(name)
        if not m:
            return None
        return int(m.group(1), 16) if self._exploded else int(m.group(1))

    def _rc(self, level: int, outer: int, inner: int) -> tuple[int, int]:
        if self._exploded or self._row_first:
            return outer, inner
        row = (1 << level) - 1 - inner if self._flip else inner
        return row, outer

    def _list(self, level: int) -> dict:
        """{(row, col): path} of a level's tiles, listed again at most once per RELIST_SECONDS."""
        with self._lock:
            hit = self._listing.get(level)
            if hit is not None and time.monotonic() - hit[0] < compact.RELIST_SECONDS:
                return hit[1]
        found: dict = {}
        base = self._dirs.get(level)
        try:
            outers = list(os.scandir(base)) if base else []
        except OSError:
            outers = []
        for o in outers:
            ov = self._parse_outer(o.name)
            if ov is None or not o.is_dir():
                self._warn(f"{o.path}: not a tile folder name; skipped")
                continue
            try:
                inners = list(os.scandir(o.path))
            except OSError:
                continue
            for f in inners:
                iv = self._parse_inner(f.name)
                if iv is None:
                    self._warn(f"{f.path}: not a tile file name; skipped")
                    continue
                row, col = self._rc(level, ov, iv)
                # an XYZ level is 2**z tiles square: a column of 9999999999 was counted by estimates
                # and failed .tpk/.tpkx exports with a bare ValueError (a bundle past 2**32)
                if row < 0 or col < 0 or (not self._exploded and (row >> level or col >> level)):
                    self._warn(f"{f.path}: outside the level's grid; skipped")
                    continue
                if (row, col) in found:
                    self._warn(f"{f.path}: a second file for the same tile; skipped")
                    continue
                found[(row, col)] = f.path
        with self._lock:
            self._listing[level] = (time.monotonic(), found)
        return found

    def levels(self) -> list[int]:
        """Level folders holding at least one tile."""
        return sorted(lv for lv in self._dirs if self._list(lv))

    def blocks(self, level: int):
        """Blocks holding tiles at `level`."""
        return {(r - r % PACKET, c - c % PACKET) for r, c in self._list(level)}

    def _block_files(self, level: int, row0: int, col0: int) -> list[tuple[int, str]]:
        out = []
        for (r, c), p in self._list(level).items():
            if row0 <= r < row0 + PACKET and col0 <= c < col0 + PACKET:
                out.append(((r - row0) * PACKET + (c - col0), p))
        out.sort()
        return out

    def block_index(self, level: int, row0: int, col0: int):
        """(identity, sizes) from a stat of each file of the block."""
        sizes = np.zeros(PACKET * PACKET, dtype=np.uint32)
        ident = []
        for i, p in self._block_files(level, row0, col0):
            try:
                st = os.stat(p)
            except OSError:
                continue                       # removed since the listing: no tile
            if not (0 < st.st_size <= TILE_LIMIT) or not os.path.isfile(p):
                if st.st_size > TILE_LIMIT:
                    self._warn(f"{p}: {st.st_size} bytes is too large for a tile; skipped")
                continue
            sizes[i] = st.st_size
            ident.append((i, *file_id(st)))
        return (hash(tuple(ident)), len(ident)), sizes

    def _read(self, path: str) -> tuple[bytes, tuple] | None:
        try:
            fd, st = open_regular(path, path)
        except Gone:
            return None
        try:
            if not (0 < st.st_size <= TILE_LIMIT):
                return None
            data = pread_exact(fd, st.st_size, 0, path)
            if file_id(os.fstat(fd)) != file_id(st):
                raise changed(path)
            return data, file_id(st)
        finally:
            os.close(fd)

    def block_tiles(self, level: int, row0: int, col0: int):
        """(identity, {index: bytes}) read from the files, each checked unchanged during its read."""
        tiles, ident = {}, []
        for i, p in self._block_files(level, row0, col0):
            got = self._read(p)
            if got is None:
                continue
            tiles[i] = got[0]
            ident.append((i, *got[1]))
        return (hash(tuple(ident)), len(ident)), tiles

    def tile(self, level: int, row: int, col: int) -> bytes | None:
        """One tile from its file, or None."""
        p = self._list(level).get((row, col))
        got = self._read(p) if p else None
        return got[0] if got else None

    def first_tiles(self, n: int = 8) -> list[bytes]:
        """A few tiles of the lowest level (to tell format and tile size)."""
        out = []
        for lv in sorted(self._dirs):
            for p in list(self._list(lv).values())[:n]:
                got = self._read(p)
                if got:
                    out.append(got[0])
            if out:
                break
        return out

    def close(self) -> None:
        """Nothing is held open between reads."""


def open_xyz(path: str, scheme: str | None = None) -> BlockCache:
    """Open an XYZ or TMS folder; `scheme` 'xyz' or 'tms', else TMS when tilemapresource.xml is
    there (gdal2tiles writes one), XYZ otherwise."""
    detected = "tms" if os.path.isfile(os.path.join(path, "tilemapresource.xml")) else "xyz"
    scheme = (scheme or detected).lower()
    if scheme == "rowcol":
        scheme = detected = "xyz"
    if scheme not in ("xyz", "tms"):
        raise CacheError(f"{path}: tile scheme {scheme!r} is not one of xyz, tms")
    dirs, named = {}, False
    with os.scandir(path) as it:
        for e in it:
            z = _level_of(e.name)
            if z is not None and e.is_dir():
                if z > _MAX_LEVEL:
                    raise CacheError(f"{e.path}: zoom level {z} is past {_MAX_LEVEL}")
                if z in dirs:
                    raise CacheError(f"{path}: two folders for level {z}")
                dirs[z] = e.path
                named = named or not e.name.isdigit()
    warnings: list[str] = []
    backend = FolderBackend(path, dirs, exploded=False, flip=scheme == "tms", warn=warnings.append)
    if named:
        # Lnn/{row}/{col}.ext is how Esri's tools lay out tiles before bundling (raster-tiles-compactcache)
        if scheme == "tms":
            raise CacheError(f"{path}: Lnn/row/column folders count rows from the top; the tms scheme does not apply")
        backend._row_first = True
        scheme = "rowcol"
    samples = backend.first_tiles()
    if not samples:
        raise CacheError(f"{path}: no tiles ({{z}}/{{x}}/{{y}}.png|jpg|webp|pbf) in this folder")
    fmt = detect_format(samples)
    size = tile_pixel_size(samples[0]) if fmt in ("PNG", "JPEG", "MIXED") else 512 if fmt == "pbf" else 256
    tiling = web_mercator_scheme(max(max(dirs) + 1, 1), size)
    meta = _metadata_json(path, warnings.append)
    name = meta.get("name") if isinstance(meta.get("name"), str) and meta["name"].strip() else \
        os.path.basename(os.path.normpath(path))
    where = os.path.abspath(path) + ("" if scheme in (detected, "rowcol") else "#" + scheme)   # reopened alike
    cache = BlockCache.create(where, scheme, name, tiling, fmt, backend,
                              parse_bounds(meta.get("bounds")))
    backend._warn = cache._warn
    for w in warnings:
        cache._warn(w)
    cache.item = read_item_folder(path, path, cache._warn).merged(from_metadata(meta))
    cache.source_metadata = meta
    return cache


def _metadata_json(path: str, warn) -> dict:
    """metadata.json of a tile folder (written by pmtiles, mb-util, tippecanoe): MBTiles-style keys."""
    p = os.path.join(path, "metadata.json")
    if not os.path.isfile(p):
        return {}
    try:
        meta = json.loads(read_regular(p, p, 4 << 20).decode("utf-8-sig"))
    except (CacheError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(f"{p}: not read ({e})")
        return {}
    except RecursionError:                # [[[[...]]]] a few thousand deep: not a bare error at open
        warn(f"{p}: not read (nested too deeply)")
        return {}
    return meta if isinstance(meta, dict) else {}


def open_exploded(path: str, root: str, meta, tiles_dir: str, label: str) -> BlockCache:
    """Open an exploded ArcGIS cache (conf.xml with esriMapCacheStorageModeExploded)."""
    if not os.path.isdir(tiles_dir):
        raise CacheError(f"{path}: no tile folder (_alllayers) next to {os.path.basename(label)}")
    dirs = {}
    with os.scandir(tiles_dir) as it:
        for e in it:
            lv = parse_level_dir(e.name)
            if lv is not None and e.is_dir():
                dirs[lv] = e.path
    warnings: list[str] = []
    backend = FolderBackend(tiles_dir, dirs, exploded=True, flip=False, warn=warnings.append)
    if not backend.levels():
        bundles = any(n.lower().endswith(".bundle") for d in dirs.values() for n in os.listdir(d))
        raise CacheError(f"{label}: the conf.xml says exploded storage but _alllayers holds no exploded tiles "
                         "(Lnn/Rrrrrrrrr/Ccccccccc.ext)" + ("; it holds compact .bundle files: fix StorageFormat"
                                                            if bundles else ""))
    scheme: TileScheme = meta.scheme
    fmt = meta.tile_format
    if fmt.upper() in ("MIXED", "") or fmt.lower() in FORMAT_NAMES:
        fmt = FORMAT_NAMES.get(fmt.lower(), fmt)
    name = os.path.basename(os.path.normpath(root))
    if name.lower() == "layers":
        name = os.path.basename(os.path.dirname(os.path.normpath(root))) or name
    cache = BlockCache.create(os.path.abspath(path), "exploded", meta.name or name, scheme, fmt, backend,
                              meta.full_extent, meta.initial_extent)
    cache.compression_quality = meta.quality
    backend._warn = cache._warn
    for w in warnings:
        cache._warn(w)
    cache.item = read_item_folder(root, label, cache._warn)
    return cache


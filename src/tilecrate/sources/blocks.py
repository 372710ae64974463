"""Sources whose tiles are not stored in bundles (MBTiles, GeoPackage, PMTiles, XYZ / TMS and
exploded folders), presented as compact caches are: blocks of 128x128 tiles with every tile's size.

A format module implements `TileBackend` (levels, the blocks of a level, one block's tile sizes and
bytes with a change identity, one tile); `BlockCache` turns it into a `Cache`, so selection,
estimates, exports and the server use one code path and stay exact. A block's bytes are laid out
as a compact V2 bundle body (a 4-byte little-endian size before each tile; offsets point at the
tile bytes), so bundle writers copy them unchanged. Blocks exist only in memory: `bundle_file`
is None.
"""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import numpy as np

from tilecrate.errors import BundleError, CacheError
from tilecrate.sourcefiles import FileRange
from tilecrate.sources.compact import Cache
from tilecrate.sources.model import COMPACT_V2, BundleData, BundleRef
from tilecrate.tiling import PACKET, WEB_MERCATOR, WEB_MERCATOR_HALF, Extent, TileScheme, bundle_origin, sniff_image

_U32_LE = struct.Struct("<I").pack
BLOCK_LIMIT = 1 << 30      # a block's tile bytes are held in memory while it is exported: refuse more
_INDEX_CACHE_SIZE = 64         # as compact caches: 64 indexes of 192 KiB


class TileBackend(Protocol):
    """What a format module provides. Rows and columns are ArcGIS's (row 0 at the top)."""

    label: str

    def levels(self) -> list[int]:
        """Levels holding at least one tile, ascending."""

    def blocks(self, level: int) -> Iterable[tuple[int, int]]:
        """(row0, col0) of the 128x128 blocks holding at least one tile at `level`."""

    def block_index(self, level: int, row0: int, col0: int) -> tuple[tuple, np.ndarray]:
        """(identity of the version read, sizes: uint32[16384] row-major, 0 = no tile)."""

    def block_tiles(self, level: int, row0: int, col0: int) -> tuple[tuple, dict[int, bytes]]:
        """(identity, {row-major index in the block: tile bytes}) of the tiles present."""

    def tile(self, level: int, row: int, col: int) -> bytes | None:
        """One tile's bytes, or None."""

    # optional: block_body(level, row0, col0, label) -> (identity, buffer, offsets, sizes), the block
    # already laid out by `v2_layout` (BlockCache uses it instead of block_tiles + v2_body), and
    # block_list(level, row0, col0) -> (identity, ascending unique indices, their tiles' bytes), the
    # tiles without a body (BlockCache.open_tiles uses it instead of block_tiles)

    def close(self) -> None:
        """Release files and connections."""


def v2_body(tiles: dict[int, bytes], label: str) -> tuple[memoryview, np.ndarray, np.ndarray]:
    """(buffer, offsets, sizes) of tiles laid out as a compact V2 bundle body, row-major."""
    order = sorted(tiles)
    return v2_layout(np.asarray(order, dtype=np.int64), [tiles[i] for i in order], label)


def v2_layout(idx: np.ndarray, tiles: list, label: str) -> tuple[memoryview, np.ndarray, np.ndarray]:
    """(buffer, offsets, sizes) of a V2 bundle body holding `tiles[k]` at block index `idx[k]`
    (indices ascending, unique, each in [0, 16384); tiles non-empty bytes-likes)."""
    idx = np.asarray(idx, dtype=np.int64)
    n = idx.size
    if n != len(tiles) or (n and (idx[0] < 0 or idx[-1] >= PACKET * PACKET or np.any(np.diff(idx) <= 0))):
        raise ValueError(f"{label}: block indices must be ascending, unique and inside the block")
    lens = np.fromiter(map(len, tiles), dtype=np.int64, count=n)
    _, offsets, sizes, _ = v2_index(idx, lens, label)
    if n == 0:
        return memoryview(bytearray()), offsets, sizes
    # one join (one copy of the tile bytes, in C) instead of a slice assignment per tile
    parts: list = [None] * (2 * n)
    parts[0::2] = map(_U32_LE, lens.tolist())
    parts[1::2] = tiles
    return memoryview(b"".join(parts)), offsets, sizes


def v2_index(idx: np.ndarray, lens: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(each tile's offset in the V2 bundle body of tiles of `lens` bytes at ascending block indices `idx`,
    row-major, each after its 4-byte size; the block's 16 384 offsets and sizes; the body's bytes). A body
    past BLOCK_LIMIT is a CacheError."""
    total = int(lens.sum()) + 4 * idx.size
    if total > BLOCK_LIMIT:
        raise CacheError(f"{label}: one 128x128 block holds {total} bytes of tiles, more than the "
                         f"{BLOCK_LIMIT >> 20} MiB a block may hold in memory")
    at = np.cumsum(lens + 4) - lens
    offsets = np.zeros(PACKET * PACKET, dtype=np.uint64)
    sizes = np.zeros(PACKET * PACKET, dtype=np.uint32)
    offsets[idx] = at.astype(np.uint64)
    sizes[idx] = lens
    return at, offsets, sizes, total


def detect_format(samples: Iterable[bytes]) -> str:
    """The cache tile format of some tiles: JPEG, PNG, MIXED (both), WEBP, pbf, LERC or UNKNOWN."""
    kinds = {sniff_image(bytes(t[:16])) for t in samples if t}
    if not kinds:
        return "PNG"
    if kinds <= {"jpeg", "png"}:
        return "MIXED" if len(kinds) == 2 else kinds.pop().upper()
    if kinds == {"webp"}:
        return "WEBP"
    if kinds == {"gzip"}:
        return "pbf"
    if kinds == {"lerc"}:
        return "LERC"
    return "UNKNOWN"


def lonlat_extent(lon0: float, lat0: float, lon1: float, lat1: float) -> Extent | None:
    """Web Mercator extent of WGS 84 bounds (MBTiles / PMTiles / TileJSON `bounds`); None if empty."""
    def merc(lon: float, lat: float) -> tuple[float, float]:
        lat = max(min(lat, 85.05112878), -85.05112878)
        lon = max(min(lon, 180.0), -180.0)
        return lon * WEB_MERCATOR_HALF / 180.0, math.log(math.tan((90 + lat) * math.pi / 360.0)) * 6378137.0
    if not (lon0 < lon1 and lat0 < lat1) or not all(math.isfinite(v) for v in (lon0, lat0, lon1, lat1)):
        return None
    (x0, y0), (x1, y1) = merc(lon0, lat0), merc(lon1, lat1)
    return Extent(x0, y0, x1, y1, WEB_MERCATOR)


def parse_bounds(value) -> Extent | None:
    """An extent from `bounds` given as "w,s,e,n" or [w, s, e, n]; None if it is not that."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        vals = [float(v) for v in parts]
    except (TypeError, ValueError):
        return None
    return lonlat_extent(*vals) if len(vals) == 4 else None


FORMAT_NAMES = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "pbf": "pbf", "mvt": "pbf"}


@dataclass
class BlockCache(Cache):
    """A `Cache` over a `TileBackend`: the same methods, bytes served from memory."""

    _blocks: dict = field(default_factory=dict, repr=False)     # level -> set of (row0, col0)
    _levels_now: list = field(default_factory=list, repr=False)
    source_metadata: dict = field(default_factory=dict)         # MBTiles / PMTiles metadata as read

    @classmethod
    def create(cls, path: str, kind: str, name: str, scheme: TileScheme, tile_format: str, backend,
               full_extent=None, initial_extent=None) -> "BlockCache":
        """A cache over `backend`, its levels listed now."""
        cache = cls(path, kind, name, scheme, COMPACT_V2, tile_format, 0, full_extent, initial_extent,
                    backend, {})
        cache._refresh_levels()
        return cache

    # -- listing -------------------------------------------------------------------------------

    def _refresh_levels(self) -> None:
        with self._lock:
            if not self._stale(None):
                return
            self._listed[None] = time.monotonic()
        levels = self._store.levels()
        with self._lock:
            self._levels_now = sorted(levels)
            for lv in list(self._blocks):
                if lv not in levels:
                    del self._blocks[lv]

    def _refresh_level(self, level: int, force: bool = False) -> None:
        with self._lock:
            if not force and not self._stale(level):
                return
            self._listed[level] = time.monotonic()
        found = set(self._store.blocks(level)) if level in self._levels_now else set()
        with self._lock:
            self._blocks[level] = found

    @property
    def levels(self) -> list[int]:
        """Levels that hold at least one tile, ascending."""
        self._refresh_levels()
        with self._lock:
            return list(self._levels_now)

    def bundles(self, level: int | None = None) -> list[BundleRef]:
        """Blocks present, of one level or of all levels, sorted by level, row, col."""
        out = []
        for lv in ([level] if level is not None else self.levels):
            self._refresh_level(lv)
            with self._lock:
                keys = sorted(self._blocks.get(lv, ()))
            out.extend(BundleRef(lv, r, c) for r, c in keys)
        return out

    def has_bundle(self, ref: BundleRef) -> bool:
        """Whether this block holds tiles (looked for again at most once per RELIST_SECONDS)."""
        self._refresh_levels()
        self._refresh_level(ref.level)
        with self._lock:
            return (ref.row0, ref.col0) in self._blocks.get(ref.level, ())

    def _check_ref(self, ref: BundleRef) -> None:
        if not self.has_bundle(ref):
            raise CacheError(f"{self.path}: no tiles at level {ref.level}, row {ref.row0}, column {ref.col0}")

    def bundle_label(self, ref: BundleRef) -> str:
        """A readable name for messages: the source and the block."""
        return f"{self.path} (level {ref.level}, block at row {ref.row0}, column {ref.col0})"

    # -- reading -------------------------------------------------------------------------------

    def _sizes(self, ref: BundleRef) -> tuple[tuple, np.ndarray, np.ndarray]:
        self._check_ref(ref)
        key, sizes = self._store.block_index(ref.level, ref.row0, ref.col0)
        with self._lock:
            hit = self._index_cache.get(ref)
            if hit is not None and hit[0] == key:
                self._index_cache.move_to_end(ref)
                return key, hit[1], hit[2]
        sizes = np.ascontiguousarray(sizes, dtype=np.uint32)
        offsets = np.zeros(PACKET * PACKET, dtype=np.uint64)
        present = sizes > 0
        ends = np.cumsum(np.where(present, sizes.astype(np.uint64) + 4, 0), dtype=np.uint64)
        offsets[present] = (ends - sizes)[present]
        with self._lock:
            self._index_cache[ref] = (key, offsets, sizes, None)
            while len(self._index_cache) > _INDEX_CACHE_SIZE:
                self._index_cache.popitem(last=False)
        return key, offsets, sizes

    def index_with_key(self, ref: BundleRef) -> tuple[tuple, np.ndarray, np.ndarray]:
        """(identity of the version read, offsets, sizes) of a block as it is now."""
        return self._sizes(ref)

    def bundle_key(self, ref: BundleRef) -> tuple[str, tuple]:
        """(location, identity of the block's current content)."""
        return f"{self.path}::{ref.level}/{ref.row0}/{ref.col0}", self._sizes(ref)[0]

    def bundle_file_size(self, ref: BundleRef) -> int:
        """Bytes of the block laid out as a V2 bundle body (its tiles and their size prefixes)."""
        _, offsets, sizes = self._sizes(ref)
        return int(sizes.sum(dtype=np.uint64)) + 4 * int(np.count_nonzero(sizes))

    def bundle_file(self, ref: BundleRef) -> FileRange | None:
        """None: a block's bytes exist only in memory."""
        return None

    def open_bundle(self, ref: BundleRef, expect: tuple | None = None) -> BundleData:
        """The block's tiles as they are now, in memory; with `expect`, a block that is no longer that
        version is a BundleError."""
        self._check_ref(ref)
        label = self.bundle_label(ref)
        body = getattr(self._store, "block_body", None)
        if body is not None:            # the backend lays the block out itself (one query, no dict)
            key, buf, offsets, sizes = body(ref.level, ref.row0, ref.col0, label)
        else:
            key, tiles = self._store.block_tiles(ref.level, ref.row0, ref.col0)
        if expect is not None and key != expect:
            raise BundleError(f"{label}: the source changed after its tiles were selected; run the export again")
        if body is None:
            buf, offsets, sizes = v2_body(tiles, label)
        with self._lock:
            self._index_cache[ref] = (key, offsets, sizes, None)
            while len(self._index_cache) > _INDEX_CACHE_SIZE:
                self._index_cache.popitem(last=False)
        return BundleData(ref, buf, offsets, sizes, None, None)

    def open_body(self, ref: BundleRef, stream: bool = False) -> tuple[BundleData, object | None]:
        """(the block as open_bundle gives it, a `Filling` or None) from a backend that lays it out as it reads
        (see lays_out): a large body comes back while its bytes are still being copied in, band after band;
        wait on the Filling before using a byte. With `stream`, a large body is a Stream instead (its buffer
        and its filling): read into a few reused buffers and taken once, in order (BundlePlan.chunks)."""
        self._check_ref(ref)
        got = self._store.block_body(ref.level, ref.row0, ref.col0, self.bundle_label(ref), bands=True,
                                     stream=stream)
        key, buf, offsets, sizes = got[:4]
        with self._lock:
            self._index_cache[ref] = (key, offsets, sizes, None)
            while len(self._index_cache) > _INDEX_CACHE_SIZE:
                self._index_cache.popitem(last=False)
        return BundleData(ref, buf, offsets, sizes, None, None), (got[4] if len(got) > 4 else None)

    def lays_out(self, ref: BundleRef) -> bool:
        """Whether the backend lays this block out as a bundle body while reading it (open_bundle then costs
        no copy beyond the read; SQLite tables read by page), so writers take runs of that body."""
        lays_out = getattr(self._store, "lays_out", None)
        return lays_out is not None and lays_out(ref.level, ref.row0, ref.col0)

    def open_tiles(self, ref: BundleRef, expect: tuple | None = None,
                   wanted: np.ndarray | None = None) -> tuple[np.ndarray, list]:
        """(ascending block indices, their tiles' bytes) of a block as it is now, without laying out a
        bundle body (the open sinks write tiles one by one: a body would be one more copy of every byte).
        With `wanted` (block indices), a block that lays_out reads only those tiles; others may give more."""
        self._check_ref(ref)
        listed = getattr(self._store, "block_list", None)
        if listed is not None:
            key, idx, tiles = listed(ref.level, ref.row0, ref.col0, wanted) if wanted is not None \
                else listed(ref.level, ref.row0, ref.col0)
        else:
            key, found = self._store.block_tiles(ref.level, ref.row0, ref.col0)
            order = sorted(i for i, t in found.items() if t)
            idx, tiles = np.asarray(order, dtype=np.int64), [found[i] for i in order]
        if expect is not None and key != expect:
            raise BundleError(f"{self.bundle_label(ref)}: the source changed after its tiles were selected; "
                              "run the export again")
        idx = np.asarray(idx, dtype=np.int64)
        if len(tiles) != idx.size or (idx.size and (idx[0] < 0 or idx[-1] >= PACKET * PACKET
                                                      or np.any(np.diff(idx) <= 0))):
            raise BundleError(f"{self.bundle_label(ref)}: block indices must be ascending, unique and inside "
                              "the block")
        return idx, tiles

    def prefetch_levels(self, levels: list[int]) -> None:
        """Let the backend index these levels ahead of planning, on a thread of its own (SQLite: the finest
        first while planning scans from the coarsest); nothing for backends that cannot."""
        prefetch = getattr(self._store, "prefetch_scans", None)
        if prefetch is not None:
            present = set(self.levels)
            prefetch([lv for lv in levels if lv in present])

    def tile(self, level: int, row: int, col: int) -> bytes | None:
        """Bytes of one tile as the source holds it now, or None."""
        if row < 0 or col < 0:
            return None
        r0, c0 = bundle_origin(row, col)
        if not self.has_bundle(BundleRef(level, r0, c0)):
            return None
        return self._store.tile(level, row, col)

    def data_extent(self) -> Extent:
        """The extent from the metadata, else the bounds of the tiles of the most detailed level."""
        if self.full_extent is not None:
            return self.full_extent
        levels = self.levels
        if not levels or self.tile_range(levels[-1]) is None:
            raise CacheError(f"{self.path}: no data extent in the metadata and no tiles to derive one from")
        rmin, rmax, cmin, cmax = self.tile_range(levels[-1])
        x0, _, _, y1 = self.scheme.tile_bounds(levels[-1], rmin, cmin)
        _, y0, x1, _ = self.scheme.tile_bounds(levels[-1], rmax, cmax)
        return Extent(x0, y0, x1, y1, self.scheme.spatial_ref)

    def close(self) -> None:
        """Close the backend's files and connections."""
        self._store.close()
        with self._lock:
            self._index_cache.clear()


def _header_size(tile: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR or a JPEG's SOF marker, or None (other formats, odd files)."""
    if tile[:8] == b"\x89PNG\r\n\x1a\n" and tile[12:16] == b"IHDR" and len(tile) >= 24:
        return struct.unpack(">II", tile[16:24])
    if tile[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 9 <= len(tile) and tile[at] == 0xFF:
        marker = tile[at + 1]
        if marker in _SOF:
            h, w = struct.unpack(">HH", tile[at + 5:at + 9])
            return w, h
        if marker == 0xFF:                       # fill byte
            at += 1
            continue
        at += 2 + struct.unpack(">H", tile[at + 2:at + 4])[0]
    return None


_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def tile_pixel_size(tile: bytes) -> int:
    """The pixel size of a square sample tile (128-1024), else 256 (the open formats' default)."""
    import io

    # the PNG/JPEG header read directly: PIL's JPEG open parses every table (2 ms an MBTiles open)
    found = _header_size(bytes(tile[:65536]))
    if found is not None:
        w, h = found
        return w if w == h and w in (128, 256, 512, 1024) else 256
    try:
        from PIL import Image
        with Image.open(io.BytesIO(tile)) as im:
            w, h = im.size
    except Exception:
        return 256
    return w if w == h and w in (128, 256, 512, 1024) else 256

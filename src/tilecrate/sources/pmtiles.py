"""PMTiles v3 archives, read through `blocks.BlockCache`.

Header and directories are read here (no runtime dependency; the tests check every piece against
the `pmtiles` package: its header reader, tile ids and Reader.get); directories are decoded with numpy
(one pass per directory, no Python loop per tile) and bounded: offsets and lengths inside the file's
sections, at most `MAX_DEPTH` levels of leaves, each leaf read once (a directory loop is an error),
at most `MAX_TILES` addressed tiles, decompressed directories at most `MAX_DIRECTORY` bytes.
Run-length entries are expanded to their tiles (deduplicated tiles keep one offset). Tiles are
read with pread from the descriptor the index came from, each read checked against the file's
identity; a replaced archive is indexed again when the path is found to name another file.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib

import numpy as np

from tilecrate.errors import BundleError, CacheError
from tilecrate.sourcefiles import changed, file_id, open_regular, pread_exact
from tilecrate.sources.blocks import BlockCache, detect_format, lonlat_extent
from tilecrate.sources.item import from_metadata
from tilecrate.tiling import PACKET, web_mercator_scheme

MAX_DEPTH = 4
MAX_TILES = 20_000_000
MAX_DIRECTORY = 256 << 20
MAX_METADATA = 16 << 20
MAX_TILE = 64 << 20
MAX_ZOOM = 30
CHECK_SECONDS = 0.05
_TYPES = {1: "pbf", 2: "PNG", 3: "JPEG", 4: "WEBP", 5: "AVIF", 6: "MLT"}
_BASES = np.array([((1 << (2 * z)) - 1) // 3 for z in range(MAX_ZOOM + 2)], dtype=np.uint64)


def _inflate(data: bytes, compression: int, limit: int, label: str) -> bytes:
    if compression in (0, 1):
        if data[:2] != b"\x1f\x8b":
            return data
    elif compression != 2:
        name = {3: "brotli", 4: "zstd"}.get(compression, str(compression))
        raise CacheError(f"{label}: internal compression {name} is not supported (tilecrate reads gzip and none)")
    d = zlib.decompressobj(47)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise CacheError(f"{label}: a directory or the metadata is not valid gzip ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise CacheError(f"{label}: a directory or the metadata inflates past {limit >> 20} MiB")
    return out


_HEADER = struct.Struct("<7sB8Q3Q6B4iB2i")
_HEADER_FIELDS = ("root_offset", "root_length", "metadata_offset", "metadata_length", "leaf_directory_offset",
                  "leaf_directory_length", "tile_data_offset", "tile_data_length", "addressed_tiles_count",
                  "tile_entries_count", "tile_contents_count", "clustered", "internal_compression",
                  "tile_compression", "tile_type", "min_zoom", "max_zoom", "min_lon_e7", "min_lat_e7",
                  "max_lon_e7", "max_lat_e7", "center_zoom", "center_lon_e7", "center_lat_e7")


def parse_header(data: bytes, label: str) -> dict:
    """The 127-byte v3 header (FORMATS.md 20.3) as a dict of its fields."""
    if len(data) < _HEADER.size:
        raise CacheError(f"{label}: shorter than a PMTiles header")
    magic, version, *values = _HEADER.unpack_from(data)
    if magic != b"PMTiles":
        raise CacheError(f"{label}: not a PMTiles archive")
    if version != 3:
        raise CacheError(f"{label}: PMTiles version {version} is not supported (tilecrate reads v3)")
    return dict(zip(_HEADER_FIELDS, values))


def zxy_tileid(z: int, x: int, y: int) -> int:
    """The PMTiles tile id of a tile (Hilbert order within the zoom, after all lower zooms)."""
    acc = ((1 << (2 * z)) - 1) // 3
    for a in range(z - 1, -1, -1):
        s = 1 << a
        rx, ry = s & x, s & y
        acc += ((3 * rx) ^ ry) << a
        if ry == 0:
            if rx:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
    return acc


def decode_varints(data: bytes, label: str) -> np.ndarray:
    """All LEB128 varints of a buffer, as uint64 (vectorised: arrays per number, not per byte)."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size == 0 or ends[-1] != b.size - 1:
        raise CacheError(f"{label}: a directory ends inside a number")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    extra = (ends - starts).astype(np.uint8)      # bytes after the first
    del ends
    longest = int(extra.max())
    if longest > 9:
        raise CacheError(f"{label}: a directory holds a number longer than 64 bits")
    # byte k of every number at once, k up to the longest: an int64 position and a uint64 part per
    # *byte* made a directory cost some 56 bytes of memory per byte (1.8 GB for 32 MiB)
    out = (b[starts] & 0x7F).astype(np.uint64)
    for k in range(1, longest + 1):
        more = np.flatnonzero(extra >= k)
        out[more] |= (b[starts[more] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    return out


def _count_numbers(data: bytes) -> int:
    """How many varints a buffer ends (bytes under 0x80), counted in slices (no array of its size)."""
    b = np.frombuffer(data, dtype=np.uint8)
    step = 1 << 22
    return sum(int(np.count_nonzero(b[i:i + step] < 0x80)) for i in range(0, b.size, step))


def _first_number(data: bytes) -> int:
    """The first varint of a buffer, -1 if it does not end within 10 bytes."""
    n = 0
    for k, byte in enumerate(data[:10]):
        n |= (byte & 0x7F) << (7 * k)
        if byte < 0x80:
            return n
    return -1


def decode_directory(data: bytes, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tile ids, run lengths, lengths, offsets) of one directory (decompressed)."""
    if not data:
        raise CacheError(f"{label}: an empty directory")
    # the count is checked before decoding: a 32 KB archive whose root inflates to 32 MiB of one-byte
    # numbers (announcing 1 entry) took 5 s and 1.8 GB; at the 256 MiB limit, some 14 GB
    n = _first_number(data)
    if n > MAX_TILES:
        raise CacheError(f"{label}: a directory of {n} entries (tilecrate reads at most {MAX_TILES})")
    held = _count_numbers(data) - 1
    if n <= 0 or held != 4 * n:
        raise CacheError(f"{label}: a directory says {max(n, 0)} entries but holds {max(held, 0)} numbers")
    v = decode_varints(data, label)
    ids = np.cumsum(v[1:1 + n], dtype=np.uint64)
    runs = v[1 + n:1 + 2 * n]
    lens = v[1 + 2 * n:1 + 3 * n]
    raw = v[1 + 3 * n:1 + 4 * n]
    if n > 1 and np.any(np.diff(ids.astype(np.float64)) <= 0) and np.any(ids[1:] <= ids[:-1]):
        raise CacheError(f"{label}: directory entries are not in tile id order")
    offs = np.empty(n, dtype=np.uint64)
    # an offset written 0 continues the previous entry: resolve those runs
    explicit = raw != 0
    explicit[0] = True
    offs[explicit] = raw[explicit] - np.uint64(1)
    if not explicit.all():
        if raw[0] == 0:
            raise CacheError(f"{label}: the first directory entry has no offset")
        # cumulative lengths: offset[i] = offset[last explicit] + sum(lengths between)
        ends = np.cumsum(lens, dtype=np.uint64)
        last = np.maximum.accumulate(np.where(explicit, np.arange(n), 0))
        before = np.concatenate(([np.uint64(0)], ends[:-1]))
        offs = offs[last] + (before - before[last])
    return ids, runs, lens, offs


def tileid_zxy(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, x, y) of PMTiles tile ids (Hilbert order per zoom), vectorised."""
    ids = np.asarray(ids, dtype=np.uint64)
    z = (np.searchsorted(_BASES, ids, side="right") - 1).astype(np.int64)
    d = ids - _BASES[z]
    x = np.zeros(ids.shape, dtype=np.int64)
    y = np.zeros(ids.shape, dtype=np.int64)
    t = d.astype(np.int64)
    for k in range(int(z.max()) if ids.size else 0):
        s = 1 << k
        live = z > k
        rx = (t >> 1) & 1
        ry = (t ^ rx) & 1
        turn = live & (ry == 0)
        flip = turn & (rx == 1)
        x = np.where(flip, s - 1 - x, x)
        y = np.where(flip, s - 1 - y, y)
        x, y = np.where(turn, y, x), np.where(turn, x, y)
        x = np.where(live, x + s * rx, x)
        y = np.where(live, y + s * ry, y)
        t = t >> 2
    return z, x, y


def _past(offs: np.ndarray, lens: np.ndarray, size: int) -> bool:
    """Whether any (offset, length) reaches past `size`; uint64 offset + length may wrap to a small
    number (an offset near 2**64), which then passed and reached os.pread as an OverflowError."""
    end = np.uint64(size)
    return bool(np.any((offs > end) | (lens > end - np.minimum(offs, end))))


class PMTilesBackend:
    """An indexed PMTiles archive: every addressed tile's (z, row, col, offset, length)."""

    def __init__(self, path: str):
        self.path = path
        self.label = path
        self._lock = threading.Lock()
        self._fd = -1
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        fd, st = open_regular(self.path, self.label)
        try:
            h = parse_header(pread_exact(fd, 127, 0, self.label) if st.st_size >= 127 else b"", self.label)
            size = st.st_size
            for what in ("root", "metadata", "leaf_directory", "tile_data"):
                off, n = h[f"{what}_offset"], h[f"{what}_length"]
                if off + n > size:
                    raise CacheError(f"{self.label}: the {what.replace('_', ' ')} section ({off}+{n}) is past the "
                                     f"end of the file ({size} bytes)")
            self.header = h
            self._data0, self._data_len = h["tile_data_offset"], h["tile_data_length"]
            self.metadata = self._read_metadata(fd, h)
            entries = self._walk(fd, h)
            self._index(entries)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd, self._id = self._fd, fd, file_id(st)
        if old >= 0:
            os.close(old)
        self._checked = time.monotonic()

    def _read_metadata(self, fd: int, h: dict) -> dict:
        if h["metadata_length"] == 0:
            return {}
        if h["metadata_length"] > MAX_METADATA:
            raise CacheError(f"{self.label}: metadata of {h['metadata_length']} bytes is too large")
        raw = _inflate(pread_exact(fd, h["metadata_length"], h["metadata_offset"], self.label),
                       h["internal_compression"], MAX_METADATA, self.label)
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # nested arrays: RecursionError
            return {}
        return meta if isinstance(meta, dict) else {}

    def _walk(self, fd: int, h: dict) -> list:
        comp = h["internal_compression"]
        leaf0, leaf_len = h["leaf_directory_offset"], h["leaf_directory_length"]
        out, seen, total = [], set(), 0
        stack = [(h["root_offset"], h["root_length"], 0)]
        budget = MAX_DIRECTORY
        while stack:
            off, n, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise CacheError(f"{self.label}: leaf directories nest deeper than {MAX_DEPTH} levels")
            if (off, n) in seen:
                raise CacheError(f"{self.label}: a leaf directory is referenced twice (a directory loop)")
            seen.add((off, n))
            ids, runs, lens, offs = decode_directory(_inflate(pread_exact(fd, n, off, self.label), comp, budget,
                                                              self.label), self.label)
            budget -= 4 * len(ids)
            if budget <= 0:
                raise CacheError(f"{self.label}: directories larger than {MAX_DIRECTORY >> 20} MiB in all")
            leaf = runs == 0
            if _past(offs[~leaf], lens[~leaf], self._data_len):
                raise CacheError(f"{self.label}: a tile points past the end of the tile data section")
            if np.any(lens[~leaf] == 0):
                raise CacheError(f"{self.label}: a directory entry has length 0")
            if np.any(lens[~leaf] > MAX_TILE):
                raise CacheError(f"{self.label}: a tile of {int(lens[~leaf].max())} bytes (tilecrate reads tiles "
                                 f"up to {MAX_TILE >> 20} MiB)")
            if leaf.any():
                lo, ln = offs[leaf], lens[leaf]
                if _past(lo, ln, leaf_len):
                    raise CacheError(f"{self.label}: a leaf directory points past the leaf section")
                stack.extend((leaf0 + int(a), int(b), depth + 1) for a, b in zip(lo.tolist(), ln.tolist()))
            keep = ~leaf
            # each run bounded before the sum: two run lengths of 2**63 wrapped a uint64 sum to 0,
            # passed the limit and reached np.repeat as negative counts (a bare ValueError)
            kept = runs[keep]
            total += int(kept.sum(dtype=np.uint64)) if not kept.size or int(kept.max()) <= MAX_TILES else MAX_TILES + 1
            if total > MAX_TILES:
                raise CacheError(f"{self.label}: addresses more than {MAX_TILES} tiles (tilecrate's limit)")
            out.append((ids[keep], runs[keep], lens[keep], offs[keep]))
        return out

    def _index(self, entries: list) -> None:
        if entries:
            ids, runs, lens, offs = (np.concatenate(p) for p in zip(*entries))
        else:
            ids = runs = lens = offs = np.zeros(0, dtype=np.uint64)
        rep = runs.astype(np.int64)
        first = np.repeat(ids, rep)
        step = np.arange(first.size, dtype=np.uint64) - np.repeat(np.cumsum(rep) - rep, rep).astype(np.uint64)
        tid = first + step
        order = np.argsort(tid, kind="stable")
        tid = tid[order]
        if tid.size > 1 and np.any(tid[1:] == tid[:-1]):
            raise CacheError(f"{self.label}: a tile id is addressed twice")
        self._tid = tid
        self._len = np.repeat(lens, rep)[order].astype(np.uint32)
        self._off = np.repeat(offs, rep)[order]
        if tid.size and int(tid[-1]) >= int(_BASES[MAX_ZOOM + 1]):
            raise CacheError(f"{self.label}: tiles past zoom {MAX_ZOOM}")
        z, x, y = tileid_zxy(tid)
        self._z, self._row, self._col = z, y, x
        key = (z << 50) | ((y >> 7) << 25) | (x >> 7)
        order = np.argsort(key, kind="stable")
        self._border = order
        skeys, starts = np.unique(key[order], return_index=True)
        ends = np.append(starts[1:], order.size)
        self._blocks = {}
        for k, a, b in zip(skeys.tolist(), starts.tolist(), ends.tolist()):
            lv, r, c = k >> 50, (k >> 25) & ((1 << 25) - 1), k & ((1 << 25) - 1)
            self._blocks.setdefault(lv, {})[(r * PACKET, c * PACKET)] = (a, b)

    # -- identity --------------------------------------------------------------------------------

    def _current(self) -> tuple:
        """The identity of the indexed file; a path that now names another file is indexed again."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= CHECK_SECONDS:
                self._checked = now
                try:
                    st = os.stat(self.path)
                except OSError:
                    raise CacheError(f"{self.label}: the file no longer exists") from None
                if file_id(st) != self._id:
                    self._load()
            if file_id(os.fstat(self._fd)) != self._id:
                raise changed(self.label)
            return self._id

    # -- protocol --------------------------------------------------------------------------------

    def levels(self) -> list[int]:
        """Zoom levels holding tiles."""
        self._current()
        return sorted(self._blocks)

    def blocks(self, level: int):
        """Blocks holding tiles at `level`."""
        self._current()
        return set(self._blocks.get(level, {}))

    def _members(self, level: int, row0: int, col0: int) -> np.ndarray:
        span = self._blocks.get(level, {}).get((row0, col0))
        return self._border[span[0]:span[1]] if span else np.zeros(0, dtype=np.int64)

    def block_index(self, level: int, row0: int, col0: int):
        """(identity, sizes) of a block from the directories."""
        ident = self._current()
        m = self._members(level, row0, col0)
        sizes = np.zeros(PACKET * PACKET, dtype=np.uint32)
        sizes[(self._row[m] - row0) * PACKET + (self._col[m] - col0)] = self._len[m]
        return ident, sizes

    def block_tiles(self, level: int, row0: int, col0: int):
        """(identity, {index: bytes}), read in coalesced runs of the tile data."""
        ident = self._current()
        m = self._members(level, row0, col0)
        idx = ((self._row[m] - row0) * PACKET + (self._col[m] - col0)).tolist()
        offs, lens = self._off[m].tolist(), self._len[m].tolist()
        tiles: dict[int, bytes] = {}
        order = sorted(range(len(idx)), key=lambda k: offs[k])
        k = 0
        while k < len(order):
            lo = offs[order[k]]
            hi = lo + lens[order[k]]
            j = k + 1
            while j < len(order) and offs[order[j]] <= hi + 65536 and offs[order[j]] + lens[order[j]] - lo <= 8 << 20:
                hi = max(hi, offs[order[j]] + lens[order[j]])
                j += 1
            chunk = pread_exact(self._fd, hi - lo, self._data0 + lo, self.label)
            for q in order[k:j]:
                tiles[idx[q]] = chunk[offs[q] - lo:offs[q] - lo + lens[q]]
            k = j
        if file_id(os.fstat(self._fd)) != ident:
            raise BundleError(f"{self.label}: the file changed while it was being read; retry the request")
        return ident, tiles

    def tile(self, level: int, row: int, col: int) -> bytes | None:
        """One tile's bytes, or None."""
        if not (0 <= level <= MAX_ZOOM and 0 <= row < (1 << level) and 0 <= col < (1 << level)):
            return None
        ident = self._current()
        t = zxy_tileid(level, col, row)
        i = int(np.searchsorted(self._tid, np.uint64(t)))
        if i >= self._tid.size or int(self._tid[i]) != t:
            return None
        data = pread_exact(self._fd, int(self._len[i]), self._data0 + int(self._off[i]), self.label)
        if file_id(os.fstat(self._fd)) != ident:
            raise changed(self.label)
        return data

    def first_tiles(self, n: int = 8) -> list[bytes]:
        """A few tiles (to tell their format)."""
        return [pread_exact(self._fd, int(self._len[i]), self._data0 + int(self._off[i]), self.label)
                for i in range(min(n, self._tid.size))]

    def close(self) -> None:
        """Close the archive."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def open_pmtiles(path: str) -> BlockCache:
    """Open a PMTiles v3 archive (Web Mercator, 256 px raster or 512 px vector tiles)."""
    backend = PMTilesBackend(path)
    h = backend.header
    fmt = _TYPES.get(h["tile_type"]) or detect_format(backend.first_tiles())
    if fmt in ("PNG", "JPEG"):
        found = detect_format(backend.first_tiles())
        fmt = found if found in ("PNG", "JPEG", "MIXED") else fmt
    size = 512 if fmt in ("pbf", "MLT") else 256
    if fmt in ("PNG", "JPEG", "MIXED"):
        from tilecrate.sources.blocks import tile_pixel_size
        first = backend.first_tiles(1)
        size = tile_pixel_size(first[0]) if first else 256
    levels = backend.levels()
    top = max(levels) if levels else min(int(h["max_zoom"]), MAX_ZOOM)
    scheme = web_mercator_scheme(top + 1, size)
    extent = lonlat_extent(*(h[k] / 1e7 for k in ("min_lon_e7", "min_lat_e7", "max_lon_e7", "max_lat_e7")))
    meta = backend.metadata
    name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else \
        os.path.splitext(os.path.basename(path))[0]
    cache = BlockCache.create(os.path.abspath(path), "pmtiles", name, scheme, fmt, backend, extent)
    cache.item = from_metadata(meta)
    cache.source_metadata = meta
    return cache

"""Compact caches: a compact cache folder (V1 or V2) or a .tpk / .tpkx / .vtpk read in place.

A cache is a tile scheme plus bundles. Bundles are found by name and read with pread
(tilecrate.sourcefiles): nothing is mapped, so a file truncated or overwritten under a running
server is an error for that request, never SIGBUS. Every read validates the file as it is now
(device, inode, size, mtime, ctime): parsed indexes are kept in a small LRU keyed by that identity, so a
replaced bundle is re-read, and a bundle that changes during one read is a BundleError naming it.
Folders are listed again (per level, at most once per `RELIST_SECONDS`) when asked for a bundle
that is not known, so new bundles appear and removed ones disappear while the cache is open.
Bundle names off the 128-tile grid, and entries that are not regular files, are refused with a
warning in `Cache.warnings`.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from tilecrate import _bundle
from tilecrate.errors import BundleError, CacheError
from tilecrate.sourcefiles import (
    FileRange,
    FolderStore,
    Gone,
    Source,
    Stale,
    ZipStore,
    changed,
    file_id,
    read_head,
    read_regular,
)
from tilecrate.sources.esri import (
    ITEM_FILES,
    MAPSERVER_JSON,
    SERVICE_LIMIT,
    ServiceExtents,
    _check_storage,
    _Meta,
    normalize_storage_format,
    parse_conf_cdi,
    parse_conf_xml,
    parse_item_extent,
    parse_mapserver_json,
    parse_root_json,
    root_json_extents,
)
from tilecrate.sources.item import ItemInfo, read_item_folder, read_item_package
from tilecrate.sources.model import COMPACT_V1, COMPACT_V2, EXPLODED, BundleData, BundleRef, _FileBytes
from tilecrate.tiling import PACKET, Extent, TileScheme, bundle_origin, parse_bundle_name, parse_level_dir

_INDEX_CACHE_SIZE = 64
RELIST_SECONDS = 1.0              # a folder level (or a package) is listed again at most this often
MAX_POSITION = (1 << 31) - PACKET  # bundle rows/columns past this are refused (V1 headers hold uint32)
_MAX_WARNINGS = 1000
_HELD = 32                        # bundles whose descriptor the tile route keeps open between requests
PATH_CHECK_SECONDS = 0.05         # a held bundle's path is looked up again (replaced by rename?) this often
WOULD_BLOCK = object()            # tile_cached: the answer needs a wait (a read from disk, a listing, an open)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


@dataclass
class _Loc:
    """Where a bundle's bytes live: a folder file, or a zip entry name."""

    bundle: str                      # file path, or zip entry name
    bundlx: str | None = None        # V1 only


@dataclass
class Cache:
    """An open source cache: tile scheme, metadata, the bundles present, tile bytes."""

    path: str
    kind: str                        # 'folder', 'tpk', 'tpkx', 'vtpk'
    name: str
    scheme: TileScheme
    storage_format: str              # COMPACT_V1 or COMPACT_V2 (as found on disk)
    tile_format: str                 # JPEG, PNG, PNG8, PNG24, PNG32, MIXED, LERC, pbf
    compression_quality: int
    full_extent: Extent | None
    initial_extent: Extent | None
    _store: object = field(repr=False)
    _bundles: dict = field(repr=False)   # level -> {(row0, col0): _Loc}
    _tiles_dir: str | None = field(default=None, repr=False)   # folder: the level folders' parent
    _tiles_prefix: str | None = field(default=None, repr=False)  # package: the level folders' prefix
    warnings: list = field(default_factory=list)     # bundles refused (names off the grid, not files)
    item: ItemInfo = field(default_factory=ItemInfo)  # title, summary, tags, credits... of the source
    # the extents the package states for its service (mapserver.json / root.json / iteminfo), which a
    # whole-source export writes back unchanged; None for sources that state none
    service_extents: ServiceExtents | None = None
    # an elevation cache's TileImageInfo BandCount / LERCError (conf.xml, root.json); None if not stated
    band_count: int | None = None
    lerc_error: float | None = None
    _index_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _level_dirs: dict = field(default_factory=dict, repr=False)
    _listed: dict = field(default_factory=dict, repr=False)    # level (or None: levels) -> monotonic time
    _warned: set = field(default_factory=set, repr=False)
    _held: OrderedDict = field(default_factory=OrderedDict, repr=False)    # ref -> Source (tile route)
    _nowait: bool = field(default=bool(_RWF_NOWAIT), repr=False)  # preadv(RWF_NOWAIT) works on this file system

    @property
    def esri_readable(self) -> bool:
        """Whether ArcGIS readers can decode these tiles (JPEG / PNG / LERC / vector tiles in a .vtpk);
        False for WebP and for pbf tiles outside a .vtpk, which .tpk/.tpkx refuse."""
        fmt = self.tile_format.upper()
        if fmt == "PBF":
            return self.kind == "vtpk"
        return fmt not in ("WEBP", "AVIF", "UNKNOWN")

    @property
    def version(self) -> int:
        """1 for compact V1 bundles, 2 for compact V2."""
        return 1 if self.storage_format == COMPACT_V1 else 2

    # -- listing -------------------------------------------------------------------------------

    def _stale(self, key) -> bool:
        return time.monotonic() - self._listed.get(key, float("-inf")) >= RELIST_SECONDS

    def _warn(self, message: str) -> None:
        with self._lock:
            if message not in self._warned and len(self.warnings) < _MAX_WARNINGS:
                self._warned.add(message)
                self.warnings.append(message)

    def _refresh_levels(self) -> None:
        """List the level folders again (folder caches) or re-read a replaced package's directory.
        Folders are listed outside the lock: readers are not held up by a listing."""
        with self._lock:
            if not self._stale(None):
                return
            self._listed[None] = time.monotonic()
        if self._tiles_dir is None:
            self._refresh_package(check=True)
            return
        dirs = _level_dirs(self._tiles_dir)
        with self._lock:
            for lv in list(self._bundles):
                if lv not in dirs:
                    del self._bundles[lv]
            self._level_dirs = dirs
            new = [lv for lv in dirs if lv not in self._bundles]
        for lv in new:
            self._refresh_level(lv, force=True)

    def _refresh_level(self, level: int, force: bool = False) -> None:
        if self._tiles_dir is None:
            return               # packages are listed whole (_refresh_levels), and checked on every read
        with self._lock:
            if not force and not self._stale(level):
                return
            self._listed[level] = time.monotonic()
            path = self._level_dirs.get(level)
        found = _list_level(path, self._warn) if path is not None else {}
        with self._lock:
            if found:
                self._bundles[level] = found
            else:
                self._bundles.pop(level, None)

    def _refresh_package(self, check: bool) -> None:
        """Re-read the central directory when the package file is not the one listed. It is read
        outside the lock: the event loop takes that lock for every tile (`tile_cached`), and a
        directory read that is slow (a large package) or hangs (a network mount) held it, and with
        it every request of the server, for as long."""
        if check:
            try:
                now = file_id(os.stat(self.path))
            except OSError:
                return               # gone: every read reports it
            if now == self._store.fid:
                return
        store = ZipStore(self.path)
        bundles = _list_package(store, self._tiles_prefix, self._warn)
        with self._lock:
            if store.fid == self._store.fid:
                return               # another thread listed this version meanwhile
            self._store = store
            self._bundles = bundles
            self._index_cache.clear()
            self._listed[None] = time.monotonic()

    def _forget(self, ref: BundleRef) -> None:
        with self._lock:
            found = self._bundles.get(ref.level)
            if found is not None:
                found.pop((ref.row0, ref.col0), None)
                if not found:
                    del self._bundles[ref.level]
            self._index_cache.pop(ref, None)
            held = self._held.pop(ref, None)
            if held is not None:
                self._retire_locked(held)

    @property
    def levels(self) -> list[int]:
        """LevelIDs that have at least one bundle, ascending."""
        self._refresh_levels()
        with self._lock:
            return sorted(lv for lv, b in self._bundles.items() if b)

    def bundles(self, level: int | None = None) -> list[BundleRef]:
        """Bundles present, of one level or of all levels, sorted by level, row, col."""
        levels = [level] if level is not None else self.levels
        out = []
        for lv in levels:
            self._refresh_level(lv)
            with self._lock:
                keys = sorted(self._bundles.get(lv, {}))
            out.extend(BundleRef(lv, r, c) for r, c in keys)
        return out

    def has_bundle(self, ref: BundleRef) -> bool:
        """Whether this bundle exists in the cache (a bundle not known yet is looked for again,
        at most once per RELIST_SECONDS per level)."""
        with self._lock:
            if (ref.row0, ref.col0) in self._bundles.get(ref.level, {}):
                return True
        if self._tiles_dir is not None:
            self._refresh_levels()
            self._refresh_level(ref.level)
        else:
            self._refresh_levels()
        with self._lock:
            return (ref.row0, ref.col0) in self._bundles.get(ref.level, {})

    def _loc(self, ref: BundleRef) -> _Loc:
        with self._lock:
            loc = self._bundles.get(ref.level, {}).get((ref.row0, ref.col0))
        if loc is None and self.has_bundle(ref):
            with self._lock:
                loc = self._bundles.get(ref.level, {}).get((ref.row0, ref.col0))
        if loc is None:
            raise CacheError(f"{self.path}: no bundle at level {ref.level}, row {ref.row0}, column {ref.col0}")
        return loc

    def bundle_label(self, ref: BundleRef) -> str:
        """A readable name for messages: the bundle's path (inside the package for packages)."""
        loc = self._loc(ref)
        return loc.bundle if self.kind == "folder" else f"{self.path}!{loc.bundle}"

    # -- reading -------------------------------------------------------------------------------

    def _open(self, ref: BundleRef) -> Source:
        """Open a bundle for one read; a replaced package is listed again (once), a removed bundle
        is forgotten (Gone)."""
        for attempt in (0, 1):
            loc = self._loc(ref)
            label = loc.bundle if self.kind == "folder" else f"{self.path}!{loc.bundle}"
            try:
                return self._store.open(loc.bundle, loc.bundlx, label)
            except Stale:
                if attempt:
                    raise
                self._refresh_package(check=False)
            except Gone:
                self._forget(ref)
                raise
        raise AssertionError("unreachable")

    def _index_of(self, ref: BundleRef, src: Source) -> tuple[np.ndarray, np.ndarray]:
        """The index of the bundle `src` reads, from the LRU when its identity matches."""
        with self._lock:
            hit = self._index_cache.get(ref)
            if hit is not None and hit[0] == src.key:
                self._index_cache.move_to_end(ref)
                return hit[1], hit[2]
        if src.bundlx is not None:
            if src.memory is not None:
                offsets, sizes = _bundle.parse_v1(src.bundlx, src.memory, src.label)
            else:
                offsets, sizes = _bundle.parse_v1_fd(src.bundlx, src.fd, src.base, src.length, src.label)
        else:
            head = src.pread(0, min(_bundle.V2_DATA_START, src.length))
            offsets, sizes = _bundle.parse_v2_index(head, src.length, src.label)
        src.check()
        with self._lock:
            self._index_cache[ref] = (src.key, offsets, sizes, src.where)
            self._index_cache.move_to_end(ref)
            while len(self._index_cache) > _INDEX_CACHE_SIZE:
                self._index_cache.popitem(last=False)
        return offsets, sizes

    def index_with_key(self, ref: BundleRef) -> tuple[tuple, np.ndarray, np.ndarray]:
        """(identity of the version read, offsets, sizes) of a bundle: its index as it is now."""
        with self._open(ref) as src:
            offsets, sizes = self._index_of(ref, src)
            return src.key, offsets, sizes

    def index(self, ref: BundleRef) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, sizes) of a bundle as it is now, row-major 16 384 entries (kept in a small LRU
        keyed by the file's identity: a replaced bundle is read again)."""
        return self.index_with_key(ref)[1:]

    def bundle_key(self, ref: BundleRef) -> tuple[str, tuple]:
        """(location, identity of the bundle's current content), for keeping indexes elsewhere."""
        loc = self._loc(ref)
        with self._open(ref) as src:
            return f"{self.path}::{loc.bundle}", src.key

    def bundle_file_size(self, ref: BundleRef) -> int:
        """Size in bytes of the .bundle (without .bundlx), as it is now."""
        with self._open(ref) as src:
            return src.length

    def bundle_file(self, ref: BundleRef) -> FileRange | None:
        """(file, offset of the bundle's first byte in it, the file's size) of the version whose index
        was read last (`FileRange.file_id` names it), for plain reads; None where the bytes exist only
        in memory (a deflated package entry). Prefer `BundleData.where` of an open bundle."""
        with self._lock:
            hit = self._index_cache.get(ref)
        if hit is None:
            with self._open(ref) as src:
                self._index_of(ref, src)
                return src.where
        return hit[3]

    def open_bundle(self, ref: BundleRef, expect: tuple | None = None) -> BundleData:
        """The bundle's index as it is now and its bytes (read on demand from the same open file;
        no mapping); close the result when done with the bytes. With `expect` (a key from
        `index_with_key` or `bundle_key`), a bundle that is no longer that version is a BundleError."""
        src = self._open(ref)
        try:
            if expect is not None and src.key != expect:
                raise BundleError(f"{src.label}: the bundle changed after its tiles were selected; "
                                  "run the export again")
            offsets, sizes = self._index_of(ref, src)
            if src.memory is not None:
                src.close()
                return BundleData(ref, memoryview(src.memory), offsets, sizes, None, None)
            return BundleData(ref, _FileBytes(src), offsets, sizes, src, src.where)
        except BaseException:
            src.close()
            raise

    # -- the tile route: descriptors kept open, each read proven current by a stat afterwards --

    def _acquire(self, ref: BundleRef) -> Source:
        with self._lock:
            src = self._held.get(ref)
            if src is not None:
                src.users += 1
                self._held.move_to_end(ref)
                return src
        src = self._open(ref)
        with self._lock:
            other = self._held.get(ref)
            if other is not None:              # another thread opened it meanwhile
                other.users += 1
                src.close()
                return other
            src.users = 1
            self._held[ref] = src
            while len(self._held) > _HELD:
                _, old = self._held.popitem(last=False)
                self._retire_locked(old)
        return src

    def _retire_locked(self, src: Source) -> None:
        src.retired = True
        if src.users == 0:
            src.close()

    def _release(self, ref: BundleRef, src: Source, current: bool) -> None:
        with self._lock:
            src.users -= 1
            if not current and self._held.get(ref) is src:
                del self._held[ref]
                src.retired = True
            if src.retired and src.users == 0:
                src.close()

    def tile(self, level: int, row: int, col: int) -> bytes | None:
        """Bytes of one tile as the file holds it now, or None where the cache has none.

        The bundle's descriptor stays open between requests. A read is returned only if an fstat of
        that descriptor afterwards shows the version the index came from (a change in place, even
        during the read, is noticed at once: read again, once, then a BundleError); the path is
        looked up again at most every PATH_CHECK_SECONDS, so a bundle replaced by rename is served
        from its new file within that time (until then the old file's consistent bytes)."""
        if row < 0 or col < 0:
            return None
        r0, c0 = bundle_origin(row, col)
        ref = BundleRef(level, r0, c0)
        if not self.has_bundle(ref):
            return None
        i = (row - r0) * PACKET + (col - c0)
        for attempt in (0, 1):
            try:
                src = self._acquire(ref)
            except Gone:
                return None
            current = False
            try:
                try:
                    offsets, sizes = self._index_of(ref, src)
                    size = int(sizes[i])
                    if size > _bundle.MAX_TILE_SIZE:   # as exports refuse it (V2 cannot even say it)
                        raise BundleError(f"{src.label}: tile at row {row - r0}, column {col - c0} of the "
                                          f"bundle has offset {int(offsets[i])} and size {size}, over 16 MiB")
                    if size:
                        data, current = src.pread_current(int(offsets[i]), size)
                    else:
                        data, current = None, src.is_current()
                except BundleError:
                    if attempt or src.still_current():
                        raise                 # the current version itself is unreadable
                    continue                  # it changed under the held descriptor: read it again
                now = time.monotonic()
                if current and now - src.paths_checked >= PATH_CHECK_SECONDS:
                    current = src.still_current()
                    src.paths_checked = now
                if current:
                    return data
            finally:
                self._release(ref, src, current)
        raise changed(src.label)

    def tile_cached(self, level: int, row: int, col: int) -> bytes | None | object:
        """`tile()` where nothing has to wait, for an event loop: the bundle known and its descriptor
        held, its index in memory for that version, its path not due a look, the bytes in the page
        cache (preadv with RWF_NOWAIT) and an fstat afterwards showing that version; WOULD_BLOCK
        wherever any of it is not so (`tile()` on a thread then reads, checks and reports)."""
        if row < 0 or col < 0 or not self._nowait:
            return None if (row < 0 or col < 0) else WOULD_BLOCK
        r0, c0 = bundle_origin(row, col)
        ref = BundleRef(level, r0, c0)
        with self._lock:
            if (r0, c0) not in self._bundles.get(level, ()):
                return WOULD_BLOCK        # not known: tile() lists the level again
            src = self._held.get(ref)
            hit = self._index_cache.get(ref)
            if src is None or src.retired or hit is None or hit[0] != src.key or \
                    time.monotonic() - src.paths_checked >= PATH_CHECK_SECONDS:
                return WOULD_BLOCK
            src.users += 1
        current = True                    # nothing learnt about the file: it stays held
        try:
            i = (row - r0) * PACKET + (col - c0)
            size = int(hit[2][i])
            if not size:
                current = src.is_current()
                return None if current else WOULD_BLOCK
            data, current = self._pread_nowait(src, int(hit[1][i]), size)
            return data if current else WOULD_BLOCK   # changed: tile() reads it again and says so
        finally:
            self._release(ref, src, current)

    def _pread_nowait(self, src: Source, offset: int, n: int) -> tuple[object, bool]:
        """(bytes or WOULD_BLOCK, whether the file is still the version read); the index's offset and
        size are checked against the bundle's length as Source.pread does (past it: tile() says so)."""
        # a V1 size prefix may claim up to 4 GiB inside a (sparse) file: this buffer was made and
        # filled on the event loop (a 300 MB "tile" of zeros took 1.2 s and 570 MB there)
        if offset < 0 or n < 0 or n > _bundle.MAX_TILE_SIZE or offset + n > src.length:
            return WOULD_BLOCK, True
        if src.memory is not None:
            return src.memory[offset:offset + n], True
        buf = bytearray(n)
        try:
            got = os.preadv(src.fd, [buf], src.base + offset, _RWF_NOWAIT)
        except BlockingIOError:           # EAGAIN: some of it is on the disk only
            return WOULD_BLOCK, True
        except OSError as e:              # EOPNOTSUPP and the like: never again on this cache
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._nowait = False
            return WOULD_BLOCK, True
        if got != n:                      # a short read: part not cached, or the file shrank
            return WOULD_BLOCK, True
        return bytes(buf), src.is_current()

    def iter_tiles(self, level: int | None = None) -> Iterator[tuple[int, int, int, bytes]]:
        """(level, row, col, bytes) of every tile, bundle by bundle, row-major inside bundles."""
        for ref in self.bundles(level):
            with self.open_bundle(ref) as data:
                for i in np.flatnonzero(data.sizes):
                    off, size = int(data.offsets[i]), int(data.sizes[i])
                    yield ref.level, ref.row0 + i // PACKET, ref.col0 + i % PACKET, bytes(data.buf[off:off + size])

    def level_summary(self, on_bundle: Callable[[BundleRef], None] | None = None) -> dict[int, dict]:
        """Per level: bundles, tiles and tile bytes, from the indexes (`on_bundle` after each one)."""
        out = {}
        for lv in self.levels:
            tiles = nbytes = 0
            refs = self.bundles(lv)
            for ref in refs:
                _, sizes = self.index(ref)
                tiles += int(np.count_nonzero(sizes))
                nbytes += int(sizes.sum(dtype=np.uint64))
                if on_bundle is not None:
                    on_bundle(ref)
            out[lv] = {"bundles": len(refs), "tiles": tiles, "bytes": nbytes}
        return out

    def data_extent(self) -> Extent:
        """The full extent if the metadata has one, else the bounds of the tiles present."""
        if self.full_extent is not None:
            return self.full_extent
        lv = self.levels[0] if self.levels else None
        if lv is None or not self.scheme.has_level(lv):
            raise CacheError(f"{self.path}: no data extent in the metadata and no tiles to derive one from")
        bounds = self.tile_range(lv)
        if bounds is None:
            raise CacheError(f"{self.path}: the cache holds no tiles")
        rmin, rmax, cmin, cmax = bounds
        x0, _, _, y1 = self.scheme.tile_bounds(lv, rmin, cmin)
        _, y0, x1, _ = self.scheme.tile_bounds(lv, rmax, cmax)
        return Extent(x0, y0, x1, y1, self.scheme.spatial_ref)

    def tile_range(self, level: int) -> tuple[int, int, int, int] | None:
        """Inclusive (row_min, row_max, col_min, col_max) of the tiles present at a level; None if none."""
        rmin = cmin = None
        rmax = cmax = None
        for ref in self.bundles(level):
            present = self.index(ref)[1].reshape(PACKET, PACKET) > 0
            rows, cols = np.flatnonzero(present.any(axis=1)), np.flatnonzero(present.any(axis=0))
            if not rows.size:
                continue
            r0, r1 = ref.row0 + int(rows[0]), ref.row0 + int(rows[-1])
            c0, c1 = ref.col0 + int(cols[0]), ref.col0 + int(cols[-1])
            rmin, rmax = (r0, r1) if rmin is None else (min(rmin, r0), max(rmax, r1))
            cmin, cmax = (c0, c1) if cmin is None else (min(cmin, c0), max(cmax, c1))
        return None if rmin is None else (rmin, rmax, cmin, cmax)

    def close(self) -> None:
        """Close held descriptors and drop what is kept between reads."""
        self._store.close()
        with self._lock:
            self._index_cache.clear()
            held, self._held = list(self._held.values()), OrderedDict()
            for src in held:
                self._retire_locked(src)

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# listing


def _on_grid(rc: tuple[int, int]) -> bool:
    r, c = rc
    return r % PACKET == 0 and c % PACKET == 0 and 0 <= r <= MAX_POSITION and 0 <= c <= MAX_POSITION


def _level_dirs(tiles_dir: str) -> dict[int, str]:
    out = {}
    try:
        with os.scandir(tiles_dir) as it:
            for e in it:
                level = parse_level_dir(e.name)
                if level is not None and e.is_dir():
                    out[level] = e.path
    except OSError:
        pass
    return out


def _list_level(path: str, warn: Callable[[str], None]) -> dict:
    """{(row0, col0): _Loc} of a level folder's bundles; names off the grid and non-files refused."""
    try:
        with os.scandir(path) as files:
            entries = {e.name: e for e in files}
    except OSError:
        return {}
    lower = {n.lower(): n for n in entries}
    found = {}
    for n, entry in entries.items():
        rc = parse_bundle_name(n)
        if rc is None:
            continue
        if not _on_grid(rc):
            warn(f"{entry.path}: not a bundle of the 128-tile grid (row and column must be multiples of 128); skipped")
            continue
        try:
            regular = entry.is_file()
        except OSError:
            regular = False
        if not regular:
            warn(f"{entry.path}: not a regular file; skipped")
            continue
        bx = lower.get(n.lower()[:-1] + "x")
        found[rc] = _Loc(entry.path, os.path.join(path, bx) if bx else None)
    return found


def _list_package(store: ZipStore, prefix: str, warn: Callable[[str], None]) -> dict:
    bundles: dict[int, dict] = {}
    lower = {n.lower(): n for n in store.infos}
    for n in store.infos:
        if not n.startswith(prefix):
            continue
        parts = n[len(prefix):].split("/")
        if len(parts) != 2:
            continue
        level = parse_level_dir(parts[0])
        rc = parse_bundle_name(parts[1])
        if level is None or rc is None:
            continue
        if not _on_grid(rc):
            warn(f"{store.path}!{n}: not a bundle of the 128-tile grid (row and column must be multiples of 128); "
                 "skipped")
            continue
        bx = lower.get(n.lower()[:-1] + "x")
        bundles.setdefault(level, {})[rc] = _Loc(n, bx)
    return bundles


# --------------------------------------------------------------------------------------------
# opening


def open_compact(path: str | os.PathLike) -> Cache:
    """Open a compact cache folder, .tpk, .tpkx or .vtpk for reading."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CacheError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return _open_folder(path)
    magic = read_head(path, 4)
    if magic[:2] != b"PK":
        raise CacheError(f"{path}: not a tile package (not a zip file) and not a cache folder")
    return _open_zip(path)


def _find_conf(folder: str) -> str | None:
    for n in ("conf.xml", "Conf.xml", "CONF.XML"):
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            return p
    try:
        for entry in os.scandir(folder):
            if entry.is_file() and entry.name.lower() == "conf.xml":
                return entry.path
    except OSError:
        pass
    return None


def _open_folder(path: str) -> Cache:
    root = path
    conf = _find_conf(root)
    root_json = os.path.join(root, "root.json")
    if conf is None and not os.path.isfile(root_json):
        # accept the service folder above Layers (arcgiscache/<Service>/Layers)
        for sub in ("Layers", "layers"):
            if _find_conf(os.path.join(root, sub)):
                root = os.path.join(root, sub)
                conf = _find_conf(root)
                break
    if conf is not None:
        meta = parse_conf_xml(read_regular(conf, conf), conf)
        cdi = os.path.join(root, "conf.cdi")
        if os.path.isfile(cdi):
            meta.full_extent = parse_conf_cdi(read_regular(cdi, cdi), cdi, meta.scheme.spatial_ref)
        tiles_dir = os.path.join(root, "_alllayers")
        label = conf
    elif os.path.isfile(root_json):
        meta, tbp = parse_root_json(read_regular(root_json, root_json), root_json)
        tiles_dir = os.path.normpath(os.path.join(root, tbp))
        label = root_json
    else:
        raise CacheError(f"{path}: not a cache folder (no conf.xml, Conf.xml or root.json)")
    if normalize_storage_format(meta.storage_format) == EXPLODED:
        from tilecrate.sources.folders import open_exploded
        return open_exploded(path, root, meta, tiles_dir, label)
    _check_storage(meta, label)
    if not os.path.isdir(tiles_dir):
        raise CacheError(f"{path}: no tile folder ({os.path.basename(tiles_dir)}) next to {os.path.basename(label)}")
    name = os.path.basename(os.path.normpath(root))
    if name.lower() == "layers":
        name = os.path.basename(os.path.dirname(os.path.normpath(root))) or name
    warnings: list[str] = []
    dirs = _level_dirs(tiles_dir)
    bundles = {}
    for level, lpath in dirs.items():
        found = _list_level(lpath, warnings.append)
        if found:
            bundles[level] = found
    cache = _make_cache(os.path.abspath(path), "folder", meta.name or name, meta, FolderStore(), bundles, label)
    cache._tiles_dir = tiles_dir
    cache.item = read_item_folder(root, label, cache._warn)
    if conf is None:
        cache.service_extents = _folder_service_extents(root, meta)
    if cache.name.lower() == "layers" and cache.item.name:
        cache.name = cache.item.name       # the item's name, not ArcGIS's fixed folder name
    cache._level_dirs = dirs
    now = time.monotonic()
    cache._listed = {None: now, **{lv: now for lv in dirs}}
    for w in warnings:
        cache._warn(w)
    return cache


def _display_name(name: str) -> str:
    """Zip names without the UTF-8 flag were decoded as cp437; GBK is the common real encoding."""
    try:
        return name.encode("cp437").decode("gbk")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name


def _open_zip(path: str) -> Cache:
    store = ZipStore(path)
    try:
        return _open_zip_store(path, store)
    except BaseException:
        store.close()
        raise


def _open_zip_store(path: str, store: ZipStore) -> Cache:
    names = list(store.infos)
    ext = os.path.splitext(path)[1].lower()
    root_jsons = [n for n in names if n.rsplit("/", 1)[-1] == "root.json"
                  and "/resources/" not in n and "/tilemap/" not in n]
    confs = [n for n in names if n.rsplit("/", 1)[-1].lower() == "conf.xml"]
    meta = None
    if root_jsons:
        rj = min(root_jsons, key=lambda n: n.count("/"))
        data = store.read_small(rj)
        if b"tileInfo" in data:
            meta, tbp = parse_root_json(data, f"{path}!{rj}")
            base = rj[: -len("root.json")]
            tiles_prefix = _join_zip(base, tbp)
            kind = "vtpk" if ext == ".vtpk" or base else "tpkx"
            label = f"{path}!{rj}"
    from_root_json = meta is not None
    if meta is None:
        if not confs:
            raise CacheError(f"{path}: no root.json or conf.xml inside; not a tile package")
        # prefer the conf.xml whose folder has bundles (tpk: v101/<Root>/)
        def has_bundles(c):
            pre = c[: -len("conf.xml")] + "_alllayers/"
            return any(n.startswith(pre) and n.lower().endswith(".bundle") for n in names)
        confs.sort(key=lambda c: (not has_bundles(c), c.count("/")))
        conf = confs[0]
        label = f"{path}!{conf}"
        meta = parse_conf_xml(store.read_small(conf), label)
        base = conf[: -len("conf.xml")]
        cdi = next((n for n in names if n.lower() == (base + "conf.cdi").lower()), None)
        if cdi:
            meta.full_extent = parse_conf_cdi(store.read_small(cdi), f"{path}!{cdi}", meta.scheme.spatial_ref)
        tiles_prefix = base + "_alllayers/"
        kind = "tpk" if ext == ".tpk" else ext.lstrip(".") or "tpk"
        if meta.name is None and base:
            meta.name = _display_name(base.rstrip("/").rsplit("/", 1)[-1])
    _check_storage(meta, label)
    warnings: list[str] = []
    bundles = _list_package(store, tiles_prefix, warnings.append)
    name = meta.name or os.path.splitext(os.path.basename(path))[0]
    cache = _make_cache(os.path.abspath(path), kind, name, meta, store, bundles, label)
    cache._tiles_prefix = tiles_prefix
    cache.item = read_item_package(store, tiles_prefix, path, cache._warn)
    cache.service_extents = _zip_service_extents(store, tiles_prefix, path, meta, from_root_json, cache._warn)
    if cache.name.lower() == "layers" and cache.item.name:
        cache.name = cache.item.name       # the item's name, not ArcGIS's fixed folder name
    cache._listed = {None: time.monotonic()}
    for w in warnings:
        cache._warn(w)
    return cache


def _zip_service_extents(store: ZipStore, tiles_prefix: str, path: str, meta: _Meta, from_root_json: bool,
                         warn: Callable[[str], None]) -> ServiceExtents | None:
    """The extents a package states for its service: root.json's (.tpkx) or mapserver.json's (.tpk),
    and its item's; a broken mapserver.json is a warning, as a broken item file is."""
    names = {n.lower(): n for n in store.infos}
    top = tiles_prefix.split("/", 1)[0] + "/" if "/" in tiles_prefix.strip("/") else ""
    found = ServiceExtents()
    if from_root_json:
        found = root_json_extents(meta)
    else:
        n = names.get(MAPSERVER_JSON) or names.get((top + MAPSERVER_JSON).lower())
        if n is not None and store.infos[n].file_size <= SERVICE_LIMIT:
            try:
                found = parse_mapserver_json(store.read_small(n), f"{path}!{n}", meta.scheme.spatial_ref)
            except CacheError as e:
                warn(f"{path}!{n}: service extents not read ({e})")
    # the item file sources.item reads, in its order
    for rel in ITEM_FILES + (top + "iteminfo.json", top + "esriinfo/iteminfo.xml"):
        n = names.get(rel.lower())
        if n is not None:
            if store.infos[n].file_size <= SERVICE_LIMIT:
                found = replace(found, item=parse_item_extent(store.read_small(n), n))
            break
    return None if found.empty else found


def _folder_service_extents(root: str, meta: _Meta) -> ServiceExtents | None:
    """The extents a cache folder's root.json states, and those of an iteminfo.json next to it."""
    found = root_json_extents(meta)
    p = os.path.join(root, "iteminfo.json")
    if os.path.isfile(p) and os.path.getsize(p) <= SERVICE_LIMIT:
        try:
            found = replace(found, item=parse_item_extent(read_regular(p, p), p))
        except (CacheError, OSError):
            pass    # sources.item warns about an unreadable item file
    return None if found.empty else found


def _join_zip(base: str, rel: str) -> str:
    rel = rel.replace("\\", "/")
    while rel.startswith("./"):
        rel = rel[2:]
    rel = rel.strip("/")
    return f"{base}{rel}/" if rel else base


def _make_cache(path, kind, name, meta: _Meta, store, bundles, label) -> Cache:
    has_v1 = any(loc.bundlx for found in bundles.values() for loc in found.values())
    storage = COMPACT_V1 if has_v1 else COMPACT_V2
    if bundles and meta.storage_format == COMPACT_V1 and not has_v1:
        # conf.xml says V1, but no .bundlx exists: trust the files if the bundles are V2
        sample_level = min(bundles)
        sample = next(iter(bundles[sample_level].values()))
        with store.open(sample.bundle, None, label) as src:
            problem = _bundle.v2_header_problem(src.pread(0, min(_bundle.V2_DATA_START, src.length)))
        if problem is not None:
            raise CacheError(f"{label}: the cache is compact V1 but {sample.bundle} has no .bundlx index next to it")
    cache = Cache(path, kind, name, meta.scheme, storage, meta.tile_format, meta.quality,
                  meta.full_extent, meta.initial_extent, store, bundles)
    cache.band_count, cache.lerc_error = meta.band_count, meta.lerc_error
    return cache

"""Opening a source cache: a compact cache folder (V1 or V2) or a .tpk / .tpkx / .vtpk read in place.

A cache is a tile scheme plus bundles. Bundles are found by name; their bytes are mmapped (a
folder's .bundle files, or a stored entry of a package, which is a byte range of the zip) and only
deflated package entries are decompressed into memory. Indexes are parsed by the compiled core
into (offsets, sizes) arrays relative to the bundle's own first byte.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import xml.etree.ElementTree as ET
import zipfile
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import numpy as np

from tilecrate import _bundle
from tilecrate.errors import BundleError, CacheError
from tilecrate.tiling import (
    LOD,
    PACKET,
    Extent,
    SpatialRef,
    TileScheme,
    bundle_origin,
    parse_bundle_name,
    parse_level_dir,
)

COMPACT_V1 = "esriMapCacheStorageModeCompact"
COMPACT_V2 = "esriMapCacheStorageModeCompactV2"
EXPLODED = "esriMapCacheStorageModeExploded"
_INDEX_CACHE_SIZE = 64
_DEFLATED_CACHE_SIZE = 8


class BundleRef(NamedTuple):
    """A bundle by position: level and the (row, col) of its top-left tile."""

    level: int
    row0: int
    col0: int


@dataclass
class BundleData:
    """One bundle's bytes and parsed index; `buf` stays valid until `close()`."""

    ref: BundleRef
    buf: memoryview
    offsets: np.ndarray
    sizes: np.ndarray
    _closer: object = None

    def tile(self, row: int, col: int) -> bytes | None:
        """Bytes of a tile of this bundle (absolute row/col), or None if absent."""
        i = (row - self.ref.row0) * PACKET + (col - self.ref.col0)
        if not (0 <= row - self.ref.row0 < PACKET and 0 <= col - self.ref.col0 < PACKET):
            raise IndexError(f"tile ({row}, {col}) is not in bundle {self.ref}")
        size = int(self.sizes[i])
        if size == 0:
            return None
        off = int(self.offsets[i])
        return bytes(self.buf[off:off + size])

    def close(self) -> None:
        """Release the mapping (safe to call twice)."""
        self.buf.release()
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __enter__(self) -> "BundleData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Loc:
    """Where a bundle's bytes live: a folder file, or a zip entry (stored or deflated)."""

    bundle: str                      # file path, or zip entry name
    bundlx: str | None = None        # V1 only
    size: int = 0                    # bytes of the .bundle
    mtime: float = 0.0


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
    _store: "_Store" = field(repr=False)
    _bundles: dict = field(repr=False)   # level -> {(row0, col0): _Loc}
    _index_cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> int:
        """1 for compact V1 bundles, 2 for compact V2."""
        return 1 if self.storage_format == COMPACT_V1 else 2

    @property
    def levels(self) -> list[int]:
        """LevelIDs that have at least one bundle, ascending."""
        return sorted(lv for lv, b in self._bundles.items() if b)

    def bundles(self, level: int | None = None) -> list[BundleRef]:
        """Bundles present, of one level or of all levels, sorted by level, row, col."""
        levels = [level] if level is not None else self.levels
        out = []
        for lv in levels:
            out.extend(BundleRef(lv, r, c) for r, c in sorted(self._bundles.get(lv, {})))
        return out

    def has_bundle(self, ref: BundleRef) -> bool:
        """Whether this bundle exists in the cache."""
        return (ref.row0, ref.col0) in self._bundles.get(ref.level, {})

    def bundle_file_size(self, ref: BundleRef) -> int:
        """Size in bytes of the .bundle file (without .bundlx)."""
        return self._loc(ref).size

    def bundle_key(self, ref: BundleRef) -> tuple[str, int, float]:
        """(location, size, mtime) identifying this bundle's current content, for caching indexes."""
        loc = self._loc(ref)
        return f"{self.path}::{loc.bundle}", loc.size, loc.mtime

    def bundle_label(self, ref: BundleRef) -> str:
        """A readable name for messages: the bundle's path (inside the package for packages)."""
        loc = self._loc(ref)
        return loc.bundle if self.kind == "folder" else f"{self.path}!{loc.bundle}"

    def bundle_file(self, ref: BundleRef) -> tuple[str, int, int] | None:
        """(file, offset of the bundle's first byte in it, the file's size) for reading the bundle with
        plain reads; None where the bytes exist only in memory (a deflated package entry)."""
        loc = self._loc(ref)
        return self._store.file_range(loc.bundle, loc.size)

    def _loc(self, ref: BundleRef) -> _Loc:
        try:
            return self._bundles[ref.level][(ref.row0, ref.col0)]
        except KeyError:
            raise CacheError(f"{self.path}: no bundle at level {ref.level}, row {ref.row0}, column {ref.col0}") from None

    def _parse(self, ref: BundleRef, buf: memoryview) -> tuple[np.ndarray, np.ndarray]:
        loc = self._loc(ref)
        label = self.bundle_label(ref)
        if loc.bundlx is not None:
            bx = self._store.read_small(loc.bundlx)
            return _bundle.parse_v1(bx, buf, label)
        return _bundle.parse_v2(buf, label)

    def index(self, ref: BundleRef) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, sizes) of a bundle, row-major 16 384 entries; kept in a small LRU.

        A V2 index is read with one plain read of the header and index (no mapping: cheaper, and a
        file truncated under a running server gives an error, not SIGBUS); V1 needs the tiles'
        size prefixes, so the bundle is mapped.
        """
        with self._lock:
            hit = self._index_cache.get(ref)
            if hit is not None:
                self._index_cache.move_to_end(ref)
                return hit
        loc = self._loc(ref)
        if loc.bundlx is not None:
            with self.open_bundle(ref) as data:
                return data.offsets, data.sizes
        label = self.bundle_label(ref)
        head, file_size = self._store.head(loc.bundle, _bundle.V2_DATA_START, label)
        result = _bundle.parse_v2_index(head, file_size, label)
        self._remember(ref, result)
        return result

    def _remember(self, ref: BundleRef, index: tuple[np.ndarray, np.ndarray]) -> None:
        with self._lock:
            self._index_cache[ref] = index
            self._index_cache.move_to_end(ref)
            while len(self._index_cache) > _INDEX_CACHE_SIZE:
                self._index_cache.popitem(last=False)

    def open_bundle(self, ref: BundleRef) -> BundleData:
        """Map a bundle and parse its index; close the result when done with the bytes."""
        loc = self._loc(ref)
        buf, closer = self._store.map(loc.bundle, self.bundle_label(ref))
        try:
            offsets, sizes = self._parse(ref, buf)
        except BaseException:
            buf.release()
            if closer is not None:
                closer.close()
            raise
        self._remember(ref, (offsets, sizes))
        return BundleData(ref, buf, offsets, sizes, closer)

    def tile(self, level: int, row: int, col: int) -> bytes | None:
        """Bytes of one tile, or None where the cache has none."""
        r0, c0 = bundle_origin(row, col)
        ref = BundleRef(level, r0, c0)
        if row < 0 or col < 0 or not self.has_bundle(ref):
            return None
        offsets, sizes = self.index(ref)
        i = (row - r0) * PACKET + (col - c0)
        size = int(sizes[i])
        if size == 0:
            return None
        return self._store.read_at(self._loc(ref).bundle, int(offsets[i]), size, self.bundle_label(ref))

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
        """Close the underlying files."""
        self._store.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BundleReader:
    """Plain reads from the file holding a bundle, refusing a file whose size changed since the
    bundle's index was read (a changed bundle must be an error, never wrong bytes)."""

    def __init__(self, where: tuple[str, int, int], label: str):
        self.path, self.base, size = where
        self.label = label
        self._f = open(self.path, "rb", buffering=0)
        if os.fstat(self._f.fileno()).st_size != size:
            self.close()
            raise self._changed()

    def _changed(self) -> BundleError:
        return BundleError(f"{self.label}: the file changed while it was being exported")

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset` of the bundle (GIL released in the read)."""
        if os.preadv(self._f.fileno(), [view], self.base + offset) != len(view):
            raise self._changed()

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# storage backends


class _Store(ABC):
    """Byte access to the files of a cache: a folder, or the entries of a package."""

    @abstractmethod
    def map(self, name: str, label: str) -> tuple[memoryview, object]:
        """A view of a bundle's bytes and the object to close when done with it (or None)."""

    @abstractmethod
    def read_small(self, name: str) -> bytes:
        """The whole content of a small file (metadata, .bundlx)."""

    @abstractmethod
    def file_range(self, name: str, size: int) -> tuple[str, int, int] | None:
        """(file, offset, file size) holding a bundle's bytes on disk, or None if only in memory."""

    @abstractmethod
    def head(self, name: str, length: int, label: str) -> tuple[bytes, int]:
        """(up to `length` first bytes of a bundle, the bundle's whole size)."""

    @abstractmethod
    def read_at(self, name: str, offset: int, length: int, label: str) -> bytes:
        """`length` bytes of a bundle from `offset` (BundleError if the bundle is shorter now)."""

    def close(self) -> None:
        """Release files and mappings."""


class _FolderStore(_Store):
    def map(self, name: str, label: str) -> tuple[memoryview, object]:
        try:
            f = open(name, "rb")
        except OSError as e:
            raise CacheError(f"{label}: cannot open ({e.strerror})") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BundleError(f"{label}: the file is empty")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(mm), mm

    def file_range(self, name: str, size: int) -> tuple[str, int, int] | None:
        return name, 0, size

    def _open(self, name: str, label: str) -> int:
        try:
            return os.open(name, os.O_RDONLY)
        except OSError as e:
            raise CacheError(f"{label}: cannot open ({e.strerror})") from None

    def head(self, name: str, length: int, label: str) -> tuple[bytes, int]:
        fd = self._open(name, label)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise BundleError(f"{label}: the file is empty")
            return os.pread(fd, min(length, size), 0), size
        except OSError as e:
            raise CacheError(f"{label}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)

    def read_at(self, name: str, offset: int, length: int, label: str) -> bytes:
        fd = self._open(name, label)
        try:
            data = os.pread(fd, length, offset)
        except OSError as e:
            raise CacheError(f"{label}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)
        if len(data) != length:
            raise BundleError(f"{label}: the file ends before the tile at offset {offset} "
                              f"({length} bytes); it changed after its index was read")
        return data

    def read_small(self, name: str) -> bytes:
        try:
            with open(name, "rb") as f:
                return f.read()
        except OSError as e:
            raise CacheError(f"{name}: cannot read ({e.strerror})") from None


class _ZipStore(_Store):
    """Entries of a zip: stored ones are slices of one mmap, deflated ones are inflated once."""

    def __init__(self, path: str, zf: zipfile.ZipFile):
        self.path = path
        self.zf = zf
        self._zf_lock = threading.Lock()
        self.infos = {i.filename: i for i in zf.infolist()}
        self._file = open(path, "rb")
        self.file_size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._inflated: OrderedDict[str, bytes] = OrderedDict()

    def data_range(self, name: str) -> tuple[int, int]:
        """(offset, length) of a stored entry's bytes in the zip file."""
        info = self.infos[name]
        hdr = self._mm[info.header_offset:info.header_offset + 30]
        if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
            raise CacheError(f"{self.path}!{name}: bad local file header")
        name_len, extra_len = struct.unpack("<HH", hdr[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.compress_size > self.file_size:
            raise BundleError(f"{self.path}!{name}: entry runs past the end of the package (truncated download?)")
        return start, info.compress_size

    def file_range(self, name: str, size: int) -> tuple[str, int, int] | None:
        if self.infos[name].compress_type != zipfile.ZIP_STORED:
            return None
        start, _ = self.data_range(name)
        return self.path, start, self.file_size

    def head(self, name: str, length: int, label: str) -> tuple[bytes, int]:
        view, _ = self.map(name, label)
        try:
            return bytes(view[:length]), view.nbytes
        finally:
            view.release()

    def read_at(self, name: str, offset: int, length: int, label: str) -> bytes:
        view, _ = self.map(name, label)
        try:
            if offset + length > view.nbytes:
                raise BundleError(f"{label}: the tile at offset {offset} ({length} bytes) is past the entry's end")
            return bytes(view[offset:offset + length])
        finally:
            view.release()

    def map(self, name: str, label: str) -> tuple[memoryview, object]:
        info = self.infos[name]
        if info.compress_type == zipfile.ZIP_STORED:
            start, length = self.data_range(name)
            if length == 0:
                raise BundleError(f"{label}: the entry is empty")
            return memoryview(self._mm)[start:start + length], None
        data = self._inflate(name, label)
        return memoryview(data), None

    def _inflate(self, name: str, label: str) -> bytes:
        with self._zf_lock:
            data = self._inflated.get(name)
            if data is not None:
                self._inflated.move_to_end(name)
                return data
            try:
                data = self.zf.read(name)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise BundleError(f"{label}: cannot inflate the entry ({e})") from None
            if not data:
                raise BundleError(f"{label}: the entry is empty")
            self._inflated[name] = data
            while len(self._inflated) > _DEFLATED_CACHE_SIZE:
                self._inflated.popitem(last=False)
            return data

    def read_small(self, name: str) -> bytes:
        with self._zf_lock:
            try:
                return self.zf.read(name)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as e:
                raise CacheError(f"{self.path}!{name}: cannot read ({e})") from None

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass  # a BundleData still holds a slice; the mapping goes when it is released
        self._file.close()
        self.zf.close()


# --------------------------------------------------------------------------------------------
# metadata


def _text(el: ET.Element | None, tag: str, default: str | None = None) -> str | None:
    if el is None:
        return default
    child = el.find(tag)
    if child is None or child.text is None:
        return default
    return child.text.strip()


def _num(el, tag, default=None, conv=float):
    txt = _text(el, tag)
    if txt is None or txt == "":
        return default
    try:
        return conv(txt)
    except ValueError:
        raise CacheError(f"{tag} is not a number: {txt!r}") from None


def _xml_root(data: bytes, label: str) -> ET.Element:
    try:
        return ET.fromstring(data.lstrip(b"\xef\xbb\xbf").strip())
    except ET.ParseError as e:
        raise CacheError(f"{label}: not valid XML ({e})") from None


@dataclass
class _Meta:
    scheme: TileScheme
    storage_format: str
    tile_format: str
    quality: int
    full_extent: Extent | None = None
    initial_extent: Extent | None = None
    name: str | None = None


def _spatial_ref_xml(el: ET.Element | None) -> SpatialRef:
    if el is None:
        return SpatialRef()
    wkid = _num(el, "WKID", conv=int)
    latest = _num(el, "LatestWKID", conv=int)
    return SpatialRef(wkid, latest, _text(el, "WKT"))


def parse_conf_xml(data: bytes, label: str = "conf.xml") -> _Meta:
    """Read a CacheInfo document (conf.xml)."""
    root = _xml_root(data, label)
    tci = root.find("TileCacheInfo")
    if tci is None:
        raise CacheError(f"{label}: no TileCacheInfo element; is this a cache conf.xml?")
    try:
        sr = _spatial_ref_xml(tci.find("SpatialReference"))
        origin = tci.find("TileOrigin")
        lods = []
        infos = tci.find("LODInfos")
        for li in (infos if infos is not None else []):
            lods.append(LOD(_num(li, "LevelID", conv=int), _num(li, "Resolution"), _num(li, "Scale")))
        if not lods:
            raise CacheError(f"{label}: no LODInfo elements")
        if origin is None:
            raise CacheError(f"{label}: no TileOrigin")
        cols = _num(tci, "TileCols", 256, int)
        rows = _num(tci, "TileRows", 256, int)
        dpi = _num(tci, "DPI", 96, lambda s: int(float(s)))
        tii = root.find("TileImageInfo")
        csi = root.find("CacheStorageInfo")
        storage = _text(csi, "StorageFormat", COMPACT_V1) or COMPACT_V1
        packet = _num(csi, "PacketSize", PACKET, int)
        scheme = TileScheme(_num(origin, "X"), _num(origin, "Y"), cols, rows, dpi,
                            tuple(sorted(lods, key=lambda l: l.level)), sr, packet)
        _check_scheme(scheme, label)
        return _Meta(scheme, storage, _text(tii, "CacheTileFormat", "MIXED") or "MIXED",
                     _num(tii, "CompressionQuality", 0, lambda s: int(float(s))))
    except (TypeError, AttributeError) as e:
        raise CacheError(f"{label}: incomplete tiling scheme ({e})") from None


def parse_conf_cdi(data: bytes, label: str = "conf.cdi", sr: SpatialRef | None = None) -> Extent | None:
    """Read the data envelope (conf.cdi); None if it has no usable numbers."""
    root = _xml_root(data, label)
    try:
        vals = [_num(root, t) for t in ("XMin", "YMin", "XMax", "YMax")]
    except CacheError:
        return None
    if any(v is None for v in vals):
        return None
    esr = _spatial_ref_xml(root.find("SpatialReference"))
    ext = Extent(*vals, esr if esr.code or esr.wkt else (sr or SpatialRef()))
    return ext if ext.is_valid else None


def _extent_json(obj, default_sr: SpatialRef) -> Extent | None:
    if not isinstance(obj, dict):
        return None
    try:
        vals = [float(obj[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (KeyError, TypeError, ValueError):
        return None
    sr = SpatialRef.from_json(obj.get("spatialReference")) if obj.get("spatialReference") else default_sr
    ext = Extent(*vals, sr)
    return ext if ext.is_valid else None


def parse_root_json(data: bytes, label: str = "root.json") -> tuple[_Meta, str]:
    """Read a .tpkx/.vtpk root.json; returns the metadata and tileBundlesPath."""
    try:
        root = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{label}: not valid JSON ({e})") from None
    if not isinstance(root, dict) or not isinstance(root.get("tileInfo"), dict):
        raise CacheError(f"{label}: no tileInfo object")
    ti = root["tileInfo"]
    try:
        lods = tuple(sorted((LOD(int(l["level"]), float(l["resolution"]), float(l.get("scale", 0)))
                             for l in ti["lods"]), key=lambda l: l.level))
        sr = SpatialRef.from_json(ti.get("spatialReference") or root.get("spatialReference"))
        scheme = TileScheme(float(ti["origin"]["x"]), float(ti["origin"]["y"]), int(ti.get("cols", 256)),
                            int(ti.get("rows", 256)), int(float(ti.get("dpi", 96))), lods, sr)
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{label}: incomplete tileInfo ({e!r})") from None
    if not lods:
        raise CacheError(f"{label}: tileInfo has no lods")
    storage_info = root.get("storageInfo") or (root.get("resourceInfo") or {}).get("cacheInfo", {}).get("storageInfo") or {}
    storage = storage_info.get("storageFormat", COMPACT_V2)
    packet = int(storage_info.get("packetSize", PACKET))
    if packet != PACKET:
        scheme = TileScheme(scheme.origin_x, scheme.origin_y, scheme.tile_cols, scheme.tile_rows,
                            scheme.dpi, scheme.lods, scheme.spatial_ref, packet)
    _check_scheme(scheme, label)
    tii = root.get("tileImageInfo") or {}
    fmt = tii.get("format") or ti.get("format") or "MIXED"
    quality = tii.get("compressionQuality", ti.get("compressionQuality", 0)) or 0
    meta = _Meta(scheme, storage, str(fmt), int(quality),
                 _extent_json(root.get("fullExtent"), sr), _extent_json(root.get("initialExtent"), sr),
                 root.get("name") or None)
    return meta, str(root.get("tileBundlesPath", "./tile"))


def _check_scheme(scheme: TileScheme, label: str) -> None:
    if scheme.packet_size != PACKET:
        raise CacheError(f"{label}: packet size {scheme.packet_size} is not supported (compact caches use 128)")
    if not (0 < scheme.tile_cols <= 8192 and 0 < scheme.tile_rows <= 8192):
        raise CacheError(f"{label}: tile size {scheme.tile_cols}x{scheme.tile_rows} is out of range")
    for lod in scheme.lods:
        if not (lod.resolution > 0):
            raise CacheError(f"{label}: level {lod.level} has resolution {lod.resolution}")


_STORAGE_NAMES = {"compact": COMPACT_V1, "compactv1": COMPACT_V1, "tpk": COMPACT_V1,
                  "compactv2": COMPACT_V2, "tpkx": COMPACT_V2, "exploded": EXPLODED}


def normalize_storage_format(value: str) -> str:
    """The long esriMapCacheStorageMode* name for any spelling (`compactV2`, `COMPACT_V2`, `tpkx`, ...);
    an unknown value comes back as it was."""
    key = "".join(str(value).split()).lower().replace("_", "").replace("-", "")
    return _STORAGE_NAMES.get(key.replace("esrimapcachestoragemode", ""), str(value))


def _check_storage(meta: _Meta, label: str) -> None:
    meta.storage_format = normalize_storage_format(meta.storage_format)
    if meta.storage_format not in (COMPACT_V1, COMPACT_V2):
        raise CacheError(f"{label}: storage format {meta.storage_format} is not supported yet "
                         "(tilecrate reads compact V1 and V2 caches)")


# --------------------------------------------------------------------------------------------
# opening


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a compact cache folder, .tpk, .tpkx or .vtpk for reading."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CacheError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return _open_folder(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CacheError(f"{path}: cannot read ({e.strerror})") from None
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
        with open(conf, "rb") as f:
            meta = parse_conf_xml(f.read(), conf)
        cdi = os.path.join(root, "conf.cdi")
        if os.path.isfile(cdi):
            with open(cdi, "rb") as f:
                meta.full_extent = parse_conf_cdi(f.read(), cdi, meta.scheme.spatial_ref)
        tiles_dir = os.path.join(root, "_alllayers")
        label = conf
    elif os.path.isfile(root_json):
        with open(root_json, "rb") as f:
            meta, tbp = parse_root_json(f.read(), root_json)
        tiles_dir = os.path.normpath(os.path.join(root, tbp))
        label = root_json
    else:
        raise CacheError(f"{path}: not a cache folder (no conf.xml, Conf.xml or root.json)")
    _check_storage(meta, label)
    if not os.path.isdir(tiles_dir):
        raise CacheError(f"{path}: no tile folder ({os.path.basename(tiles_dir)}) next to {os.path.basename(label)}")
    bundles: dict[int, dict] = {}
    with os.scandir(tiles_dir) as levels:
        for lvl in levels:
            level = parse_level_dir(lvl.name)
            if level is None or not lvl.is_dir():
                continue
            found = {}
            with os.scandir(lvl.path) as files:
                names = {e.name: e for e in files}
            lower = {n.lower(): n for n in names}
            for n, entry in names.items():
                rc = parse_bundle_name(n)
                if rc is None:
                    continue
                st = entry.stat()
                bx = lower.get(n.lower()[:-1] + "x")
                found[rc] = _Loc(entry.path, os.path.join(lvl.path, bx) if bx else None, st.st_size, st.st_mtime)
            if found:
                bundles[level] = found
    name = os.path.basename(os.path.normpath(root))
    if name.lower() == "layers":
        name = os.path.basename(os.path.dirname(os.path.normpath(root))) or name
    return _make_cache(os.path.abspath(path), "folder", meta.name or name, meta, _FolderStore(), bundles, label)


def _display_name(name: str) -> str:
    """Zip names without the UTF-8 flag were decoded as cp437; GBK is the common real encoding."""
    try:
        return name.encode("cp437").decode("gbk")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name


def _open_zip(path: str) -> Cache:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CacheError(f"{path}: not a readable zip package ({e})") from None
    try:
        store = _ZipStore(path, zf)
    except (OSError, ValueError) as e:
        zf.close()
        raise CacheError(f"{path}: cannot map the package ({e})") from None
    try:
        return _open_zip_store(path, store)
    except BaseException:
        store.close()
        raise


def _open_zip_store(path: str, store: _ZipStore) -> Cache:
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
    bundles: dict[int, dict] = {}
    lower = {n.lower(): n for n in names}
    for n in names:
        if not n.startswith(tiles_prefix):
            continue
        parts = n[len(tiles_prefix):].split("/")
        if len(parts) != 2:
            continue
        level = parse_level_dir(parts[0])
        rc = parse_bundle_name(parts[1])
        if level is None or rc is None:
            continue
        bx = lower.get(n.lower()[:-1] + "x")
        bundles.setdefault(level, {})[rc] = _Loc(n, bx, store.infos[n].file_size, 0.0)
    try:
        mtime = os.stat(path).st_mtime
    except OSError:
        mtime = 0.0
    for found in bundles.values():
        for loc in found.values():
            loc.mtime = mtime
    name = meta.name or os.path.splitext(os.path.basename(path))[0]
    return _make_cache(os.path.abspath(path), kind, name, meta, store, bundles, label)


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
        buf, closer = store.map(sample.bundle, label)
        try:
            problem = _bundle.v2_header_problem(buf)
        finally:
            buf.release()
            if closer is not None:
                closer.close()
        if problem is not None:
            raise CacheError(f"{label}: the cache is compact V1 but {sample.bundle} has no .bundlx index next to it")
    return Cache(path, kind, name, meta.scheme, storage, meta.tile_format, meta.quality,
                 meta.full_extent, meta.initial_extent, store, bundles)

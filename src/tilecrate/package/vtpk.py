"""The .vtpk writer: a vector tile package of the tiles an export selects (FORMATS.md §12, §18).

Layout, in the sorted order ArcGIS writes (natural-earth.vtpk): `esriinfo/item.pkinfo`,
`esriinfo/iteminfo.xml`, `esriinfo/thumbnail/thumbnail.png` (the source's), `p12/metadata.json`
(the source's), `p12/resources/…` (copied whole: styles, sprites, fonts, info), `p12/root.json`
(the source's with minLOD/maxLOD, extents and minScale of the export), `p12/tile/Lzz/R…C….bundle`
(compact V2, tile bytes passed through: gzip'd MVT is never re-encoded, so optimizeTilesForSize is
ignored as ArcGIS ignores it) and `p12/tilemap/root.json`, the quadtree index rebuilt for the
exported tiles. Entries are STORED. One generator lists the entries for both the writer and the
size prediction, so an estimate equals the bytes written.

The source is a .vtpk (read in place) or an extracted package folder (the folder holding
root.json, with `esriinfo/` optionally next to it).
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from isal import isal_zlib

from tilecrate import _plan
from tilecrate.cache import Cache
from tilecrate.errors import CacheError, ExportError
from tilecrate.esri.iteminfo import vtpk_item_texts, write_vtpk_item_pkinfo, write_vtpk_iteminfo_xml
from tilecrate.esri.root_json import restate_root_json
from tilecrate.package.bundles import plan_bundle
from tilecrate.package.layout import is_vector_source  # noqa: F401 - re-exported
from tilecrate.package.metadata import WGS84, Stamp, to_wgs84
from tilecrate.package.tempfiles import temp_path
from tilecrate.package.zipstream import ZIP64_LIMIT, ZipWriter
from tilecrate.request import ExportRequest
from tilecrate.results import ExportProgress, ExportResult, check_cancel, os_error
from tilecrate.selection import Selection, area_of, select
from tilecrate.tiling import PACKET, Extent, bundle_name, level_dir

ROOT = "p12/"
KIND = "vtpk"
STORAGE_FORMAT = "esriMapCacheStorageModeCompactV2"
MAX_SMALL = 4 << 20            # source metadata read into memory (root.json, iteminfo.xml) at most this big
_CHUNK = 1 << 20
_LISTINGS: "OrderedDict[tuple, tuple]" = OrderedDict()
_LISTINGS_LOCK = threading.Lock()
_LISTINGS_SIZE = 16
WHOLE = 8 << 20                # source files up to this size are copied with one read and a CRC check
_LOD_RATIO_TOL = 1e-3


# --------------------------------------------------------------------------------------------
# the source package's files


@dataclass(frozen=True)
class _File:
    """A file of the source package to copy: its name in the output, size and (if known) CRC-32."""

    name: str
    size: int
    crc: int | None
    src: str                   # zip entry name, or file path
    header: int | None = None  # a stored zip entry's local header offset...
    start: int | None = None   # ...and where its bytes start (after that header)


class _Source:
    """The non-tile files of a source vector package: a .vtpk zip or an extracted folder."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.label = cache.path
        self.warnings: list[str] = []
        self._zf: zipfile.ZipFile | None = None
        self._is_zip = False
        self._fd: int | None = None
        self._infos: dict[str, zipfile.ZipInfo] = {}
        try:
            if os.path.isdir(cache.path):
                self._init_folder(cache.path)
            else:
                self._init_zip(cache.path)
        except BaseException:
            self.close()
            raise

    def _init_zip(self, path: str) -> None:
        self._is_zip = True
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(self._fd)
        except OSError as e:
            raise ExportError(f"{path}: cannot read the vector tile package ({e.strerror})") from None
        self._zip_size = st.st_size
        # a server exports the same package again and again: its listing is kept per file identity
        key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _LISTINGS_LOCK:
            hit = _LISTINGS.get(key)
            if hit is not None:
                _LISTINGS.move_to_end(key)
        if hit is None:
            hit = self._list_zip(path)
            with _LISTINGS_LOCK:
                _LISTINGS[key] = hit
                while len(_LISTINGS) > _LISTINGS_SIZE:
                    _LISTINGS.popitem(last=False)
        self._infos, self.root_json, self.iteminfo, files, warnings = hit
        self.files = dict(files)
        self.warnings = list(warnings)

    def _list_zip(self, path: str) -> tuple:
        """(infos, root.json bytes, iteminfo.xml bytes or None, files, warnings) of a package."""
        infos = {i.filename: i for i in self._zipfile().infolist() if not i.is_dir()}
        self._infos = infos
        roots = [n for n in infos if n.rsplit("/", 1)[-1] == "root.json"
                 and "/resources/" not in "/" + n and "/tilemap/" not in "/" + n]
        if not roots:
            raise ExportError(f"{path}: no root.json in the package")
        root_json = min(roots, key=lambda n: n.count("/"))
        base = root_json[:-len("root.json")]
        root_bytes = self._read_zip(infos[root_json])
        self.files = {}
        for name, info in sorted(infos.items()):
            if name.startswith(base + "resources/"):
                self._add(ROOT + name[len(base):], info.file_size, info.CRC, name)
            elif name == base + "metadata.json":
                self._add(ROOT + "metadata.json", info.file_size, info.CRC, name)
            elif name == "esriinfo/thumbnail/thumbnail.png":
                self._add(name, info.file_size, info.CRC, name)
        self._locate_stored(infos)
        item = infos.get("esriinfo/iteminfo.xml")
        iteminfo = self._read_zip(item) if item is not None and item.file_size <= MAX_SMALL else None
        return infos, root_bytes, iteminfo, dict(self.files), list(self.warnings)

    def _zipfile(self) -> zipfile.ZipFile:
        """The package opened with zipfile (only for listing it, deflated entries and large ones)."""
        if self._zf is None:
            try:
                # the same file as the descriptor the listing came from, even if renamed over since
                self._zf = zipfile.ZipFile(os.fdopen(os.dup(self._fd), "rb"))
            except (zipfile.BadZipFile, OSError) as e:
                raise ExportError(f"{self.label}: cannot read the vector tile package ({e})") from None
        return self._zf

    def _init_folder(self, root: str) -> None:
        self.root_json = self._read_path(os.path.join(root, "root.json"))
        self.files = {}
        for name, path in self._walk(os.path.join(root, "resources"), "resources/"):
            self._add(ROOT + name, os.path.getsize(path), None, path)
        for out_name, path in ((ROOT + "metadata.json", os.path.join(root, "metadata.json")),
                               ("esriinfo/thumbnail/thumbnail.png",
                                os.path.join(root, os.pardir, "esriinfo", "thumbnail", "thumbnail.png"))):
            if os.path.isfile(path) and not os.path.islink(path):
                self._add(out_name, os.path.getsize(path), None, path)
        item = os.path.join(root, os.pardir, "esriinfo", "iteminfo.xml")
        self.iteminfo = (self._read_path(item) if os.path.isfile(item) and os.path.getsize(item) <= MAX_SMALL
                         else None)

    def _walk(self, folder: str, prefix: str) -> Iterator[tuple[str, str]]:
        if not os.path.isdir(folder):
            return
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            rel = os.path.relpath(dirpath, folder).replace(os.sep, "/")
            for fn in sorted(filenames):
                path = os.path.join(dirpath, fn)
                if os.path.islink(path) or not os.path.isfile(path):
                    self.warnings.append(f"{path}: not a regular file; left out of the package")
                    continue
                yield prefix + (fn if rel == "." else f"{rel}/{fn}"), path

    def _add(self, name: str, size: int, crc: int | None, src: str) -> None:
        parts = name.split("/")
        if "\\" in name or any(p in ("", ".", "..") for p in parts):
            # an entry an unzipper would write outside its folder is not copied into our package
            self.warnings.append(f"{self.label}: resource {name!r} has an unsafe name; left out of the package")
            return
        self.files[name] = _File(name, int(size), crc, src)

    def _read_zip(self, info: zipfile.ZipInfo) -> bytes:
        if info.file_size > MAX_SMALL:
            raise ExportError(f"{self.label}!{info.filename}: {info.file_size} bytes is too large for package metadata")
        try:
            return self._zipfile().read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ExportError(f"{self.label}!{info.filename}: cannot read ({e})") from None

    def _read_path(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SMALL + 1)
        except OSError as e:
            raise ExportError(f"{path}: cannot read ({e.strerror})") from None
        if len(data) > MAX_SMALL:
            raise ExportError(f"{path}: too large for package metadata")
        return data

    def _changed(self, f: _File, what: str) -> ExportError:
        return ExportError(f"{self.label}: {f.name} changed while it was being exported ({what})")

    def _locate_stored(self, infos: dict[str, zipfile.ZipInfo]) -> None:
        """Find where each stored file's bytes start, from its local header: once per listing (one read
        of the span holding the headers when they lie together), so an export reads only the bytes.
        A file whose header is not where the central directory says is read through zipfile, whose
        error names it when it is copied or served (one broken font range does not stop the rest)."""
        # a header the central directory places past the end is left to zipfile too: with every one
        # there, the span below ran backwards (pread of a negative length: a bare EINVAL, no name)
        stored = [f for f in self.files.values() if infos[f.src].compress_type == zipfile.ZIP_STORED
                  and infos[f.src].header_offset + 30 <= self._zip_size]
        if not stored:
            return
        offsets = sorted(infos[f.src].header_offset for f in stored)
        lo, hi = offsets[0], offsets[-1] + 30
        try:
            span = os.pread(self._fd, hi - lo, lo) if hi - lo <= 4 * WHOLE else None
        except OSError as e:
            raise ExportError(f"{self.label}: cannot read the vector tile package ({e.strerror})") from None
        for f in stored:
            info = infos[f.src]
            at = info.header_offset
            try:
                hdr = span[at - lo:at - lo + 30] if span is not None else os.pread(self._fd, 30, at)
            except OSError as e:
                raise ExportError(f"{self.label}: cannot read the vector tile package ({e.strerror})") from None
            if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
                continue           # left to zipfile, which says what is wrong when the file is read
            name_len, extra_len = struct.unpack_from("<HH", hdr, 26)
            start = at + 30 + name_len + extra_len
            if start + info.compress_size <= self._zip_size:
                self.files[f.name] = _File(f.name, f.size, f.crc, f.src, at, start)

    def read_whole(self, f: _File) -> tuple[bytes | memoryview, int]:
        """(bytes, CRC-32) of a file of at most WHOLE bytes, checked against its listed size (and CRC)."""
        try:
            if f.start is not None:
                data = os.pread(self._fd, f.size, f.start)
            elif self._is_zip:
                data = self._zipfile().read(self._infos[f.src])      # zipfile checks the CRC-32
            else:
                with open(f.src, "rb") as src:
                    data = src.read(f.size + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ExportError(f"{self.label}: cannot copy {f.name} ({e})") from None
        if len(data) != f.size:
            raise self._changed(f, f"{f.size} bytes listed, {len(data)} read")
        crc = isal_zlib.crc32(data) & 0xFFFFFFFF
        if f.crc is not None and crc != f.crc:
            raise ExportError(f"{self.label}: {f.name} is corrupt or changed (CRC-32 mismatch)")
        return data, crc

    def read_many(self, files: list[_File]) -> list[tuple[str, bytes | memoryview, int]]:
        """[(name, bytes, CRC-32)] of files of at most WHOLE bytes each, each checked as `read_whole`
        checks it; stored entries lying together (a package's hundreds of font ranges) in one read."""
        if len(files) < 2 or any(f.start is None for f in files):
            return [(f.name, *self.read_whole(f)) for f in files]
        lo = min(f.header for f in files)
        hi = max(f.start + f.size for f in files)
        if hi - lo > 2 * sum(f.size for f in files) + (64 << 10):
            return [(f.name, *self.read_whole(f)) for f in files]      # scattered: file by file
        try:
            span = memoryview(os.pread(self._fd, hi - lo, lo))
        except OSError as e:
            raise ExportError(f"{self.label}: cannot copy its resources ({e.strerror})") from None
        if len(span) != hi - lo:
            raise ExportError(f"{self.label}: the package is shorter than when it was opened (truncated?)")
        crc32 = isal_zlib.crc32
        out = []
        for f in files:
            if span[f.header - lo:f.header - lo + 4] != b"PK\x03\x04":
                raise self._changed(f, "its local header is gone")
            data = span[f.start - lo:f.start - lo + f.size]
            crc = crc32(data) & 0xFFFFFFFF
            if crc != f.crc:
                raise ExportError(f"{self.label}: {f.name} is corrupt or changed (CRC-32 mismatch)")
            out.append((f.name, data, crc))
        return out

    def chunks(self, f: _File, check: Callable[[], None]) -> Iterator[bytes]:
        """A large source file's bytes in pieces; an error if it is not the size it was listed with."""
        done = 0
        try:
            if self._is_zip:
                with self._zipfile().open(f.src) as src:      # zipfile checks the CRC-32 at the end
                    while piece := src.read(_CHUNK):
                        check()
                        done += len(piece)
                        if done > f.size:
                            break
                        yield piece
            else:
                with open(f.src, "rb") as src:
                    while piece := src.read(min(_CHUNK, f.size - done + 1)):
                        check()
                        done += len(piece)
                        if done > f.size:
                            break
                        yield piece
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ExportError(f"{self.label}: cannot copy {f.name} ({e})") from None
        if done != f.size:
            raise self._changed(f, f"{f.size} bytes listed, {done} read")

    def close(self) -> None:
        """Close the source zip."""
        if self._zf is not None:
            self._zf.close()
            self._zf = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# tilemap


def _check_quadtree(cache: Cache, levels: list[int]) -> None:
    """The tilemap index assumes level 0 is one tile and each level halves the resolution."""
    if not levels:
        return
    lods = {lod.level: lod for lod in cache.scheme.lods}
    if 0 not in lods:
        raise ExportError(f"{cache.path}: the tiling scheme has no level 0, so the tilemap quadtree of a "
                          ".vtpk cannot index it (not supported)")
    for lv in range(1, max(levels) + 1):
        if lv not in lods or abs(lods[lv - 1].resolution / lods[lv].resolution - 2.0) > 2.0 * _LOD_RATIO_TOL:
            raise ExportError(f"{cache.path}: level {lv} is not half the resolution of level {lv - 1}; "
                              "a .vtpk tilemap needs a quadtree tiling scheme (not supported)")


def present_tiles(selection: Selection) -> dict[int, np.ndarray]:
    """{level: int64 keys row << 32 | col} of the selected tiles."""
    out: dict[int, np.ndarray] = {}
    for lv in selection.levels:
        keys = []
        for b in lv.bundles:
            if b.tiles <= 0:
                continue
            cells = np.flatnonzero(np.asarray(b.mask).reshape(-1))
            rows = b.ref.row0 + cells // PACKET
            cols = b.ref.col0 + cells % PACKET
            keys.append((rows.astype(np.int64) << 32) | cols.astype(np.int64))
        if keys:
            out[lv.level] = np.concatenate(keys)
    return out


def tilemap_index(tiles: dict[int, np.ndarray]) -> bytes:
    """`{"index": node}` (FORMATS.md §18.4) of the tiles present: 1 = leaf, 0 = none, [nw, ne, sw, se].

    A tile absent while tiles below it are present (levels left out of the export) is written as an
    array, i.e. as present: the format cannot say "absent, but look deeper".
    """
    if not tiles:
        return b'{"index":0}'
    deepest = max(tiles)
    below: dict[int, str] = {}
    for lv in range(deepest, -1, -1):
        here: dict[int, str] = {}
        keys = tiles.get(lv)
        if keys is not None:
            side = 1 << lv
            rows, cols = keys >> 32, keys & 0xFFFFFFFF
            if (rows >= side).any() or (cols >= side).any() or (keys < 0).any():
                raise ExportError(f"level {lv} has tiles outside its 2^{lv} x 2^{lv} grid; a .vtpk tilemap "
                                  "cannot index them (not supported)")
            for k in keys.tolist():
                here[k] = "1"
        kids: dict[int, list[str]] = {}
        for k, text in below.items():
            # key row << 32 | col: the parent is (row >> 1, col >> 1), the slot (row & 1) * 2 + (col & 1)
            parent = ((k >> 33) << 32) | ((k & 0xFFFFFFFF) >> 1)
            quad = kids.get(parent)
            if quad is None:
                quad = kids[parent] = ["0", "0", "0", "0"]
            quad[((k >> 31) & 2) | (k & 1)] = text
        for k, quad in kids.items():
            here[k] = "[" + ",".join(quad) + "]"
        below = here
    return b'{"index":' + below.get(0, "0").encode() + b"}"


# --------------------------------------------------------------------------------------------
# metadata


@dataclass(frozen=True)
class _Info:
    """The facts the metadata states: exported levels, extent (native and WGS 84)."""

    levels: list[int]
    extent: Extent | None
    geo_extent: Extent | None


def _export_info(cache: Cache, request: ExportRequest | None, selection: Selection) -> _Info:
    """Levels with tiles, and the extent: the source's full extent clipped to the exported tiles
    (all levels: a vector package's deepest level is often sparse, clients overzoom) and to the
    request's area."""
    levels = [lv.level for lv in selection.levels if lv.tiles > 0]
    boxes = []
    for lv in selection.levels:
        bounds = lv.tile_range() if lv.tiles > 0 and cache.scheme.has_level(lv.level) else None
        if bounds is not None:
            rmin, rmax, cmin, cmax = bounds
            x0, _, _, y1 = cache.scheme.tile_bounds(lv.level, rmin, cmin)
            _, y0, x1, _ = cache.scheme.tile_bounds(lv.level, rmax, cmax)
            boxes.append((x0, y0, x1, y1))
    if not boxes:
        return _Info(levels, cache.full_extent, _geographic(cache.full_extent))
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    # tile edges computed from rounded resolutions differ from the source's extent by micrometres:
    # a whole-package export keeps the source's numbers
    tol = 1e-9 * max(box[2] - box[0], box[3] - box[1])
    box = (box[0] - tol, box[1] - tol, box[2] + tol, box[3] + tol)
    clips = []
    if cache.full_extent is not None and cache.full_extent.is_valid:
        f = cache.full_extent
        clips.append((f.xmin, f.ymin, f.xmax, f.ymax))
    area = area_of(cache, request) if request is not None else None
    if area is not None:
        clips.append(tuple(area.bounds))
    for c in clips:
        clipped = (max(box[0], c[0]), max(box[1], c[1]), min(box[2], c[2]), min(box[3], c[3]))
        if clipped[0] < clipped[2] and clipped[1] < clipped[3]:
            box = clipped
    extent = Extent(*box, cache.scheme.spatial_ref)
    return _Info(levels, extent, _geographic(extent))


def _geographic(extent: Extent | None) -> Extent | None:
    """The extent in WGS 84: Web Mercator by its closed-form inverse (building a pyproj transformer
    costs milliseconds per export), anything else through pyproj."""
    if extent is None or extent.spatial_ref.code not in (3857, 102100, 102113, 900913):
        return to_wgs84(extent)
    r = 6378137.0

    def lon(x: float) -> float:
        return max(-180.0, min(180.0, math.degrees(x / r)))

    def lat(y: float) -> float:
        return math.degrees(2.0 * math.atan(math.exp(y / r)) - math.pi / 2.0)

    return Extent(lon(extent.xmin), lat(extent.ymin), lon(extent.xmax), lat(extent.ymax), WGS84)


def _root_json(source: _Source, cache: Cache, selection: Selection, info: _Info) -> tuple[dict, bytes]:
    try:
        root = json.loads(source.root_json.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{cache.path}: root.json is not valid JSON ({e})") from None
    if not isinstance(root, dict):
        raise ExportError(f"{cache.path}: root.json is not a JSON object")
    levels = info.levels
    first_scale = cache.scheme.lod(levels[0]).scale if levels and cache.scheme.has_level(levels[0]) else None
    return root, restate_root_json(root, levels, first_scale, info.extent)


def _item_texts(source: _Source, name: str) -> dict[str, str]:
    """Title, snippet, tags... of the source item (iteminfo.xml), to carry into the export's item."""
    try:
        return vtpk_item_texts(source.iteminfo, name)
    except CacheError:
        source.warnings.append(f"{source.label}: esriinfo/iteminfo.xml is not valid XML; item texts not copied")
        return vtpk_item_texts(None, name)


def _sr_name(cache: Cache) -> str:
    code = cache.scheme.spatial_ref.code
    if code in (3857, 102100):
        return "WGS_1984_Web_Mercator_Auxiliary_Sphere"
    return f"WKID {code}" if code else "Unknown"


def iteminfo_xml(texts: dict[str, str], stamp: Stamp, info, root: dict, cache: Cache) -> bytes:
    """esriinfo/iteminfo.xml of a .vtpk, shaped like ArcGIS's (item type "Vector Tile Package")."""
    scales = {k: root[k] for k in ("minScale", "maxScale")
              if isinstance(root.get(k), (int, float)) and math.isfinite(root[k])}
    return write_vtpk_iteminfo_xml(texts, info.geo_extent, _sr_name(cache), scales, stamp)


def item_pkinfo(texts: dict[str, str], stamp: Stamp) -> bytes:
    """esriinfo/item.pkinfo of a .vtpk."""
    return write_vtpk_item_pkinfo(texts["name"], stamp)


# --------------------------------------------------------------------------------------------
# the entries, shared by the writer and the size prediction


class VtpkPackage:
    """Everything a .vtpk export writes, worked out once (metadata, tilemap, the source's files);
    only the item's GUID and time differ between `entries(stamp)` calls, with fixed widths."""

    def __init__(self, cache: Cache, request: ExportRequest | None, selection: Selection):
        self.cache, self.selection = cache, selection
        self.source = _Source(cache)
        try:
            self.info = _export_info(cache, request, selection)
            _check_quadtree(cache, self.info.levels)
            self.tilemap = tilemap_index(present_tiles(selection))
            self.root, self.root_bytes = _root_json(self.source, cache, selection, self.info)
            self.texts = _item_texts(self.source, os.path.splitext(os.path.basename(cache.path))[0] or cache.name)
        except BaseException:
            self.source.close()
            raise

    @property
    def warnings(self) -> list[str]:
        """What was left out of the package, and why."""
        return self.source.warnings

    def entries(self, stamp: Stamp):
        """("bytes", name, data) | ("file", name, _File) | ("bundle", name, BundleSelection), in writing order."""
        yield "bytes", "esriinfo/item.pkinfo", item_pkinfo(self.texts, stamp)
        yield "bytes", "esriinfo/iteminfo.xml", iteminfo_xml(self.texts, stamp, self.info, self.root, self.cache)
        files = dict(self.source.files)
        for name in sorted(n for n in files if not n.startswith(ROOT)):
            yield "file", name, files.pop(name)
        if ROOT + "metadata.json" in files:
            yield "file", ROOT + "metadata.json", files.pop(ROOT + "metadata.json")
        for name in sorted(files):
            yield "file", name, files[name]
        yield "bytes", ROOT + "root.json", self.root_bytes
        for lv in self.selection.levels:
            for b in lv.bundles:
                if b.tiles > 0:
                    yield "bundle", f"{ROOT}tile/{level_dir(b.ref.level)}/{bundle_name(b.ref.row0, b.ref.col0)}", b
        yield "bytes", ROOT + "tilemap/root.json", self.tilemap

    def predicted_size(self, zip64_limit: int = ZIP64_LIMIT) -> tuple[int, dict[int, int]]:
        """(bytes of the .vtpk, bundle bytes per level), from indexes and metadata only."""
        writer = ZipWriter(None, zip64_limit=zip64_limit, dry_run=True)
        per_level: dict[int, int] = {lv.level: 0 for lv in self.selection.levels}
        for kind, name, item in self.entries(Stamp.placeholder()):
            if kind == "bytes":
                writer.add_size(name, len(item))
            elif kind == "file":
                writer.add_size(name, item.size)
            else:
                size = _bundle_size(item)
                per_level[item.ref.level] = per_level.get(item.ref.level, 0) + size
                writer.add_size(name, size)
        return writer.close(), per_level

    def close(self) -> None:
        """Close the source files."""
        self.source.close()

    def __enter__(self) -> "VtpkPackage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bundle_size(bsel) -> int:
    return _plan.V2_DATA_START + 4 * bsel.tiles + bsel.tile_bytes


def predict_vtpk_size(cache: Cache, selection: Selection, request: ExportRequest | None = None, *,
                      zip64_limit: int = ZIP64_LIMIT) -> tuple[int, dict[int, int]]:
    """(bytes of the .vtpk export_vtpk writes, bundle bytes per level), from indexes and metadata only."""
    with VtpkPackage(cache, request, selection) as pkg:
        return pkg.predicted_size(zip64_limit)


# --------------------------------------------------------------------------------------------
# writing


def check_output_name(out: str) -> None:
    """A vector export is always a .vtpk: refuse raster package names."""
    ext = os.path.splitext(os.fspath(out))[1].lower()
    if ext in (".tpk", ".tpkx"):
        raise ExportError(f"{out}: vector tile packages are exported as a .vtpk package, not a {ext}; "
                          "name the output *.vtpk")


def export_vtpk(cache: Cache, request: ExportRequest, out: str, *,
                progress: Callable[[ExportProgress], None] | None = None,
                cancel: threading.Event | None = None, selection: Selection | None = None,
                zip64_limit: int = ZIP64_LIMIT) -> ExportResult:
    """Write the vector tiles a request selects (levels, exportExtent, polygon/areaOfInterest) as a .vtpk.

    tilePackage, storageFormatType and optimizeTilesForSize are ignored, as the VectorTileServer
    ignores them: the output is always a .vtpk of compact V2 bundles with the tiles as stored.
    """
    out = os.path.abspath(os.fspath(out))
    check_output_name(out)
    if os.path.isdir(out):
        raise ExportError(f"{out}: a folder with this name exists; choose another output or remove it")
    if not os.path.isdir(os.path.dirname(out)):
        raise ExportError(f"{os.path.dirname(out)}: the output folder does not exist")
    started = time.perf_counter()
    if selection is None:
        selection = select(cache, request, cancel=cancel)
    tmp = temp_path(out)
    with VtpkPackage(cache, request, selection) as pkg:
        try:
            result = _write(pkg, tmp, progress, cancel, zip64_limit)
            check_cancel(cancel)
            os.replace(tmp, out)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise os_error(e, out) from None
            raise
        result.warnings = pkg.warnings + result.warnings
    result.path = out
    result.seconds = time.perf_counter() - started
    return result


def _write(pkg: VtpkPackage, tmp: str, progress, cancel, zip64_limit: int) -> ExportResult:
    def check() -> None:
        check_cancel(cancel)

    cache, selection, source = pkg.cache, pkg.selection, pkg.source
    bytes_total = pkg.predicted_size(zip64_limit)[0] if progress is not None else 0
    levels: dict[int, dict] = {}
    tiles_done = 0
    with open(tmp, "wb", buffering=1 << 20) as f:
        writer = ZipWriter(f, zip64_limit=zip64_limit)

        def report(level: int | None) -> None:
            if progress is not None:
                progress(ExportProgress(tiles_done, selection.tiles, writer.position, bytes_total, level))

        report(None)
        small: list[_File] = []      # files copied whole, written together (one read, one write)
        held = 0

        def write_small() -> None:
            nonlocal held
            if small:
                writer.add_wholes(source.read_many(small))
                small.clear()
                held = 0

        for kind, name, item in pkg.entries(Stamp.now()):
            check()
            if kind == "file" and item.size <= WHOLE:
                if held + item.size > WHOLE:
                    write_small()
                small.append(item)
                held += item.size
                continue
            write_small()
            if kind == "bytes":
                writer.add_bytes(name, item)
            elif kind == "file":
                writer.add_stream(name, item.size, None, source.chunks(item, check))
            else:
                with cache.open_bundle(item.ref) as data:
                    plan = plan_bundle(data, item.mask, 2, cache.bundle_label(item.ref), cache)
                    # one pread per run of tiles, CRC-32 while writing, patched into the header:
                    # measured faster here than ZipSink's kernel copies with their read-ahead
                    # thread (the fixture's six bundles: 1.4 vs 1.9 ms best, 2.5 vs 12 ms median;
                    # a 26 MB bundle: 30-36 vs 40-74 ms best, cp 24-27 ms; 2 loaded cores)
                    writer.add_stream(name, plan.size, None, plan.chunks())
                lv = levels.setdefault(item.ref.level, {"tiles": 0, "size": 0})
                lv["tiles"] += plan.tiles
                lv["size"] += plan.size
                tiles_done += plan.tiles
                report(item.ref.level)
        write_small()
        size = writer.close()
        report(None)
    return ExportResult(tmp, tiles_done, size, levels, kind=KIND, storage_format=STORAGE_FORMAT)


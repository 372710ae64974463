"""What every open-format sink shares: the source's metadata, Web Mercator zooms, and the selected tiles.

The tiles come from the export plan's per-bundle selection (the same masks a .tpkx export uses),
one bundle at a time: a bundle's selected tiles are read with one pread when they sit close
together, re-encoded first when the plan's policy is active. Only one bundle's bytes are held.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from tilecrate.cache import Cache
from tilecrate.errors import BundleError, ExportError
from tilecrate.plan import ExportPlan
from tilecrate.results import CancelFlag, check_cancel
from tilecrate.selection import BundleSelection
from tilecrate.tiling import PACKET, TileScheme, sniff_image

if TYPE_CHECKING:
    import sqlite3

WEB_MERCATOR_CODES = {3857, 102100, 102113, 900913, 3785}
_HALF_WORLD = 20037508.342789244
_Z0_RESOLUTION = 2 * _HALF_WORLD / 256          # metres per pixel of a 256 px zoom-0 tile
MAX_LAT = 85.0511287798066


@dataclass(frozen=True)
class SourceMeta:
    """The source's descriptive metadata that travels into every output."""

    name: str
    description: str = ""
    attribution: str = ""


def _pick(item, *keys: str) -> str:
    for key in keys:
        value = item.get(key) if isinstance(item, dict) else getattr(item, key, None)
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value if v)
        if value:
            return str(value).strip()
    return ""


def source_meta(cache: Cache) -> SourceMeta:
    """Title, description and attribution of the source (its item metadata when it has one, else its name)."""
    item = getattr(cache, "item", None)
    if item is None:
        item = {}
    name = _pick(item, "title", "name") or cache.name or "tiles"
    description = _pick(item, "description", "summary", "snippet")
    attribution = _pick(item, "attribution", "credits", "accessInformation", "copyrightText")
    return SourceMeta(name, description, attribution)


def web_mercator_zooms(scheme: TileScheme, levels: list[int]) -> dict[int, int]:
    """{level: zoom} for a Web Mercator scheme whose levels are whole XYZ zooms; ExportError otherwise."""
    sr = scheme.spatial_ref
    size = scheme.tile_cols
    reason = None
    if sr.code not in WEB_MERCATOR_CODES:
        reason = f"its spatial reference is {sr.code or 'a custom one'}, not Web Mercator (3857)"
    elif scheme.tile_rows != size or size not in (256, 512):
        reason = f"its tiles are {scheme.tile_cols}x{scheme.tile_rows} px, not 256 or 512 px squares"
    elif abs(scheme.origin_x + _HALF_WORLD) > 1.0 or abs(scheme.origin_y - _HALF_WORLD) > 1.0:
        reason = f"its origin ({scheme.origin_x}, {scheme.origin_y}) is not the Web Mercator world's corner"
    zooms: dict[int, int] = {}
    if reason is None:
        for level in levels:
            res = scheme.lod(level).resolution * size / 256
            z = math.log2(_Z0_RESOLUTION / res)
            if abs(z - round(z)) > 1e-6 or round(z) < 0:
                reason = f"its level {level} (resolution {scheme.lod(level).resolution}) is not a whole XYZ zoom"
                break
            zooms[level] = int(round(z))
    if reason is not None:
        raise ExportError(f"this output needs a Web Mercator tiling scheme of whole XYZ zooms; the source does not "
                          f"have one: {reason}")
    return zooms


def tile_kind(cache: Cache, policy_active: bool) -> str:
    """'png', 'jpg' or 'webp': what the source's tiles are (re-encoded tiles are JPEG); others are refused."""
    fmt = (cache.tile_format or "").upper()
    if fmt == "JPEG" or policy_active and fmt in ("JPEG", "MIXED"):
        return "jpg"
    if fmt.startswith("PNG") or fmt == "MIXED":
        return "png"
    if fmt == "WEBP":
        return "webp"
    raise ExportError(f"{cache.path}: its tiles are {cache.tile_format}; the open formats take PNG, JPEG or WebP "
                      "tiles (vector and LERC tiles are not supported by these outputs yet)")


def image_ext(data, default: str) -> str:
    """The file extension of one tile's bytes (a MIXED cache holds both PNG and JPEG)."""
    kind = sniff_image(bytes(data[:16]))
    return {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(kind, default)


def bundle_tiles(cache: Cache, plan: ExportPlan, bsel: BundleSelection,
                 cancel: CancelFlag | None = None) -> tuple[np.ndarray, np.ndarray, list, list[str]]:
    """(rows, cols, tiles, warnings) of one bundle's selected tiles (bytes-like: bytes or memoryviews of one
    buffer), re-encoded under an active policy."""
    check_cancel(cancel)
    ref = bsel.ref
    idx = np.flatnonzero(bsel.mask.reshape(-1))
    listed = getattr(cache, "open_tiles", None)
    if listed is not None and plan.policy is None:
        # a source of separate tiles (MBTiles, GeoPackage, PMTiles, folders): its tiles as read, no body
        tiles = _selected(cache.bundle_label(ref), *listed(ref, wanted=idx), idx, bsel.tiles)
        rows = ref.row0 + idx // PACKET
        cols = ref.col0 + idx % PACKET
        return rows.astype(np.int64), cols.astype(np.int64), tiles, []
    data = cache.open_bundle(ref)
    try:
        sizes = data.sizes[idx]
        if idx.size != bsel.tiles or not np.all(sizes > 0):
            raise BundleError(f"{cache.bundle_label(ref)}: holds {int(np.count_nonzero(sizes))} of the "
                              f"{bsel.tiles} selected tiles now; the source changed since the export was planned")
        warnings: list[str] = []
        if plan.policy is not None:
            from tilecrate.recompress import recompress_bundle

            tiles, warnings = recompress_bundle(plan.policy, data, bsel.mask, cache, cancel=cancel)
        else:
            offsets = data.offsets[idx].astype(np.int64)
            sizes = sizes.astype(np.int64)
            lo, hi = int(offsets.min()), int((offsets + sizes).max())
            if hi > data.length:
                raise BundleError(f"{cache.bundle_label(ref)}: a tile runs past the end of the bundle")
            mem = getattr(data.buf, "obj", None) if isinstance(data.buf, memoryview) else None
            if mem is not None:
                # a block held in memory (sources that are not bundles): views of it, no copies; our own
                # view keeps the buffer alive after data.close() releases the source's
                span = memoryview(mem).cast("B")
                tiles = [span[o:o + s] for o, s in zip(offsets.tolist(), sizes.tolist())]
            elif hi - lo <= 2 * int(sizes.sum()) + (1 << 16):
                # the selected tiles lie close together: one read for the bundle, views of it
                span = memoryview(bytes(data.buf[lo:hi]))
                tiles = [span[o - lo:o - lo + s] for o, s in zip(offsets.tolist(), sizes.tolist())]
            else:
                tiles = [bytes(data.buf[o:o + s]) for o, s in zip(offsets.tolist(), sizes.tolist())]
    finally:
        data.close()
    rows = ref.row0 + idx // PACKET
    cols = ref.col0 + idx % PACKET
    return rows.astype(np.int64), cols.astype(np.int64), tiles, warnings


def _selected(label: str, present: np.ndarray, tiles: list, idx: np.ndarray, expected: int) -> list:
    """The tiles at block indices `idx` (ascending) out of a block's `present` indices (ascending) and tiles."""
    if present.size == idx.size and idx.size == expected and np.array_equal(present, idx):
        return tiles
    at = np.searchsorted(present, idx)
    found = at < present.size
    found[found] = present[at[found]] == idx[found]
    if idx.size != expected or not found.all():
        raise BundleError(f"{label}: holds {int(np.count_nonzero(found))} of the {expected} selected tiles now; "
                          "the source changed since the export was planned")
    return [tiles[i] for i in at.tolist()]


def wgs84_bounds(plan: ExportPlan) -> tuple[float, float, float, float]:
    """The exported data's extent in WGS 84 (clamped to the Web Mercator latitudes), or the world."""
    ext = plan.info.geo_extent
    if ext is None:
        return (-180.0, -MAX_LAT, 180.0, MAX_LAT)
    return (max(-180.0, ext.xmin), max(-MAX_LAT, ext.ymin), min(180.0, ext.xmax), min(MAX_LAT, ext.ymax))


def iter_bundles(plan: ExportPlan) -> Iterator[BundleSelection]:
    """The plan's bundles that hold selected tiles, in the plan's order."""
    return (b for b in plan.selection.bundles() if b.tiles > 0)


def inside_grid(rows: np.ndarray, cols: np.ndarray, tiles: list, n: int, what: str,
                warnings: list[str]) -> tuple[np.ndarray, np.ndarray, list]:
    """Only the tiles inside an n x n grid (an ArcGIS cache may hold rows past the Web Mercator world,
    which XYZ zooms cannot address); those left out are named in one warning."""
    ok = (rows >= 0) & (rows < n) & (cols >= 0) & (cols < n)
    if ok.all():
        return rows, cols, tiles
    warnings.append(f"{what}: {int((~ok).sum())} tile(s) outside the Web Mercator world's {n}x{n} tiles were "
                    "left out (this output cannot address them)")
    keep = np.flatnonzero(ok)
    return rows[keep], cols[keep], [tiles[i] for i in keep.tolist()]


class Tally:
    """Tiles and tile bytes written so far, per level ({level: {"tiles", "size"}}) and in all."""

    def __init__(self) -> None:
        self.levels: dict[int, dict] = {}
        self.tiles = 0
        self.size = 0

    def add(self, level: int, tiles: list) -> int:
        """Count one bundle's tiles written at `level`; their bytes."""
        nbytes = sum(map(len, tiles))
        lv = self.levels.setdefault(level, {"tiles": 0, "size": 0})
        lv["tiles"] += len(tiles)
        lv["size"] += nbytes
        self.tiles += len(tiles)
        self.size += nbytes
        return nbytes


COMMIT_BYTES = 256 << 20         # tile bytes per SQLite transaction: bounds what SQLite holds before writing


def open_sqlite(path: str, application_id: int) -> sqlite3.Connection:
    """A new SQLite output file in autocommit mode, without journal or syncs (it is renamed into place
    only when complete, and removed on any error)."""
    import sqlite3       # here: the PMTiles and XYZ writers, which share this module, need not load it

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute(f"PRAGMA application_id={int(application_id)}")
    except BaseException:
        db.close()
        raise
    return db


def commit_when_full(db: sqlite3.Connection, pending: int) -> int:
    """Commit and begin again once `pending` tile bytes are in the open transaction; the bytes still pending."""
    if pending < COMMIT_BYTES:
        return pending
    db.execute("COMMIT")
    db.execute("BEGIN")
    return 0

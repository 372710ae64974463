"""Which tiles an export takes: levels matched to the cache's LODs, the area rasterized per bundle.

The result is, per selected level and per source bundle, a 128x128 mask of tiles that are both
wanted (their closed square touches the export area; see tilecrate._mask for the convention) and
present (size > 0 in the bundle index), with their count and byte total. Only bundles that exist
are visited, one row of bundles at a time, so no level-wide grid is ever built; tile data is
never read, only bundle indexes.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from tilecrate import _mask
from tilecrate.cache import BundleRef, Cache
from tilecrate.errors import RequestError
from tilecrate.geometry import Area, GeometryLimits, check_cancel, request_area
from tilecrate.request import ExportRequest
from tilecrate.tiling import PACKET, Extent, TileScheme

if TYPE_CHECKING:
    from tilecrate.geometry import Cancel
    from tilecrate.presence import PresenceStore

LOD_REL_TOL = 1e-3   # scales/resolutions copied with rounding still match (adjacent LODs differ ~2x)
COUNT_ROWS = 1 << 16  # rows counted between two looks at `cancel`


@dataclass
class BundleSelection:
    """The tiles of one source bundle to export."""

    ref: BundleRef
    mask: np.ndarray               # uint8 (128, 128), 1 = export (wanted and present)
    tiles: int
    tile_bytes: int


@dataclass
class LevelSelection:
    """The bundles of one level with tiles to export."""

    level: int
    bundles: list[BundleSelection] = field(default_factory=list)
    tiles: int = 0
    tile_bytes: int = 0

    def tile_range(self) -> tuple[int, int, int, int] | None:
        """Inclusive (row_min, row_max, col_min, col_max) of the selected tiles; None if there are none."""
        rmin = cmin = math.inf
        rmax = cmax = -math.inf
        for b in self.bundles:
            if b.tiles <= 0:
                continue
            m = np.asarray(b.mask).reshape(PACKET, PACKET)
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            if rows.size:
                rmin, rmax = min(rmin, b.ref.row0 + int(rows[0])), max(rmax, b.ref.row0 + int(rows[-1]))
                cmin, cmax = min(cmin, b.ref.col0 + int(cols[0])), max(cmax, b.ref.col0 + int(cols[-1]))
        if rmin is math.inf:
            return None
        return rmin, rmax, cmin, cmax


@dataclass
class Selection:
    """Everything an export takes, level by level (ascending)."""

    levels: list[LevelSelection]
    tiles: int
    tile_bytes: int
    whole_area: bool = False       # no extent or polygon limited it (package metadata: the source's extents)

    def bundles(self) -> Iterator[BundleSelection]:
        """All selected bundles, level by level, then by row0 and col0."""
        for lv in self.levels:
            yield from lv.bundles

    def level_counts(self) -> dict[int, dict]:
        """{level: {"tiles": n, "tileBytes": bytes}}."""
        return {lv.level: {"tiles": lv.tiles, "tileBytes": lv.tile_bytes} for lv in self.levels}


# --------------------------------------------------------------------------------------------
# levels


def _describe_levels(scheme: TileScheme) -> str:
    ids = sorted(lod.level for lod in scheme.lods)
    if not ids:
        return "none"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def _fmt(v: float) -> str:
    return f"{v:.10g}"


def resolve_levels(scheme: TileScheme, export_by: str, items: list[tuple[float, float]]) -> list[int]:
    """LevelIDs a request names, ascending; RequestError naming whatever matches no LOD."""
    if not scheme.lods:
        raise RequestError("the cache's tiling scheme has no levels of detail")
    chosen: set[int] = set()
    by = export_by.lower()
    if by == "levelid":
        known = sorted({lod.level for lod in scheme.lods})
        missing: dict[str, None] = {}   # ordered, each text once: a request may repeat a range
        for lo, hi in items:
            if lo != int(lo) or hi != int(hi):
                raise RequestError(f"level {_fmt(lo if lo != int(lo) else hi)} is not a whole number; "
                                   f"with exportBy=LevelID give level numbers such as 0-5")
            a, b = sorted((int(lo), int(hi)))
            if b - a > 10_000:
                raise RequestError(f"level range {a}-{b} is absurdly long")
            # the known levels in a..b, found without walking the range: a GET may carry many
            # thousands of long ranges, and this runs in a job worker
            inside = known[bisect.bisect_left(known, a):bisect.bisect_right(known, b)]
            chosen.update(inside)
            absent = _gaps(a, b, inside)
            if absent:
                missing[absent] = None
        if missing:
            raise RequestError(f"level {', '.join(missing)} not in the cache's tiling scheme "
                               f"(it has levels {_describe_levels(scheme)})")
        return sorted(chosen)
    attr = "scale" if by == "scale" else "resolution"
    values = [(getattr(lod, attr), lod.level) for lod in scheme.lods]
    unmatched: list[str] = []
    for lo, hi in items:
        if lo <= 0 or hi <= 0:
            raise RequestError(f"{attr} {_fmt(min(lo, hi))} is not positive")
        if lo == hi:
            best = min(values, key=lambda vl: abs(vl[0] - lo))
            if abs(best[0] - lo) <= LOD_REL_TOL * lo:
                chosen.add(best[1])
            else:
                unmatched.append(_fmt(lo))
        else:
            a, b = sorted((lo, hi))
            hit = [lv for v, lv in values if a * (1 - LOD_REL_TOL) <= v <= b * (1 + LOD_REL_TOL)]
            if hit:
                chosen.update(hit)
            else:
                unmatched.append(f"{_fmt(lo)}-{_fmt(hi)}")
    if unmatched:
        known = ", ".join(_fmt(v) for v, _ in sorted(values, reverse=True))
        raise RequestError(f"{attr} {', '.join(unmatched)} matches no level of the cache (its {attr}s: {known})")
    return sorted(chosen)


def _gaps(a: int, b: int, inside: list[int]) -> str:
    """The levels of a..b not in `inside` (ascending, all within a..b) as text: '24-40', '3,5-6'."""
    out, start = [], a
    for lv in inside + [b + 1]:
        if lv > start:
            out.append(f"{start}" if start == lv - 1 else f"{start}-{lv - 1}")
        start = lv + 1
    return ",".join(out)


# --------------------------------------------------------------------------------------------
# area -> tiles


def tile_coords(scheme: TileScheme, level: int, xy: np.ndarray) -> np.ndarray:
    """Map coordinates (..., 2k) to fractional tile coordinates (col, row) of a level, pairwise."""
    w, h = scheme.tile_span(level)
    out = np.array(xy, dtype=np.float64, copy=True)
    out[..., 0::2] = (out[..., 0::2] - scheme.origin_x) / w
    out[..., 1::2] = (scheme.origin_y - out[..., 1::2]) / h
    return out


def rect_range(scheme: TileScheme, level: int, bounds: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """Inclusive (row0, row1, col0, col1) of the tiles whose closed squares touch a rectangle."""
    tc = tile_coords(scheme, level, np.array([[bounds[0], bounds[3], bounds[2], bounds[1]]]))
    # an absurdly large extent covers everything; keep the numbers finite and in int64
    (c0, r0, c1, r1), = np.clip(np.nan_to_num(tc, nan=0.0), -_mask.MAX_COORD, _mask.MAX_COORD)
    return math.ceil(r0) - 1, math.floor(r1), math.ceil(c0) - 1, math.floor(c1)


class LevelArea:
    """The export area on one level's grid: per-band spans, from a rectangle or rasterized edges."""

    def __init__(self, scheme: TileScheme, level: int, area: Area):
        self.rast = None
        if area.edges is None:
            self.row0, self.row1, self.col0, self.col1 = rect_range(scheme, level, area.bounds)
        else:
            edges = tile_coords(scheme, level, area.edges)
            if edges.size and np.abs(edges).max() > _mask.MAX_COORD:
                raise RequestError(f"the area's coordinates lie too far from the tile origin for level {level} "
                                   f"(beyond {_mask.MAX_COORD:.0f} tiles); check its spatial reference")
            self.rast = _mask.Rasterizer(edges, area.groups)
            self.row0, self.row1 = self.rast.row_min, self.rast.row_max
            self.col0, self.col1 = self.rast.col_min, self.rast.col_max

    def band(self, row0: int) -> tuple[np.ndarray, np.ndarray]:
        """(row_ptr, spans) of the 128 rows starting at row0 (rows ascending between calls is fastest)."""
        if self.rast is not None:
            return self.rast.spans(row0, PACKET)
        rows = np.arange(row0, row0 + PACKET)
        inside = (rows >= self.row0) & (rows <= self.row1)
        row_ptr = np.concatenate([[0], np.cumsum(inside)]).astype(np.int64)
        spans = np.tile(np.array([[self.col0, self.col1]], dtype=np.int64), (int(inside.sum()), 1))
        return row_ptr, spans

    def count(self, row_first: int, row_last: int, col_first: int, col_last: int, *, cancel=None) -> int:
        """Wanted tiles in a window (presence not considered); `cancel` is polled every COUNT_ROWS rows."""
        if self.rast is not None:
            total = 0
            r = max(row_first, self.row0)
            last = min(row_last, self.row1)
            while r <= last:
                check_cancel(cancel, "counting tiles")
                stop = min(r + COUNT_ROWS - 1, last)
                total += int(self.rast.count(r, stop, col_first, col_last))
                r = stop + 1
            return total
        rows = min(row_last, self.row1) - max(row_first, self.row0) + 1
        cols = min(col_last, self.col1) - max(col_first, self.col0) + 1
        return max(rows, 0) * max(cols, 0)


def count_wanted(scheme: TileScheme, area: Area, levels: list[int], *, cancel=None) -> dict[int, int]:
    """Tiles the area touches per level, on the grid rows/cols >= 0, whether or not a cache holds them."""
    out = {}
    for lv in levels:
        la = LevelArea(scheme, lv, area)
        out[lv] = la.count(max(la.row0, 0), la.row1, max(la.col0, 0), la.col1, cancel=cancel)
    return out


def _check_cancel(cancel) -> None:
    check_cancel(cancel, "selecting tiles")


def _full_mask(sizes: np.ndarray) -> tuple[np.ndarray, int, int]:
    mask = np.ascontiguousarray((sizes > 0).reshape(PACKET, PACKET), dtype=np.uint8)
    tiles = int(np.count_nonzero(mask))
    return mask, tiles, int(sizes.sum(dtype=np.uint64))


def _sizes_getter(cache: Cache, presence: "PresenceStore | None"):
    if presence is None:
        return lambda ref: cache.index(ref)[1]
    return lambda ref: presence.sizes(cache, ref)


def select_level(cache: Cache, level: int, area: Area | None, *,
                 cancel: "Cancel | None" = None, presence: "PresenceStore | None" = None) -> LevelSelection:
    """One level's selection: every existing bundle the area touches, masked to wanted and present tiles.

    `cancel` (an Event or a callable, see geometry.check_cancel) is polled per bundle row and per bundle.
    """
    sizes_of = _sizes_getter(cache, presence)
    out = LevelSelection(level)
    refs = cache.bundles(level)
    if not refs or not cache.scheme.has_level(level):
        return out
    if area is None:
        for ref in refs:
            _check_cancel(cancel)
            mask, tiles, nbytes = _full_mask(sizes_of(ref))
            if tiles:
                out.bundles.append(BundleSelection(ref, mask, tiles, nbytes))
        return _total(out)
    la = LevelArea(cache.scheme, level, area)
    bands: dict[int, list[BundleRef]] = {}
    for ref in refs:
        if (ref.row0 + PACKET - 1 >= la.row0 and ref.row0 <= la.row1
                and ref.col0 + PACKET - 1 >= la.col0 and ref.col0 <= la.col1):
            bands.setdefault(ref.row0, []).append(ref)
    for row0 in sorted(bands):
        _check_cancel(cancel)
        row_ptr, spans = la.band(row0)
        if not len(spans):
            continue
        lo, hi = int(spans[:, 0].min()), int(spans[:, 1].max())
        for ref in bands[row0]:
            if ref.col0 + PACKET - 1 < lo or ref.col0 > hi:
                continue
            _check_cancel(cancel)
            mask, wanted = _mask.window_mask(row_ptr, spans, ref.col0)
            if not wanted:
                continue
            tiles, nbytes = _mask.apply_presence(mask, sizes_of(ref))
            if tiles:
                out.bundles.append(BundleSelection(ref, mask, int(tiles), int(nbytes)))
    return _total(out)


def _total(ls: LevelSelection) -> LevelSelection:
    ls.tiles = sum(b.tiles for b in ls.bundles)
    ls.tile_bytes = sum(b.tile_bytes for b in ls.bundles)
    return ls


def _bundle_extent(cache: Cache) -> Extent | None:
    """Bounds of the bundles of the coarsest level present: from file names only, no index read."""
    levels = [lv for lv in cache.levels if cache.scheme.has_level(lv)]
    if not levels:
        return None
    refs = cache.bundles(levels[0])
    r0, r1 = min(r.row0 for r in refs), max(r.row0 for r in refs) + PACKET - 1
    c0, c1 = min(r.col0 for r in refs), max(r.col0 for r in refs) + PACKET - 1
    x0, _, _, y1 = cache.scheme.tile_bounds(levels[0], r0, c0)
    _, y0, x1, _ = cache.scheme.tile_bounds(levels[0], r1, c1)
    return Extent(x0, y0, x1, y1, cache.scheme.spatial_ref)


def area_of(cache: Cache, request: ExportRequest, *, limits: GeometryLimits | None = None,
            cancel: "Cancel | None" = None) -> Area | None:
    """The request's export area in the cache's coordinates (None = everything); refuses areas off the cache."""
    area = request_area(request.extent, request.area_of_interest, request.aoi_sr, cache.scheme.spatial_ref,
                        limits=limits, cancel=cancel)
    if area is None:
        return None
    ext = cache.full_extent if cache.full_extent is not None and cache.full_extent.is_valid else _bundle_extent(cache)
    if ext is None:
        return area  # nothing to compare with; the selection will simply be empty
    xmin, ymin, xmax, ymax = area.bounds
    # a little slack: extents written by ArcGIS are rounded
    tol = 1e-9 * max(abs(ext.xmax - ext.xmin), abs(ext.ymax - ext.ymin), 1.0)
    if xmin > ext.xmax + tol or xmax < ext.xmin - tol or ymin > ext.ymax + tol or ymax < ext.ymin - tol:
        what = "area of interest" if request.area_of_interest is not None else "export extent"
        raise RequestError(
            f"the {what} ({xmin:.6g}, {ymin:.6g}, {xmax:.6g}, {ymax:.6g} in the cache's coordinates) lies "
            f"outside the cache's extent ({ext.xmin:.6g}, {ext.ymin:.6g}, {ext.xmax:.6g}, {ext.ymax:.6g})")
    return area


def validate_request(cache: Cache, request: ExportRequest, limits: GeometryLimits | None = None) -> Area | None:
    """Everything a request can get wrong before a tile is read (levels, area, area off the cache), or RequestError.

    Meant for submit time: bounded by `limits`, reads no bundle index. Returns the area (None = everything).
    """
    resolve_levels(cache.scheme, request.export_by, request.level_items)
    return area_of(cache, request, limits=limits)


def select(cache: Cache, request: ExportRequest, *, cancel: "Cancel | None" = None,
           presence: "PresenceStore | None" = None, limits: GeometryLimits | None = None) -> Selection:
    """The tiles a request exports from a cache: per level, per bundle, wanted and present.

    With a `presence` store (tilecrate.presence), bundle indexes read once are remembered there.
    `cancel`: a threading.Event or a callable polled between steps (see geometry.check_cancel);
    `limits`: what the area may cost (geometry.GeometryLimits; default: the module's).
    """
    levels = resolve_levels(cache.scheme, request.export_by, request.level_items)
    area = area_of(cache, request, limits=limits, cancel=cancel)
    out = [select_level(cache, lv, area, cancel=cancel, presence=presence) for lv in levels]
    if presence is not None:
        presence.flush()
    return Selection(out, sum(ls.tiles for ls in out), sum(ls.tile_bytes for ls in out), area is None)

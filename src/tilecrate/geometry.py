"""Export areas: extents and areas of interest (Esri JSON or GeoJSON) as edges in the cache's coordinates.

Reading: an extent is `xmin,ymin,xmax,ymax`, Envelope JSON (string or dict) or DEFAULT; an area
of interest is an Esri FeatureSet (one or many polygon features), a plain Esri Polygon, an
Envelope, or GeoJSON (Polygon, MultiPolygon, Feature, FeatureCollection, GeometryCollection).
Spatial references come as wkid, latestWkid or WKT; a geometry without one is in the `default`
reference the caller names (the cache's for Esri JSON, WGS 84 for GeoJSON, unless `aoi_sr` says
otherwise).

Fill rule (what area a set of rings means, valid or not): rings of one geometry (an Esri
polygon, a GeoJSON Polygon, one part of a MultiPolygon) combine by the even-odd rule, so ring
orientation does not matter (clients write both conventions) and a ring inside an odd number of
others is a hole; geometries (features, parts) combine by union. The closed area is that
interior plus every ring edge. tilecrate._mask rasterizes exactly this from the edges, so no
polygon is ever repaired or unioned: the cost is linear in the vertices (n log n sorts).

Cost is bounded before heavy work (GeometryLimits): vertices and rings are counted while the
JSON is read, nesting is bounded, and after projecting, the most edges any horizontal line
crosses (what one row of the rasterizer costs) is checked.

Projecting: edges are densified in the source coordinates first (a straight edge in degrees is
a curve in Web Mercator; pieces of at most 1/DENSIFY_STEPS of the area's larger side, adding at
most DENSIFY_EXTRA vertices in all), geographic input is clipped to the target's area of use
(Web Mercator stops at ±85.06°; the clip keeps winding numbers, and along the clip lines only
the stretches the area reaches stay edges), then every vertex goes through pyproj. pyproj and
shapely are imported only when an area needs them: WGS 84 to Web Mercator (a bbox in degrees on
the usual cache) is computed in closed form, the same doubles PROJ gives, without loading pyproj.
"""
from __future__ import annotations

import functools
import json
import math
import reprlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from tilecrate.errors import Cancelled, RequestError
from tilecrate.tiling import Extent, SpatialRef

if TYPE_CHECKING:
    from pyproj import CRS, Transformer

    from tilecrate.request import ExportRequest

MAX_VERTICES = 250_000            # vertices as given, counted while reading (~6 MB of JSON)
MAX_RINGS = 100_000               # rings over all features and parts
MAX_LINE_CROSSINGS = 20_000       # edges one horizontal line (in the cache's coordinates) may cross
MAX_JSON_DEPTH = 32               # nesting of geometry JSON (arrays and objects) our readers follow
MAX_COORDINATE = 1e15             # coordinates beyond this are junk in any spatial reference
MAX_WKT_CHARS = 32_768            # real WKT is a few kB; PROJ parses whatever it gets
MAX_SPATIAL_REFS = 8              # distinct spatial references in one area: each costs a PROJ set-up
DENSIFY_STEPS = 256               # segments along the larger side of the area when projecting
DENSIFY_EXTRA = 262_144           # vertices densifying may add in all (beyond that, pieces get longer)
WEB_MERCATOR_CODES = {3857, 102100, 102113, 900913, 3785, 41001}
WGS84 = SpatialRef(4326, 4326)

# anything else in a message is shortened: a request may be megabytes or nested a thousand deep
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80
_repr.maxlevel = 3


def show(value: Any) -> str:
    """A short, safe repr of user input for an error message (bounded length and depth)."""
    return _repr.repr(value)


def one_line(text: object, limit: int = 300) -> str:
    """An exception text as one bounded line."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


@dataclass(frozen=True)
class GeometryLimits:
    """What an area may cost, checked before heavy work; the defaults are the module constants."""

    max_vertices: int = MAX_VERTICES
    max_rings: int = MAX_RINGS
    max_line_crossings: int = MAX_LINE_CROSSINGS
    max_json_depth: int = MAX_JSON_DEPTH

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GeometryLimits.{f.name} must be a positive whole number, not {v!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "GeometryLimits":
        """Limits from a config mapping (keys as the field names; absent = default)."""
        base = default_limits()
        if not cfg:
            return base
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown geometry limit {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        values = {n: getattr(base, n) for n in names}
        values.update(cfg)
        return cls(**values)


def default_limits() -> GeometryLimits:
    """The limits the module constants give now (read at call time, so they can be tuned)."""
    return GeometryLimits(MAX_VERTICES, MAX_RINGS, MAX_LINE_CROSSINGS, MAX_JSON_DEPTH)


def _limits(limits: GeometryLimits | None, max_vertices: int | None = None) -> GeometryLimits:
    lim = limits if limits is not None else default_limits()
    if max_vertices is not None:
        lim = GeometryLimits(max_vertices, lim.max_rings, lim.max_line_crossings, lim.max_json_depth)
    return lim


Cancel = Callable[[], Any]


def check_cancel(cancel: Any, what: str) -> None:
    """Stop if `cancel` says so: a threading.Event that is set, or a callable returning true.

    A callable may also raise its own error (a job's time or memory budget), which propagates.
    """
    if cancel is None:
        return
    is_set = getattr(cancel, "is_set", None)
    if is_set() if is_set is not None else cancel():
        raise Cancelled(f"cancelled while {what}")


# --------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True, eq=False)
class Area:
    """An export area in the cache's coordinates: its bounds, and its edges unless it is the bounds.

    `edges` is (n, 4) float64 (x0, y0, x1, y1) and `groups` (n,) int64: edges of one group combine
    by the even-odd rule, groups by union (see the module docstring).
    """

    bounds: tuple[float, float, float, float]
    edges: np.ndarray | None = None
    groups: np.ndarray | None = None

    @property
    def is_rectangle(self) -> bool:
        """True when the area is exactly its bounding rectangle."""
        return self.edges is None

    @property
    def vertex_count(self) -> int:
        """Edges of the area (4 for a rectangle): each ring has as many vertices as edges."""
        return 4 if self.edges is None else int(len(self.edges))

    @classmethod
    def from_shapely(cls, geom: Any) -> "Area":
        """An Area from a shapely (Multi)Polygon: one group per polygon (tests, benchmarks)."""
        import shapely

        parts = [p for p in shapely.get_parts(geom) if not p.is_empty]
        rings, groups = [], []
        for g, p in enumerate(parts):
            for r in shapely.get_rings(p):
                rings.append(shapely.get_coordinates(r)[:-1])
                groups.append(g)
        return _area_from_edges(*_ring_edges(_RingSet.of(rings, groups)))


# --------------------------------------------------------------------------------------------
# spatial references


def spatial_ref_from(value: Any) -> SpatialRef | None:
    """A SpatialRef from 4326, '4326', 'EPSG:4326', 'ESRI:102100', {'wkid': ...} JSON or WKT; None if absent."""
    if value is None or isinstance(value, SpatialRef):
        return value
    if isinstance(value, bool):
        raise RequestError(f"not a spatial reference: {value!r}")
    if isinstance(value, int):
        return SpatialRef(value)
    if isinstance(value, float) and value.is_integer():
        return SpatialRef(int(value))
    if isinstance(value, dict):
        low = {str(k).lower(): v for k, v in value.items()}
        wkt = low.get("wkt")
        sr = SpatialRef(_sr_code(low.get("wkid")), _sr_code(low.get("latestwkid")),
                        _check_wkt(wkt.strip()) if isinstance(wkt, str) and wkt.strip() else None)
        if sr.code is None and not sr.wkt:
            raise RequestError(f"spatialReference has no wkid, latestWkid or wkt: {show(value)}")
        return sr
    if not isinstance(value, str):
        raise RequestError(f"not a spatial reference: {show(value)}")
    text = value.strip()
    if not text:
        return None
    if text.lstrip("+-").isdigit() and len(text) < 20:
        return SpatialRef(int(text))
    if text.startswith("{"):
        return spatial_ref_from(load_json(text, "spatial reference"))
    if ":" in text and text.split(":", 1)[1].strip().isdigit() and len(text) < 32:
        return SpatialRef(int(text.split(":", 1)[1]))
    return SpatialRef(wkt=_check_wkt(text))


def _check_wkt(text: str) -> str:
    if len(text) > MAX_WKT_CHARS:
        raise RequestError(f"the spatial reference WKT is {len(text):,} characters long; "
                           f"more than {MAX_WKT_CHARS:,} is not a spatial reference")
    return text


def _sr_code(v: Any) -> int | None:
    """A wkid as an int; None when absent or not a whole number (then wkt or the other code decides)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v if abs(v) < 2**31 else None
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and v.is_integer() and abs(v) < 2**31 else None
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit() and len(v.strip()) < 12:
        return int(v.strip())
    return None


def _code_crs(code: int) -> "CRS | None":
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    if code in WEB_MERCATOR_CODES:
        return CRS.from_epsg(3857)
    for auth in ("EPSG", "ESRI"):
        try:
            return CRS.from_authority(auth, str(code))
        except CRSError:
            continue
    return None


@functools.lru_cache(maxsize=64)
def crs_for(sr: SpatialRef) -> "CRS | None":
    """The pyproj CRS of a spatial reference (latestWkid, then wkid, then WKT); None if it has none."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    tried = []
    for code in (sr.latest_wkid, sr.wkid):
        if code is not None and code not in tried:
            tried.append(code)
            crs = _code_crs(code)
            if crs is not None:
                return crs
    if sr.wkt:
        try:
            return CRS.from_user_input(_check_wkt(sr.wkt))
        except CRSError as e:
            raise RequestError(f"cannot read the spatial reference WKT: {one_line(e, 160)}") from None
    if tried:
        raise RequestError(f"unknown spatial reference wkid {tried[0]}: not an EPSG or ESRI code")
    return None


def _norm_code(sr: SpatialRef) -> int | None:
    code = sr.code
    return 3857 if code in WEB_MERCATOR_CODES else code


def same_sr(a: SpatialRef, b: SpatialRef) -> bool:
    """Whether two spatial references are the same coordinate system (unknown counts as the other)."""
    if (a.code is None and not a.wkt) or (b.code is None and not b.wkt):
        return True
    ca, cb = _norm_code(a), _norm_code(b)
    if ca is not None and cb is not None and (ca == cb or {a.wkid, a.latest_wkid} & {b.wkid, b.latest_wkid} - {None}):
        return True
    if _wgs84_to_web_mercator(a, b) or _wgs84_to_web_mercator(b, a):
        return False        # known apart without loading pyproj
    crs_a, crs_b = crs_for(a), crs_for(b)
    if crs_a is None or crs_b is None:
        return False
    return crs_a.equals(crs_b, ignore_axis_order=True)


def _sr_label(sr: SpatialRef) -> str:
    if sr.code is not None:
        return f"wkid {sr.code}"
    return "WKT " + (sr.wkt or "")[:60] if sr.wkt else "unknown"


@functools.lru_cache(maxsize=64)
def _transformer(src: "CRS", dst: "CRS") -> "Transformer":
    from pyproj import Transformer
    from pyproj.exceptions import ProjError

    try:
        return Transformer.from_crs(src, dst, always_xy=True)
    except ProjError as e:
        text = str(e)
        if "celestial body" in text:
            raise RequestError(
                f"cannot project between {src.name!r} and {dst.name!r}: they are not on the same "
                f"celestial body (a WKT on a non-Earth ellipsoid?)") from None
        raise RequestError(f"cannot project from {src.name!r} to {dst.name!r}: {one_line(text, 160)}") from None


# --------------------------------------------------------------------------------------------
# reading


def load_json(text: str, what: str) -> Any:
    """JSON text to Python, RequestError (one line) for bad or absurdly nested JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError(f"the {what} is nested too deeply to be read") from None
    except ValueError as e:
        raise RequestError(f"the {what} is not valid JSON ({one_line(e, 120)})") from None


def _finite(values: list[float], what: str) -> None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise RequestError(f"the {what} has a coordinate that is not a finite number")


def _box_numbers(low: dict, what: str) -> list[float]:
    try:
        nums = [float(low[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"the {what} has a value that is not a number") from None
    _finite(nums, what)
    return nums


def parse_extent(value: str | dict | Extent | None, default_sr: SpatialRef, *,
                 limits: GeometryLimits | None = None) -> Extent | None:
    """An extent from 'xmin,ymin,xmax,ymax', Envelope JSON or DEFAULT (None); checks it is a real box."""
    depth = _limits(limits).max_json_depth
    for _ in range(depth):
        if value is None or isinstance(value, Extent):
            ext = value
            break
        if isinstance(value, str):
            text = value.strip()
            if not text or text.upper() == "DEFAULT":
                return None
            if text.startswith("{"):
                value = load_json(text, "exportExtent")
                continue
            parts = text.replace(";", ",").split(",")
            if len(parts) != 4:
                raise RequestError(f"exportExtent must be xmin,ymin,xmax,ymax or Envelope JSON, not {show(text)}")
            try:
                nums = [float(p) for p in parts]
            except ValueError:
                raise RequestError(f"exportExtent has a value that is not a number: {show(text)}") from None
            _finite(nums, "exportExtent")
            ext = Extent(*nums, default_sr)
            break
        if not isinstance(value, dict):
            raise RequestError("exportExtent JSON must be an object with xmin, ymin, xmax, ymax")
        low = {str(k).lower(): v for k, v in value.items()}
        if "extent" in low and isinstance(low["extent"], dict):  # {"extent": {...}} wrappers
            value = low["extent"]
            continue
        missing = [k for k in ("xmin", "ymin", "xmax", "ymax") if low.get(k) is None]
        if missing:
            raise RequestError(f"exportExtent JSON lacks {', '.join(missing)}")
        nums = _box_numbers(low, "exportExtent")
        ext = Extent(*nums, spatial_ref_from(low.get("spatialreference")) or default_sr)
        break
    else:
        raise RequestError(f"exportExtent is nested more than {depth} levels deep")
    if ext is None:
        return None
    if not ext.is_valid:
        raise RequestError(f"exportExtent is inverted or not finite: xmin {ext.xmin}, ymin {ext.ymin}, "
                           f"xmax {ext.xmax}, ymax {ext.ymax}")
    if ext.xmin == ext.xmax or ext.ymin == ext.ymax:
        raise RequestError("exportExtent is empty: it has no width or no height")
    return ext


@dataclass(frozen=True, eq=False)
class _RingSet:
    """Closed rings as flat arrays: a ring's last vertex connects to its first."""

    xy: np.ndarray        # (n, 2) float64
    start: np.ndarray     # (k + 1,) int64 offsets of the rings in xy
    group: np.ndarray     # (k,) int64

    @classmethod
    def of(cls, rings: list[np.ndarray], groups: list[int]) -> "_RingSet":
        lengths = np.array([len(r) for r in rings], dtype=np.int64)
        start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        xy = np.vstack(rings).astype(np.float64) if rings else np.zeros((0, 2))
        return cls(xy.reshape(-1, 2), start, np.asarray(groups, dtype=np.int64).reshape(-1))

    @property
    def rings(self) -> int:
        """Number of rings."""
        return len(self.start) - 1

    def ring_of_vertex(self) -> np.ndarray:
        """The ring index of every vertex."""
        return np.repeat(np.arange(self.rings), np.diff(self.start))

    def next_index(self) -> np.ndarray:
        """For every vertex, the index of the next one of its ring (the last wraps to the first)."""
        nxt = np.arange(1, len(self.xy) + 1, dtype=np.int64)
        some = np.diff(self.start) > 0
        nxt[self.start[1:][some] - 1] = self.start[:-1][some]
        return nxt


class _Reader:
    """Reads geometry JSON into rings per spatial reference, counting against the limits as it goes."""

    def __init__(self, limits: GeometryLimits):
        self.limits = limits
        self.vertices = 0
        self.ring_count = 0
        self.groups = 0
        # per spatial reference: flat points, ring lengths, ring groups
        self.by_sr: dict[SpatialRef, tuple[list, list[int], list[int]]] = {}

    def new_group(self) -> int:
        self.groups += 1
        return self.groups - 1

    def count_parts(self, items: list, what: str) -> None:
        """Refuse more features or parts than rings allowed, before looking at any of them."""
        if len(items) > self.limits.max_rings:
            raise RequestError(f"the area of interest has more than {self.limits.max_rings:,} {what} "
                               f"(the limit is max_rings)")

    def add_rings(self, rings: Any, sr: SpatialRef, group: int | None = None, what: str = "polygon 'rings'") -> None:
        if not isinstance(rings, list):
            raise RequestError(f"{what} must be a list of rings")
        g = self.new_group() if group is None else group
        if sr not in self.by_sr and len(self.by_sr) >= MAX_SPATIAL_REFS:
            raise RequestError(f"the area of interest uses more than {MAX_SPATIAL_REFS} spatial references; "
                               f"give its features one")
        pts, lengths, groups = self.by_sr.setdefault(sr, ([], [], []))
        for ring in rings:
            if not isinstance(ring, (list, tuple)):
                raise RequestError("a polygon ring must be a list of [x, y] points")
            self.ring_count += 1
            self.vertices += len(ring)
            if self.ring_count > self.limits.max_rings:
                raise RequestError(f"the area of interest has more than {self.limits.max_rings:,} rings; "
                                   f"simplify it or merge its features (the limit is max_rings)")
            if self.vertices > self.limits.max_vertices:
                raise RequestError(
                    f"the area of interest has more than {self.limits.max_vertices:,} vertices; simplify it "
                    f"(the limit is max_vertices, default tilecrate.geometry.MAX_VERTICES)")
            pts.extend(ring)
            lengths.append(len(ring))
            groups.append(g)

    def add_box(self, nums: list[float], sr: SpatialRef) -> None:
        x0, y0, x1, y1 = nums
        self.add_rings([[[x0, y0], [x0, y1], [x1, y1], [x1, y0]]], sr)

    def ring_sets(self) -> list[tuple[_RingSet, SpatialRef]]:
        """The rings read, per spatial reference, checked and without degenerate rings."""
        out = []
        for sr, (pts, lengths, groups) in self.by_sr.items():
            xy = _points_array(pts, lengths)
            rs = _clean(xy, np.asarray(lengths, dtype=np.int64), np.asarray(groups, dtype=np.int64))
            if rs.rings:
                out.append((rs, sr))
        return out


def _points_array(pts: list, lengths: list[int]) -> np.ndarray:
    try:
        arr = np.asarray(pts, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] < 2 or arr.shape[0] != len(pts):
            raise ValueError
        arr = arr[:, :2]
    except (TypeError, ValueError, OverflowError):
        # points of mixed dimension ([x, y] and [x, y, z]), or junk
        try:
            arr = np.array([(float(p[0]), float(p[1])) for p in pts], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError, IndexError, KeyError, OverflowError):
            raise RequestError("a polygon ring has a point that is not [x, y] numbers") from None
    if not np.isfinite(arr).all():
        raise RequestError("the area of interest has a coordinate that is not a finite number")
    if arr.size and np.abs(arr).max() > MAX_COORDINATE:
        raise RequestError(f"the area of interest has a coordinate beyond ±{MAX_COORDINATE:g}: no spatial "
                           f"reference has such values; check the geometry and its spatial reference")
    return arr


def _clean(xy: np.ndarray, lengths: np.ndarray, groups: np.ndarray) -> _RingSet:
    """Rings without their repeated closing vertex, and without rings that enclose no area."""
    start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    some = np.flatnonzero(lengths >= 2)
    first, last = start[:-1][some], start[1:][some] - 1
    closed = (xy[first] == xy[last]).all(axis=1)
    keep_vertex = np.ones(len(xy), dtype=bool)
    keep_vertex[last[closed]] = False
    lengths = lengths.copy()
    lengths[some[closed]] -= 1
    rs = _RingSet(xy[keep_vertex], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), groups)
    return _drop_flat_rings(rs)


def _drop_flat_rings(rs: _RingSet) -> _RingSet:
    """Without rings of fewer than 3 vertices or with all vertices on one line: they enclose nothing."""
    if not rs.rings:
        return rs
    lengths = np.diff(rs.start)
    ring = rs.ring_of_vertex()
    first = rs.xy[rs.start[:-1][ring]] if len(ring) else rs.xy
    d = rs.xy - first
    nxt = rs.next_index()
    cross = d[:, 0] * d[nxt, 1] - d[:, 1] * d[nxt, 0]
    bent = np.bincount(ring, weights=cross != 0, minlength=rs.rings) > 0
    good = bent & (lengths >= 3)
    if good.all():
        return rs
    keep_vertex = good[ring]
    kept = lengths[good]
    return _RingSet(rs.xy[keep_vertex], np.concatenate([[0], np.cumsum(kept)]).astype(np.int64), rs.group[good])


def _lower(d: dict) -> dict:
    """Keys in lower case (Esri JSON keys come in any case); as is when they already are."""
    if all(type(k) is str and k.islower() for k in d):
        return d
    return {str(k).lower(): v for k, v in d.items()}


def _esri_geometry(g: dict, sr: SpatialRef, reader: _Reader) -> None:
    low = _lower(g)
    if "rings" in low:
        reader.add_rings(low["rings"], sr)
        return
    if all(k in low for k in ("xmin", "ymin", "xmax", "ymax")):
        nums = _box_numbers(low, "envelope")
        if nums[0] > nums[2] or nums[1] > nums[3]:
            raise RequestError("the envelope is inverted (xmin > xmax or ymin > ymax)")
        reader.add_box(nums, sr)
        return
    if "paths" in low or "points" in low or ("x" in low and "y" in low):
        raise RequestError("the area of interest must be a polygon or an envelope, not a line or points")
    raise RequestError("the area of interest geometry has no 'rings' (polygon) or xmin/ymin/xmax/ymax (envelope)")


def _geojson_geometry(g: dict, sr: SpatialRef, reader: _Reader, depth: int = 0) -> None:
    if depth > reader.limits.max_json_depth:
        raise RequestError(f"the GeoJSON geometry is nested more than {reader.limits.max_json_depth} levels deep")
    kind = g.get("type")
    coords = g.get("coordinates")
    if kind == "Polygon":
        _geojson_polygon(coords, sr, reader)
    elif kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise RequestError("GeoJSON MultiPolygon coordinates must be a list of polygons")
        reader.count_parts(coords, "polygons")
        for c in coords:
            _geojson_polygon(c, sr, reader)       # each part its own group: parts combine by union
    elif kind == "GeometryCollection":
        members = g.get("geometries") or []
        if not isinstance(members, list):
            raise RequestError("GeoJSON GeometryCollection 'geometries' must be a list")
        reader.count_parts(members, "geometries")
        for x in members:
            if isinstance(x, dict):
                _geojson_geometry(x, sr, reader, depth + 1)
    elif kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        raise RequestError(f"the area of interest must be a polygon, not a GeoJSON {kind}")
    else:
        raise RequestError(f"unsupported GeoJSON geometry type {show(kind)}")


def _geojson_polygon(coords: Any, sr: SpatialRef, reader: _Reader) -> None:
    if not isinstance(coords, list) or not coords:
        raise RequestError("GeoJSON Polygon coordinates must be a list of rings")
    reader.add_rings(coords, sr, what="GeoJSON Polygon coordinates")


def _geojson_crs(obj: dict) -> SpatialRef | None:
    crs = obj.get("crs")
    if isinstance(crs, dict):
        props = crs.get("properties")
        name = props.get("name") if isinstance(props, dict) else None
        if isinstance(name, str):
            # "EPSG:3857" or "urn:ogc:def:crs:EPSG::3857"; CRS84 is WGS 84
            if "CRS84" in name.upper():
                return WGS84
            tail = name.rsplit(":", 1)[-1]
            if tail.isdigit() and len(tail) < 12:
                return SpatialRef(int(tail))
            return SpatialRef(wkt=_check_wkt(name))
    return None


_GEOJSON_TYPES = ("FeatureCollection", "Feature", "Polygon", "MultiPolygon", "GeometryCollection", "Point",
                  "MultiPoint", "LineString", "MultiLineString")


def parse_aoi(value: str | dict, esri_default: SpatialRef, geojson_default: SpatialRef, *,
              max_vertices: int | None = None,
              limits: GeometryLimits | None = None) -> list[tuple[_RingSet, SpatialRef]]:
    """Read an area of interest into rings per spatial reference (flat arrays; groups numbered across all)."""
    reader = _Reader(_limits(limits, max_vertices))
    obj = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            raise RequestError("the area of interest must be JSON: an Esri FeatureSet, Polygon or Envelope, or GeoJSON")
        obj = load_json(text, "area of interest")
    if not isinstance(obj, dict):
        raise RequestError("the area of interest must be a JSON object")
    low = {str(k).lower(): v for k, v in obj.items()}
    gtype = obj.get("type")
    if isinstance(gtype, str) and gtype in _GEOJSON_TYPES:
        sr = _geojson_crs(obj) or geojson_default
        if gtype == "FeatureCollection":
            feats = obj.get("features")
            if not isinstance(feats, list):
                raise RequestError("GeoJSON FeatureCollection has no 'features' list")
            reader.count_parts(feats, "features")
            for f in feats:
                g = f.get("geometry") if isinstance(f, dict) else None
                if isinstance(g, dict):
                    _geojson_geometry(g, sr, reader)
        elif gtype == "Feature":
            g = obj.get("geometry")
            if not isinstance(g, dict):
                raise RequestError("GeoJSON Feature has no geometry")
            _geojson_geometry(g, sr, reader)
        else:
            _geojson_geometry(obj, sr, reader)
    elif "features" in low:
        feats = low["features"]
        if not isinstance(feats, list):
            raise RequestError("the FeatureSet's 'features' must be a list")
        reader.count_parts(feats, "features")
        set_sr = spatial_ref_from(low.get("spatialreference")) or esri_default
        for f in feats:
            if not isinstance(f, dict):
                raise RequestError("a FeatureSet feature must be an object with a 'geometry'")
            g = f.get("geometry") if "geometry" in f else _lower(f).get("geometry")
            if g is None:
                continue
            if not isinstance(g, dict):
                raise RequestError("a feature's geometry must be a JSON object")
            gl = _lower(g)
            gsr = spatial_ref_from(gl.get("spatialreference")) or set_sr
            _esri_geometry(gl, gsr, reader)
    elif "geometry" in low and isinstance(low["geometry"], dict):
        g = low["geometry"]
        gl = {str(k).lower(): v for k, v in g.items()}
        sr = spatial_ref_from(gl.get("spatialreference")) or spatial_ref_from(low.get("spatialreference")) or esri_default
        _esri_geometry(g, sr, reader)
    else:
        sr = spatial_ref_from(low.get("spatialreference")) or esri_default
        _esri_geometry(obj, sr, reader)
    out = reader.ring_sets()
    if not out:
        raise RequestError("the area of interest is empty: it has no polygon with an area")
    return out


# --------------------------------------------------------------------------------------------
# clipping (geographic input to the target's area of use)


def _clip_half(rs: _RingSet, axis: int, c: float, keep_below: bool) -> _RingSet:
    """Sutherland-Hodgman against one half-plane, every ring at once: keeps winding numbers inside."""
    if not rs.rings:
        return rs
    v = rs.xy[:, axis]
    inside = v <= c if keep_below else v >= c
    if inside.all():
        return rs
    nxt = rs.next_index()
    s, e = rs.xy, rs.xy[nxt]
    in_e = inside[nxt]
    crossing = inside != in_e
    # per edge S->E: the crossing point if it crosses, then E if E is inside
    count = crossing.astype(np.int64) + in_e
    pos = np.concatenate([[0], np.cumsum(count)])
    out = np.empty((int(pos[-1]), 2), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (c - s[:, axis]) / (e[:, axis] - s[:, axis])
    other = 1 - axis
    ci = np.flatnonzero(crossing)
    cross_pt = np.empty((len(ci), 2))
    cross_pt[:, axis] = c               # exactly on the line: the boundary fix finds these edges
    cross_pt[:, other] = s[ci, other] + t[ci] * (e[ci, other] - s[ci, other])
    out[pos[ci]] = cross_pt
    ei = np.flatnonzero(in_e)
    out[pos[ei] + crossing[ei]] = e[ei]
    ring = rs.ring_of_vertex()
    per_ring = np.bincount(ring, weights=count, minlength=rs.rings).astype(np.int64)
    # a ring's outputs are contiguous and cyclic: wherever they start, they close the same ring
    clipped = _RingSet(out, np.concatenate([[0], np.cumsum(per_ring)]).astype(np.int64), rs.group)
    return _drop_flat_rings(clipped)


def _clip_rect(rs: _RingSet, rect: tuple[float, float, float, float]) -> tuple[_RingSet, np.ndarray, np.ndarray]:
    """Rings clipped to a rectangle, and the edges on its sides that bound the clipped area.

    Clipping leaves edges along the rectangle's sides where a ring left and re-entered it, also
    over stretches the area does not reach there. Along each side the area just inside is
    filled exactly where an odd number of a group's on-side edges cover it (the crossing count
    changes by that many); so on-side edges are replaced by those odd-coverage intervals.
    Returns (rings, their edges to drop: bool per vertex, extra edges (m, 5): x0, y0, x1, y1, group).
    """
    x0, y0, x1, y1 = rect
    for axis, c, below in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
        rs = _clip_half(rs, axis, c, below)
    nxt = rs.next_index()
    a, b = rs.xy, rs.xy[nxt]
    drop = np.zeros(len(a), dtype=bool)
    extra = []
    for axis, c in ((0, x0), (0, x1), (1, y0), (1, y1)):
        on = (a[:, axis] == c) & (b[:, axis] == c)
        if not on.any():
            continue
        drop |= on
        other = 1 - axis
        grp = rs.group[rs.ring_of_vertex()[on]]
        ends = np.concatenate([a[on, other], b[on, other]])
        gg = np.concatenate([grp, grp])
        order = np.lexsort((ends, gg))
        ends, gg = ends[order], gg[order]
        # each edge adds two endpoints, so every group has an even count: pair them up in order
        lo, hi, g = ends[0::2], ends[1::2], gg[0::2]
        keep = hi > lo
        seg = np.empty((int(keep.sum()), 5))
        seg[:, axis] = c
        seg[:, 2 + axis] = c
        seg[:, other] = lo[keep]
        seg[:, 2 + other] = hi[keep]
        seg[:, 4] = g[keep]
        extra.append(seg)
    return rs, drop, (np.vstack(extra) if extra else np.zeros((0, 5)))


# --------------------------------------------------------------------------------------------
# projecting


def _densify_counts(lengths: np.ndarray, step: float, budget: int) -> np.ndarray:
    """Pieces per edge so that no piece is longer than step, at most `budget` pieces in all."""
    if step <= 0 or not len(lengths):
        return np.ones(len(lengths), dtype=np.int64)
    total = float(lengths.sum())
    spare = budget - len(lengths)          # each edge's ceil() may add one piece beyond length / step
    if total / step > spare:
        step = total / max(spare, 1)
    return np.maximum(np.ceil(lengths / step), 1).astype(np.int64)


def _split(a: np.ndarray, b: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Points a + (b - a) * j / k for j = 0..k-1 of every edge, edge after edge."""
    idx = np.repeat(np.arange(len(a)), k)
    j = np.arange(len(idx)) - np.repeat(np.cumsum(k) - k, k)
    t = (j / k[idx])[:, None]
    return a[idx] + (b[idx] - a[idx]) * t


def _first_code(sr: SpatialRef) -> int | None:
    """The code crs_for resolves first (latestWkid, then wkid)."""
    return sr.latest_wkid if sr.latest_wkid is not None else sr.wkid


def _wgs84_to_web_mercator(src: SpatialRef, dst: SpatialRef) -> bool:
    """Whether src -> dst is WGS 84 -> Web Mercator by their codes, which same_sr finds different: projected in
    closed form (`_web_mercator`), without loading pyproj (~0.3 s of a process, most of a bbox export's)."""
    shared = {src.wkid, src.latest_wkid} & {dst.wkid, dst.latest_wkid} - {None}
    return _first_code(src) == 4326 and _first_code(dst) in WEB_MERCATOR_CODES and not shared


class _AreaOfUse:
    """EPSG:3857's area of use as PROJ states it (pyproj's CRS.area_of_use)."""

    west, south, east, north = -180.0, -85.06, 180.0, 85.06


_MERCATOR_RADIUS = 6378137.0
_DEGREE = math.pi / 180


def _web_mercator(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EPSG:4326 -> EPSG:3857 as PROJ computes it (x = R lon, y = R asinh(tan lat), libm's tan and asinh):
    the same doubles as pyproj's transformer, checked in tests/test_geometry_webmercator.py."""
    rad = np.asarray(lat, dtype=np.float64) * _DEGREE
    # math's (libm's, as PROJ's) tan and asinh, not numpy's own vectorised ones, whose last bits differ
    y = np.fromiter(map(math.asinh, map(math.tan, rad.tolist())), dtype=np.float64, count=len(rad))
    return _MERCATOR_RADIUS * (np.asarray(lon, dtype=np.float64) * _DEGREE), _MERCATOR_RADIUS * y


def _project_rings(rs: _RingSet, src: SpatialRef, dst: SpatialRef, limits: GeometryLimits,
                   cancel: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Edges (n, 4) and groups of rings from `src` into `dst`, densified first, clipped to dst's domain."""
    closed_form = _wgs84_to_web_mercator(src, dst)
    if same_sr(src, dst):
        return _ring_edges(rs)
    if closed_form:
        geographic, aou, transform = True, _AreaOfUse, _web_mercator
    else:
        src_crs, dst_crs = crs_for(src), crs_for(dst)
        if dst_crs is None:
            raise RequestError(f"cannot project the area from {_sr_label(src)}: "
                               "the cache's spatial reference is unknown")
        if src_crs is None:
            raise RequestError("the area of interest's spatial reference is unknown")
        transformer = _transformer(src_crs, dst_crs)
        geographic, aou = src_crs.is_geographic, dst_crs.area_of_use

        def transform(x: np.ndarray, y: np.ndarray):
            from pyproj.exceptions import ProjError

            try:
                return transformer.transform(x, y, errcheck=False)
            except ProjError as e:
                raise RequestError(f"cannot project the area of interest to the cache's spatial reference: "
                                   f"{one_line(e, 160)}") from None
    drop = np.zeros(len(rs.xy), dtype=bool)
    extra = np.zeros((0, 5))
    if geographic:
        rect = [-180.0, -90.0, 180.0, 90.0]
        if aou is not None and aou.west < aou.east:
            rect = [max(rect[0], aou.west), max(rect[1], aou.south), min(rect[2], aou.east), min(rect[3], aou.north)]
        lo, hi = rs.xy.min(axis=0), rs.xy.max(axis=0)
        if lo[0] < rect[0] or lo[1] < rect[1] or hi[0] > rect[2] or hi[1] > rect[3]:
            rs, drop, extra = _clip_rect(rs, tuple(rect))
            if not rs.rings:
                raise RequestError(
                    f"the area of interest lies outside the area the cache's spatial reference covers "
                    f"({aou.west:g}..{aou.east:g} E, {aou.south:g}..{aou.north:g} N)" if aou is not None else
                    "the area of interest lies outside the valid longitudes and latitudes")
    check_cancel(cancel, "projecting the area")
    # densify: pieces no longer than 1/DENSIFY_STEPS of the area's larger side, within the vertex budget
    nxt = rs.next_index()
    a, b = rs.xy, rs.xy[nxt]
    ea, eb = extra[:, 0:2], extra[:, 2:4]
    span = np.ptp(np.vstack([a, ea]), axis=0).max() if len(a) else 0.0
    lengths = np.hypot(*(np.vstack([b - a, eb - ea]).T))
    n_edges = len(lengths)
    k = _densify_counts(lengths, span / DENSIFY_STEPS, n_edges + DENSIFY_EXTRA)
    k_ring, k_extra = k[:len(a)], k[len(a):]
    k_ring = np.where(drop, 1, k_ring)              # dropped edges are not drawn: no need to bend them
    pts = _split(a, b, k_ring)
    ring_ends = np.cumsum(np.bincount(rs.ring_of_vertex(), weights=k_ring, minlength=rs.rings)).astype(np.int64)
    dense = _RingSet(pts, np.concatenate([[0], ring_ends]), rs.group)
    dense_drop = np.repeat(drop, k_ring)
    # the extra (side) edges: pieces plus their end point, as open paths
    ext_pts = _split(ea, eb, k_extra)
    ext_end = np.cumsum(k_extra + 1) - 1
    ext_all = np.empty((len(ext_pts) + len(ea), 2))
    is_end = np.zeros(len(ext_all), dtype=bool)
    is_end[ext_end] = True
    ext_all[~is_end] = ext_pts
    ext_all[is_end] = eb
    check_cancel(cancel, "projecting the area")
    allp = np.vstack([dense.xy, ext_all]) if len(ext_all) else dense.xy
    x, y = transform(allp[:, 0], allp[:, 1])
    proj = np.column_stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])
    if not np.isfinite(proj).all():
        raise RequestError(
            f"the area of interest cannot be projected from {_sr_label(src)} to the cache's {_sr_label(dst)}: "
            f"part of it lies outside the valid area of that projection")
    ring_xy = proj[:len(dense.xy)]
    moved = _RingSet(ring_xy, dense.start, dense.group)
    edges, groups = _ring_edges(moved)
    edges, groups = edges[~dense_drop], groups[~dense_drop]
    if len(ext_all):
        ep = proj[len(dense.xy):]
        starts = np.flatnonzero(~is_end)
        e2 = np.hstack([ep[starts], ep[starts + 1]])
        g2 = np.repeat(extra[:, 4].astype(np.int64), k_extra)
        edges, groups = np.vstack([edges, e2]), np.concatenate([groups, g2])
    return edges, groups


def _ring_edges(rs: _RingSet) -> tuple[np.ndarray, np.ndarray]:
    """Every ring edge (n, 4) and its group."""
    nxt = rs.next_index()
    edges = np.ascontiguousarray(np.hstack([rs.xy, rs.xy[nxt]]), dtype=np.float64)
    return edges, rs.group[rs.ring_of_vertex()]


def line_crossings(edges: np.ndarray) -> int:
    """The most edges one horizontal line crosses (ends touching the line count once)."""
    if not len(edges):
        return 0
    ya, yb = np.minimum(edges[:, 1], edges[:, 3]), np.maximum(edges[:, 1], edges[:, 3])
    slanted = yb > ya
    ya, yb = ya[slanted], yb[slanted]
    if not len(ya):
        return 0
    # an edge is active on [ya, yb); the count peaks at some lower end y = ya_i, where it is
    # (lower ends <= y) - (upper ends <= y)
    ya, yb = np.sort(ya), np.sort(yb)
    active = np.searchsorted(ya, ya, side="right") - np.searchsorted(yb, ya, side="right")
    return int(active.max())


def _area_from_edges(edges: np.ndarray, groups: np.ndarray) -> Area:
    xs, ys = edges[:, 0::2], edges[:, 1::2]
    bounds = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    if _is_bounds(edges, groups, bounds):
        return Area(bounds)
    # top edge first: every level's rasterizer then finds its edges in row order and sorts nothing
    order = np.argsort(-np.maximum(edges[:, 1], edges[:, 3]), kind="stable")
    return Area(bounds, np.ascontiguousarray(edges[order], dtype=np.float64),
                np.ascontiguousarray(groups[order], dtype=np.int64))


def _is_bounds(edges: np.ndarray, groups: np.ndarray, bounds: tuple[float, float, float, float]) -> bool:
    """Whether one group's edges all run along its bounding box and wind around it once."""
    if len(edges) > 100_000 or (len(groups) and groups.min() != groups.max()):
        return False
    x0, y0, x1, y1 = bounds
    if x0 == x1 or y0 == y1:
        return False
    ex0, ey0, ex1, ey1 = edges.T
    on_side = (((ex0 == x0) & (ex1 == x0)) | ((ex0 == x1) & (ex1 == x1))
               | ((ey0 == y0) & (ey1 == y0)) | ((ey0 == y1) & (ey1 == y1)))
    if not on_side.all():
        return False
    # all edges on the box's sides: the signed area is (winding number) x (box area)
    signed = 0.5 * float(np.sum(ex0 * ey1 - ex1 * ey0))
    box = (x1 - x0) * (y1 - y0)
    return abs(abs(signed) - box) <= 1e-9 * box


def request_area(extent: str | dict | None, aoi: str | dict | None, aoi_sr: Any, target: SpatialRef, *,
                 max_vertices: int | None = None, limits: GeometryLimits | None = None,
                 cancel: Any = None) -> Area | None:
    """The export area of a request in `target` coordinates; None for the full extent (no extent, no AOI)."""
    lim = _limits(limits, max_vertices)
    try:
        return _request_area(extent, aoi, aoi_sr, target, lim, cancel)
    except RecursionError:
        raise RequestError("the area is nested too deeply to be read") from None
    except MemoryError:
        raise RequestError("the area is too large to read in the memory available") from None


def _request_area(extent, aoi, aoi_sr, target: SpatialRef, lim: GeometryLimits, cancel: Any) -> Area | None:
    given_sr = spatial_ref_from(aoi_sr)
    if aoi is not None:
        parts = parse_aoi(aoi, given_sr or target, given_sr or WGS84, limits=lim)
    else:
        ext = parse_extent(extent, given_sr or target, limits=lim) if extent is not None else None
        if ext is None:
            return None
        if same_sr(ext.spatial_ref, target):
            return Area((ext.xmin, ext.ymin, ext.xmax, ext.ymax))
        box = np.array([[ext.xmin, ext.ymin], [ext.xmin, ext.ymax], [ext.xmax, ext.ymax], [ext.xmax, ext.ymin]])
        parts = [(_RingSet(box, np.array([0, 4]), np.array([0])), ext.spatial_ref)]
    check_cancel(cancel, "reading the area")
    all_edges, all_groups = [], []
    for rs, sr in parts:
        e, g = _project_rings(rs, sr, target, lim, cancel)
        all_edges.append(e)
        all_groups.append(g)
    edges = np.vstack(all_edges) if all_edges else np.zeros((0, 4))
    groups = np.concatenate(all_groups) if all_groups else np.zeros(0, np.int64)
    if not len(edges):
        raise RequestError("the area of interest is empty after projecting it to the cache's spatial reference")
    check_cancel(cancel, "checking the area")
    crossings = line_crossings(edges)
    if crossings > lim.max_line_crossings:
        raise RequestError(
            f"the area of interest is too convoluted: one horizontal line crosses {crossings:,} of its edges "
            f"(the limit, max_line_crossings, is {lim.max_line_crossings:,}); simplify it")
    return _area_from_edges(edges, groups)


def validate_request_area(request: "ExportRequest", target_sr: SpatialRef,
                          limits: GeometryLimits | None = None) -> Area | None:
    """The request's area in `target_sr` (None = everything), or RequestError: for submit-time checks.

    Bounded by `limits` (vertices, rings, nesting, line crossings): no repair, no tile or index read.
    """
    return request_area(request.extent, request.area_of_interest, request.aoi_sr, target_sr, limits=limits)

"""Export areas: extents and areas of interest (Esri JSON or GeoJSON) in the cache's coordinates.

Reading: an extent is `xmin,ymin,xmax,ymax`, Envelope JSON (string or dict) or DEFAULT; an area
of interest is an Esri FeatureSet (one or many polygon features), a plain Esri Polygon, an
Envelope, or GeoJSON (Polygon, MultiPolygon, Feature, FeatureCollection, GeometryCollection).
Esri rings are combined by nesting (even-odd), so ring orientation does not matter: clients
write both conventions. Spatial references come as wkid, latestWkid or WKT; a geometry without
one is in the `default` reference the caller names (the cache's for Esri JSON, WGS 84 for
GeoJSON, unless `aoi_sr` says otherwise).

Projecting: edges are densified in the source coordinates first (a straight edge in degrees is
a curve in Web Mercator), geographic input is clipped to the target's area of use (Web Mercator
stops at ±85.06°), and the result is made valid with shapely. Geometry with more than
MAX_VERTICES vertices is refused before any heavy work.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
import shapely.errors
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError, ProjError
from shapely.geometry.base import BaseGeometry

from tilecrate.errors import RequestError
from tilecrate.tiling import Extent, SpatialRef

MAX_VERTICES = 1_000_000          # refuse geometry above this many vertices (override per call or here)
MAX_COORDINATE = 1e15            # coordinates beyond this are junk in any spatial reference
DENSIFY_STEPS = 256               # segments along the larger side of the area when projecting
WEB_MERCATOR_CODES = {3857, 102100, 102113, 900913, 3785, 41001}
WGS84 = SpatialRef(4326, 4326)


@dataclass(frozen=True)
class Area:
    """An export area in the cache's coordinates: its bounds, and a polygon unless it is the bounds."""

    bounds: tuple[float, float, float, float]
    polygon: BaseGeometry | None = None

    @property
    def is_rectangle(self) -> bool:
        """True when the area is exactly its bounding rectangle."""
        return self.polygon is None

    @property
    def vertex_count(self) -> int:
        """Vertices of the polygon (4 for a rectangle)."""
        return 4 if self.polygon is None else int(shapely.get_num_coordinates(self.polygon))


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
    if isinstance(value, dict):
        low = {str(k).lower(): v for k, v in value.items()}
        wkt = low.get("wkt")
        sr = SpatialRef(_sr_code(low.get("wkid")), _sr_code(low.get("latestwkid")),
                        wkt.strip() if isinstance(wkt, str) and wkt.strip() else None)
        if sr.code is None and not sr.wkt:
            raise RequestError(f"spatialReference has no wkid, latestWkid or wkt: {json.dumps(value)[:200]}")
        return sr
    text = str(value).strip()
    if not text:
        return None
    if text.lstrip("+-").isdigit():
        return SpatialRef(int(text))
    if text.startswith("{"):
        return spatial_ref_from(_load_json(text, "spatial reference"))
    if ":" in text and text.split(":", 1)[1].strip().isdigit() and len(text) < 32:
        return SpatialRef(int(text.split(":", 1)[1]))
    return SpatialRef(wkt=text)


def _sr_code(v: Any) -> int | None:
    """A wkid as an int; None when absent or not a whole number (then wkt or the other code decides)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and v.is_integer() else None
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        return int(v.strip())
    return None


def _code_crs(code: int) -> CRS | None:
    if code in WEB_MERCATOR_CODES:
        return CRS.from_epsg(3857)
    for auth in ("EPSG", "ESRI"):
        try:
            return CRS.from_authority(auth, str(code))
        except CRSError:
            continue
    return None


@functools.lru_cache(maxsize=64)
def crs_for(sr: SpatialRef) -> CRS | None:
    """The pyproj CRS of a spatial reference (latestWkid, then wkid, then WKT); None if it has none."""
    tried = []
    for code in (sr.latest_wkid, sr.wkid):
        if code is not None and code not in tried:
            tried.append(code)
            crs = _code_crs(code)
            if crs is not None:
                return crs
    if sr.wkt:
        try:
            return CRS.from_user_input(sr.wkt)
        except CRSError as e:
            raise RequestError(f"cannot read the spatial reference WKT ({e})") from None
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
    crs_a, crs_b = crs_for(a), crs_for(b)
    if crs_a is None or crs_b is None:
        return False
    return crs_a.equals(crs_b, ignore_axis_order=True)


def _sr_label(sr: SpatialRef) -> str:
    if sr.code is not None:
        return f"wkid {sr.code}"
    return "WKT " + (sr.wkt or "")[:60] if sr.wkt else "unknown"


# --------------------------------------------------------------------------------------------
# reading


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise RequestError(f"the {what} is not valid JSON ({e})") from None


def _finite(values: list[float], what: str) -> None:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise RequestError(f"the {what} has a coordinate that is not a finite number")


def parse_extent(value: str | dict | Extent, default_sr: SpatialRef) -> Extent | None:
    """An extent from 'xmin,ymin,xmax,ymax', Envelope JSON or DEFAULT (None); checks it is a real box."""
    if value is None or isinstance(value, Extent):
        ext = value
    else:
        obj = value
        if isinstance(value, str):
            text = value.strip()
            if not text or text.upper() == "DEFAULT":
                return None
            if text.startswith("{"):
                obj = _load_json(text, "exportExtent")
            else:
                parts = [p for p in text.replace(";", ",").split(",")]
                if len(parts) != 4:
                    raise RequestError(f"exportExtent must be xmin,ymin,xmax,ymax or Envelope JSON, not {text!r}")
                try:
                    nums = [float(p) for p in parts]
                except ValueError:
                    raise RequestError(f"exportExtent has a value that is not a number: {text!r}") from None
                _finite(nums, "exportExtent")
                ext = Extent(*nums, default_sr)
                obj = None
        if obj is not None:
            if not isinstance(obj, dict):
                raise RequestError("exportExtent JSON must be an object with xmin, ymin, xmax, ymax")
            low = {str(k).lower(): v for k, v in obj.items()}
            if "extent" in low and isinstance(low["extent"], dict):  # {"extent": {...}} wrappers
                return parse_extent(low["extent"], default_sr)
            missing = [k for k in ("xmin", "ymin", "xmax", "ymax") if low.get(k) is None]
            if missing:
                raise RequestError(f"exportExtent JSON lacks {', '.join(missing)}")
            try:
                nums = [float(low[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                raise RequestError("exportExtent JSON has a value that is not a number") from None
            _finite(nums, "exportExtent")
            sr = spatial_ref_from(low.get("spatialreference")) or default_sr
            ext = Extent(*nums, sr)
    if not ext.is_valid:
        raise RequestError(f"exportExtent is inverted or not finite: xmin {ext.xmin}, ymin {ext.ymin}, "
                           f"xmax {ext.xmax}, ymax {ext.ymax}")
    if ext.xmin == ext.xmax or ext.ymin == ext.ymax:
        raise RequestError("exportExtent is empty: it has no width or no height")
    return ext


class _Counter:
    """Counts vertices as geometry is read, refusing absurd input before shapely sees it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k
        if self.n > self.limit:
            raise RequestError(
                f"the area of interest has more than {self.limit:,} vertices; simplify it "
                f"(the limit is tilecrate.geometry.MAX_VERTICES)")


def _ring_array(ring: Any, counter: _Counter) -> np.ndarray:
    if not isinstance(ring, (list, tuple)):
        raise RequestError("a polygon ring must be a list of [x, y] points")
    counter.add(len(ring))
    try:
        arr = np.asarray(ring, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise ValueError
        arr = arr[:, :2]
    except (TypeError, ValueError):
        # points of mixed dimension ([x, y] and [x, y, z]) or junk
        try:
            arr = np.asarray([[float(p[0]), float(p[1])] for p in ring], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError, IndexError, KeyError):
            raise RequestError("a polygon ring has a point that is not [x, y] numbers") from None
    if not np.isfinite(arr).all():
        raise RequestError("the area of interest has a coordinate that is not a finite number")
    if arr.size and np.abs(arr).max() > MAX_COORDINATE:
        raise RequestError(f"the area of interest has a coordinate beyond ±{MAX_COORDINATE:g}: no spatial "
                           f"reference has such values; check the geometry and its spatial reference")
    return arr


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry, made valid (lines and points dropped)."""
    if geom.is_empty:
        return shapely.MultiPolygon()
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        return shapely.MultiPolygon()
    polys = []
    for p in parts:
        polys.extend(shapely.get_parts(p))
    polys = [p for p in polys if not p.is_empty and p.area > 0]
    if not polys:
        return shapely.MultiPolygon()
    return polys[0] if len(polys) == 1 else shapely.union_all(polys)


def rings_to_geometry(rings: list[np.ndarray]) -> BaseGeometry:
    """Esri rings to a valid (Multi)Polygon by nesting: a ring inside an odd number of others is a hole."""
    polys = []
    for r in rings:
        if len(r) < 3:
            continue
        p = _polygonal(shapely.Polygon(r)) if len(np.unique(r, axis=0)) >= 3 else None
        if p is not None and not p.is_empty:
            polys.append(p)
    if not polys:
        return shapely.MultiPolygon()
    if len(polys) == 1:
        return polys[0]
    arr = np.array(polys, dtype=object)
    tree = shapely.STRtree(arr)
    inner, outer = tree.query(arr, predicate="covered_by")
    keep = inner != outer
    inner, outer = inner[keep], outer[keep]
    depth = np.bincount(inner, minlength=len(polys))
    holes_of: dict[int, list[int]] = {}
    for i, j in zip(inner.tolist(), outer.tolist()):
        if depth[i] % 2 == 1 and depth[j] == depth[i] - 1:
            holes_of.setdefault(j, []).append(i)
    pieces = []
    for i, p in enumerate(polys):
        if depth[i] % 2:
            continue
        holes = holes_of.get(i)
        pieces.append(p.difference(shapely.union_all([polys[h] for h in holes])) if holes else p)
    return _polygonal(shapely.union_all(pieces))


def _esri_geometry(g: dict, counter: _Counter) -> BaseGeometry:
    low = {str(k).lower(): v for k, v in g.items()}
    if "rings" in low:
        rings = low["rings"]
        if not isinstance(rings, list):
            raise RequestError("polygon 'rings' must be a list of rings")
        return rings_to_geometry([_ring_array(r, counter) for r in rings])
    if all(k in low for k in ("xmin", "ymin", "xmax", "ymax")):
        try:
            nums = [float(low[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise RequestError("the envelope has a value that is not a number") from None
        _finite(nums, "envelope")
        if nums[0] > nums[2] or nums[1] > nums[3]:
            raise RequestError("the envelope is inverted (xmin > xmax or ymin > ymax)")
        counter.add(4)
        return _polygonal(shapely.box(*nums))
    if "paths" in low or "points" in low or ("x" in low and "y" in low):
        raise RequestError("the area of interest must be a polygon or an envelope, not a line or points")
    raise RequestError("the area of interest geometry has no 'rings' (polygon) or xmin/ymin/xmax/ymax (envelope)")


def _geojson_geometry(g: dict, counter: _Counter) -> BaseGeometry:
    kind = g.get("type")
    coords = g.get("coordinates")
    if kind == "Polygon":
        return _geojson_polygon(coords, counter)
    if kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise RequestError("GeoJSON MultiPolygon coordinates must be a list of polygons")
        parts = [_geojson_polygon(c, counter) for c in coords]
        return _polygonal(shapely.union_all(parts)) if parts else shapely.MultiPolygon()
    if kind == "GeometryCollection":
        parts = [_geojson_geometry(x, counter) for x in g.get("geometries") or [] if isinstance(x, dict)]
        return _polygonal(shapely.union_all(parts)) if parts else shapely.MultiPolygon()
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        raise RequestError(f"the area of interest must be a polygon, not a GeoJSON {kind}")
    raise RequestError(f"unsupported GeoJSON geometry type {kind!r}")


def _geojson_polygon(coords: Any, counter: _Counter) -> BaseGeometry:
    if not isinstance(coords, list) or not coords:
        raise RequestError("GeoJSON Polygon coordinates must be a list of rings")
    rings = [_ring_array(r, counter) for r in coords]
    shell, holes = rings[0], [h for h in rings[1:] if len(h) >= 3]
    if len(shell) < 3:
        return shapely.MultiPolygon()
    return _polygonal(shapely.Polygon(shell, holes))


def _geojson_crs(obj: dict) -> SpatialRef | None:
    crs = obj.get("crs")
    if isinstance(crs, dict):
        name = (crs.get("properties") or {}).get("name")
        if isinstance(name, str):
            # "EPSG:3857" or "urn:ogc:def:crs:EPSG::3857"; CRS84 is WGS 84
            if "CRS84" in name.upper():
                return WGS84
            tail = name.rsplit(":", 1)[-1]
            if tail.isdigit():
                return SpatialRef(int(tail))
            return SpatialRef(wkt=name)
    return None


def parse_aoi(value: str | dict, esri_default: SpatialRef, geojson_default: SpatialRef, *,
              max_vertices: int | None = None) -> list[tuple[BaseGeometry, SpatialRef]]:
    """Read an area of interest into (geometry, spatial reference) parts, each valid and polygonal."""
    limit = MAX_VERTICES if max_vertices is None else max_vertices
    counter = _Counter(limit)
    obj = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            raise RequestError("the area of interest must be JSON: an Esri FeatureSet, Polygon or Envelope, or GeoJSON")
        obj = _load_json(text, "area of interest")
    if not isinstance(obj, dict):
        raise RequestError("the area of interest must be a JSON object")
    out: list[tuple[BaseGeometry, SpatialRef]] = []
    low = {str(k).lower(): v for k, v in obj.items()}
    gtype = obj.get("type")
    if isinstance(gtype, str) and gtype in ("FeatureCollection", "Feature", "Polygon", "MultiPolygon",
                                            "GeometryCollection", "Point", "MultiPoint", "LineString",
                                            "MultiLineString"):
        sr = _geojson_crs(obj) or geojson_default
        if gtype == "FeatureCollection":
            feats = obj.get("features")
            if not isinstance(feats, list):
                raise RequestError("GeoJSON FeatureCollection has no 'features' list")
            for f in feats:
                g = f.get("geometry") if isinstance(f, dict) else None
                if isinstance(g, dict):
                    out.append((_geojson_geometry(g, counter), sr))
        elif gtype == "Feature":
            g = obj.get("geometry")
            if not isinstance(g, dict):
                raise RequestError("GeoJSON Feature has no geometry")
            out.append((_geojson_geometry(g, counter), sr))
        else:
            out.append((_geojson_geometry(obj, counter), sr))
    elif "features" in low:
        feats = low["features"]
        if not isinstance(feats, list):
            raise RequestError("the FeatureSet's 'features' must be a list")
        set_sr = spatial_ref_from(low.get("spatialreference")) or esri_default
        for f in feats:
            if not isinstance(f, dict):
                raise RequestError("a FeatureSet feature must be an object with a 'geometry'")
            g = {str(k).lower(): v for k, v in f.items()}.get("geometry")
            if g is None:
                continue
            if not isinstance(g, dict):
                raise RequestError("a feature's geometry must be a JSON object")
            gsr = spatial_ref_from({str(k).lower(): v for k, v in g.items()}.get("spatialreference")) or set_sr
            out.append((_esri_geometry(g, counter), gsr))
    elif "geometry" in low and isinstance(low["geometry"], dict):
        g = low["geometry"]
        gl = {str(k).lower(): v for k, v in g.items()}
        sr = spatial_ref_from(gl.get("spatialreference")) or spatial_ref_from(low.get("spatialreference")) or esri_default
        out.append((_esri_geometry(g, counter), sr))
    else:
        sr = spatial_ref_from(low.get("spatialreference")) or esri_default
        out.append((_esri_geometry(obj, counter), sr))
    out = [(g, sr) for g, sr in out if not g.is_empty]
    if not out:
        raise RequestError("the area of interest is empty: it has no polygon with an area")
    return out


# --------------------------------------------------------------------------------------------
# projecting


@functools.lru_cache(maxsize=64)
def _transformer(src: CRS, dst: CRS) -> Transformer:
    return Transformer.from_crs(src, dst, always_xy=True)


def project(geom: BaseGeometry, src: SpatialRef, dst: SpatialRef, *,
            max_vertices: int | None = None) -> BaseGeometry:
    """A valid polygonal geometry from `src` into `dst` coordinates, densified first, clipped to dst's domain."""
    if same_sr(src, dst):
        return geom
    limit = MAX_VERTICES if max_vertices is None else max_vertices
    if max(abs(v) for v in geom.bounds) > MAX_COORDINATE:
        raise RequestError(f"the area has a coordinate beyond ±{MAX_COORDINATE:g} and cannot be projected; "
                           f"check its spatial reference")
    src_crs, dst_crs = crs_for(src), crs_for(dst)
    if dst_crs is None:
        raise RequestError(f"cannot project the area from {_sr_label(src)}: the cache's spatial reference is unknown")
    if src_crs is None:
        raise RequestError("the area of interest's spatial reference is unknown")
    if src_crs.is_geographic:
        aou = dst_crs.area_of_use
        if aou is not None and aou.west < aou.east:
            geom = _polygonal(geom.intersection(shapely.box(aou.west, aou.south, aou.east, aou.north)))
        geom = _polygonal(geom.intersection(shapely.box(-180.0, -90.0, 180.0, 90.0)))
        if geom.is_empty:
            raise RequestError(
                f"the area of interest lies outside the area the cache's spatial reference covers "
                f"({aou.west:g}..{aou.east:g} E, {aou.south:g}..{aou.north:g} N)" if aou is not None else
                "the area of interest lies outside the valid longitudes and latitudes")
    xmin, ymin, xmax, ymax = geom.bounds
    n = int(shapely.get_num_coordinates(geom))
    step = max(xmax - xmin, ymax - ymin) / DENSIFY_STEPS
    if step > 0:
        budget = max(limit - n, 1)
        length = float(geom.length)
        if length / step > budget:
            step = length / budget
        geom = shapely.segmentize(geom, step)
    transformer = _transformer(src_crs, dst_crs)

    def fwd(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1], errcheck=False)
        return np.column_stack([x, y])

    try:
        out = shapely.transform(geom, fwd)
    except ProjError as e:
        raise RequestError(f"cannot project the area of interest to the cache's spatial reference ({e})") from None
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise RequestError(
            f"the area of interest cannot be projected from {_sr_label(src)} to the cache's {_sr_label(dst)}: "
            f"part of it lies outside the valid area of that projection")
    out = _polygonal(out)
    if out.is_empty:
        raise RequestError("the area of interest is empty after projecting it to the cache's spatial reference")
    return out


def _as_area(geom: BaseGeometry) -> Area:
    bounds = tuple(float(v) for v in geom.bounds)
    # an axis-aligned rectangle (an envelope, or one projected by a cylindrical projection)
    if geom.geom_type == "Polygon" and not geom.interiors and abs(geom.area - shapely.box(*bounds).area) <= \
            1e-12 * max(shapely.box(*bounds).area, 1e-300):
        return Area(bounds)
    return Area(bounds, geom)


def request_area(extent: str | dict | None, aoi: str | dict | None, aoi_sr: Any, target: SpatialRef, *,
                 max_vertices: int | None = None) -> Area | None:
    """The export area of a request in `target` coordinates; None for the full extent (no extent, no AOI)."""
    try:
        return _request_area(extent, aoi, aoi_sr, target, max_vertices)
    except shapely.errors.GEOSException as e:
        # degenerate input that got past the checks; GEOS says why
        raise RequestError(f"the area cannot be used as a polygon ({e})") from None


def _request_area(extent, aoi, aoi_sr, target: SpatialRef, max_vertices: int | None) -> Area | None:
    given_sr = spatial_ref_from(aoi_sr)
    if aoi is not None:
        parts = parse_aoi(aoi, given_sr or target, given_sr or WGS84, max_vertices=max_vertices)
        projected = [project(g, sr, target, max_vertices=max_vertices) for g, sr in parts]
        geom = projected[0] if len(projected) == 1 else _polygonal(shapely.union_all(projected))
        if geom.is_empty:
            raise RequestError("the area of interest is empty")
        return _as_area(geom)
    ext = parse_extent(extent, given_sr or target) if extent is not None else None
    if ext is None:
        return None
    if same_sr(ext.spatial_ref, target):
        return Area((ext.xmin, ext.ymin, ext.xmax, ext.ymax))
    box = shapely.box(ext.xmin, ext.ymin, ext.xmax, ext.ymax)
    return _as_area(project(box, ext.spatial_ref, target, max_vertices=max_vertices))


def polygon_edges(geom: BaseGeometry) -> np.ndarray:
    """Every ring edge of a (Multi)Polygon as an (n, 4) float64 array: x0, y0, x1, y1."""
    rings = shapely.get_rings(shapely.get_parts(geom))
    xy, idx = shapely.get_coordinates(rings, return_index=True)
    if len(xy) < 2:
        return np.zeros((0, 4), dtype=np.float64)
    same = idx[1:] == idx[:-1]
    return np.ascontiguousarray(np.hstack([xy[:-1][same], xy[1:][same]]), dtype=np.float64)

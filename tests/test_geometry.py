"""Reading extents and areas of interest, spatial references, projecting with densification."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import shapely
from pyproj import Transformer

from tilecrate import geometry
from tilecrate.errors import RequestError
from tilecrate.geometry import (WGS84, Area, crs_for, parse_aoi, parse_extent, request_area, same_sr,
                                spatial_ref_from)
from tilecrate.tiling import WEB_MERCATOR, SpatialRef

TO_3857 = Transformer.from_crs(4326, 3857, always_xy=True)
SQUARE = [[-100, 35], [-100, 45], [-90, 45], [-90, 35], [-100, 35]]
FEATURESET = {"features": [{"geometry": {"rings": [SQUARE], "spatialReference": {"wkid": 4326}}}]}


def _parity(px, py, e) -> bool:
    x0, y0, x1, y1 = e.T
    cross = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(cross & (px < xc)) % 2)


def region(edges, groups):
    """The fill rule, independently: per group the faces of the noded edges with odd crossing parity, unioned."""
    parts = []
    for g in np.unique(groups):
        e = edges[groups == g]
        lines = shapely.MultiLineString([[(a, b), (c, d)] for a, b, c, d in e])
        for face in shapely.get_parts(shapely.polygonize(shapely.get_parts(shapely.node(lines)))):
            p = face.representative_point()
            if _parity(p.x, p.y, e):
                parts.append(face)
    return shapely.union_all(parts) if parts else shapely.MultiPolygon()


def rings_region(rs):
    """The region a reader's ring set means."""
    edges, groups = geometry._ring_edges(rs)
    return region(edges, groups)


def area_region(area: Area):
    return shapely.box(*area.bounds) if area.is_rectangle else region(area.edges, area.groups)


def _one(value, esri_default=WEB_MERCATOR, geojson_default=WGS84, **kw):
    parts = parse_aoi(value, esri_default, geojson_default, **kw)
    assert len(parts) == 1
    rs, sr = parts[0]
    return rings_region(rs), sr


def test_spatial_refs():
    assert spatial_ref_from(4326) == SpatialRef(4326)
    assert spatial_ref_from("3857").code == 3857
    assert spatial_ref_from("EPSG:2154").code == 2154
    assert spatial_ref_from({"wkid": 102100, "latestWkid": 3857}).code == 3857
    assert spatial_ref_from('{"wkid": 4326}').code == 4326
    assert spatial_ref_from(None) is None and spatial_ref_from("") is None
    assert crs_for(SpatialRef(102100)).to_epsg() == 3857
    assert crs_for(SpatialRef(102100, 3857)).to_epsg() == 3857
    assert crs_for(SpatialRef(102003)) is not None            # an ESRI-only code
    wkt = crs_for(SpatialRef(4326)).to_wkt()
    assert crs_for(SpatialRef(wkt=wkt)).to_epsg() == 4326
    assert same_sr(SpatialRef(102100), SpatialRef(3857)) and same_sr(WEB_MERCATOR, SpatialRef(None, 3857))
    assert not same_sr(SpatialRef(4326), WEB_MERCATOR)
    with pytest.raises(RequestError, match="unknown spatial reference"):
        crs_for(SpatialRef(999999))
    with pytest.raises(RequestError, match="spatialReference"):
        spatial_ref_from({"foo": 1})


def test_extent_forms():
    e = parse_extent("1,2,3,4", WEB_MERCATOR)
    assert (e.xmin, e.ymin, e.xmax, e.ymax, e.spatial_ref) == (1, 2, 3, 4, WEB_MERCATOR)
    e = parse_extent('{"xmin":-10,"ymin":-5,"xmax":10,"ymax":5,"spatialReference":{"wkid":4326}}', WEB_MERCATOR)
    assert e.spatial_ref.code == 4326 and e.xmax == 10
    e = parse_extent({"XMIN": 0, "ymin": 0, "xmax": "2", "ymax": 2}, WEB_MERCATOR)
    assert e.spatial_ref == WEB_MERCATOR and e.xmax == 2
    assert parse_extent("DEFAULT", WEB_MERCATOR) is None and parse_extent("default", WEB_MERCATOR) is None


@pytest.mark.parametrize("bad, message", [
    ("1,2,3", "xmin,ymin,xmax,ymax"),
    ("a,b,c,d", "not a number"),
    ("3,2,1,4", "inverted"),
    ("1,2,1,4", "empty"),
    ("1,2,nan,4", "finite"),
    ('{"xmin":1,"ymin":2}', "lacks xmax, ymax"),
    ("{nope", "not valid JSON"),
])
def test_bad_extents(bad, message):
    with pytest.raises(RequestError, match=message):
        parse_extent(bad, WEB_MERCATOR)


def test_featureset_documented_example():
    geom, sr = _one(json.dumps(FEATURESET))
    assert sr.code == 4326
    assert geom.equals(shapely.Polygon(SQUARE))


def test_rings_orientation_holes_and_multipart():
    outer = [[0, 0], [0, 10], [10, 10], [10, 0], [0, 0]]          # clockwise: Esri's outer ring
    hole = [[2, 2], [8, 2], [8, 8], [2, 8], [2, 2]]               # counter-clockwise: Esri's hole
    island = [[4, 4], [4, 6], [6, 6], [6, 4], [4, 4]]             # inside the hole
    other = [[20, 0], [20, 5], [25, 5], [25, 0], [20, 0]]         # a second part
    for rings in ([outer, hole, island, other], [outer[::-1], hole[::-1], island, other[::-1]],
                  [other, island, hole, outer]):
        geom, _ = _one({"rings": rings, "spatialReference": {"wkid": 3857}})
        assert geom.area == pytest.approx(100 - 36 + 4 + 25)
        assert geom.contains(shapely.Point(5, 5)) and not geom.contains(shapely.Point(3, 3))
        assert geom.contains(shapely.Point(22, 2))


def test_many_features_union_and_sr_per_feature():
    """Features in the same spatial reference are read together (one group each); others apart."""
    fs = {"spatialReference": {"wkid": 3857}, "geometryType": "esriGeometryPolygon", "features": [
        {"geometry": {"rings": [[[0, 0], [0, 2], [2, 2], [2, 0], [0, 0]]]}, "attributes": {"OID": 1}},
        {"geometry": {"rings": [[[1, 1], [1, 3], [3, 3], [3, 1], [1, 1]]]}},
        {"geometry": {"rings": [SQUARE], "spatialReference": {"wkid": 4326}}},
        {"geometry": None},
    ]}
    parts = parse_aoi(fs, WEB_MERCATOR, WGS84)
    assert [p[1].code for p in parts] == [3857, 4326]
    assert parts[0][0].group.tolist() == [0, 1] and parts[1][0].group.tolist() == [2]
    area = request_area(None, fs, None, WEB_MERCATOR)
    assert not area.is_rectangle
    # overlapping features are a union (not even-odd across features): 4 + 4 - 1 and the projected square
    got = area_region(area)
    assert got.intersection(shapely.box(-1, -1, 4, 4)).area == pytest.approx(7)
    assert got.area > 7


def test_envelope_and_polygon_forms():
    geom, sr = _one({"xmin": 0, "ymin": 0, "xmax": 4, "ymax": 2, "spatialReference": {"wkid": 4326}})
    assert geom.area == 8 and sr.code == 4326
    geom, sr = _one({"geometry": {"rings": [SQUARE]}, "spatialReference": {"wkid": 4326}})
    assert sr.code == 4326 and geom.area == 100


def test_geojson_forms():
    poly = {"type": "Polygon", "coordinates": [SQUARE, [[-97, 38], [-93, 38], [-93, 42], [-97, 42], [-97, 38]]]}
    geom, sr = _one(poly)
    assert sr == WGS84 and geom.area == 100 - 16
    multi = {"type": "MultiPolygon", "coordinates": [[SQUARE], [[[0, 0], [1, 0], [1, 1], [0, 0]]]]}
    assert _one(multi)[0].area == pytest.approx(100.5)
    feature = {"type": "Feature", "properties": {}, "geometry": poly}
    assert _one(feature)[0].area == 84
    fc = {"type": "FeatureCollection", "features": [feature, {"type": "Feature", "geometry": multi}]}
    (rs, sr), = parse_aoi(fc, WEB_MERCATOR, WGS84)
    assert rs.group.tolist() == [0, 0, 1, 2]     # the Polygon (shell and hole), then each MultiPolygon part
    assert rings_region(rs).area == pytest.approx(84 + 100.5 - 84)   # the union: the square part covers the first
    overlapping = {"type": "MultiPolygon", "coordinates": [[SQUARE], [[[-95, 40], [-80, 40], [-80, 50], [-95, 50]]]]}
    assert _one(overlapping)[0].area == pytest.approx(100 + 150 - 25)   # parts are a union
    legacy = dict(poly, crs={"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::3857"}})
    assert _one(legacy)[1].code == 3857
    assert _one(poly, geojson_default=SpatialRef(3857))[1].code == 3857


def test_invalid_geometry_means_its_even_odd_region():
    """No repair: a self-intersecting ring is its even-odd region (what make_valid gives too)."""
    bowtie = {"rings": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    geom, _ = _one(bowtie)
    assert geom.area == pytest.approx(50)
    assert geom.equals(shapely.make_valid(shapely.Polygon(bowtie["rings"][0])))
    # a pentagram: the even-odd rule leaves the centre pentagon out
    star = [[math.cos(math.pi / 2 + k * 4 * math.pi / 5), math.sin(math.pi / 2 + k * 4 * math.pi / 5)] for k in range(5)]
    geom, _ = _one({"rings": [star]})
    assert not geom.contains(shapely.Point(0, 0)) and geom.contains(shapely.Point(0, 0.7))


@pytest.mark.parametrize("bad, message", [
    ('{"paths": [[[0, 0], [1, 1]]]}', "not a line"),
    ('{"type": "LineString", "coordinates": [[0, 0], [1, 1]]}', "not a GeoJSON LineString"),
    ('{"rings": [[[0, 0], [1, 1], [2, 2], [0, 0]]]}', "empty"),
    ('{"rings": []}', "empty"),
    ('{"features": []}', "empty"),
    ('{"rings": [[[0, 0], [1, "x"], [2, 2], [0, 0]]]}', "not \\[x, y\\] numbers"),
    ('{"rings": [[[0, 0], [1, NaN], [2, 2], [0, 0]]]}', "finite"),
    ('{"foo": 1}', "no 'rings'"),
    ("not json", "must be JSON"),
    ("{bad json", "not valid JSON"),
    ('{"xmin": 5, "ymin": 0, "xmax": 1, "ymax": 1}', "inverted"),
])
def test_bad_aoi(bad, message):
    with pytest.raises(RequestError, match=message):
        parse_aoi(bad, WEB_MERCATOR, WGS84)


def test_vertex_limit_refuses_before_heavy_work(monkeypatch):
    ring = [[math.cos(a), math.sin(a)] for a in np.linspace(0, 2 * math.pi, 2001)]
    with pytest.raises(RequestError, match="more than 1,000 vertices"):
        parse_aoi({"rings": [ring]}, WEB_MERCATOR, WGS84, max_vertices=1000)
    with pytest.raises(RequestError, match="more than 1,000 vertices"):
        request_area(None, {"rings": [ring]}, None, WEB_MERCATOR, limits=geometry.GeometryLimits(max_vertices=1000))
    monkeypatch.setattr(geometry, "MAX_VERTICES", 500)
    with pytest.raises(RequestError, match="MAX_VERTICES"):
        request_area(None, {"rings": [ring]}, None, WEB_MERCATOR)
    monkeypatch.setattr(geometry, "MAX_VERTICES", 5000)
    assert request_area(None, {"rings": [ring]}, None, WEB_MERCATOR) is not None


def test_project_densifies_edges():
    # a long diagonal edge in degrees: its true course in Web Mercator is a curve
    area = request_area(None, {"rings": [[(-60, -50), (60, 70), (60, -50)]]}, 4326, WEB_MERCATOR)
    out = area_region(area)
    # points along the diagonal, projected one by one, lie on the projected boundary
    t = np.linspace(0.05, 0.95, 19)
    lon, lat = -60 + 120 * t, -50 + 120 * t
    x, y = TO_3857.transform(lon, lat)
    d = shapely.distance(shapely.points(x, y), out.boundary)
    assert d.max() < 2_000  # metres: far below a level-10 tile (39 km); without densifying it is ~1 000 km
    straight = shapely.LineString(TO_3857.transform([-60, 60], [-50, 70]))
    assert shapely.distance(shapely.points(x, y), straight).max() > 500_000


def test_project_clips_to_web_mercator_latitudes():
    area = request_area("-10,80,10,89.9", None, 4326, WEB_MERCATOR)
    assert area.is_rectangle
    assert area.bounds[3] == pytest.approx(TO_3857.transform(0, 85.06)[1], rel=1e-3)
    with pytest.raises(RequestError, match="outside"):
        request_area("-10,86,10,89.9", None, 4326, WEB_MERCATOR)


def test_request_area_forms():
    # extent in the cache's SR: the rectangle itself
    a = request_area("1,2,3,4", None, None, WEB_MERCATOR)
    assert a.is_rectangle and a.bounds == (1, 2, 3, 4)
    # an extent in degrees stays a rectangle in Web Mercator (a cylindrical projection)
    a = request_area('{"xmin":-10,"ymin":40,"xmax":10,"ymax":50,"spatialReference":{"wkid":4326}}',
                     None, None, WEB_MERCATOR)
    x0, y0 = TO_3857.transform(-10, 40)
    x1, y1 = TO_3857.transform(10, 50)
    assert a.is_rectangle and a.bounds == pytest.approx((x0, y0, x1, y1))
    # aoi_sr names the SR of an extent without one
    assert request_area("-10,40,10,50", None, 4326, WEB_MERCATOR).bounds == pytest.approx((x0, y0, x1, y1))
    # the AOI supersedes the extent
    a = request_area("1,2,3,4", FEATURESET, None, WEB_MERCATOR)
    assert a.bounds[0] == pytest.approx(TO_3857.transform(-100, 35)[0])
    assert request_area(None, None, None, WEB_MERCATOR) is None
    assert request_area("DEFAULT", None, None, WEB_MERCATOR) is None
    tri = request_area(None, {"rings": [[[0, 0], [0, 1], [1, 0], [0, 0]]]}, None, WEB_MERCATOR)
    assert not tri.is_rectangle and tri.vertex_count == 3


def test_area_edges_from_shapely():
    poly = shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 1)]])
    area = Area.from_shapely(shapely.MultiPolygon([poly, shapely.box(10, 10, 11, 12)]))
    edges = area.edges
    assert edges.shape == (4 + 3 + 4, 4) and sorted(area.groups.tolist()) == [0] * 7 + [1] * 4
    # every ring is closed: each edge's end is some edge's start; no edge joins two rings
    assert sorted(map(tuple, edges[:, 2:].tolist())) == sorted(map(tuple, edges[:, :2].tolist()))
    assert not ((edges[:, :2] == [2, 2]).all(axis=1) & (edges[:, 2:] == [0, 0]).all(axis=1)).any()
    # top edges first (each level's rasterizer takes them in row order as they are)
    top = np.maximum(edges[:, 1], edges[:, 3])
    assert (np.diff(top) <= 0).all()
    assert area_region(area).equals(shapely.MultiPolygon([poly, shapely.box(10, 10, 11, 12)]))


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=5),
    st.dictionaries(st.sampled_from(["rings", "features", "geometry", "type", "coordinates", "xmin", "ymin",
                                     "xmax", "ymax", "spatialReference", "wkid", "latestWkid", "wkt", "crs",
                                     "geometries", "paths"]), kids, max_size=6)), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(_json, _json)
def test_junk_areas_raise_request_errors_only(aoi, extent):
    """Whatever arrives, the answer is an Area, None, or a RequestError: never another exception."""
    for a, e in ((aoi, None), (None, extent), (json.dumps(aoi), None), (None, json.dumps(extent))):
        try:
            request_area(e, a, None, WEB_MERCATOR)
        except RequestError:
            pass


_coord = st.one_of(st.floats(-200, 200), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**7, 10**7))
_ring = st.lists(st.lists(_coord, min_size=2, max_size=3), max_size=8)
_sr = st.one_of(st.none(), st.fixed_dictionaries({"wkid": st.sampled_from([4326, 3857, 102100, 2154, 0, -1, 99999999])}),
                st.fixed_dictionaries({"wkt": st.text(max_size=10)}))


@settings(max_examples=200, deadline=None)
@given(st.lists(_ring, max_size=3), _sr, st.sampled_from(["esri", "featureset", "geojson"]))
def test_random_rings_raise_request_errors_only(rings, sr, form):
    if form == "esri":
        aoi = {"rings": rings, "spatialReference": sr}
    elif form == "featureset":
        aoi = {"features": [{"geometry": {"rings": rings, "spatialReference": sr}}]}
    else:
        aoi = {"type": "Polygon", "coordinates": rings}
    try:
        area = request_area(None, aoi, None, WEB_MERCATOR)
    except RequestError:
        return
    assert area.is_rectangle or (len(area.edges) and np.isfinite(area.edges).all())
    assert all(math.isfinite(v) for v in area.bounds)


def test_clipping_keeps_only_the_sides_the_area_reaches():
    """A ∩-shaped ring whose bar lies beyond Web Mercator's 85.06°: clipping leaves its two legs.
    Sutherland-Hodgman joins the exits along the clip line, also across the gap between the
    legs; those edges would take tiles the area never touches, so only odd-coverage stretches stay."""
    legs = [[0, 80], [0, 88], [30, 88], [30, 80], [25, 80], [25, 87], [5, 87], [5, 80]]
    area = request_area(None, {"rings": [legs], "spatialReference": {"wkid": 4326}}, None, WEB_MERCATOR)
    top = area.bounds[3]
    on_top = area.edges[(area.edges[:, 1] == top) & (area.edges[:, 3] == top)]
    xs = sorted(tuple(sorted((a, b))) for a, b in on_top[:, [0, 2]].tolist())
    x = lambda lon: TO_3857.transform(lon, 0)[0]          # noqa: E731
    covered = shapely.union_all([shapely.LineString([(a, 0), (b, 0)]) for a, b in xs])
    assert covered.equals(shapely.MultiLineString([[(x(0), 0), (x(5), 0)], [(x(25), 0), (x(30), 0)]]))
    # and the region is the two legs up to the clip line
    assert area_region(area).area == pytest.approx(2 * (x(5) - x(0)) * (top - TO_3857.transform(0, 80)[1]), rel=1e-6)


def test_clipping_counts_parity_per_feature():
    """Two features overlapping at the clip line: each keeps its own side edges (union across features)."""
    a = [[0, 80], [0, 88], [20, 88], [20, 80]]
    b = [[10, 80], [10, 88], [30, 88], [30, 80]]
    fs = {"features": [{"geometry": {"rings": [a]}}, {"geometry": {"rings": [b]}}], "spatialReference": {"wkid": 4326}}
    area = request_area(None, fs, None, WEB_MERCATOR)
    top = area.bounds[3]
    on_top = area.edges[(area.edges[:, 1] == top) & (area.edges[:, 3] == top)]
    x = lambda lon: TO_3857.transform(lon, 0)[0]          # noqa: E731
    groups = area.groups[(area.edges[:, 1] == top) & (area.edges[:, 3] == top)]
    for g, (lo, hi) in ((0, (0, 20)), (1, (10, 30))):
        segs = on_top[groups == g][:, [0, 2]].tolist()
        covered = shapely.union_all([shapely.LineString([(a, 0), (b, 0)]) for a, b in segs])
        assert covered.bounds == pytest.approx((x(lo), 0, x(hi), 0)) and covered.length == pytest.approx(x(hi) - x(lo))


def test_esri_keys_in_any_case():
    fs = {"Features": [{"Geometry": {"RINGS": [SQUARE], "SpatialReference": {"WKID": 4326}}},
                       {"geometry": {"rings": [SQUARE]}}], "spatialReference": {"wkid": 4326}}
    (rs, sr), = parse_aoi(fs, WEB_MERCATOR, WGS84)
    assert sr.code == 4326 and rs.group.tolist() == [0, 1]

"""Selection over real bundles: level matching, counts against brute force, masks, errors."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import shapely
from pyproj import Transformer

from tilecrate.cache import open_cache
from tilecrate.errors import Cancelled, RequestError
from tilecrate.geometry import Area
from tilecrate.request import ExportRequest
from tilecrate.selection import count_wanted, resolve_levels, select, select_level
from tilecrate.tiling import PACKET, web_mercator_scheme

from conftest import REAL_SOURCES, real_path

TO_4326 = Transformer.from_crs(3857, 4326, always_xy=True)
BBOX_4326 = (3.3, 41.7, 27.9, 55.4)                 # not aligned with any tile edge
POLY_4326 = [(-12.3, 30.1), (31.7, 58.3), (38.2, 9.7), (4.4, -21.9), (-12.3, 30.1)]


def brute_force(cache, levels, geom_4326) -> dict[int, int]:
    """Tiles per level whose bounds, taken to EPSG:4326 with pyproj, touch a geometry given in 4326."""
    out = {lv: 0 for lv in levels}
    for lv, row, col, _ in cache.iter_tiles():
        if lv not in out:
            continue
        x0, y0, x1, y1 = cache.scheme.tile_bounds(lv, row, col)
        lon, lat = TO_4326.transform([x0, x1], [y0, y1])
        # Web Mercator keeps meridians and parallels straight: the tile is a lon/lat box
        if shapely.box(lon[0], lat[0], lon[1], lat[1]).intersects(geom_4326):
            out[lv] += 1
    return out


@pytest.fixture(scope="module")
def v2(sample_v2):
    with open_cache(str(sample_v2)) as c:
        yield c


def test_full_selection_matches_level_summary(v2):
    sel = select(v2, ExportRequest("0-5"))
    summary = v2.level_summary()
    assert [ls.level for ls in sel.levels] == list(range(6))
    for ls in sel.levels:
        assert ls.tiles == summary[ls.level]["tiles"] and ls.tile_bytes == summary[ls.level]["bytes"]
    assert sel.tiles == 123 == sum(v["tiles"] for v in summary.values())


def test_bbox_in_4326_matches_brute_force(v2):
    extent = {"xmin": BBOX_4326[0], "ymin": BBOX_4326[1], "xmax": BBOX_4326[2], "ymax": BBOX_4326[3],
              "spatialReference": {"wkid": 4326}}
    sel = select(v2, ExportRequest("0-5", extent=json.dumps(extent)))
    expected = brute_force(v2, range(6), shapely.box(*BBOX_4326))
    assert {ls.level: ls.tiles for ls in sel.levels} == expected
    assert 0 < sel.tiles < 123
    # the same box as a CSV extent with --aoi-sr, and as an Esri polygon AOI
    csv = ",".join(map(str, BBOX_4326))
    assert select(v2, ExportRequest("0-5", extent=csv, aoi_sr=4326)).tiles == sel.tiles
    ring = [[BBOX_4326[0], BBOX_4326[1]], [BBOX_4326[0], BBOX_4326[3]], [BBOX_4326[2], BBOX_4326[3]],
            [BBOX_4326[2], BBOX_4326[1]], [BBOX_4326[0], BBOX_4326[1]]]
    aoi = {"features": [{"geometry": {"rings": [ring], "spatialReference": {"wkid": 4326}}}]}
    assert select(v2, ExportRequest("0-5", area_of_interest=aoi)).tiles == sel.tiles


def test_polygon_in_4326_matches_brute_force(v2):
    aoi = {"features": [{"geometry": {"rings": [POLY_4326], "spatialReference": {"wkid": 4326}}}]}
    sel = select(v2, ExportRequest("0-5", area_of_interest=json.dumps(aoi)))
    expected = brute_force(v2, range(6), shapely.Polygon(POLY_4326))
    assert {ls.level: ls.tiles for ls in sel.levels} == expected
    assert sel.tiles < select(v2, ExportRequest("0-5", extent=",".join(map(str, shapely.Polygon(POLY_4326).bounds)),
                                                aoi_sr=4326)).tiles
    geojson = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [POLY_4326]}}
    assert select(v2, ExportRequest("0-5", area_of_interest=geojson)).tiles == sel.tiles


def test_masks_are_wanted_and_present(v2):
    aoi = {"rings": [POLY_4326], "spatialReference": {"wkid": 4326}}
    sel = select(v2, ExportRequest("3-5", area_of_interest=aoi))
    assert list(sel.bundles())
    for b in sel.bundles():
        _, sizes = v2.index(b.ref)
        assert b.mask.dtype == np.uint8 and b.mask.shape == (PACKET, PACKET) and b.mask.flags.c_contiguous
        assert int(b.mask.sum()) == b.tiles > 0
        flat = b.mask.ravel().astype(bool)
        assert (sizes[flat] > 0).all()
        assert int(sizes[flat].sum()) == b.tile_bytes
    assert sel.tiles == sum(b.tiles for b in sel.bundles())


def test_rectangle_fast_path_equals_rasterized_polygon(v2):
    b = (-1_500_000.5, -900_000.25, 3_200_000.75, 6_100_000.5)
    for lv in range(6):
        fast = select_level(v2, lv, Area(b))
        slow = select_level(v2, lv, Area.from_shapely(shapely.box(*b)))
        assert fast.tiles == slow.tiles and fast.tile_bytes == slow.tile_bytes
        for x, y in zip(fast.bundles, slow.bundles):
            assert x.ref == y.ref and np.array_equal(x.mask, y.mask)


def test_v1_and_v2_select_the_same(sample_v1, v2):
    aoi = {"rings": [POLY_4326], "spatialReference": {"wkid": 4326}}
    with open_cache(str(sample_v1)) as v1:
        a = select(v1, ExportRequest("0-5", area_of_interest=aoi))
    b = select(v2, ExportRequest("0-5", area_of_interest=aoi))
    assert [(ls.level, ls.tiles) for ls in a.levels] == [(ls.level, ls.tiles) for ls in b.levels]


def test_levels_without_bundles_select_nothing(v2):
    sel = select(v2, ExportRequest("5-8"))
    assert [(ls.level, ls.tiles) for ls in sel.levels] == [(5, 84), (6, 0), (7, 0), (8, 0)]


def test_resolve_levels_by_scale_and_resolution():
    scheme = web_mercator_scheme(20)
    scales = [lod.scale for lod in scheme.lods]
    res = [lod.resolution for lod in scheme.lods]
    assert resolve_levels(scheme, "LevelID", [(1, 4), (7, 9)]) == [1, 2, 3, 4, 7, 8, 9]
    # values rounded as clients copy them, ranges in either order
    assert resolve_levels(scheme, "Scale", [(round(scales[5], 2), round(scales[5], 2))]) == [5]
    assert resolve_levels(scheme, "Scale", [(round(scales[3]), round(scales[6]))]) == [3, 4, 5, 6]
    assert resolve_levels(scheme, "Scale", [(scales[6], scales[3])]) == [3, 4, 5, 6]
    assert resolve_levels(scheme, "Resolution", [(round(res[10], 4), round(res[10], 4)), (res[2], res[1])]) == [1, 2, 10]
    req = ExportRequest("18489297.737236-9244648.868618", export_by="scale")
    assert resolve_levels(scheme, req.export_by, req.level_items) == [5, 6]


@pytest.mark.parametrize("by, items, message", [
    ("LevelID", [(18, 25)], r"level 20-25 not in the cache's tiling scheme \(it has levels 0-19\)"),
    ("LevelID", [(3, 3), (40, 40)], "level 40 not in"),
    ("LevelID", [(1.5, 1.5)], "not a whole number"),
    ("Scale", [(12345.0, 12345.0)], "scale 12345 matches no level"),
    ("Scale", [(1.0, 2.0)], "matches no level"),
    ("Resolution", [(-1.0, -1.0)], "not positive"),
])
def test_resolve_levels_errors(by, items, message):
    with pytest.raises(RequestError, match=message):
        resolve_levels(web_mercator_scheme(20), by, items)


def test_area_outside_the_cache_is_refused(v2):
    far = {"rings": [[[150, -40], [150, -30], [160, -30], [160, -40], [150, -40]]], "spatialReference": {"wkid": 4326}}
    with pytest.raises(RequestError, match="outside the cache's extent"):
        select(v2, ExportRequest("0-5", area_of_interest=far))
    with pytest.raises(RequestError, match="outside"):
        select(v2, ExportRequest("0-5", extent="150,-40,160,-30", aoi_sr=4326))


def test_cancel(v2):
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        select(v2, ExportRequest("0-5"), cancel=ev)
    with pytest.raises(Cancelled):
        select(v2, ExportRequest("0-5", extent=",".join(map(str, BBOX_4326)), aoi_sr=4326), cancel=ev)


def test_real_geographic_cache_512px():
    # wgs84.tpkx: EPSG:4326, 512 px tiles; an extent in its own SR against brute force
    with open_cache(str(real_path("wgs84.tpkx"))) as c:
        box = (-20.3, -10.7, 60.1, 50.2)
        sel = select(c, ExportRequest("0-5", extent=",".join(map(str, box))))
        expected = {lv: 0 for lv in range(6)}
        for lv, row, col, _ in c.iter_tiles():
            if shapely.box(*c.scheme.tile_bounds(lv, row, col)).intersects(shapely.box(*box)):
                expected[lv] += 1
        assert {ls.level: ls.tiles for ls in sel.levels} == expected
        assert 0 < sel.tiles < sum(c.level_summary()[lv]["tiles"] for lv in range(6))


def test_count_wanted_without_presence():
    scheme = web_mercator_scheme(20)
    half = 20037508.342787
    # the world at level z is 4**z tiles, plus (rows, cols >= 0) the row and column touching its far edges
    world = Area((-half, -half, half, half))
    assert count_wanted(scheme, world, [0, 3]) == {0: 2 * 2, 3: 9 * 9}
    q = Area.from_shapely(shapely.box(-half, 0.5, -0.5, half))
    assert not q.is_rectangle or q.edges is None
    assert count_wanted(scheme, q, [4]) == {4: 8 * 8}


@pytest.mark.parametrize("key", sorted(REAL_SOURCES))
def test_real_sources_full_and_full_extent(key):
    """Every real cache: everything selects the tiles PROVENANCE.md lists; so does its own full extent."""
    with open_cache(str(real_path(key))) as c:
        levels = f"{c.levels[0]}-{c.levels[-1]}"
        full = select(c, ExportRequest(levels))
        expected = REAL_SOURCES[key][1]
        assert {ls.level: ls.tiles for ls in full.levels if ls.tiles} == expected
        if c.full_extent is not None:
            assert select(c, ExportRequest(levels, extent=c.full_extent.to_json())).tiles == full.tiles


def test_huge_extent_selects_everything(v2):
    sel = select(v2, ExportRequest("0-5", extent="-1e300,-1e300,1e300,1e300"))
    assert sel.tiles == 123


def test_absurd_polygon_coordinates_are_refused(v2):
    ring = [[-1e300, -1e300], [1e300, -1e300], [0, 1e300], [-1e300, -1e300]]
    with pytest.raises(RequestError, match="coordinate beyond"):
        select(v2, ExportRequest("0-5", area_of_interest={"rings": [ring]}))


def test_level_20_over_a_continent_visits_only_existing_bundles(tmp_path):
    """Two bundles at level 20 under a Europe-sized AOI: selected from spans of their own rows only."""
    from pyproj import Transformer as T

    from tilecrate.sample import SampleSpec, _conf_xml, _v2_bundle

    root = tmp_path / "deep"
    (root / "_alllayers" / "L20").mkdir(parents=True)
    (root / "conf.xml").write_text(_conf_xml(SampleSpec()))
    scheme = web_mercator_scheme(24)
    inside_lonlat, outside_lonlat = (10.0, 50.0), (-40.0, 50.0)
    refs = []
    for lon, lat in (inside_lonlat, outside_lonlat):
        x, y = T.from_crs(4326, 3857, always_xy=True).transform(lon, lat)
        row, col = scheme.tile_at(20, x, y)
        row0, col0 = row // PACKET * PACKET, col // PACKET * PACKET
        tiles = {i: b"\xff\xd8\xff" + bytes(10 + i % 7) for i in range(0, 16384, 5)}
        (root / "_alllayers" / "L20" / f"R{row0:04x}C{col0:04x}.bundle").write_bytes(_v2_bundle(tiles))
        refs.append((row0, col0))
    europe = {"rings": [[[-10, 35], [-10, 70], [40, 70], [40, 35], [-10, 35]]], "spatialReference": {"wkid": 4326}}
    europe["rings"][0].insert(2, [15, 72])   # not a rectangle: the rasterizer runs
    with open_cache(str(root)) as c:
        sel = select(c, ExportRequest("20", area_of_interest=europe))
    assert [b.ref[1:] for b in sel.bundles()] == [refs[0]]
    assert sel.tiles == len(range(0, 16384, 5))


def test_level_selection_tile_range():
    from tilecrate.cache import BundleRef
    from tilecrate.selection import BundleSelection, LevelSelection

    def bsel(row0, col0, cells):
        m = np.zeros((128, 128), np.uint8)
        for r, c in cells:
            m[r, c] = 1
        return BundleSelection(BundleRef(9, row0, col0), m, len(cells), 0)

    lv = LevelSelection(9, [bsel(0, 128, [(5, 7), (100, 0)]), bsel(128, 0, [(0, 127), (3, 3)]),
                            bsel(256, 256, [])])
    assert lv.tile_range() == (5, 131, 3, 135)
    assert LevelSelection(9, [bsel(0, 0, [])]).tile_range() is None

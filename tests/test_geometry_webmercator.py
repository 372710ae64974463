"""WGS 84 -> Web Mercator in closed form (geometry._web_mercator): the same doubles as pyproj, the same areas
as the pyproj path, and no pyproj in the process of a bbox export in degrees."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pyproj import CRS, Transformer

from tilecrate import geometry
from tilecrate.geometry import WGS84, request_area
from tilecrate.tiling import SpatialRef

MERCATOR = SpatialRef(102100, 3857)


def test_closed_form_gives_pyprojs_doubles():
    rng = np.random.default_rng(11)
    lon = np.concatenate([rng.uniform(-180, 180, 50_000), np.round(rng.uniform(-180, 180, 2000), 4),
                          [-180.0, 180.0, 0.0, -0.0, 1e-300, -10.0, 40.0, 179.999999999]])
    lat = np.concatenate([rng.uniform(-85.06, 85.06, 50_000), np.round(rng.uniform(-85.06, 85.06, 2000), 4),
                          [-85.06, 85.06, 0.0, -0.0, -1e-300, 30.0, 60.0, 85.0511287798066]])
    want = Transformer.from_crs(CRS.from_epsg(4326), CRS.from_epsg(3857), always_xy=True).transform(lon, lat)
    got = geometry._web_mercator(lon, lat)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    aou = CRS.from_epsg(3857).area_of_use
    a = geometry._AreaOfUse
    assert (a.west, a.south, a.east, a.north) == (aou.west, aou.south, aou.east, aou.north)


@pytest.mark.parametrize("src,dst,fast", [
    (WGS84, MERCATOR, True), (SpatialRef(4326), SpatialRef(3857), True), (SpatialRef(4326), SpatialRef(900913), True),
    (SpatialRef(4326), SpatialRef(3857, 4326), False),       # codes shared: same_sr calls them the same
    (SpatialRef(4269), MERCATOR, False), (SpatialRef(None, wkt='GEOGCS["x"]'), MERCATOR, False),
    (MERCATOR, WGS84, False), (SpatialRef(0, 4326), MERCATOR, True), (SpatialRef(4326, 0), MERCATOR, False)])
def test_which_pairs_take_the_closed_form(src, dst, fast):
    assert geometry._wgs84_to_web_mercator(src, dst) is fast


AOIS = [
    ("-10,30,40,60", None),                                   # the benchmark's bbox
    ("-200,-89,200,89", None),                                # clipped to the area of use
    ("179.5,-10,180,10", None),
    (None, {"type": "Polygon", "coordinates": [[[-5, 40], [10, 61.3], [25.25, 35], [3, 20], [-5, 40]],
                                                [[2, 38], [8, 45], [12, 36], [2, 38]]]}),
    (None, {"type": "MultiPolygon", "coordinates": [[[[-170, -80], [170, -80], [170, 88], [-170, 88],
                                                       [-170, -80]]], [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]]}),
]


@pytest.mark.parametrize("extent,aoi", AOIS)
def test_same_area_as_the_pyproj_path(monkeypatch, extent, aoi):
    def area():
        return request_area(extent, json.dumps(aoi) if aoi else None, 4326, MERCATOR)

    fast = area()
    monkeypatch.setattr(geometry, "_wgs84_to_web_mercator", lambda a, b: False)
    slow = area()
    assert fast.bounds == slow.bounds
    for a, b in ((fast.edges, slow.edges), (fast.groups, slow.groups)):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_outside_the_area_of_use_is_the_same_error(monkeypatch):
    with pytest.raises(Exception) as fast:
        request_area("-10,86,10,89", None, 4326, MERCATOR)
    monkeypatch.setattr(geometry, "_wgs84_to_web_mercator", lambda a, b: False)
    with pytest.raises(Exception) as slow:
        request_area("-10,86,10,89", None, 4326, MERCATOR)
    assert type(fast.value) is type(slow.value) and str(fast.value) == str(slow.value)


def test_bbox_export_in_degrees_does_not_load_pyproj(tmp_path, sample_v2):
    out = tmp_path / "b.tpkx"
    args = ["export", str(sample_v2), "-o", str(out), "--levels", "0-4", "--extent=-10,30,40,60", "--aoi-sr", "4326",
            "--json"]
    code = ("import sys, json\nfrom tilecrate.cli import main\nrc = main(%r)\n"
            "print(json.dumps(sorted(m for m in ('pyproj', 'shapely') if m in sys.modules)))\nsys.exit(rc)" % (args,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    *result, loaded = r.stdout.strip().splitlines()
    assert json.loads(loaded) == [] and json.loads("\n".join(result))["tiles"] > 0

"""Hostile areas of interest cost what they are worth: an answer (a correct selection or a clear
error) in bounded time and memory.

Each case runs in a child process with an address-space limit and a timeout, so a regression
(make_valid on a 20 000-vertex zigzag went past 3.8 GB; a 200 000-vertex star ran for minutes)
fails the test instead of eating the machine. The selections are checked against an independent
brute force over the sample cache's tiles (in degrees: Web Mercator keeps meridians and
parallels straight, so a tile is a lon/lat box).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import shapely

from tilecrate.cache import open_cache
from tilecrate.errors import Cancelled, RequestError
from tilecrate.geometry import GeometryLimits, line_crossings, request_area, validate_request_area
from tilecrate.request import ExportRequest
from tilecrate.selection import select, validate_request
from tilecrate.tiling import WEB_MERCATOR

MEMORY_LIMIT = 1536 * 2**20     # address space of the child: far above what the answers need
TIMEOUT = 90                    # seconds; the answers take about one on an idle core


def zigzag(n: int = 20_000) -> list:
    """A sawtooth between latitudes 0 and 50 whose closing edge runs back under every tooth."""
    x = np.linspace(-10.0, 30.0, n)
    y = np.where(np.arange(n) % 2 == 0, 0.0, 50.0)
    return np.column_stack([x, y]).tolist()


def nested_squares(n: int = 10_000) -> list:
    """n concentric squares around (10, 10): even-odd makes them alternate in and out."""
    return [[[10 - h, 10 - h], [10 - h, 10 + h], [10 + h, 10 + h], [10 + h, 10 - h], [10 - h, 10 - h]]
            for h in (20.0 * (i + 1) / n for i in range(n))]


def star(n: int = 200_000) -> list:
    """A self-intersecting star polygon {n/m}: chords nearly through the centre, ~n^2/4 crossings."""
    m = n // 2 - 1
    k = np.arange(n)
    a = 2 * math.pi * ((k * m) % n) / n
    return np.column_stack([10 + 30 * np.cos(a), 10 + 30 * np.sin(a)]).tolist()


CASES = {
    "zigzag": lambda: {"rings": [zigzag()], "spatialReference": {"wkid": 4326}},
    "nested": lambda: {"rings": nested_squares(), "spatialReference": {"wkid": 4326}},
    "star": lambda: {"rings": [star()], "spatialReference": {"wkid": 4326}},
}

CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from tilecrate.cache import open_cache
from tilecrate.errors import RequestError
from tilecrate.request import ExportRequest
from tilecrate.selection import select

aoi = open(sys.argv[2]).read()
with open_cache(sys.argv[1]) as c:
    try:
        sel = select(c, ExportRequest("0-5", area_of_interest=aoi))
        print(json.dumps({{"levels": {{str(ls.level): ls.tiles for ls in sel.levels}}}}))
    except RequestError as e:
        print(json.dumps({{"error": str(e)}}))
"""


def run_child(cache, aoi_text: str, tmp_path) -> dict:
    path = tmp_path / "aoi.json"
    path.write_text(aoi_text)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    try:
        run = subprocess.run([sys.executable, "-c", CHILD.format(limit=MEMORY_LIMIT), str(cache), str(path)],
                             capture_output=True, text=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no answer within {TIMEOUT} s")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def brute_force(cache, rings: list) -> dict[str, int]:
    """Tiles per level whose lon/lat box meets a ring edge or has its centre inside (even-odd)."""
    from pyproj import Transformer

    to_ll = Transformer.from_crs(3857, 4326, always_xy=True)
    edges = np.vstack([np.hstack([np.asarray(r), np.roll(np.asarray(r), -1, axis=0)]) for r in rings])
    x0, y0, x1, y1 = edges.T
    lines = shapely.STRtree(shapely.linestrings(np.stack([edges[:, :2], edges[:, 2:]], axis=1)))
    out: dict[str, int] = {}
    for lv, row, col, _ in cache.iter_tiles():
        bx0, by0, bx1, by1 = cache.scheme.tile_bounds(lv, row, col)
        (lon0, lon1), (lat0, lat1) = to_ll.transform([bx0, bx1], [by0, by1])
        hit = len(lines.query(shapely.box(lon0, lat0, lon1, lat1), predicate="intersects")) > 0
        if not hit:
            cx, cy = (lon0 + lon1) / 2, (lat0 + lat1) / 2
            cross = (y0 > cy) != (y1 > cy)
            with np.errstate(divide="ignore", invalid="ignore"):
                xc = x0 + (cy - y0) * (x1 - x0) / (y1 - y0)
            hit = bool(np.count_nonzero(cross & (cx < xc)) % 2)
        out[str(lv)] = out.get(str(lv), 0) + int(hit)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_area_answers_in_bounded_time_and_memory(case, sample_v2, tmp_path):
    aoi = CASES[case]()
    got = run_child(sample_v2, json.dumps(aoi), tmp_path)
    if case == "star":
        # ~200 000 edges cross the centre line: refused with the reason, before any rasterizing
        assert "error" in got and "too convoluted" in got["error"] and "\n" not in got["error"]
        return
    assert "levels" in got, got
    with open_cache(str(sample_v2)) as c:
        expected = brute_force(c, aoi["rings"])
    assert got["levels"] == {k: v for k, v in expected.items() if k in got["levels"]}
    assert 0 < sum(got["levels"].values()) < 123


def test_nested_squares_alternate_in_and_out(sample_v2):
    """Even-odd: between the 2nd and 3rd of 4 squares is outside; a ring's edges still take the tiles they touch."""
    rings = [[[10 - h, 10 - h], [10 - h, 10 + h], [10 + h, 10 + h], [10 + h, 10 - h]] for h in (2.0, 5.0, 30.0, 31.0)]
    aoi = {"rings": rings, "spatialReference": {"wkid": 4326}}
    with open_cache(str(sample_v2)) as c:
        sel = select(c, ExportRequest("0-5", area_of_interest=aoi))
        assert {str(ls.level): ls.tiles for ls in sel.levels} == brute_force(c, rings)
        # the level-5 tile holding (10, 10) is in, a tile at (25, 25) (between 5 and 30) is out
        lv5 = {(b.ref.row0 + r, b.ref.col0 + cc) for b in sel.levels[5].bundles for r, cc in zip(*np.nonzero(b.mask))}
    from pyproj import Transformer

    t = Transformer.from_crs(4326, 3857, always_xy=True)
    inside = c.scheme.tile_at(5, *t.transform(10, 10))
    between = c.scheme.tile_at(5, *t.transform(24, 24))
    assert inside in lv5 and between not in lv5


def test_line_crossings_measure():
    sq = np.array([[0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=float)
    assert line_crossings(sq) == 2
    assert line_crossings(np.vstack([sq, sq * 2, sq * 3])) == 6
    assert line_crossings(np.zeros((0, 4))) == 0
    assert line_crossings(np.array([[0, 0, 5, 0]], dtype=float)) == 0    # horizontal edges cross no line
    rng = np.random.default_rng(1)
    for _ in range(300):                  # against the definition: edges active on [ya, yb) at each ya
        e = rng.integers(0, 6, (int(rng.integers(1, 12)), 4)).astype(float)
        ya, yb = np.minimum(e[:, 1], e[:, 3]), np.maximum(e[:, 1], e[:, 3])
        want = max([int(((ya <= y) & (y < yb)).sum()) for y in ya[yb > ya]], default=0)
        assert line_crossings(e) == want


@pytest.mark.parametrize("limits, aoi, message", [
    (GeometryLimits(max_vertices=1000), {"rings": [zigzag(2000)]}, "more than 1,000 vertices"),
    (GeometryLimits(max_rings=100), {"rings": nested_squares(200)}, "more than 100 rings"),
    (GeometryLimits(max_line_crossings=500), {"rings": nested_squares(300)}, "one horizontal line crosses 600"),
    (GeometryLimits(max_line_crossings=500), {"rings": [zigzag(1000)]}, "too convoluted"),
])
def test_limits_refuse_with_one_line(limits, aoi, message):
    aoi = dict(aoi, spatialReference={"wkid": 4326})
    with pytest.raises(RequestError, match=message) as e:
        request_area(None, aoi, None, WEB_MERCATOR, limits=limits)
    assert "\n" not in str(e.value)
    # the same request is admitted under the defaults
    assert request_area(None, aoi, None, WEB_MERCATOR) is not None


def test_limits_from_config():
    assert GeometryLimits.from_config(None) == GeometryLimits()
    assert GeometryLimits.from_config({"max_rings": 5}).max_rings == 5
    with pytest.raises(ValueError, match="unknown geometry limit max_rigns"):
        GeometryLimits.from_config({"max_rigns": 5})
    with pytest.raises(ValueError, match="positive whole number"):
        GeometryLimits(max_vertices=0)


def test_validate_request_area_at_submit(sample_v2):
    good = ExportRequest("0-5", area_of_interest={"rings": [[[0, 0], [0, 10], [10, 10], [0, 0]]],
                                                   "spatialReference": {"wkid": 4326}})
    area = validate_request_area(good, WEB_MERCATOR)
    assert area is not None and not area.is_rectangle
    assert validate_request_area(ExportRequest("0-5"), WEB_MERCATOR) is None
    with pytest.raises(RequestError, match="more than 3 vertices"):
        validate_request_area(good, WEB_MERCATOR, GeometryLimits(max_vertices=3))
    with open_cache(str(sample_v2)) as c:
        assert validate_request(c, good) is not None
        with pytest.raises(RequestError, match="level 40 not in"):
            validate_request(c, ExportRequest("40", area_of_interest=good.area_of_interest))
        far = ExportRequest("0-5", extent="150,-40,160,-30", aoi_sr=4326)
        with pytest.raises(RequestError, match="outside the cache's extent"):
            validate_request(c, far)


def test_cancel_may_be_a_callable(sample_v2):
    calls = []

    def budget():
        calls.append(1)
        return len(calls) > 3

    aoi = {"rings": [[[0, 0], [0, 40], [40, 40], [0, 0]]], "spatialReference": {"wkid": 4326}}
    with open_cache(str(sample_v2)) as c:
        with pytest.raises(Cancelled):
            select(c, ExportRequest("0-5", area_of_interest=aoi), cancel=budget)

        class OverBudget(Exception):
            pass

        def raising():
            raise OverBudget("the job used more than its 1 s")

        with pytest.raises(OverBudget):
            select(c, ExportRequest("0-5", area_of_interest=aoi), cancel=raising)
        assert select(c, ExportRequest("0-5", area_of_interest=aoi), cancel=lambda: False).tiles > 0


# --------------------------------------------------------------------------------------------
# item 5: nested JSON and non-Earth spatial references are one-line RequestErrors

DEEP = 5000
MARS = ('GEOGCS["Mars 2000",DATUM["D_Mars_2000",SPHEROID["Mars_2000_IAU_IAG",3396190.0,169.8944472236118]],'
        'PRIMEM["Greenwich",0],UNIT["Degree",0.0174532925199433]]')


@pytest.mark.parametrize("field, value", [
    ("levels", "[" * DEEP + "]" * DEEP),
    ("levels", "[[[[[1]]]]]"),
    ("area_of_interest", '{"rings":' + "[" * DEEP + "]" * DEEP + "}"),
    ("area_of_interest", '{"type": "GeometryCollection", "geometries": [' * 200 + "]}" * 200),
    ("area_of_interest", '{"geometry":' * DEEP + "{}" + "}" * DEEP),
    ("extent", '{"extent":' * DEEP + "{}" + "}" * DEEP),
    ("extent", '{"extent":' * 500 + '{"xmin":0,"ymin":0,"xmax":1,"ymax":1}' + "}" * 500),
    ("aoi_sr", '{"wkid":' + "[" * DEEP + "]" * DEEP + "}"),
    ("aoi_sr", "{" * DEEP),
])
def test_nested_json_is_a_one_line_error(field, value, sample_v2):
    kw = {"levels": "0-5", field: value}
    if field == "aoi_sr":
        kw["extent"] = "0,0,10,10"
    with pytest.raises(RequestError) as e:
        req = ExportRequest(**kw)
        with open_cache(str(sample_v2)) as c:
            select(c, req)
    text = str(e.value)
    assert "\n" not in text and len(text) < 400, text


def test_nested_python_objects_are_refused():
    """The Python API may hand over nested or cyclic objects: no RecursionError, no str() of them."""
    deep: list = []
    for _ in range(DEEP):
        deep = [deep]
    cyc: dict = {"type": "GeometryCollection"}
    cyc["geometries"] = [cyc]
    with pytest.raises(RequestError):
        ExportRequest((deep, deep))
    with pytest.raises(RequestError):
        ExportRequest("0-5", export_by=deep)
    with pytest.raises(RequestError):
        request_area(None, cyc, None, WEB_MERCATOR)
    with pytest.raises(RequestError):
        request_area("1,2,3,4", None, deep, WEB_MERCATOR)


@pytest.mark.parametrize("where", ["aoi_sr", "extent", "feature"])
def test_non_earth_wkt_is_a_one_line_error(where):
    box = [[0, 0], [0, 10], [10, 10], [10, 0], [0, 0]]
    kw = {"aoi_sr": {"wkt": MARS}, "extent": "0,0,10,10", "aoi": None}
    if where == "extent":
        kw = {"aoi_sr": None, "aoi": None,
              "extent": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1, "spatialReference": {"wkt": MARS}}}
    elif where == "feature":
        kw = {"aoi_sr": None, "extent": None,
              "aoi": {"features": [{"geometry": {"rings": [box], "spatialReference": {"wkt": MARS}}}]}}
    with pytest.raises(RequestError, match="celestial body") as e:
        request_area(kw["extent"], kw["aoi"], kw["aoi_sr"], WEB_MERCATOR)
    assert "\n" not in str(e.value)


def test_huge_or_junk_wkt_is_a_short_error():
    with pytest.raises(RequestError, match="characters long"):
        request_area("0,0,1,1", None, "GEOGCS[" * 10_000, WEB_MERCATOR)
    with pytest.raises(RequestError, match="cannot read the spatial reference WKT") as e:
        request_area("0,0,1,1", None, "PROJCS[" + "x" * 5000 + "]", WEB_MERCATOR)
    assert len(str(e.value)) < 300


def test_importing_selection_does_not_import_pyproj_or_shapely():
    code = ("import sys, tilecrate, tilecrate.selection, tilecrate.geometry;"
            "print(sorted(m for m in ('pyproj', 'shapely') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr[-2000:]


def test_cheap_to_send_expensive_to_handle():
    """Many empty features, or a PROJ set-up per feature (a distinct WKT each): refused up front."""
    lim = GeometryLimits(max_rings=1000)
    with pytest.raises(RequestError, match="more than 1,000 features"):
        request_area(None, {"features": [{}] * 1001}, None, WEB_MERCATOR, limits=lim)
    with pytest.raises(RequestError, match="more than 1,000 features"):
        request_area(None, {"type": "FeatureCollection", "features": [{}] * 1001}, None, WEB_MERCATOR, limits=lim)
    with pytest.raises(RequestError, match="more than 1,000 polygons"):
        request_area(None, {"type": "MultiPolygon", "coordinates": [[]] * 1001}, None, WEB_MERCATOR, limits=lim)
    wkt = ('PROJCS["p{0}",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
           'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
           'PARAMETER["central_meridian",{0}],PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],'
           'PARAMETER["false_northing",0],PARAMETER["latitude_of_origin",0],UNIT["metre",1]]')
    feats = [{"geometry": {"rings": [[[500000, 0], [500000, 1000], [501000, 1000]]],
                           "spatialReference": {"wkt": wkt.format(i)}}} for i in range(50)]
    with pytest.raises(RequestError, match="more than 8 spatial references"):
        request_area(None, {"features": feats}, None, WEB_MERCATOR)

"""Selection speed: AOI rasterize+count over levels 0-18, per-bundle masks, estimates over the large sample,
the worst areas of interest the geometry limits admit, and the edge path vs the make_valid path.

Run: `.venv/bin/pytest benchmarks/bench_selection.py --benchmark-enable [--large-sample data/large]`
Baselines are measured in the same run: shapely tile-box intersection tests on a subsample of
candidate tiles (the obvious way to do it), plain reads of every bundle index, and the repair
path the geometry layer used before (make_valid per ring, nesting by covered_by, union_all).
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import shapely
from pyproj import Transformer

import tilecrate
from tilecrate import _mask
from tilecrate.estimate import estimate
from tilecrate.geometry import Area
from tilecrate.request import ExportRequest
from tilecrate.selection import LevelArea, count_wanted, rect_range, select
from tilecrate.tiling import PACKET, web_mercator_scheme
from conftest import report

TO_3857 = Transformer.from_crs(4326, 3857, always_xy=True)


def wobbly_polygon(n: int = 1000, lon: float = 10.0, lat: float = 50.0, radius_deg: float = 14.0):
    """An n-vertex star-like polygon over Europe (in EPSG:4326 degrees), deterministic."""
    rng = np.random.default_rng(3)
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = radius_deg * (0.75 + 0.2 * np.sin(7 * a) + 0.05 * rng.random(n))
    ring = np.column_stack([lon + r * np.cos(a), lat + 0.6 * r * np.sin(a)])
    return np.vstack([ring, ring[:1]])


@pytest.fixture(scope="module")
def europe():
    ring = wobbly_polygon()
    x, y = TO_3857.transform(ring[:, 0], ring[:, 1])
    poly = shapely.Polygon(np.column_stack([x, y]))
    assert poly.is_valid and shapely.get_num_coordinates(poly) == 1001
    return web_mercator_scheme(19), Area.from_shapely(poly), poly


def _run(benchmark, fn, *args):
    """(result, median seconds): pytest-benchmark's median, or one timed call when benchmarks are disabled."""
    result = benchmark(fn, *args)
    if benchmark.stats is not None:
        return result, benchmark.stats.stats.median
    t0 = time.perf_counter()
    fn(*args)
    return result, time.perf_counter() - t0


def _candidates(scheme, area, levels) -> int:
    total = 0
    for lv in levels:
        r0, r1, c0, c1 = rect_range(scheme, lv, area.bounds)
        total += (r1 - r0 + 1) * (c1 - c0 + 1)
    return total


def _shapely_seconds_per_tile(scheme, area, poly, level: int, sample: int = 100_000) -> float:
    """The baseline: prepared-polygon intersects on tile boxes, timed on a subsample of one level's candidates."""
    r0, r1, c0, c1 = rect_range(scheme, level, area.bounds)
    rng = np.random.default_rng(5)
    rows = rng.integers(r0, r1 + 1, sample)
    cols = rng.integers(c0, c1 + 1, sample)
    w, h = scheme.tile_span(level)
    xmin = scheme.origin_x + cols * w
    ymax = scheme.origin_y - rows * h
    shapely.prepare(poly)
    t0 = time.perf_counter()
    boxes = shapely.box(xmin, ymax - h, xmin + w, ymax)
    hits = shapely.intersects(poly, boxes)
    elapsed = time.perf_counter() - t0
    # cross-check the sampled tiles against the rasterizer: same answer, tile by tile
    la = LevelArea(scheme, level, area)
    ours = np.array([la.count(r, r, c, c) for r, c in zip(rows[:2000].tolist(), cols[:2000].tolist())], bool)
    mismatch = int((ours != hits[:2000]).sum())
    assert mismatch <= 2, f"{mismatch} of 2000 sampled tiles disagree with shapely"  # only float-boundary ties
    return elapsed / sample


def test_rasterize_count_levels_0_18(benchmark, europe, request):
    scheme, area, _ = europe
    levels = list(range(19))
    counts, t = _run(benchmark, count_wanted, scheme, area, levels)
    candidates = _candidates(scheme, area, levels)
    per_tile_shapely = _shapely_seconds_per_tile(scheme, area, europe[2], 12)
    ms_per_million = t * 1e3 / (candidates / 1e6)
    shapely_ms_per_million = per_tile_shapely * 1e9
    report(request, "rasterize+count 1000-vertex AOI, levels 0-18",
           ms=t * 1e3, candidate_tiles=candidates, selected_tiles=sum(counts.values()),
           ms_per_million_candidates=ms_per_million, shapely_ms_per_million=shapely_ms_per_million,
           speedup_vs_shapely=shapely_ms_per_million / ms_per_million)
    assert counts[18] > 0
    assert ms_per_million < 50


def test_masks_per_bundle_level_14(benchmark, europe, request):
    """128x128 masks for every bundle position the AOI's bbox touches at level 14 (no cache needed)."""
    scheme, area, _ = europe
    lv = 14
    r0, r1, c0, c1 = rect_range(scheme, lv, area.bounds)
    band_rows = range(r0 // PACKET * PACKET, r1 + 1, PACKET)
    band_cols = range(c0 // PACKET * PACKET, c1 + 1, PACKET)

    def all_masks():
        la = LevelArea(scheme, lv, area)
        n = 0
        for row0 in band_rows:
            rp, sp = la.band(row0)
            for col0 in band_cols:
                n += _mask.window_mask(rp, sp, col0)[1]
        return n

    n, t = _run(benchmark, all_masks)
    bundles = len(band_rows) * len(band_cols)
    assert n == count_wanted(scheme, area, [lv])[lv]
    report(request, f"per-bundle masks, level {lv}", bundles=bundles, ms=t * 1e3,
           bundles_per_s=bundles / t, tiles=n)


def _large_aoi(cache):
    ring = wobbly_polygon(1000, lon=15.0, lat=15.0, radius_deg=40.0)
    return json.dumps({"features": [{"geometry": {"rings": [ring.tolist()], "spatialReference": {"wkid": 4326}}}]})


def test_estimate_large_sample(benchmark, large_sample, tmp_path, request):
    cache = tilecrate.open_cache(str(large_sample))
    req = ExportRequest("0-10", area_of_interest=_large_aoi(cache))
    paths = [cache._loc(ref).bundle for ref in cache.bundles()]

    def plain_index_reads():
        for p in paths:
            with open(p, "rb") as f:
                f.read(64 + 16384 * 8)

    def run():
        cache._index_cache.clear()   # every estimate re-reads every index, as a fresh process would
        return estimate(cache, req)

    est, t = _run(benchmark, run)
    t0 = time.perf_counter()
    for _ in range(5):
        plain_index_reads()
    t_plain = (time.perf_counter() - t0) / 5
    full = estimate(cache, ExportRequest("0-10"))
    from tilecrate.presence import PresenceStore

    with PresenceStore(str(tmp_path / "presence")) as store:
        estimate(cache, req, presence=store)
        t_store = math.inf
        for _ in range(5):
            cache._index_cache.clear()
            t0 = time.perf_counter()
            estimate(cache, req, presence=store)
            t_store = min(t_store, time.perf_counter() - t0)
    report(request, "estimate over the large sample (AOI, levels 0-10)",
           ms=t * 1e3, bundles=len(paths), tiles=est.total_tiles, of_tiles=full.total_tiles,
           total_size=est.total_size, plain_index_reads_ms=t_plain * 1e3, ratio_to_plain_reads=t / t_plain,
           with_presence_store_ms=t_store * 1e3, presence_speedup=t / t_store)
    assert 0 < est.total_tiles < full.total_tiles


@pytest.fixture(scope="module")
def many_bundles(tmp_path_factory):
    """A V2 cache of 24 x 24 = 576 small bundles at level 12 (tiny fake tiles): index reading dominates."""
    from tilecrate.sample import SampleSpec, _conf_xml, _v2_bundle

    root = tmp_path_factory.mktemp("many") / "cache"
    level_dir = root / "_alllayers" / "L12"
    level_dir.mkdir(parents=True)
    (root / "conf.xml").write_text(_conf_xml(SampleSpec()))
    rng = np.random.default_rng(1)
    for i in range(24):
        for j in range(24):
            cells = rng.choice(16384, 64, replace=False)
            tiles = {int(k): b"\xff\xd8\xff" + bytes(int(rng.integers(50, 400))) for k in cells}
            (level_dir / f"R{(4 + i) * 128:04x}C{(4 + j) * 128:04x}.bundle").write_bytes(_v2_bundle(tiles))
    return root


def test_estimate_presence_store_speedup(benchmark, many_bundles, tmp_path, request):
    from tilecrate.presence import PresenceStore

    cache = tilecrate.open_cache(str(many_bundles))
    half = 20037508.342787
    span = 2 * half / 4096 * 128                       # one level-12 bundle in metres
    x0, y1 = -half + 4 * span, half - 4 * span
    ring = [[x0 + 2.3 * span, y1 - 1.1 * span], [x0 + 22.7 * span, y1 - 3.9 * span],
            [x0 + 20.1 * span, y1 - 23.2 * span], [x0 + 0.6 * span, y1 - 18.4 * span]]
    ring.append(ring[0])
    req = ExportRequest("12", area_of_interest={"rings": [ring], "spatialReference": {"wkid": 3857}})

    def without_store():
        cache._index_cache.clear()
        return estimate(cache, req)

    t0 = time.perf_counter()
    rounds = 5
    for _ in range(rounds):
        plain = without_store()
    t_plain = (time.perf_counter() - t0) / rounds
    store = PresenceStore(str(tmp_path / "presence"))
    t0 = time.perf_counter()
    estimate(cache, req, presence=store)               # first run fills the store
    t_fill = time.perf_counter() - t0

    def with_store():
        cache._index_cache.clear()
        return estimate(cache, req, presence=store)

    est, t_store = _run(benchmark, with_store)

    def timed(fn) -> float:
        best = math.inf
        for _ in range(rounds):
            cache._index_cache.clear()
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    # the selection alone (what the store speeds up; the rest of an estimate is package sizing)
    s_plain = timed(lambda: select(cache, req))
    s_store = timed(lambda: select(cache, req, presence=store))
    store.close()
    assert est.to_json() == plain.to_json() and est.total_tiles > 0
    report(request, "estimate, 576 bundles, LMDB presence store", without_store_ms=t_plain * 1e3,
           first_run_filling_ms=t_fill * 1e3, with_store_ms=t_store * 1e3, estimate_speedup=t_plain / t_store,
           select_without_ms=s_plain * 1e3, select_with_ms=s_store * 1e3, select_speedup=s_plain / s_store,
           bundles=len(cache.bundles()), tiles=est.total_tiles)


# --------------------------------------------------------------------------------------------
# the worst areas the limits admit (issue 9 item 2: under 2 s and 500 MB)

WORST_CHILD = r"""
import json, sys, time
from tilecrate.cache import open_cache
from tilecrate.geometry import validate_request_area
from tilecrate.request import ExportRequest
from tilecrate.selection import select


def status(key):
    # VmHWM is this process image's own high-water mark (ru_maxrss keeps the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024


aoi = open(sys.argv[2]).read()
with open_cache(sys.argv[1]) as c:
    select(c, ExportRequest("0-5", extent="0,0,1,1", aoi_sr=4326))   # warm: pyproj, CRS database
    base = status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    req = ExportRequest("0-5", area_of_interest=aoi)
    area = validate_request_area(req, c.scheme.spatial_ref)
    t1, c1 = time.perf_counter(), time.process_time()
    sel = select(c, req)
    t2, c2 = time.perf_counter(), time.process_time()
    peak = status("VmHWM")
print(json.dumps({"validate_s": t1 - t0, "validate_cpu_s": c1 - c0, "select_s": t2 - t1, "select_cpu_s": c2 - c1,
                  "peak_growth_mb": peak - base, "edges": area.vertex_count, "tiles": sel.tiles}))
"""


def _worst_areas() -> dict[str, str]:
    """At the default limits: MAX_VERTICES in one ring; as many whose lines cross MAX_LINE_CROSSINGS
    edges; MAX_RINGS features; all over the sample's extent, in degrees (so projected)."""
    from tilecrate import geometry as g

    n = g.MAX_VERTICES - 1
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    r = 25 * (0.8 + 0.15 * np.sin(37 * a) + 0.05 * np.sin(1013 * a))
    ring = np.column_stack([10 + r * np.cos(a), 10 + 0.8 * r * np.sin(a)])
    out = {f"{n + 1} vertices, one ring": {"rings": [np.round(ring, 6).tolist()]}}
    teeth = g.MAX_LINE_CROSSINGS // 2 - 2             # each tooth (down and up) crosses a line twice
    per = (g.MAX_VERTICES - 8) // teeth            # vertices per tooth: collinear points along its edges
    t = np.linspace(0, 1, per, endpoint=False)
    xs = np.repeat(np.linspace(-10, 30, teeth + 1)[:-1], per) + np.tile(t, teeth) * (40 / teeth)
    ys = 50 * np.abs(2 * np.tile(t, teeth) - 1)
    out[f"{per * teeth} vertices, {2 * teeth} line crossings"] = {"rings": [np.round(np.column_stack([xs, ys]), 7).tolist()]}
    k = int(math.isqrt(min(g.MAX_RINGS, g.MAX_VERTICES // 4)))
    cx, cy = np.meshgrid(np.linspace(-20, 40, k), np.linspace(-30, 55, k))
    feats = [{"geometry": {"rings": [[[x, y], [x, y + 0.1], [x + 0.1, y + 0.1], [x + 0.1, y]]]}}
             for x, y in zip(np.round(cx.ravel(), 5).tolist(), np.round(cy.ravel(), 5).tolist())]
    out[f"{k * k} features"] = {"features": feats}
    return {name: json.dumps(dict(v, spatialReference={"wkid": 4326})) for name, v in out.items()}


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory):
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("sample") / "cache"
    make_sample(out, SampleSpec())
    return out


def test_worst_admitted_areas(sample_cache, tmp_path, request):
    """Each worst case in a fresh process: time to validate (submit) and to select, and peak RSS growth."""
    import subprocess
    import sys

    for name, text in _worst_areas().items():
        path = tmp_path / "aoi.json"
        path.write_text(text)
        run = subprocess.run([sys.executable, "-c", WORST_CHILD, str(sample_cache), str(path)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        load = os.getloadavg()[0]
        report(request, f"worst admitted AOI: {name}", json_mb=len(text) / 1e6, **got, load_avg=load,
               validate_under_2s=got["validate_s"] < 2, select_under_2s=got["select_s"] < 2,
               under_500mb=got["peak_growth_mb"] < 500)
        assert got["tiles"] > 0
        assert got["peak_growth_mb"] < 500


def test_band_cost_at_max_line_crossings(request):
    """The unit of work between two looks at `cancel`: one bundle row (128 rows) at level 18 under an
    area at the line-crossing limit (every row has that many active edges)."""
    from tilecrate import geometry as g

    teeth = g.MAX_LINE_CROSSINGS // 2
    xs = np.linspace(-1e6, 2e6, 2 * teeth)
    ys = np.where(np.arange(2 * teeth) % 2 == 0, 4e6, 6e6)
    area = g.request_area(None, {"rings": [np.column_stack([xs, ys]).tolist()]}, None, web_mercator_scheme(19).spatial_ref)
    scheme = web_mercator_scheme(19)
    la = LevelArea(scheme, 18, area)
    mid = (la.row0 + la.row1) // 2 // PACKET * PACKET
    t0 = time.perf_counter()
    rp, sp = la.band(mid)
    t = time.perf_counter() - t0
    report(request, "one 128-row band at level 18, area at max_line_crossings", ms=t * 1e3,
           line_crossings=g.line_crossings(area.edges), spans=len(sp))
    assert len(sp) > 0


# --------------------------------------------------------------------------------------------
# the edge path (fill rule, no repair) vs the make_valid path it replaced


def _old_polygonal(geom):
    if geom.is_empty:
        return shapely.MultiPolygon()
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
    polys = [q for p in parts for q in shapely.get_parts(p) if not q.is_empty and q.area > 0]
    if not polys:
        return shapely.MultiPolygon()
    return polys[0] if len(polys) == 1 else shapely.union_all(polys)


def _old_rings_to_geometry(rings):
    """The repair path before: make each ring valid, nest by covered_by, holes by difference, union."""
    polys = [p for p in (_old_polygonal(shapely.Polygon(r)) for r in rings if len(r) >= 3) if not p.is_empty]
    if len(polys) <= 1:
        return polys[0] if polys else shapely.MultiPolygon()
    arr = np.array(polys, dtype=object)
    inner, outer = shapely.STRtree(arr).query(arr, predicate="covered_by")
    keep = inner != outer
    inner, outer = inner[keep], outer[keep]
    depth = np.bincount(inner, minlength=len(polys))
    holes_of: dict[int, list[int]] = {}
    for i, j in zip(inner.tolist(), outer.tolist()):
        if depth[i] % 2 == 1 and depth[j] == depth[i] - 1:
            holes_of.setdefault(j, []).append(i)
    pieces = [p.difference(shapely.union_all([polys[h] for h in holes_of[i]])) if i in holes_of else p
              for i, p in enumerate(polys) if depth[i] % 2 == 0]
    return _old_polygonal(shapely.union_all(pieces))


def _old_path(rings, scheme, levels):
    geom = _old_rings_to_geometry([np.asarray(r, dtype=np.float64) for r in rings])
    return count_wanted(scheme, Area.from_shapely(geom), levels)


def _new_path(rings, scheme, levels):
    from tilecrate.geometry import request_area

    area = request_area(None, {"rings": rings}, None, scheme.spatial_ref)
    return count_wanted(scheme, area, levels)


@pytest.mark.parametrize("shape", ["europe-1000", "nested-200", "zigzag-2000"])
def test_edge_path_vs_make_valid_path(shape, request):
    """Same rings in the cache's coordinates, to tiles counted over levels 0-10; ratio old/new."""
    scheme = web_mercator_scheme(19)
    if shape == "europe-1000":
        ring = wobbly_polygon()
        x, y = TO_3857.transform(ring[:, 0], ring[:, 1])
        rings = [np.column_stack([x, y]).tolist()]
    elif shape == "nested-200":
        rings = [[[-h, -h], [-h, h], [h, h], [h, -h], [-h, -h]] for h in np.linspace(1e5, 4e6, 200)]
    else:
        n = 2000
        rings = [np.column_stack([np.linspace(-1e6, 2e6, n), np.where(np.arange(n) % 2 == 0, 4e6, 6e6)]).tolist()]
    levels = list(range(11))

    def best(fn, rounds=3):
        out, t = None, math.inf
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = fn(rings, scheme, levels)
            t = min(t, time.perf_counter() - t0)
        return out, t

    new, t_new = best(_new_path)
    old, t_old = best(_old_path, rounds=1 if shape != "europe-1000" else 3)
    same = old == new
    report(request, f"area to tiles, {shape}, levels 0-10", edge_path_ms=t_new * 1e3, make_valid_path_ms=t_old * 1e3,
           speedup=t_old / t_new, same_counts=same, tiles=sum(new.values()))
    if shape != "zigzag-2000":     # valid input: both paths mean the same area
        assert same

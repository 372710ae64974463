"""Selection speed: AOI rasterize+count over levels 0-18, per-bundle masks, estimates over the large sample.

Run: `.venv/bin/pytest benchmarks/bench_selection.py --benchmark-enable [--large-sample data/large]`
Baselines are measured in the same run: shapely tile-box intersection tests on a subsample of
candidate tiles (the obvious way to do it), and plain reads of every bundle index.
"""
from __future__ import annotations

import json
import math
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

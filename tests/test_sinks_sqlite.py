"""MBTiles and GeoPackage outputs, read back by GDAL's MBTiles and GPKG drivers (rasterio wheel)."""
from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.windows import Window

from conftest import real_path
from tilecrate.cache import open_cache
from tilecrate.errors import ExportError
from tilecrate.estimate import estimate
from tilecrate.export import export
from tilecrate.request import ExportRequest


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")).transpose(2, 0, 1)


def _gdal_tile(ds, scheme, level: int, row: int, col: int, factor: int) -> np.ndarray:
    """The pixels GDAL returns for a tile's area, read at the tile's own resolution (`factor` = 2^(max-level))."""
    x0, _, _, y1 = scheme.tile_bounds(level, row, col)
    res = ds.res[0]
    size = scheme.tile_cols * factor
    win = Window(round((x0 - ds.bounds.left) / res), round((ds.bounds.top - y1) / res), size, size)
    return ds.read(window=win, out_shape=(ds.count, scheme.tile_cols, scheme.tile_rows), boundless=False)


def _inside(ds, scheme, level, row, col) -> bool:
    x0, y0, x1, y1 = scheme.tile_bounds(level, row, col)
    b = ds.bounds
    eps = ds.res[0] / 2
    return x0 >= b.left - eps and x1 <= b.right + eps and y0 >= b.bottom - eps and y1 <= b.top + eps


def _check_pixels(path, cache) -> int:
    """Every tile of the top level inside GDAL's extent, and one per coarser level, equal the source's pixels."""
    checked = 0
    top = max(cache.levels)
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() in (3857, 4326)
        for level in sorted(cache.levels, reverse=True):
            factor = 1 << (top - level)
            for _, row, col, data in cache.iter_tiles(level):
                if not _inside(ds, cache.scheme, level, row, col):
                    continue
                got = _gdal_tile(ds, cache.scheme, level, row, col, factor)
                want = _pixels(data)
                assert got.shape[0] == 4
                assert np.array_equal(got, want), (path, level, row, col)
                checked += 1
                if level != top:
                    break
    return checked


def test_mbtiles_gdal_reads_source_pixels(sample_png, tmp_path):
    out = tmp_path / "png.mbtiles"
    res = export(str(sample_png), ExportRequest("0-4"), str(out))
    assert res.kind == "mbtiles" and out.stat().st_size == res.size
    with open_cache(str(sample_png)) as cache:
        assert res.tiles == sum(1 for _ in cache.iter_tiles())
        assert _check_pixels(out, cache) >= 10
        db = sqlite3.connect(out)
        try:
            rows = db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
            assert len(rows) == res.tiles
            for z, x, y, data in rows:          # TMS rows: y counted from the bottom
                assert cache.tile(z, (1 << z) - 1 - y, x) == data
            meta = dict(db.execute("SELECT name, value FROM metadata"))
            assert db.execute("PRAGMA application_id").fetchone()[0] == 0x4D504258
            index = db.execute("SELECT sql FROM sqlite_master WHERE name = 'tile_index'").fetchone()[0]
            assert "UNIQUE" in index and "zoom_level, tile_column, tile_row" in index
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        finally:
            db.close()
    for key in ("name", "format", "bounds", "center", "minzoom", "maxzoom", "attribution", "description"):
        assert key in meta
    assert meta["format"] == "png" and (meta["minzoom"], meta["maxzoom"]) == ("0", "4")
    w, s, e, n = map(float, meta["bounds"].split(","))
    lon, lat, z = meta["center"].split(",")
    assert w < float(lon) < e and s < float(lat) < n and z == "0"


def test_gpkg_gdal_reads_source_pixels(sample_png, tmp_path):
    out = tmp_path / "png.gpkg"
    res = export(str(sample_png), ExportRequest("0-4"), str(out))
    assert res.kind == "gpkg"
    with open_cache(str(sample_png)) as cache:
        assert _check_pixels(out, cache) >= 10
        db = sqlite3.connect(out)
        try:
            assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
            assert db.execute("PRAGMA user_version").fetchone()[0] == 10300
            srs = {r[0] for r in db.execute("SELECT srs_id FROM gpkg_spatial_ref_sys")}
            assert {-1, 0, 4326, 3857} <= srs
            (table, dtype, ident, srs_id), = db.execute(
                "SELECT table_name, data_type, identifier, srs_id FROM gpkg_contents").fetchall()
            assert dtype == "tiles" and srs_id == 3857 and ident == cache.name
            mats = db.execute("SELECT zoom_level, matrix_width, matrix_height, pixel_x_size FROM gpkg_tile_matrix "
                              "WHERE table_name = ? ORDER BY zoom_level", (table,)).fetchall()
            assert [(z, w, h) for z, w, h, _ in mats] == [(z, 1 << z, 1 << z) for z in range(5)]
            assert all(a[3] == pytest.approx(2 * b[3]) for a, b in zip(mats, mats[1:]))
            for z, x, y, data in db.execute(f'SELECT zoom_level, tile_column, tile_row, tile_data FROM "{table}"'):
                assert cache.tile(z, y, x) == data      # rows from the top, as ArcGIS counts them
        finally:
            db.close()


def test_gpkg_geographic_512px(tmp_path):
    src = real_path("wgs84.tpkx")
    out = tmp_path / "wgs84.gpkg"
    export(str(src), ExportRequest("0-5"), str(out))
    with open_cache(str(src)) as cache:
        assert cache.scheme.spatial_ref.code == 4326 and cache.scheme.tile_cols == 512
        assert _check_pixels(out, cache) >= 10
        db = sqlite3.connect(out)
        try:
            (minx, maxy, srs), = db.execute("SELECT min_x, max_y, srs_id FROM gpkg_tile_matrix_set").fetchall()
            assert (minx, maxy, srs) == (cache.scheme.origin_x, cache.scheme.origin_y, 4326)
            mats = db.execute("SELECT zoom_level, matrix_width, tile_width FROM gpkg_tile_matrix ORDER BY 1").fetchall()
            assert [m[0] for m in mats] == [0, 1, 2, 3, 4, 5] and all(m[2] == 512 for m in mats)
        finally:
            db.close()


def test_mbtiles_refuses_geographic_scheme(tmp_path):
    out = tmp_path / "x.mbtiles"
    with pytest.raises(ExportError, match="Web Mercator"):
        export(str(real_path("wgs84.tpkx")), ExportRequest("0-1"), str(out))
    assert list(tmp_path.iterdir()) == []


def test_metadata_travels(tmp_path):
    """states_filled.tpk (ArcGIS): its title, summary and credits reach MBTiles and GeoPackage."""
    src = real_path("states_filled.tpk")
    with open_cache(str(src)) as cache:
        item = cache.item
    export(str(src), ExportRequest("0-4"), str(tmp_path / "s.mbtiles"))
    export(str(src), ExportRequest("0-4"), str(tmp_path / "s.gpkg"))
    db = sqlite3.connect(tmp_path / "s.mbtiles")
    meta = dict(db.execute("SELECT name, value FROM metadata"))
    db.close()
    assert meta["name"] == item.title == "states_filled"
    assert meta["attribution"] == "US Census Bureau"
    assert meta["description"] == (item.description or item.summary)
    with rasterio.open(tmp_path / "s.mbtiles") as ds:
        assert ds.tags()["attribution"] == "US Census Bureau"
    db = sqlite3.connect(tmp_path / "s.gpkg")
    ident, desc = db.execute("SELECT identifier, description FROM gpkg_contents").fetchone()
    db.close()
    assert ident == "states_filled" and "US Census Bureau" in desc


def test_levels_extent_polygon_and_reencoding(sample_v2, tmp_path):
    """The same selection as a package: counts equal the estimate; re-encoded tiles are smaller JPEGs."""
    extent = {"xmin": -1e6, "ymin": -1e6, "xmax": 2e6, "ymax": 3e6, "spatialReference": {"wkid": 3857}}
    aoi = {"rings": [[[0, 0], [2e6, 0], [0, 2e6], [0, 0]]], "spatialReference": {"wkid": 3857}}
    for i, req in enumerate([ExportRequest("2-4"), ExportRequest("0-5", extent=json.dumps(extent)),
                             ExportRequest("3-5", area_of_interest=json.dumps(aoi))]):
        want = estimate(str(sample_v2), req).total_tiles
        for ext in ("mbtiles", "gpkg"):
            res = export(str(sample_v2), req, str(tmp_path / f"r{i}.{ext}"))
            assert res.tiles == want > 0
    plain = export(str(sample_v2), ExportRequest("0-5"), str(tmp_path / "plain.mbtiles"))
    small = export(str(sample_v2), ExportRequest("0-5", optimize_tiles_for_size=True, compression_quality=40),
                   str(tmp_path / "q40.mbtiles"))
    assert small.tiles == plain.tiles and small.size < plain.size and small.quality_used == 40
    db = sqlite3.connect(tmp_path / "q40.mbtiles")
    try:
        assert all(d[:3] == b"\xff\xd8\xff" for (d,) in db.execute("SELECT tile_data FROM tiles"))
    finally:
        db.close()


def test_estimate_says_approximate_for_sqlite(sample_v2, tmp_path):
    from tilecrate.plan import make_plan
    from tilecrate.sinks import estimate_open

    plan = make_plan(str(sample_v2), ExportRequest("0-5"))
    for kind in ("mbtiles", "gpkg"):
        total, _, note = estimate_open(plan, kind)
        assert note is not None and "approximate" in note and "SQLite page overhead" in note
        size = export(str(sample_v2), ExportRequest("0-5"), str(tmp_path / f"e.{kind}")).size
        assert abs(total - size) <= 0.03 * size


def test_cli_export_mbtiles_and_gpkg(sample_v2, tmp_path):
    for ext in ("mbtiles", "gpkg"):
        out = tmp_path / f"cli.{ext}"
        done = subprocess.run([sys.executable, "-m", "tilecrate.cli", "export", str(sample_v2), "-o", str(out),
                               "--levels", "0-3", "--json"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["kind"] == ext
        with rasterio.open(out) as ds:
            assert ds.driver == {"mbtiles": "MBTiles", "gpkg": "GPKG"}[ext]
    bad = subprocess.run([sys.executable, "-m", "tilecrate.cli", "export", str(real_path("wgs84.tpkx")), "-o",
                          str(tmp_path / "w.mbtiles"), "--levels", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Web Mercator" in bad.stderr


def test_estimate_command_reports_approximate(sample_v2):
    done = subprocess.run([sys.executable, "-m", "tilecrate.cli", "estimate", str(sample_v2), "--levels", "0-5",
                           "--format", "mbtiles", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["totalTilesToExport"] == 123 and "SQLite page overhead: approximate" in body["approximate"]
    plain = subprocess.run([sys.executable, "-m", "tilecrate.cli", "estimate", str(sample_v2), "--levels", "0-5",
                            "--json"], capture_output=True, text=True, timeout=120)
    assert "approximate" not in json.loads(plain.stdout)

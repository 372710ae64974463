"""MapProxy-made MBTiles and GeoPackages read by tilecrate tile for tile (issue 12).

MapProxy 7.0.0 runs from its own venv, .venv-mapproxy/ (scripts/install.sh; it brings its own Pillow,
which our pillow-simd must not meet). `mapproxy-util export --type mbtile|geopackage` reads real
ArcGIS compact caches with its own bundle reader (cache type `compact`, version 1 or 2) and from a
cache folder tilecrate wrote; tilecrate opens each output and must find the source's tiles, byte for
byte, at the same level, row and column; and MapProxy fetching from a `tilecrate serve` MapServer
exports the served tiles unchanged. MapProxy writes no MBTiles metadata at all, so these are
also the "MBTiles without metadata" of the wild.

MapProxy's compact cache needs a grid with origin nw (on an sw grid it reads every bundle upside
down), and its `mbtile` export from that grid stores the grid's top-down row in tile_row, which the
MBTiles spec defines bottom-up (TMS): read as the spec says, its rows are mirrored. Exporting to an
sw grid instead re-renders every tile from the nw cache and still mirrors them. So its MBTiles are
checked twice: as written (rows mirrored, bytes equal) and with `scheme=xyz` in metadata, the
convention readers honour for top-down files (equal to the source). Its GeoPackages are right as written.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

import tilecrate
from conftest import real_path
from tilecrate.cache import open_cache
from tilecrate.request import ExportRequest

ROOT = Path(__file__).resolve().parents[1]
MAPPROXY_UTIL = Path(os.environ.get("MAPPROXY_UTIL", ROOT / ".venv-mapproxy" / "bin" / "mapproxy-util"))

# real ArcGIS-written compact caches on the Web Mercator grid: (key, compact version)
REAL = [("raster-tiles-compactcache", 2), ("gwc-compactcacheV2", 2), ("gwc-compactcache", 1),
        ("mbtiles2compactcache", 2), ("tiler-newbundle", 2)]
TYPES = {"mbtile": ("mbtiles", ".mbtiles"), "geopackage": ("gpkg", ".gpkg")}


@pytest.fixture(scope="module")
def mapproxy_util() -> Path:
    """The mapproxy-util of .venv-mapproxy (a missing one fails, it is not skipped)."""
    if not MAPPROXY_UTIL.is_file():
        pytest.fail(f"{MAPPROXY_UTIL} not found (scripts/install.sh creates .venv-mapproxy with MapProxy)")
    return MAPPROXY_UTIL


def mapproxy_export(util: Path, alllayers: Path, version: int, levels: list[int], dest: Path,
                    kind: str, workdir: Path, bbox=None) -> Path:
    """`mapproxy-util export` of a compact cache's _alllayers folder to `dest` (type mbtile/geopackage)."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mapproxy.yaml"
    conf.write_text(
        "services:\n  demo:\n"
        "grids:\n  webmercator:\n    base: GLOBAL_WEBMERCATOR\n    origin: nw\n"
        "caches:\n  esri:\n    grids: [webmercator]\n    sources: []\n"
        f"    cache:\n      type: compact\n      version: {version}\n      directory: {alllayers}\n"
        "layers:\n  - name: esri\n    title: esri\n    sources: [esri]\n")
    proc = subprocess.run(
        [str(util), "export", "-q", "-q", "-c", "1", "-f", str(conf), "--grid", "webmercator", "--source", "esri",
         "--levels", ",".join(map(str, levels)), "--dest", str(dest), "--type", kind]
        # without a coverage MapProxy visits every tile of the world at each level (4**10 at level 10)
        + (["--coverage", ",".join(map(repr, bbox)), "--srs", "EPSG:3857"] if bbox else []),
        cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and dest.is_file(), f"mapproxy-util export failed:\n{proc.stdout}\n{proc.stderr}"
    return dest


def _tiles(cache) -> dict:
    return {(int(lv), int(r), int(c)): t for lv, r, c, t in cache.iter_tiles()}


def _mirrored(tiles: dict) -> dict:
    """Rows counted from the other edge of the Web Mercator grid."""
    return {(lv, (1 << lv) - 1 - r, c): t for (lv, r, c), t in tiles.items()}


def _bbox(cache, tiles: dict) -> tuple:
    """The union of the tiles' bounds, shrunk by a metre so MapProxy's coverage takes no neighbour."""
    boxes = [cache.scheme.tile_bounds(lv, r, c) for lv, r, c in tiles]
    return (min(b[0] for b in boxes) + 1, min(b[1] for b in boxes) + 1,
            max(b[2] for b in boxes) - 1, max(b[3] for b in boxes) - 1)


def _as_xyz(path: Path) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO metadata (name, value) VALUES ('scheme', 'xyz')")
    return path


@pytest.mark.parametrize("key,version", REAL, ids=[k for k, _ in REAL])
def test_mapproxy_exports_of_real_caches(mapproxy_util, tmp_path, key, version):
    src = real_path(key)
    with open_cache(src) as cache:
        want = _tiles(cache)
        levels = list(cache.levels)
        bbox = _bbox(cache, want)
    assert want
    for kind, (tc_kind, ext) in TYPES.items():
        out = mapproxy_export(mapproxy_util, src / "_alllayers", version, levels, tmp_path / f"mp{ext}",
                              kind, tmp_path / kind, bbox)
        expected = _mirrored(want) if kind == "mbtile" else want
        for exp in ([expected, want] if kind == "mbtile" else [expected]):
            if exp is want and kind == "mbtile":
                _as_xyz(out)
            with open_cache(out) as c:
                assert c.kind == tc_kind and c.warnings == []
                assert c.scheme.tile_cols == 256 and c.scheme.spatial_ref.code == 3857
                got = _tiles(c)
                assert set(got) == set(exp), (kind, sorted(set(got) ^ set(exp))[:5])
                assert all(got[k] == exp[k] for k in exp), kind
                assert c.levels == sorted({k[0] for k in exp})
                summary = c.level_summary()
                for lv in c.levels:
                    assert summary[lv]["tiles"] == sum(1 for k in exp if k[0] == lv)
                    assert summary[lv]["bytes"] == sum(len(t) for k, t in exp.items() if k[0] == lv)


def test_mbtiles_without_metadata_exports_to_tpkx(mapproxy_util, tmp_path):
    """MapProxy's MBTiles has an empty metadata table: format and levels come from the tiles, and
    the file exports to a .tpkx holding the same bytes."""
    src = real_path("raster-tiles-compactcache")
    out = mapproxy_export(mapproxy_util, src / "_alllayers", 2, [0, 1, 2], tmp_path / "mp.mbtiles", "mbtile",
                          tmp_path / "work")
    with sqlite3.connect(out) as db:
        assert db.execute("SELECT count(*) FROM metadata").fetchone() == (0,)
    with open_cache(_as_xyz(out)) as c:
        assert c.tile_format == "JPEG"
        res = tilecrate.export(c, ExportRequest("0-2"), str(tmp_path / "back.tpkx"))
        assert res.tiles == 21
        with open_cache(src) as orig, open_cache(tmp_path / "back.tpkx") as back:
            assert _tiles(back) == _tiles(orig)


def test_mapproxy_reads_tilecrate_compact_cache(mapproxy_util, sample_mixed, tmp_path):
    """A compact V2 cache folder tilecrate wrote, read by MapProxy's bundle reader and exported to
    GeoPackage, holds the generated source's tiles; tilecrate reads that GeoPackage back equal."""
    folder = tmp_path / "v2"
    tilecrate.export(str(sample_mixed), ExportRequest("0-4", tile_package=False,
                                                      storage_format="esriMapCacheStorageModeCompactV2"),
                     str(folder))
    alllayers = next(folder.rglob("_alllayers"))
    out = mapproxy_export(mapproxy_util, alllayers, 2, [0, 1, 2, 3, 4], tmp_path / "mp.gpkg", "geopackage",
                          tmp_path / "work")
    with open_cache(str(sample_mixed)) as orig, open_cache(out) as c:
        want = {k: t for k, t in _tiles(orig).items() if k[0] <= 4}
        assert want and _tiles(c) == want


def test_mapproxy_export_from_tilecrate_server(mapproxy_util, sample_v2, tmp_path):
    """MapProxy fetching every tile from a `tilecrate serve` MapServer (its `tile` source on the
    /tile/{level}/{row}/{col} URLs) and exporting a GeoPackage: the served cache's tiles, byte for byte."""
    from test_server_support import Server, free_port, write_config

    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"World": {"source": sample_v2}})
    srv = Server(cfg, data, free_port()).start()
    try:
        with open_cache(str(sample_v2)) as cache:
            want = {k: t for k, t in _tiles(cache).items() if k[0] <= 3}
            bbox = _bbox(cache, want)
        assert len(want) >= 15
        work = tmp_path / "mp"
        work.mkdir()
        conf = work / "mapproxy.yaml"
        conf.write_text(
            "services:\n  demo:\n"
            "grids:\n  webmercator:\n    base: GLOBAL_WEBMERCATOR\n    origin: nw\n"
            "sources:\n  tc:\n    type: tile\n    grid: webmercator\n    transparent: true\n"
            f"    url: {srv.svc('World')}/tile/%(z)s/%(y)s/%(x)s\n"
            "    on_error:\n      404:\n        response: transparent\n        cache: false\n"
            "caches:\n  tc_cache:\n    grids: [webmercator]\n    sources: [tc]\n    format: image/jpeg\n"
            "    disable_storage: true\n"
            "layers:\n  - name: tc\n    title: tc\n    sources: [tc_cache]\n")
        dest = tmp_path / "served.gpkg"
        proc = subprocess.run(
            [str(mapproxy_util), "export", "-q", "-q", "-c", "1", "-f", str(conf), "--grid", "webmercator",
             "--source", "tc", "--levels", "0,1,2,3", "--fetch-missing-tiles", "--dest", str(dest),
             "--type", "geopackage", "--coverage", ",".join(map(repr, bbox)), "--srs", "EPSG:3857"],
            cwd=work, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and dest.is_file(), f"mapproxy-util export failed:\n{proc.stdout}\n{proc.stderr}"
    finally:
        srv.stop()
    with open_cache(dest) as c:
        assert _tiles(c) == want

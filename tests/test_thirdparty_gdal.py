"""GDAL-made MBTiles and GeoPackages of compact caches, and the `pmtiles` package's PMTiles of them,
read by tilecrate tile for tile (issue 12).

GDAL (rasterio's bundled build: rasterio.shutil.copy is `gdal_translate -of MBTiles|GPKG`; gdal-bin
is not needed) reads the compact package with its own ESRIC driver and writes the finest level as
Web Mercator tiles; nothing of tilecrate is in that chain for Esri's own Usa.tpkx. GDAL
decodes and re-encodes, so tiles are compared by pixels: inside the raster GDAL saw (its ESRIC
dataset's bounds, pixel-aligned with the tiles) every pixel equals the source's, with colour compared
only where the source is not fully transparent (GDAL writes transparent pixels as 0,0,0,0); outside
it GDAL's pixels are transparent. The PMTiles the `pmtiles` converter makes of GDAL's MBTiles hold
GDAL's bytes at the same positions.
"""
from __future__ import annotations

import io

import numpy as np
import rasterio                                   # a missing interop reader fails the run
import rasterio.shutil
from PIL import Image
from pmtiles.convert import mbtiles_to_pmtiles

import tilecrate
from conftest import real_path
from tilecrate.cache import open_cache
from tilecrate.request import ExportRequest


H = 20037508.342789244


def _tiles(cache, level: int | None = None) -> dict:
    return {(int(lv), int(r), int(c)): t for lv, r, c, t in cache.iter_tiles() if level is None or lv == level}


def _rgba(tile: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(tile)).convert("RGBA")).astype(np.int16)


def _gdal_copies(tpkx, root) -> dict:
    """GDAL's MBTiles and GeoPackage of a compact package, the pmtiles converter's PMTiles of the
    MBTiles, and the ESRIC dataset's bounds."""
    with rasterio.open(tpkx) as ds:
        assert ds.driver == "ESRIC"
        bounds = ds.bounds
    out = {"mbtiles": root / "g.mbtiles", "gpkg": root / "g.gpkg", "pmtiles": root / "g.pmtiles"}
    rasterio.shutil.copy(str(tpkx), str(out["mbtiles"]), driver="MBTiles", TILE_FORMAT="PNG", RESAMPLING="NEAREST")
    rasterio.shutil.copy(str(tpkx), str(out["gpkg"]), driver="GPKG", TILE_FORMAT="PNG",
                         TILING_SCHEME="GoogleMapsCompatible", RESAMPLING="NEAREST")
    mbtiles_to_pmtiles(str(out["mbtiles"]), str(out["pmtiles"]), 30)
    return {**out, "bounds": bounds}


def _check(source_path, copies: dict) -> int:
    """Every tile GDAL wrote matches the source's pixels (see the module's note); returns tiles compared."""
    left, bottom, right, top = copies["bounds"]
    # Web Mercator tile sets end at +-H: ArcGIS caches may have rows beyond (PROVENANCE quirk 3)
    bottom, top = max(bottom, -H), min(top, H)
    with open_cache(str(source_path)) as src:
        finest = max(src.levels)
        want = _tiles(src, finest)
        scheme = src.scheme
    compared = 0
    gdal = {}
    for kind in ("mbtiles", "gpkg", "pmtiles"):
        with open_cache(copies[kind]) as c:
            assert c.kind == kind and c.warnings == [] and c.levels == [finest], (kind, c.levels)
            assert c.scheme.spatial_ref.code == 3857 and c.scheme.tile_cols == scheme.tile_cols
            got = _tiles(c)
        if kind == "pmtiles":    # the converter copies GDAL's MBTiles bytes
            assert got == gdal["mbtiles"]
            continue
        gdal[kind] = got
        # GDAL writes no tile that is transparent all over: such a source tile must be so inside its raster
        inside = {k for k in want
                  if (lambda b: b[0] < right and b[2] > left and b[1] < top and b[3] > bottom)(scheme.tile_bounds(*k))}
        blank = None
        for key in sorted(inside | set(got)):
            tile = got.get(key)
            x0, y0, x1, y1 = scheme.tile_bounds(*key)
            n = scheme.tile_cols
            res = (x1 - x0) / n
            xs = x0 + (np.arange(n) + 0.5) * res
            ys = y1 - (np.arange(n) + 0.5) * res
            seen = (ys[:, None] > bottom) & (ys[:, None] < top) & (xs[None, :] > left) & (xs[None, :] < right)
            ours = _rgba(want[key]) if key in want else None
            if tile is None:
                assert (ours[seen, 3] == 0).all(), (kind, key, "a source tile with pixels GDAL did not write")
                continue
            theirs = _rgba(tile)
            if ours is None:
                blank = np.zeros_like(theirs) if blank is None else blank
                ours = blank
            assert (theirs[~seen, 3] == 0).all(), (kind, key, "pixels outside GDAL's raster")
            assert (theirs[seen, 3] == ours[seen, 3]).all(), (kind, key, "alpha")
            opaque = seen & (ours[:, :, 3] > 0)
            assert (theirs[opaque, :3] == ours[opaque, :3]).all(), (kind, key, "colour")
            compared += 1
    assert gdal["mbtiles"].keys() == gdal["gpkg"].keys()
    return compared


def test_gdal_copies_of_arcgis_tpkx(real_dir, tmp_path):
    """Esri's Usa.tpkx (ArcGIS ExportMapServerCache; GDAL's own ESRIC test file) -> GDAL (ESRIC ->
    MBTiles/GPKG) -> pmtiles: no tilecrate writer. (ArcGIS Pro's googlemaps.tpkx passes too, in 35 s:
    its finest level is the whole world, 8192 px square, too slow for CI.)"""
    src = real_path("Usa.tpkx")
    copies = _gdal_copies(src, tmp_path)
    assert _check(src, copies) >= 2 * 40


def test_gdal_copies_of_tilecrate_tpkx(sample_png, tmp_path):
    """A tilecrate .tpkx of a generated PNG cache, through GDAL, holds the cache's pixels."""
    tpkx = tmp_path / "src.tpkx"
    tilecrate.export(str(sample_png), ExportRequest("0-4"), str(tpkx))
    copies = _gdal_copies(tpkx, tmp_path)
    assert _check(tpkx, copies) >= 20
    with open_cache(str(sample_png)) as a, open_cache(str(tpkx)) as b:
        assert _tiles(a) == _tiles(b)

"""Open formats as sources (issue 12): MBTiles and GeoPackage written by GDAL (rasterio's wheel),
PMTiles written by the `pmtiles` package's converter, XYZ folders written by its pmtiles_to_dir,
exploded caches; each read tile for tile against the pixels GDAL was given, exported to .tpkx and
read back by GDAL's ESRIC driver. Bad input: one-line errors or warnings, never a crash or a hang."""
from __future__ import annotations

import gzip
import io
import os
import shutil
import sqlite3
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio                                   # a missing interop reader fails the run
from PIL import Image
from pmtiles.convert import mbtiles_to_pmtiles, pmtiles_to_dir
from pmtiles.reader import MmapSource, Reader
from pmtiles.tile import deserialize_header, tileid_to_zxy, zxy_to_tileid
from rasterio.transform import from_bounds

import tilecrate
from tilecrate.cache import open_cache
from tilecrate.errors import CacheError, TilecrateError
from tilecrate.sources.pmtiles import decode_varints, parse_header, tileid_zxy, zxy_tileid
from tilecrate.tiling import level_dir

H = 20037508.342789244
W = 1024                        # the image: 1024 px over [-H/4, H/4]^2, native at zoom 4 (tiles 6..9)


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:W, 0:W]
    return np.stack([xx * 255 // W, yy * 255 // W, (xx ^ yy) & 255]).astype(np.uint8)


def _gdal_write(path: Path, driver: str, **opts) -> Path:
    with rasterio.open(path, "w", driver=driver, width=W, height=W, count=3, dtype="uint8", crs="EPSG:3857",
                       transform=from_bounds(-H / 4, -H / 4, H / 4, H / 4, W, W), **opts) as ds:
        ds.write(_image())
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4, 8], rasterio.enums.Resampling.nearest)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("open")
    out = {"mbtiles": _gdal_write(root / "g.mbtiles", "MBTiles", TILE_FORMAT="PNG"),
           "gpkg": _gdal_write(root / "g.gpkg", "GPKG", TILE_FORMAT="PNG", TILING_SCHEME="GoogleMapsCompatible")}
    with sqlite3.connect(out["mbtiles"]) as db:   # metadata the item must carry
        db.execute("INSERT INTO metadata VALUES ('attribution', '© Test Survey')")
    out["pmtiles"] = root / "g.pmtiles"
    mbtiles_to_pmtiles(str(out["mbtiles"]), str(out["pmtiles"]), 30)
    out["xyz"] = root / "xyz"
    pmtiles_to_dir(str(out["pmtiles"]), str(out["xyz"]))
    return out


def _pixels(tile: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(tile)).convert("RGB")).transpose(2, 0, 1)


@pytest.mark.parametrize("kind", ["mbtiles", "gpkg", "pmtiles", "xyz"])
def test_read_tile_for_tile(made, kind):
    img = _image()
    with open_cache(made[kind]) as c:
        assert c.kind == kind and c.levels == [1, 2, 3, 4] and c.tile_format == "PNG"
        assert c.scheme.tile_cols == 256 and c.scheme.spatial_ref.code == 3857 and c.warnings == []
        for i in range(4):
            for j in range(4):
                got = _pixels(c.tile(4, 6 + i, 6 + j))
                assert (got == img[:, i * 256:(i + 1) * 256, j * 256:(j + 1) * 256]).all(), (kind, i, j)
        assert c.tile(4, 5, 6) is None and c.tile(4, 6, 10) is None and c.tile(9, 0, 0) is None
        summary = c.level_summary()
        assert [summary[lv]["tiles"] for lv in (1, 2, 3, 4)] == [4, 4, 4, 16]
        ext = c.data_extent()
        assert abs(ext.xmin + H / 4) < 1 and abs(ext.ymax - H / 4) < 1


def test_formats_agree_tile_for_tile(made):
    """The PMTiles and XYZ copies (pmtiles package) hold the MBTiles' bytes at the same positions."""
    with open_cache(made["mbtiles"]) as m, open_cache(made["pmtiles"]) as p, open_cache(made["xyz"]) as x:
        want = {(lv, r, c): t for lv, r, c, t in m.iter_tiles()}
        assert {(lv, r, c): t for lv, r, c, t in p.iter_tiles()} == want
        assert {(lv, r, c): t for lv, r, c, t in x.iter_tiles()} == want
        with open(made["pmtiles"], "rb") as f:
            reader = Reader(MmapSource(f))
            for (lv, r, c), t in want.items():
                assert reader.get(lv, c, r) == t


@pytest.mark.parametrize("kind", ["mbtiles", "gpkg", "pmtiles", "xyz"])
def test_export_tpkx_read_by_gdal(made, kind, tmp_path):
    out = tmp_path / f"{kind}.tpkx"
    with open_cache(made[kind]) as c:
        est = tilecrate.estimate(c, tilecrate.ExportRequest(levels="2-4"))
        res = tilecrate.export(c, tilecrate.ExportRequest(levels="2-4"), str(out))
        assert res.tiles == 24 and est.total_tiles == 24 and os.path.getsize(out) == est.total_size
        with open_cache(out) as back:
            assert {k[:3]: k[3] for k in back.iter_tiles()} == {k[:3]: k[3] for k in c.iter_tiles() if k[0] >= 2}
    with rasterio.open(out) as ds:
        assert ds.driver == "ESRIC"
        window = ds.read(window=rasterio.windows.from_bounds(-H / 4, -H / 4, H / 4, H / 4, ds.transform))
    assert (window[:3] == _image()).all()


def test_geographic_geopackage(tmp_path):
    p = tmp_path / "geo.gpkg"
    with rasterio.open(p, "w", driver="GPKG", width=512, height=256, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=from_bounds(-180, -90, 180, 90, 512, 256), TILE_FORMAT="JPEG",
                       TILING_SCHEME="InspireCRS84Quad") as ds:
        ds.write(np.full((3, 256, 512), 90, dtype=np.uint8))
    with open_cache(p) as c:
        assert c.scheme.spatial_ref.code == 4326 and c.scheme.spatial_ref.is_geographic
        assert c.scheme.origin_x == -180 and c.scheme.origin_y == 90 and c.tile_format == "JPEG"
        lv = c.levels[-1]
        cols = 2 ** (lv + 1)
        assert c.level_summary()[lv]["tiles"] == cols * cols // 2
        assert abs(c.scheme.lod(lv).resolution - 360 / (cols * 256)) < 1e-12
        assert (np.abs(_pixels(c.tile(lv, 0, 0)).astype(int) - 90) <= 2).all()


def test_geopackage_table_by_name(made, tmp_path):
    p = tmp_path / "two.gpkg"
    shutil.copy(made["gpkg"], p)
    with sqlite3.connect(p) as db:
        db.execute('CREATE TABLE "b" AS SELECT * FROM "g"')
        db.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, srs_id) "
                   "VALUES ('b', 'tiles', 'second', 3857)")
        db.execute("INSERT INTO gpkg_tile_matrix_set SELECT 'b', srs_id, min_x, min_y, max_x, max_y "
                   "FROM gpkg_tile_matrix_set WHERE table_name = 'g'")
        db.execute("INSERT INTO gpkg_tile_matrix SELECT 'b', zoom_level, matrix_width, matrix_height, tile_width, "
                   "tile_height, pixel_x_size, pixel_y_size FROM gpkg_tile_matrix WHERE table_name = 'g'")
        db.execute("DELETE FROM b WHERE zoom_level < 4")
    with open_cache(p) as c:
        assert c.levels == [4] and c.name == "second" and any("holds tile tables b, g" in w for w in c.warnings)
    with tilecrate.cache.open_cache(f"{p}#g") as c:
        assert c.levels == [1, 2, 3, 4] and c.name == "g" and c.path.endswith("#g")
        with open_cache(c.path) as again:                     # what a Dask worker does with plan.source
            assert again.levels == [1, 2, 3, 4]
    with pytest.raises(CacheError, match="no tile table 'zz'; it holds b, g"):
        tilecrate.sources.open_cache(p, table="zz")


def test_item_metadata(made, real_dir):
    with open_cache(real_dir / "tpkutils/tests/data/states_filled.tpk") as c:
        assert c.item.credits == "US Census Bureau" and c.item.title == "states_filled"
        assert c.item.summary == "states" and c.item.tags == ("states",)
    with open_cache(real_dir / "tile-package-spec/Sample TPKX Files/Usa.tpkx") as c:
        assert c.item.title == "Usa" and c.item.credits is None
    with open_cache(made["mbtiles"]) as c:
        assert c.item.credits == "© Test Survey" and c.item.title == "g"
    with open_cache(made["pmtiles"]) as c:
        assert c.item.credits == "© Test Survey"


def test_tms_folder_given_or_detected(made, tmp_path):
    tms = tmp_path / "tms"
    for z in (1, 2):
        for x in range(2 ** z):
            for y in range(2 ** z):
                src = made["xyz"] / str(z) / str(x) / f"{y}.mvt"    # pmtiles_to_dir's name for every tile
                if src.exists():
                    d = tms / str(z) / str(x)
                    d.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, d / f"{2 ** z - 1 - y}.png")
    with open_cache(made["xyz"]) as want, tilecrate.sources.open_cache(tms, scheme="tms") as got:
        assert got.kind == "tms" and {k[:3]: k[3] for k in got.iter_tiles()} == \
            {k[:3]: k[3] for k in want.iter_tiles() if k[0] <= 2}
        with open_cache(got.path) as again:             # a plan reopens its source by path: still TMS
            assert got.path.endswith("#tms") and again.kind == "tms" and again.tile(1, 0, 0) == got.tile(1, 0, 0)
    (tms / "tilemapresource.xml").write_text("<TileMap/>")
    (tms / "1" / "0" / "notes.txt").write_text("stray")
    (tms / "1" / "README").write_text("stray")
    with open_cache(tms) as got:
        assert got.kind == "tms" and not got.path.endswith("#tms") and got.tile(1, 1, 1) == (made["xyz"] / "1" / "1" / "1.mvt").read_bytes()
        assert sum("not a tile" in w for w in got.warnings) == 2


def test_exploded_cache_tile_for_tile(sample_png, tmp_path):
    root = tmp_path / "exploded"
    conf = (sample_png / "conf.xml").read_text()
    root.mkdir()
    (root / "conf.xml").write_text(conf.replace("esriMapCacheStorageModeCompactV2", "esriMapCacheStorageModeExploded"))
    with open_cache(sample_png) as src:
        want = {(lv, r, c): t for lv, r, c, t in src.iter_tiles()}
    for (lv, r, c), t in want.items():
        d = root / "_alllayers" / level_dir(lv) / f"R{r:08x}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"C{c:08x}.png").write_bytes(t)
    with open_cache(root) as c:
        assert c.kind == "exploded" and {k[:3]: k[3] for k in c.iter_tiles()} == want
        res = tilecrate.export(c, tilecrate.ExportRequest(levels="0-4"), str(tmp_path / "e.tpkx"))
        assert res.tiles == len(want)


def test_changed_between_plan_and_export(made, tmp_path):
    p = tmp_path / "c.mbtiles"
    shutil.copy(made["mbtiles"], p)
    with open_cache(p) as c:
        ref = c.bundles(4)[0]
        key, _, sizes = c.index_with_key(ref)
        with sqlite3.connect(p) as db:
            db.execute("UPDATE tiles SET tile_data = x'00' WHERE zoom_level = 4 AND tile_column = 6")
        with pytest.raises(tilecrate.errors.BundleError, match="changed after its tiles were selected"):
            c.open_bundle(ref, expect=key)
        _, _, now = c.index_with_key(ref)
        assert np.count_nonzero(now == 1) == 4 and np.count_nonzero(sizes) == 16


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_sqlite_files(made, tmp_path):
    trunc = tmp_path / "t.mbtiles"
    data = made["mbtiles"].read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(TilecrateError) as e:
        with open_cache(trunc) as c:
            for _ in c.iter_tiles():
                pass
    assert "\n" not in str(e.value) and "t.mbtiles" in str(e.value)
    junk = tmp_path / "j.mbtiles"
    junk.write_bytes(b"SQLite format 3\x00" + os.urandom(3000))
    with pytest.raises(CacheError, match="j.mbtiles: .*SQLite"):
        open_cache(junk)
    empty = tmp_path / "e.mbtiles"
    sqlite3.connect(empty).execute("CREATE TABLE other (a)").connection.close()
    with pytest.raises(CacheError, match="not an MBTiles file"):
        open_cache(empty)
    nometa = tmp_path / "n.mbtiles"
    shutil.copy(made["mbtiles"], nometa)
    with sqlite3.connect(nometa) as db:
        db.execute("DROP TABLE metadata")
    with open_cache(nometa) as c:
        assert c.levels == [1, 2, 3, 4] and c.tile_format == "PNG" and c.item.title is None
        assert any("no metadata table" in w for w in c.warnings)


def test_mbtiles_views_and_webp_refused_for_packages(made, tmp_path):
    p = tmp_path / "v.mbtiles"
    with sqlite3.connect(p) as db:
        db.execute("CREATE TABLE map (zoom_level, tile_column, tile_row, tile_id)")
        db.execute("CREATE TABLE images (tile_id, tile_data)")
        db.execute("CREATE TABLE metadata (name, value)")
        db.execute("INSERT INTO metadata VALUES ('format', 'webp'), ('name', 'w')")
        webp = b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00/\xff\xc0?\x00\x07\x10\xfd\x8f\xfe\x07\x00"
        db.execute("INSERT INTO images VALUES ('a', ?)", (webp,))
        db.executemany("INSERT INTO map VALUES (1, ?, ?, 'a')", [(0, 0), (1, 1)])
    with open_cache(p) as c:
        assert c.tile_format == "WEBP" and not c.esri_readable
        assert c.tile(1, 1, 0) == webp and c.tile(1, 0, 1) == webp      # TMS rows flipped
        assert c.tile(1, 0, 0) is None
        with pytest.raises(TilecrateError, match="tiles are WEBP; ArcGIS tile packages"):
            tilecrate.export(c, tilecrate.ExportRequest(levels="1"), str(tmp_path / "w.tpkx"))
    assert not (tmp_path / "w.tpkx").exists()


def test_geopackage_inconsistent_matrices(made, tmp_path):
    p = tmp_path / "bad.gpkg"
    shutil.copy(made["gpkg"], p)
    with sqlite3.connect(p) as db:
        db.execute("UPDATE gpkg_tile_matrix SET matrix_width = 3 WHERE zoom_level = 2")
    with pytest.raises(CacheError, match="matrix at zoom 2 .* does not span"):
        open_cache(p)
    with sqlite3.connect(p) as db:
        db.execute("UPDATE gpkg_tile_matrix SET matrix_width = 4 WHERE zoom_level = 2")
        db.execute("UPDATE gpkg_tile_matrix SET pixel_x_size = pixel_x_size * 4, pixel_y_size = pixel_y_size * 4 "
                   "WHERE zoom_level = 3")
    with pytest.raises(CacheError, match="pixel sizes must shrink|does not span"):
        open_cache(p)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pm_file(root: bytes, leaf_offset: int, leaf_length: int, data_offset: int, data_length: int,
             extra: bytes = b"") -> bytes:
    """A PMTiles v3 file by hand: header (FORMATS.md 20.3), root directory at 127, then `extra`."""
    head = b"PMTiles\x03" + struct.pack("<8Q", 127, len(root), 0, 0, leaf_offset, leaf_length, data_offset,
                                        data_length)
    head += struct.pack("<3Q", 1, 1, 1) + bytes([1, 2, 1, 2, 0, 1]) + struct.pack("<4i", 0, 0, 10, 10)
    head += bytes([0]) + struct.pack("<2i", 0, 0)
    assert len(head) == 127
    return head + root + extra


def _directory(entries) -> bytes:
    """gzip of a directory of (tile id, run length, length, offset) entries."""
    n = len(entries)
    out = _varint(n)
    last = 0
    for tid, *_ in entries:
        out += _varint(tid - last)
        last = tid
    out += b"".join(_varint(e[1]) for e in entries) + b"".join(_varint(e[2]) for e in entries)
    out += b"".join(_varint(e[3] + 1) for e in entries)
    return gzip.compress(out, mtime=0)


def test_pmtiles_bad_offsets_and_loops(made, tmp_path):
    data = made["pmtiles"].read_bytes()
    bad = tmp_path / "bad.pmtiles"
    bad.write_bytes(data[:64] + struct.pack("<Q", 10 ** 12) + data[72:])
    with pytest.raises(CacheError, match="past the end of the file"):
        open_cache(bad)
    bad.write_bytes(data[:200])
    with pytest.raises(CacheError, match="past the end of the file"):
        open_cache(bad)
    png = (made["xyz"] / "1" / "0" / "0.mvt").read_bytes()
    good = _directory([(0, 1, len(png), 0)])
    bad.write_bytes(_pm_file(good, 0, 0, 127 + len(good), len(png), png))
    with open_cache(bad) as c:                            # the hand-made file is right...
        assert c.tile(0, 0, 0) == png
    past = _directory([(0, 1, len(png) + 1, 0)])
    bad.write_bytes(_pm_file(past, 0, 0, 127 + len(past), len(png), png))
    with pytest.raises(CacheError, match="past the end of the tile data"):   # ...a tile past its section is not
        open_cache(bad)
    # a root whose one entry is a leaf: the leaf section is the root itself (a directory loop)
    size = 0
    for _ in range(5):
        root = _directory([(0, 0, size, 0)])
        size = len(root)
    bad.write_bytes(_pm_file(root, 127, len(root), 127 + len(root), 0))
    with pytest.raises(CacheError, match="directory loop"):
        open_cache(bad)
    # leaves nested past the limit: leaf k points at leaf k+1, the last holds the tile
    sizes = [0] * 6
    for _ in range(6):                      # offsets depend on the sizes: iterate to the fixed point
        starts = [sum(sizes[:k]) for k in range(6)]
        leaves = [_directory([(0, 1, len(png), 0)] if k == 5 else [(0, 0, sizes[k + 1], starts[k + 1])])
                  for k in range(6)]
        sizes = [len(b) for b in leaves]
    leaf = b"".join(leaves)
    root = _directory([(0, 0, sizes[0], 0)])
    bad.write_bytes(_pm_file(root, 127 + len(root), len(leaf), 127 + len(root) + len(leaf), len(png), leaf + png))
    with pytest.raises(CacheError, match="nest deeper than 4"):
        open_cache(bad)


def test_pmtiles_header_as_the_package_reads_it(made):
    head = made["pmtiles"].read_bytes()[:127]
    theirs = {k: (v.value if hasattr(v, "value") else v) for k, v in deserialize_header(head).items()}
    ours = parse_header(head, "t")
    assert ours == {k: theirs[k] for k in ours} and len(ours) == len(theirs) - 1     # all but 'version'
    with pytest.raises(CacheError, match="version 2 is not supported"):
        parse_header(head[:7] + b"\x02" + head[8:], "t")


def test_pmtiles_tileids_and_varints():
    rng = np.random.default_rng(1)
    ids = np.concatenate([np.arange(0, 400), rng.integers(0, zxy_to_tileid(20, 0, 0), 2000)]).astype(np.uint64)
    z, x, y = tileid_zxy(ids)
    assert [tuple(v) for v in zip(z.tolist(), x.tolist(), y.tolist())] == [tileid_to_zxy(int(i)) for i in ids]
    for i in ids[::7].tolist():
        assert zxy_tileid(*tileid_to_zxy(int(i))) == int(i)
    assert zxy_tileid(12, 3423, 1763) == zxy_to_tileid(12, 3423, 1763) == 19078479
    nums = [0, 1, 127, 128, 300, 2 ** 35 + 7, 2 ** 63 + 5]
    assert decode_varints(b"".join(_varint(n) for n in nums), "t").tolist() == nums
    with pytest.raises(CacheError, match="ends inside a number"):
        decode_varints(b"\x80", "t")


def test_serve_mbtiles_as_a_mapserver(made, tmp_path):
    from test_server_support import Server, free_port, write_config
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "t.toml", data, {"World": {"source": made["mbtiles"]}})
    srv = Server(cfg, data, free_port()).start()
    try:
        info = srv.get(srv.svc("World"), {"f": "json"}).json()
        assert info["tileInfo"]["rows"] == 256 and [l["level"] for l in info["tileInfo"]["lods"]][-1] == 4
        r = srv.get(srv.svc("World") + "/tile/4/7/8", {})
        with open_cache(made["mbtiles"]) as c:
            assert r.status == 200 and r.body == c.tile(4, 7, 8)
        assert srv.get(srv.svc("World") + "/tile/4/0/0", {}).status == 404
    finally:
        srv.stop()



def test_large_levels_read_block_by_block(made, monkeypatch):
    from tilecrate.sources import sqlite as sqlite_source
    with open_cache(made["mbtiles"]) as c:
        want = c.level_summary()
    monkeypatch.setattr(sqlite_source, "SCAN_LIMIT", 5)       # level 4 (16 tiles) is past it now
    with open_cache(made["mbtiles"]) as c:
        assert c.level_summary() == want and c._store._scans[4][1] is None and c._store._scans[1][1] is not None
    monkeypatch.setattr(sqlite_source, "SCAN_LIMIT", 100)
    monkeypatch.setattr(sqlite_source, "SCAN_BLOCKS", 0)      # every level too sparse to keep
    with open_cache(made["gpkg"]) as g, open_cache(made["mbtiles"]) as c:
        assert c.level_summary() == want and all(v[1] is None for v in c._store._scans.values())
        assert g.level_summary()[4]["tiles"] == 16


def test_presence_store_keys_follow_the_file(made, tmp_path):
    from tilecrate.presence import PresenceStore
    p = tmp_path / "p.mbtiles"
    shutil.copy(made["mbtiles"], p)
    with PresenceStore(str(tmp_path / "presence")) as store, open_cache(p) as c:
        ref = c.bundles(4)[0]
        assert np.count_nonzero(store.sizes(c, ref)) == 16
        with sqlite3.connect(p) as db:
            db.execute("DELETE FROM tiles WHERE zoom_level = 4 AND tile_column = 6")
        assert np.count_nonzero(store.sizes(c, ref)) == 12


def test_replaced_files_are_read_again(made, tmp_path, monkeypatch):
    from tilecrate.sources import pmtiles as pm
    from tilecrate.sources import compact
    monkeypatch.setattr(pm, "CHECK_SECONDS", 0.0)
    monkeypatch.setattr(compact, "RELIST_SECONDS", 0.0)       # levels are listed again at most this often
    p = tmp_path / "r.pmtiles"
    shutil.copy(made["pmtiles"], p)
    with open_cache(p) as c:
        before = c.tile(4, 7, 8)
        png = (made["xyz"] / "1" / "0" / "0.mvt").read_bytes()
        root = _directory([(zxy_to_tileid(4, 8, 7), 1, len(png), 0)])
        (tmp_path / "new").write_bytes(_pm_file(root, 0, 0, 127 + len(root), len(png), png))
        os.replace(tmp_path / "new", p)                    # replaced by rename under an open cache
        assert before != png and c.tile(4, 7, 8) == png and c.levels == [4]
    xyz = tmp_path / "xyz"
    shutil.copytree(made["xyz"], xyz)
    with open_cache(xyz) as c:
        ref = c.bundles(4)[0]
        key, _, _ = c.index_with_key(ref)
        (xyz / "4" / "8" / "7.mvt").write_bytes(png)      # rewritten between selection and export
        with pytest.raises(tilecrate.errors.BundleError, match="changed after its tiles were selected"):
            c.open_bundle(ref, expect=key)


def test_geopackage_zooms_that_do_not_halve(made, tmp_path):
    """Allowed by a GeoPackage extension only: read as declared, with a warning."""
    p = tmp_path / "third.gpkg"
    shutil.copy(made["gpkg"], p)
    with sqlite3.connect(p) as db:
        span = db.execute("SELECT max_x - min_x FROM gpkg_tile_matrix_set").fetchone()[0]
        db.execute("UPDATE gpkg_tile_matrix SET matrix_width = 12, matrix_height = 12, pixel_x_size = ?, "
                   "pixel_y_size = ? WHERE zoom_level = 4", (span / 12 / 256, span / 12 / 256))
    with open_cache(p) as c:
        assert any("do not halve" in w for w in c.warnings)
        assert abs(c.scheme.lod(4).resolution * 12 * 256 - span) < 1e-6 and c.level_summary()[4]["tiles"] == 16


def test_mbtiles_of_512_px_tiles(tmp_path):
    p = _gdal_write(tmp_path / "big.mbtiles", "MBTiles", TILE_FORMAT="PNG", BLOCKSIZE=512)
    img = _image()
    with open_cache(p) as c:
        assert c.scheme.tile_cols == c.scheme.tile_rows == 512 and c.levels[-1] == 3
        assert abs(c.scheme.lod(3).resolution - 2 * H / (512 * 8)) < 1e-6
        for i in range(2):
            for j in range(2):
                got = _pixels(c.tile(3, 3 + i, 3 + j))
                assert (got == img[:, i * 512:(i + 1) * 512, j * 512:(j + 1) * 512]).all()


def test_endless_tiles_view_is_stopped(tmp_path, monkeypatch):
    from tilecrate.sources import sqlite as sqlite_source
    monkeypatch.setattr(sqlite_source, "QUERY_SECONDS", 0.5)
    p = tmp_path / "endless.mbtiles"
    with sqlite3.connect(p) as db:
        db.execute("CREATE VIEW tiles AS WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n) "
                   "SELECT 0 AS zoom_level, i AS tile_column, 0 AS tile_row, x'00' AS tile_data FROM n")
    t0 = time.monotonic()
    with pytest.raises(CacheError, match=r"endless.mbtiles: a query ran longer than 0.5 s and was stopped"):
        with open_cache(p) as c:
            c.level_summary()
    assert time.monotonic() - t0 < 10

""".vtpk export, read back by an independent parse written from FORMATS.md §6.3 and §18 (zipfile + struct)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zipfile

import pytest
from shapely.geometry import Polygon, box

from tilecrate.errors import Cancelled, ExportError, TilecrateError
from tilecrate.estimate import estimate
from tilecrate.export import export
from tilecrate.package.vtpk import export_vtpk, predict_vtpk_size, tilemap_index
from tilecrate.cache import open_cache
from tilecrate.request import ExportRequest
from tilecrate.selection import select

from conftest import real_path

HALF = 20037508.342787001
TILE_PX = 512


# --------------------------------------------------------------------------------------------
# the independent reader


def read_vtpk(path) -> dict:
    """{"tiles": {(z, r, c): bytes}, "files": {name: bytes}, "root": dict, "tilemap": dict, "infos": [...]}."""
    out = {"tiles": {}, "files": {}}
    with zipfile.ZipFile(path) as zf:
        out["infos"] = zf.infolist()
        for info in zf.infolist():
            data = zf.read(info)
            parts = info.filename.split("/")
            if len(parts) == 4 and parts[:2] == ["p12", "tile"] and parts[3].endswith(".bundle"):
                level = int(parts[2][1:])
                name = parts[3][:-len(".bundle")]
                row0, col0 = int(name[1:5], 16), int(name[6:10], 16)
                out["tiles"].update(_v2_tiles(data, level, row0, col0))
            else:
                out["files"][info.filename] = data
    out["root"] = json.loads(out["files"]["p12/root.json"])
    out["tilemap"] = json.loads(out["files"]["p12/tilemap/root.json"])
    return out


def _v2_tiles(data: bytes, level: int, row0: int, col0: int) -> dict:
    version, count, _max, offset_bytes = struct.unpack_from("<4I", data, 0)
    assert version == 3 and offset_bytes == 5
    assert struct.unpack_from("<Q", data, 24)[0] == len(data)          # file size
    tiles = {}
    for i in range(128 * 128):
        (entry,) = struct.unpack_from("<Q", data, 64 + 8 * i)
        offset, size = entry & ((1 << 40) - 1), entry >> 40
        if size == 0:
            continue
        assert struct.unpack_from("<I", data, offset - 4)[0] == size    # the size prefix
        assert offset + size <= len(data)
        tiles[(level, row0 + i // 128, col0 + i % 128)] = data[offset:offset + size]
    return tiles


def walk_tilemap(node, z=0, r=0, c=0, out=None, leaves_only=False) -> set:
    """Tiles the index says exist: 1 and array nodes (FORMATS.md §18.4); only the 1s with leaves_only."""
    out = set() if out is None else out
    if node == 0:
        return out
    if isinstance(node, list):
        assert len(node) == 4
        if not leaves_only:
            out.add((z, r, c))
        for k, child in enumerate(node):
            walk_tilemap(child, z + 1, 2 * r + (k >> 1), 2 * c + (k & 1), out, leaves_only)
    else:
        assert node == 1
        out.add((z, r, c))
    return out


def tile_box(z, r, c):
    span = 2 * HALF / 2**z
    return box(-HALF + c * span, HALF - (r + 1) * span, -HALF + (c + 1) * span, HALF - r * span)


@pytest.fixture(scope="module")
def fixture_vtpk(real_dir):
    return str(real_path("natural-earth.vtpk"))


@pytest.fixture(scope="module")
def source(fixture_vtpk):
    return read_vtpk(fixture_vtpk)


def _check_package(path, source=None):
    pkg = read_vtpk(path)
    names = [i.filename for i in pkg["infos"]]
    assert names == sorted(names)
    assert all(i.compress_type == zipfile.ZIP_STORED and not i.is_dir() for i in pkg["infos"])
    # the tilemap names exactly the tiles present, plus (as arrays, never leaves) the ancestors above
    # the first exported level, which the quadtree must pass through
    levels = sorted({z for z, _, _ in pkg["tiles"]})
    indexed = walk_tilemap(pkg["tilemap"]["index"])
    leaves = walk_tilemap(pkg["tilemap"]["index"], leaves_only=True)
    assert set(pkg["tiles"]) <= indexed and leaves <= set(pkg["tiles"])
    assert all(z < levels[0] for z, _, _ in indexed - set(pkg["tiles"]))
    if levels:
        assert (pkg["root"]["minLOD"], pkg["root"]["maxLOD"]) == (levels[0], levels[-1])
    item = pkg["files"]["esriinfo/iteminfo.xml"].decode()
    assert "<type>Vector Tile Package</type>" in item and "<typekeyword>vtpk</typekeyword>" in item
    assert b"<type>Vector Tile Package</type>" in pkg["files"]["esriinfo/item.pkinfo"]
    if source is not None:
        for key, data in pkg["tiles"].items():
            assert data == source["tiles"][key], key
        for name, data in source["files"].items():
            if name.startswith("p12/resources/") or name in ("p12/metadata.json", "esriinfo/thumbnail/thumbnail.png"):
                assert pkg["files"][name] == data, name
    return pkg


# --------------------------------------------------------------------------------------------


def test_fixture_tilemap_agrees_with_its_tiles(source):
    """The reference reader and walker agree with the ArcGIS-written package (111 tiles)."""
    assert len(source["tiles"]) == 111
    assert walk_tilemap(source["tilemap"]["index"]) == set(source["tiles"])


def test_full_export_matches_the_fixture_tile_for_tile(fixture_vtpk, source, tmp_path):
    out = tmp_path / "full.vtpk"
    result = export(fixture_vtpk, ExportRequest(levels="0-7"), str(out))
    pkg = _check_package(out, source)
    assert pkg["tiles"] == source["tiles"]
    assert result.tiles == 111 and result.kind == "vtpk" and result.size == os.path.getsize(out)
    # the rebuilt tilemap is the ArcGIS one, byte for byte
    assert pkg["files"]["p12/tilemap/root.json"] == source["files"]["p12/tilemap/root.json"]
    assert set(pkg["files"]) == set(source["files"])
    # root.json: the source's, with the same levels and extents
    assert pkg["root"] == source["root"]
    assert list(pkg["root"]) == list(source["root"])


def test_estimate_equals_the_bytes_written(fixture_vtpk, tmp_path):
    for levels, extent in (("0-7", None), ("2-4", None),
                           ("1-5", {"xmin": -1e6, "ymin": 4e6, "xmax": 3e6, "ymax": 8e6,
                                    "spatialReference": {"wkid": 102100}})):
        req = ExportRequest(levels=levels, extent=extent)
        out = tmp_path / f"e{levels}.vtpk"
        result = export(fixture_vtpk, req, str(out))
        est = estimate(fixture_vtpk, req)
        assert est.total_size == os.path.getsize(out) == result.size
        assert est.total_tiles == result.tiles
        with open_cache(fixture_vtpk) as cache:
            total, per_level = predict_vtpk_size(cache, select(cache, req), req)
        assert total == result.size
        assert {lv: v["size"] for lv, v in result.levels.items()} == {lv: s for lv, s in per_level.items() if s}


def test_levels_subset(fixture_vtpk, source, tmp_path):
    out = tmp_path / "l24.vtpk"
    export(fixture_vtpk, ExportRequest(levels="2-4"), str(out))
    pkg = _check_package(out, source)
    assert pkg["tiles"] == {k: v for k, v in source["tiles"].items() if 2 <= k[0] <= 4}
    assert (pkg["root"]["minLOD"], pkg["root"]["maxLOD"]) == (2, 4)
    lods = {l["level"]: l["scale"] for l in pkg["root"]["tileInfo"]["lods"]}
    assert pkg["root"]["minScale"] == pytest.approx(lods[2])
    # levels 0-1 are not exported: the index still reaches level 2 through them
    assert isinstance(pkg["tilemap"]["index"], list)


def test_extent_subset(fixture_vtpk, source, tmp_path):
    area = (-1.0e6, 4.0e6, 3.0e6, 8.0e6)        # roughly western Europe, Web Mercator metres
    extent = {"xmin": area[0], "ymin": area[1], "xmax": area[2], "ymax": area[3],
              "spatialReference": {"wkid": 102100, "latestWkid": 3857}}
    out = tmp_path / "ext.vtpk"
    export(fixture_vtpk, ExportRequest(levels="0-5", extent=extent), str(out))
    pkg = _check_package(out, source)
    want = {k for k in source["tiles"] if tile_box(*k).intersects(box(*area))}
    assert set(pkg["tiles"]) == want and 0 < len(want) < len(source["tiles"])
    full = pkg["root"]["fullExtent"]
    # the package extent lies within the requested one
    assert area[0] - 1 <= full["xmin"] < full["xmax"] <= area[2] + 1
    assert area[1] - 1 <= full["ymin"] < full["ymax"] <= area[3] + 1


def test_polygon_subset(fixture_vtpk, source, tmp_path):
    ring = [(-5.0e6, 0.0), (6.0e6, 1.0e6), (0.0, 9.0e6), (-5.0e6, 0.0)]
    poly = Polygon(ring)
    aoi = {"rings": [[list(p) for p in ring]], "spatialReference": {"wkid": 102100}}
    out = tmp_path / "aoi.vtpk"
    result = export(fixture_vtpk, ExportRequest(levels="0-5", area_of_interest=aoi), str(out))
    pkg = _check_package(out, source)
    got = set(pkg["tiles"])
    inside = {k for k in source["tiles"] if tile_box(*k).intersection(poly).area > 0}
    touching = {k for k in source["tiles"] if tile_box(*k).intersects(poly)}
    assert inside <= got <= touching
    assert result.tiles == len(got) < len(source["tiles"])
    # a tile of the extent's corner, outside the triangle, is left out
    outside = {k for k in source["tiles"] if k[0] == 5} - touching
    assert outside and not (outside & got)


def test_optimize_tiles_for_size_is_ignored(fixture_vtpk, source, tmp_path):
    out = tmp_path / "opt.vtpk"
    req = ExportRequest(levels="0-3", optimize_tiles_for_size=True, compression_quality=10,
                        tile_package=False, storage_format="Compact")
    export(fixture_vtpk, req, str(out))
    pkg = _check_package(out, source)
    assert pkg["tiles"] == {k: v for k, v in source["tiles"].items() if k[0] <= 3}


def test_raster_package_names_are_refused(fixture_vtpk, tmp_path):
    with pytest.raises(ExportError, match=r"vector tile.*\.vtpk"):
        export(fixture_vtpk, ExportRequest(levels="0-2"), str(tmp_path / "x.tpkx"))
    assert os.listdir(tmp_path) == []


def test_extracted_package_folder_exports_the_same(fixture_vtpk, source, tmp_path):
    folder = tmp_path / "extracted"
    with zipfile.ZipFile(fixture_vtpk) as zf:
        zf.extractall(folder)
    out = tmp_path / "from-folder.vtpk"
    export(str(folder / "p12"), ExportRequest(levels="0-5"), str(out))
    pkg = _check_package(out, source)
    assert pkg["tiles"] == source["tiles"]
    assert pkg["files"]["esriinfo/thumbnail/thumbnail.png"] == source["files"]["esriinfo/thumbnail/thumbnail.png"]
    assert "<title>Map</title>" in pkg["files"]["esriinfo/iteminfo.xml"].decode()


def test_unsafe_resource_names_are_left_out(fixture_vtpk, tmp_path):
    bad = tmp_path / "bad.vtpk"
    shutil.copy(fixture_vtpk, bad)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("p12/resources/../../evil.txt", b"x")
    result = export(str(bad), ExportRequest(levels="0-1"), str(tmp_path / "out.vtpk"))
    assert any("unsafe name" in w for w in result.warnings)
    with zipfile.ZipFile(tmp_path / "out.vtpk") as zf:
        assert not any(".." in n for n in zf.namelist())


def test_cancel_leaves_nothing(fixture_vtpk, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if p.tiles_done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        export(fixture_vtpk, ExportRequest(levels="0-5"), str(tmp_path / "c.vtpk"), progress=progress,
               cancel=cancel)
    assert os.listdir(tmp_path) == []
    assert seen and seen[0].tiles_total == 111


def test_source_truncated_during_export_is_a_clear_error(fixture_vtpk, tmp_path):
    src = tmp_path / "src.vtpk"
    shutil.copy(fixture_vtpk, src)
    out = tmp_path / "out" / "t.vtpk"
    out.parent.mkdir()
    with open_cache(str(src)) as cache:
        req = ExportRequest(levels="0-5")
        sel = select(cache, req)
        with open(src, "r+b") as f:
            f.truncate(os.path.getsize(src) // 2)
        with pytest.raises(TilecrateError) as err:
            export_vtpk(cache, req, str(out), selection=sel)
    assert str(src) in str(err.value)
    assert os.listdir(out.parent) == []


def test_tilemap_index_rules():
    import numpy as np

    def keys(*rc):
        return np.array([(r << 32) | c for r, c in rc], dtype=np.int64)

    assert tilemap_index({}) == b'{"index":0}'
    assert tilemap_index({0: keys((0, 0))}) == b'{"index":1}'
    assert tilemap_index({0: keys((0, 0)), 1: keys((0, 1), (1, 0))}) == b'{"index":[0,1,1,0]}'
    # level 0 absent but level 2 present: reached through arrays
    assert tilemap_index({2: keys((3, 3))}) == b'{"index":[0,0,0,[0,0,0,1]]}'
    with pytest.raises(ExportError, match="grid"):
        tilemap_index({1: keys((2, 0))})


def test_cli_export_vtpk(fixture_vtpk, source, tmp_path):
    out = tmp_path / "cli.vtpk"
    proc = subprocess.run([sys.executable, "-m", "tilecrate.cli", "export", fixture_vtpk, "-o", str(out),
                           "--levels", "0-3", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kind"] == "vtpk" and report["tiles"] == 60
    pkg = _check_package(out, source)
    assert len(pkg["tiles"]) == 60


def test_corrupt_resource_is_a_clear_error(fixture_vtpk, tmp_path):
    bad = tmp_path / "corrupt.vtpk"
    shutil.copy(fixture_vtpk, bad)
    with zipfile.ZipFile(bad) as zf:
        info = zf.getinfo("p12/resources/styles/root.json")
    with open(bad, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + 10
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="styles/root.json is corrupt or changed"):
        export(str(bad), ExportRequest(levels="0-1"), str(out / "x.vtpk"))
    assert os.listdir(out) == []


def test_broken_local_header_names_its_file_and_spares_the_others(fixture_vtpk, tmp_path):
    """A resource whose local header is not where the central directory says fails the export with
    its name; the package still opens and its other files are read (as the VectorTileServer serves them)."""
    from tilecrate.package.vtpk import _Source

    bad = tmp_path / "badhdr.vtpk"
    shutil.copy(fixture_vtpk, bad)
    with zipfile.ZipFile(bad) as zf:
        info = zf.getinfo("p12/resources/styles/root.json")
        font = next(i for i in zf.infolist() if i.filename.endswith(".pbf") and "/fonts/" in i.filename)
        font_bytes = zf.read(font)
    with open(bad, "r+b") as f:
        f.seek(info.header_offset)
        f.write(b"XX")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="styles/root.json"):
        export(str(bad), ExportRequest(levels="0-1"), str(out / "x.vtpk"))
    assert os.listdir(out) == []
    with open_cache(str(bad)) as cache:
        src = _Source(cache)
        try:
            name = "p12/" + font.filename.split("/", 1)[1]
            assert bytes(src.read_whole(src.files[name])[0]) == font_bytes
            with pytest.raises(ExportError, match="styles/root.json"):
                src.read_whole(src.files["p12/resources/styles/root.json"])
        finally:
            src.close()

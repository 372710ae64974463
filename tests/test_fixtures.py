"""Every real fixture opens, and agrees tile for tile with an independent parse written from FORMATS.md §6.

The reference reader below uses only struct and zipfile (it inflates entries, never mmaps, and follows the
byte tables of FORMATS.md §6.1-6.3 literally), so it shares no code with tilecrate.cache or the Cython core.
"""
from __future__ import annotations

import gzip
import io
import os
import re
import struct
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import tilecrate
from conftest import REAL_SOURCES, real_path

# Esri's Usa.tpkx: the first tile of L00 and L01 lacks the PNG magic (PROVENANCE.md quirk 2)
KNOWN_CORRUPT = {("Usa.tpkx", 0, 0, 0), ("Usa.tpkx", 1, 0, 0), ("Usa_extracted", 0, 0, 0)}


def reference_v2(data: bytes) -> dict[tuple[int, int], bytes]:
    """(row, col) within the bundle -> tile bytes, per FORMATS.md §6.3."""
    version, _, _, offset_bytes = struct.unpack_from("<4I", data, 0)
    assert version == 3 and offset_bytes == 5
    assert struct.unpack_from("<I", data, 60)[0] == 131072
    out = {}
    for i in range(16384):
        rec = struct.unpack_from("<Q", data, 64 + 8 * i)[0]
        size, off = rec >> 40, rec & ((1 << 40) - 1)
        if size:
            out[(i // 128, i % 128)] = data[off:off + size]
            assert len(out[(i // 128, i % 128)]) == size
    return out


def _ref_v1(bundlx: bytes, data: bytes) -> dict[tuple[int, int], bytes]:
    """Per FORMATS.md §6.1/6.2: column-major 5-byte offsets to a 4-byte size prefix."""
    assert struct.unpack_from("<4I", bundlx, 0) == (3, 16, 16384, 5)
    out = {}
    for i in range(16384):
        off = int.from_bytes(bundlx[16 + 5 * i:21 + 5 * i], "little")
        if off == 0:
            continue
        size = struct.unpack_from("<I", data, off)[0]
        if size:
            out[(i % 128, i // 128)] = data[off + 4:off + 4 + size]
    return out


_NAME = re.compile(r"(?:^|/)L(\d+)/R([0-9a-fA-F]+)C([0-9a-fA-F]+)\.bundle$")


def reference_tiles(path: Path) -> dict[tuple[int, int, int], bytes]:
    """(level, row, col) -> bytes for every tile of a folder cache or package."""
    files: dict[str, bytes] = {}
    if path.is_dir():
        for p in path.rglob("*.bundl*"):
            files[p.relative_to(path).as_posix()] = p.read_bytes()
    else:
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                if n.lower().endswith((".bundle", ".bundlx")):
                    files[n] = z.read(n)
    tiles = {}
    for name, data in files.items():
        m = _NAME.search(name)
        if not m:
            continue
        level, r0, c0 = int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)
        bundlx = files.get(name[:-1] + "x")
        found = _ref_v1(bundlx, data) if bundlx is not None else reference_v2(data)
        for (r, c), t in found.items():
            tiles[(level, r0 + r, c0 + c)] = t
    return tiles


@pytest.mark.parametrize("key", sorted(REAL_SOURCES))
def test_fixture_matches_reference(key, real_dir):
    path = real_path(key)
    expected_levels = REAL_SOURCES[key][1]
    ref = reference_tiles(path)
    with tilecrate.open_cache(path) as cache:
        summary = cache.level_summary()
        assert {lv: v["tiles"] for lv, v in summary.items()} == expected_levels
        for lv, v in summary.items():
            assert v["bytes"] == sum(len(t) for (l, _, _), t in ref.items() if l == lv)
        got = {(lv, r, c): t for lv, r, c, t in cache.iter_tiles()}
        assert got == ref
        for (lv, r, c), t in list(ref.items())[:50]:
            assert cache.tile(lv, r, c) == t
        assert cache.warnings == []              # every real bundle name is on the 128-tile grid


def test_fixture_copies_read_the_same_by_descriptor_and_by_open_bundle(real_dir, tmp_path):
    """Every V1 fixture's index read with pread of its size prefixes equals the reference reader's."""
    import shutil

    for key in ("gwc-compactcache", "tiler-sample", "states_filled.tpk", "sample_v1.tpk"):
        src = real_path(key)
        copy = tmp_path / key
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, copy)
        ref = reference_tiles(copy)
        with tilecrate.open_cache(copy) as cache:
            assert cache.version == 1
            got = {}
            for bref in cache.bundles():
                with cache.open_bundle(bref) as data:
                    for i in data.sizes.nonzero()[0]:
                        got[(bref.level, bref.row0 + int(i) // 128, bref.col0 + int(i) % 128)] = \
                            data.tile(bref.row0 + int(i) // 128, bref.col0 + int(i) % 128)
            assert got == ref, key


@pytest.mark.parametrize("key", sorted(REAL_SOURCES))
def test_fixture_tiles_decode(key, real_dir):
    with tilecrate.open_cache(real_path(key)) as cache:
        for lv, r, c, data in cache.iter_tiles():
            if (key, lv, r, c) in KNOWN_CORRUPT:
                with pytest.raises(Exception):
                    Image.open(io.BytesIO(data)).load()
                # the documented damage: the 4-byte PNG magic is missing
                Image.open(io.BytesIO(b"\x89PNG" + data)).load()
                continue
            if cache.tile_format == "pbf":
                assert len(gzip.decompress(data)) > 0
                continue
            img = Image.open(io.BytesIO(data))
            img.load()
            assert img.size == (cache.scheme.tile_cols, cache.scheme.tile_rows)
            assert img.format in ("JPEG", "PNG")


def test_corrupt_tiles_are_returned_verbatim(real_dir):
    with tilecrate.open_cache(real_path("Usa.tpkx")) as cache:
        t = cache.tile(0, 0, 0)
    assert t[:4] == b"\r\n\x1a\n" and b"IHDR" in t[:16]


def test_metadata_of_real_caches(real_dir):
    with tilecrate.open_cache(real_path("wgs84.tpkx")) as c:
        assert c.scheme.tile_cols == 512 and c.scheme.spatial_ref.code == 4326
        assert c.scheme.origin_x == -180 and c.scheme.origin_y == 90
        assert c.kind == "tpkx" and c.storage_format.endswith("CompactV2")
        # two columns at level 0: tiles outside the nominal 2^z grid
        assert sorted((r, col) for lv, r, col, _ in c.iter_tiles(0)) == [(0, 0), (0, 1)]
    with tilecrate.open_cache(real_path("googlemaps.tpkx")) as c:
        assert sorted((r, col) for lv, r, col, _ in c.iter_tiles(0)) == [(0, 0), (1, 0)]
    with tilecrate.open_cache(real_path("nonstandard_zoom_levels.tpk")) as c:
        assert c.levels == [0, 1, 2]
        assert c.scheme.lod(0).scale == pytest.approx(147914381.897889, rel=1e-9)  # LOD0 = web zoom 2
    with tilecrate.open_cache(real_path("gwc-compactcache")) as c:          # Conf.xml, capital C
        assert c.levels == [5, 6] and len(c.scheme.lods) == 20
        assert c.storage_format == "esriMapCacheStorageModeCompact" and c.tile_format == "JPEG"
        assert c.compression_quality == 75
    with tilecrate.open_cache(real_path("tiler-sample")) as c:              # R0900C0d00
        assert c.bundles() == [tilecrate.BundleRef(2, 0x900, 0xD00)]
        assert c.scheme.spatial_ref.code == 4326 and c.scheme.origin_x == -400
    with tilecrate.open_cache(real_path("sample_v3.tpk")) as c:             # GBK root name, no UTF-8 flag
        assert c.name == "图层"
    with tilecrate.open_cache(real_path("alt_root_name.tpk")) as c:
        assert c.name == "TPK Root Name"
    with tilecrate.open_cache(real_path("sample_v1.tpk")) as c:             # bundlx without footer
        assert c.version == 1 and c.levels == [1, 2]
    with tilecrate.open_cache(real_path("tiler-newbundle")) as c:
        assert c.tile_format == "MIXED" and c.full_extent is not None
    with tilecrate.open_cache(real_path("Usa.tpkx")) as c:
        assert c.full_extent.spatial_ref.code == 3857
        assert len(c.scheme.lods) == 24 and c.levels == [0, 1, 2, 3, 4, 5]


def test_service_folder_above_layers(tmp_path, sample_v2):
    svc = tmp_path / "MySvc"
    svc.mkdir()
    os.symlink(sample_v2, svc / "Layers")
    with tilecrate.open_cache(svc) as c:
        assert c.name == "MySvc" and c.levels == [0, 1, 2, 3, 4, 5]


def test_vundler_input_tiles_match_its_bundles(real_dir):
    """Esri's raster-tiles-compactcache ships the Lnn/row/col.jpg tiles its Vundler bundled: read as a
    tile folder, they are the sample cache's tiles, tile for tile."""
    base = real_dir / "raster-tiles-compactcache"
    with tilecrate.open_cache(base / "sample_tiles") as tiles, tilecrate.open_cache(base / "sample_cache") as cache:
        assert tiles.kind == "rowcol" and tiles.tile_format == "JPEG" and tiles.warnings == []
        got = {k[:3]: k[3] for k in tiles.iter_tiles()}
        assert len(got) == 21 and got == {k[:3]: k[3] for k in cache.iter_tiles()}


def test_item_metadata_of_real_packages(real_dir):
    """iteminfo.xml / iteminfo.json travel: title, summary, tags, credits (what a licence requires)."""
    with tilecrate.open_cache(real_path("states_filled.tpk")) as c:
        assert c.item.as_dict() == {"name": "states_filled", "title": "states_filled", "summary": "states",
                                    "tags": ["states"], "description": None, "credits": "US Census Bureau",
                                    "licence": None}
        assert c.name == "states_filled"          # the item's name, not the 'Layers' folder's
    with tilecrate.open_cache(real_path("Usa_extracted")) as c:
        assert c.item.title == "Usa" and c.item.name == "Usa"
    for key in REAL_SOURCES:
        with tilecrate.open_cache(real_path(key)) as c:
            assert isinstance(c.item.tags, tuple) and not any("item information" in w for w in c.warnings), key

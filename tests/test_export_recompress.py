"""End to end: export with optimizeTilesForSize, read the package back with GDAL (ESRIC) and with open_cache;
its tiles are the re-encoded ones, its metadata states the quality used, corrupt tiles pass with a warning."""
from __future__ import annotations

import json
import os
import shutil
import warnings
import zipfile

import numpy as np
import pytest

from tilecrate.cache import open_cache
from tilecrate.export import export
from tilecrate.recompress import reencode_tiles
from tilecrate.request import ExportRequest
from tilecrate.tiling import PACKET, bundle_name, level_dir

import rasterio  # noqa: E402  (an independent reader: missing fails the run, never skips)
from rasterio.io import MemoryFile  # noqa: E402
from rasterio.windows import Window  # noqa: E402


def gdal_decode(data: bytes) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # tiles carry no georeferencing
        with MemoryFile(data) as mf, mf.open() as ds:
            return ds.read()


def tiles_of(path) -> dict:
    with open_cache(str(path)) as cache:
        return {(lv, r, c): t for lv, r, c, t in cache.iter_tiles()}


def expected(source: dict, quality: int) -> dict:
    keys = sorted(source)
    new = reencode_tiles([source[k] for k in keys], quality).tiles
    return dict(zip(keys, new))


def test_tpkx_with_reencoding_opens_in_gdal_with_the_reencoded_tiles(sample_v2, tmp_path):
    out = str(tmp_path / "small.tpkx")
    req = ExportRequest(levels="0-4", optimize_tiles_for_size=True, compression_quality=40)
    result = export(str(sample_v2), req, out)
    plain = export(str(sample_v2), ExportRequest(levels="0-4"), str(tmp_path / "plain.tpkx"))
    assert result.quality_used == 40 and result.warnings == []
    assert result.size < plain.size
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("root.json"))["tileImageInfo"]["compressionQuality"] == 40

    source = {k: v for k, v in tiles_of(sample_v2).items() if k[0] <= 4}
    want = expected(source, 40)
    got = tiles_of(out)
    assert got == want
    assert all(got[k] != source[k] for k in source)
    assert sum(map(len, got.values())) < 0.7 * sum(map(len, source.values()))

    with open_cache(out) as cache, rasterio.open(out, EXTENT_SOURCE="TILING_SCHEME") as ds:
        assert ds.driver == "ESRIC"
        tw, th = cache.scheme.tile_cols, cache.scheme.tile_rows
        checked = 0
        for lv, row, col, data in cache.iter_tiles(4):
            px = ds.read(window=Window(col * tw, row * th, tw, th))
            assert np.array_equal(px[:3], gdal_decode(want[(lv, row, col)])[:3])
            assert not np.array_equal(px[:3], gdal_decode(source[(lv, row, col)])[:3])
            checked += 1
        assert checked == result.levels[4]["tiles"] > 0


def test_tpk_from_mixed_cache_reencodes_only_jpeg(sample_mixed, tmp_path):
    out = str(tmp_path / "mixed.tpk")
    req = ExportRequest(levels="0-4", optimize_tiles_for_size=True, compression_quality=35,
                        storage_format="Compact")
    result = export(str(sample_mixed), req, out)
    assert result.quality_used == 35
    source = {k: v for k, v in tiles_of(sample_mixed).items() if k[0] <= 4}
    got = tiles_of(out)
    assert got == expected(source, 35)
    kinds = {"png": 0, "jpeg": 0}
    for k, old in source.items():
        if old[:4] == b"\x89PNG":
            assert got[k] == old
            kinds["png"] += 1
        else:
            assert len(got[k]) < len(old)
            kinds["jpeg"] += 1
    assert kinds["png"] > 0 and kinds["jpeg"] > 0


def test_quality_at_or_above_source_copies_unchanged(sample_v2, tmp_path):
    out = str(tmp_path / "same.tpkx")
    result = export(str(sample_v2), ExportRequest(levels="0-3", optimize_tiles_for_size=True,
                                                  compression_quality=90), out)
    assert result.quality_used == 75
    assert tiles_of(out) == {k: v for k, v in tiles_of(sample_v2).items() if k[0] <= 3}
    with zipfile.ZipFile(out) as zf:
        assert json.loads(zf.read("root.json"))["tileImageInfo"]["compressionQuality"] == 75


def _copy_and_find_tile(sample: str, tmp_path, k: int) -> tuple[str, str, int, int, int, int]:
    """A copy of `sample` and its k-th stored tile of level 3: (copy, bundle path, row, col, offset, size)."""
    src = tmp_path / "src"
    shutil.copytree(sample, src)
    with open_cache(str(src)) as cache:
        ref = cache.bundles(3)[0]
        offsets, sizes = cache.index(ref)
        i = int(np.flatnonzero(sizes)[k])
        path = os.path.join(str(src), "_alllayers", level_dir(3), bundle_name(ref.row0, ref.col0))
        row, col = ref.row0 + i // PACKET, ref.col0 + i % PACKET
    return str(src), path, row, col, int(offsets[i]), int(sizes[i])


def test_corrupt_tile_is_exported_verbatim_with_a_warning(sample_v2, tmp_path):
    src, path, row, col, off, size = _copy_and_find_tile(sample_v2, tmp_path, 0)
    with open(path, "r+b") as f:                 # an EOI marker in the middle of the scan
        f.seek(off + size // 2)
        f.write(b"\xff\xd9" * 8)
    broken = tiles_of(src)[(3, row, col)]
    out = str(tmp_path / "c.tpkx")
    result = export(str(src), ExportRequest(levels="3", optimize_tiles_for_size=True, compression_quality=40), out)
    assert len(result.warnings) == 1 and f"level 3 row {row} col {col}" in result.warnings[0]
    got = tiles_of(out)
    assert got[(3, row, col)] == broken
    assert sum(1 for k, v in got.items() if v != tiles_of(src)[k]) == len(got) - 1


def test_tile_declaring_a_huge_size_is_exported_verbatim_with_a_warning(sample_v2, tmp_path):
    """A tile whose frame header claims 8192x8192 (a legal tile size, but not this cache's 256) is
    refused before the codec allocates for it: the export keeps its bytes and names it."""
    src, path, row, col, off, size = _copy_and_find_tile(sample_v2, tmp_path, 1)
    with open(path, "r+b") as f:
        f.seek(off)
        tile = bytearray(f.read(size))
        sof = tile.index(b"\xff\xc0")
        tile[sof + 5:sof + 9] = (8192).to_bytes(2, "big") * 2
        f.seek(off)
        f.write(tile)
    out = str(tmp_path / "h.tpkx")
    result = export(str(src), ExportRequest(levels="3", optimize_tiles_for_size=True, compression_quality=40), out)
    assert len(result.warnings) == 1
    assert f"level 3 row {row} col {col}" in result.warnings[0] and "8192x8192" in result.warnings[0]
    got = tiles_of(out)
    assert got[(3, row, col)] == bytes(tile)

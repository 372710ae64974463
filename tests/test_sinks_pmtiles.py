"""PMTiles output, read back tile for tile by the `pmtiles` package (its Reader and all_tiles)."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
from pmtiles.reader import MmapSource, Reader, all_tiles
from pmtiles.tile import Compression, TileType, deserialize_directory, zxy_to_tileid

from conftest import real_path
from tilecrate.cache import open_cache
from tilecrate.export import export
from tilecrate.plan import make_plan
from tilecrate.request import ExportRequest
from tilecrate.sinks import estimate_open
from tilecrate.sinks import pmtiles as pm


def _read(path):
    with open(path, "rb") as f:
        data = f.read()
    reader = Reader(lambda off, n: data[off:off + n])
    return data, reader


def _source_tiles(src, levels=None) -> dict:
    with open_cache(str(src)) as cache:
        return {(lv, col, row): data for lv, row, col, data in cache.iter_tiles()
                if levels is None or lv in levels}


def test_tile_ids_match_the_pmtiles_package():
    rng = np.random.default_rng(3)
    for z in (0, 1, 2, 5, 7, 12, 20):
        x = rng.integers(0, 1 << z, 200)
        y = rng.integers(0, 1 << z, 200)
        got = pm.tile_ids(z, x, y)
        assert got.tolist() == [zxy_to_tileid(z, int(a), int(b)) for a, b in zip(x, y)]
    assert pm.tile_ids(12, np.array([3423]), np.array([1763]))[0] == 19078479


def test_every_tile_reads_back(sample_v2, tmp_path):
    out = tmp_path / "s.pmtiles"
    res = export(str(sample_v2), ExportRequest("0-5"), str(out))
    assert res.kind == "pmtiles" and out.stat().st_size == res.size
    want = _source_tiles(sample_v2)
    data, reader = _read(out)
    h = reader.header()
    assert h["clustered"] and h["internal_compression"] == Compression.GZIP
    assert h["tile_type"] == TileType.JPEG and h["tile_compression"] == Compression.NONE
    assert (h["min_zoom"], h["max_zoom"]) == (0, 5) and h["addressed_tiles_count"] == len(want)
    assert h["root_offset"] + h["root_length"] <= 16384
    got = {k: v for k, v in all_tiles(reader.get_bytes)}
    assert got == want
    for (z, x, y), blob in want.items():
        assert reader.get(z, x, y) == blob
    # clustered: the tile data is in TileID order, every offset pointing at or before the next blob
    root = deserialize_directory(data[h["root_offset"]:h["root_offset"] + h["root_length"]])
    offsets = [e.offset for e in root]
    assert offsets[0] == 0 and all(a <= b for a, b in zip(offsets, offsets[1:]))
    assert [e.tile_id for e in root] == sorted(e.tile_id for e in root)
    est, _, note = estimate_open(make_plan(str(sample_v2), ExportRequest("0-5")), "pmtiles")
    if h["tile_contents_count"] == len(want):       # nothing to deduplicate: the estimate is exact
        assert est == res.size
    else:
        assert est >= res.size and note




def test_identical_tiles_are_stored_once(tmp_path):
    """googlemaps.tpkx holds repeated blank tiles: one blob each, runs for neighbours."""
    src = real_path("googlemaps.tpkx")
    out = tmp_path / "g.pmtiles"
    res = export(str(src), ExportRequest("0-5"), str(out))
    everything = _source_tiles(src)
    # its level 0 has a second row below the Web Mercator world: left out, with a warning
    want = {k: v for k, v in everything.items() if k[1] < (1 << k[0]) and k[2] < (1 << k[0])}
    assert len(want) < len(everything)
    assert any("outside the Web Mercator world" in w for w in res.warnings)
    data, reader = _read(out)
    h = reader.header()
    distinct = len(set(want.values()))
    assert distinct < len(want)
    assert h["tile_contents_count"] == distinct and h["addressed_tiles_count"] == len(want)
    assert h["tile_data_length"] == sum(len(b) for b in set(want.values()))
    assert dict(all_tiles(reader.get_bytes)) == want
    meta = reader.metadata()
    with open_cache(str(src)) as cache:
        assert meta["name"] == (cache.item.title or cache.name)
    assert meta["format"] == "png" and res.tiles == len(want)


def test_leaf_directories(sample_v2, tmp_path, monkeypatch):
    """A root that would pass the limit is split into leaves the reader follows."""
    monkeypatch.setattr(pm, "ROOT_LIMIT", 60)
    monkeypatch.setattr(pm, "LEAF_SIZE", 16)
    out = tmp_path / "leaves.pmtiles"
    export(str(sample_v2), ExportRequest("0-5"), str(out))
    data, reader = _read(out)
    h = reader.header()
    assert h["leaf_directory_length"] > 0 and h["root_length"] <= 60
    assert h["root_offset"] + h["root_length"] <= h["tile_data_offset"] <= 127 + 60
    assert h["leaf_directory_offset"] == h["metadata_offset"] + h["metadata_length"]
    assert h["leaf_directory_offset"] + h["leaf_directory_length"] == len(data)
    root = deserialize_directory(data[h["root_offset"]:h["root_offset"] + h["root_length"]])
    assert all(e.run_length == 0 for e in root) and len(root) > 1
    assert dict(all_tiles(reader.get_bytes)) == _source_tiles(sample_v2)


def test_header_layout(sample_png, tmp_path):
    out = tmp_path / "p.pmtiles"
    export(str(sample_png), ExportRequest("1-3"), str(out))
    data, reader = _read(out)
    assert data[:8] == b"PMTiles\x03"
    root_off, root_len, meta_off, meta_len, leaf_off, leaf_len, data_off, data_len = struct.unpack_from("<8Q", data, 8)
    # header, root, room kept for the root (zeros), tile data, metadata, leaves: no gap after the data
    assert root_off == 127 and root_off + root_len <= data_off <= 16384
    assert data[root_off + root_len:data_off] == bytes(data_off - root_off - root_len)
    assert meta_off == data_off + data_len and leaf_len == 0 and meta_off + meta_len == len(data)
    assert data_off == pm.data_offset(reader.header()["addressed_tiles_count"]) < 16384    # few tiles: little room
    assert json.loads(gzip.decompress(data[meta_off:meta_off + meta_len]))["format"] == "png"
    assert reader.header()["tile_type"] == TileType.PNG
    assert dict(all_tiles(reader.get_bytes)) == _source_tiles(sample_png, {1, 2, 3})
    with open(out, "rb") as f:                 # the package's mmap reader too
        assert len(list(all_tiles(MmapSource(f)))) == len(_source_tiles(sample_png, {1, 2, 3}))


def test_room_for_the_root_bounds_any_root():
    """data_offset(n) holds the root of any n entries, even incompressible ones (random TileIDs far apart,
    runs, lengths and offsets that are never contiguous)."""
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 7, 50, 300, 440, 2000):
        ids = np.sort(rng.choice(1 << 62, size=n, replace=False)).astype(np.uint64)
        runs = rng.integers(1, 1 << 62, n, dtype=np.uint64)
        lengths = rng.integers(1, 1 << 32, n, dtype=np.uint64)
        offsets = rng.integers(0, 1 << 62, n, dtype=np.uint64)
        raw = pm.serialize_directory(ids, runs, lengths, offsets)
        root, leaves = pm.build_directories(ids, runs, lengths, offsets)
        assert pm.HEADER_SIZE + len(root) <= pm.data_offset(n) <= 16384
        if not leaves:
            assert len(raw) <= 10 + 35 * n


def test_refuses_geographic(tmp_path):
    from tilecrate.errors import ExportError

    with pytest.raises(ExportError, match="Web Mercator"):
        export(str(real_path("wgs84.tpkx")), ExportRequest("0"), str(tmp_path / "w.pmtiles"))
    assert list(tmp_path.iterdir()) == []



def test_round_trip_through_the_open_sources(tmp_path):
    """states_filled.tpk -> MBTiles -> PMTiles -> GeoPackage -> XYZ, each read by the sources of the
    previous step: the tiles and the credits arrive unchanged."""
    import sqlite3

    src = real_path("states_filled.tpk")
    want = _source_tiles(src)
    export(str(src), ExportRequest("0-4"), str(tmp_path / "a.mbtiles"))
    export(str(tmp_path / "a.mbtiles"), ExportRequest("0-4"), str(tmp_path / "b.pmtiles"))
    export(str(tmp_path / "b.pmtiles"), ExportRequest("0-4"), str(tmp_path / "c.gpkg"))
    export(str(tmp_path / "c.gpkg"), ExportRequest("0-4"), str(tmp_path / "d"), format="xyz")
    _, reader = _read(tmp_path / "b.pmtiles")
    assert dict(all_tiles(reader.get_bytes)) == want
    assert reader.metadata()["attribution"] == "US Census Bureau"
    db = sqlite3.connect(tmp_path / "c.gpkg")
    got = {(z, x, y): d for z, x, y, d in db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM "
                                                    "states_filled")}
    db.close()
    assert got == want
    assert {(int(p.parts[-3]), int(p.parts[-2]), int(p.stem)): p.read_bytes()
            for p in (tmp_path / "d").rglob("*.png")} == want
    assert json.loads((tmp_path / "d" / "metadata.json").read_text())["name"] == "states_filled"

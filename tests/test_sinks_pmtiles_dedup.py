"""The PMTiles writer's exact deduplication (`Dedup`): (length, CRC-32) keys confirmed by the bytes."""
from __future__ import annotations

import os
import tempfile

from pmtiles.reader import Reader, all_tiles

from tilecrate.export import export
from tilecrate.request import ExportRequest
from tilecrate.sinks import pmtiles as pm


def _run(dedup: pm.Dedup, fd: int, bundles: list[list[bytes]]) -> list[list[int]]:
    data_len, out = 0, []
    for tiles in bundles:
        chunk, offs, data_len = dedup.place(tiles, list(range(len(tiles))), data_len)
        os.write(fd, b"".join(chunk))
        out.append(offs)
    return out


def test_duplicates_within_and_across_bundles():
    with tempfile.TemporaryFile() as f:
        d = pm.Dedup(f.fileno())
        offs = _run(d, f.fileno(), [[b"aaaa", b"bb", b"aaaa"], [b"bb", b"cc", memoryview(b"xaaaa")[1:]]])
        assert offs == [[0, 4, 0], [4, 6, 0]] and d.contents == 3
        f.seek(0)
        assert f.read() == b"aaaabbcc"


def test_same_key_different_bytes_are_both_stored(monkeypatch):
    """Every tile gets the same CRC: equal lengths collide, and only equal bytes are shared."""
    monkeypatch.setattr(pm, "crc32", lambda b: 7)
    with tempfile.TemporaryFile() as f:
        d = pm.Dedup(f.fileno(), hot_bytes=0)        # no cache: earlier bundles are read back
        offs = _run(d, f.fileno(), [[b"ab", b"cd", b"ab"], [b"cd", b"ef", b"ab", b"ef"]])
        assert offs == [[0, 2, 0], [2, 4, 0, 4]] and d.contents == 3
        f.seek(0)
        assert f.read() == b"abcdef"


def test_export_with_crc_collisions_reads_back(sample_png, tmp_path, monkeypatch):
    """An archive written while every tile of a length shares one key still holds every tile."""
    from tilecrate.cache import open_cache

    monkeypatch.setattr(pm, "crc32", lambda b: 0)
    out = tmp_path / "c.pmtiles"
    res = export(str(sample_png), ExportRequest("0-3"), str(out))
    with open_cache(str(sample_png)) as cache:
        want = {(lv, col, row): data for lv, row, col, data in cache.iter_tiles() if lv <= 3}
    data = out.read_bytes()
    reader = Reader(lambda off, n: data[off:off + n])
    assert dict(all_tiles(reader.get_bytes)) == want
    assert reader.header()["tile_contents_count"] == len(set(want.values())) and res.tiles == len(want)


def _pm_tiles(path) -> dict:
    data = open(path, "rb").read()
    return dict(all_tiles(Reader(lambda off, n: data[off:off + n]).get_bytes))


def test_part_of_an_mbtiles_source_without_bundle_bodies(sample_v2, tmp_path):
    """An MBTiles source's blocks reach the sinks as tile lists (`open_tiles`): a polygon's part of them
    is the same archive as the same part of the compact cache it was made from."""
    import json

    aoi = {"rings": [[[0, 0], [2e6, 0], [0, 2e6], [0, 0]]], "spatialReference": {"wkid": 3857}}
    mbt = tmp_path / "src.mbtiles"
    export(str(sample_v2), ExportRequest("0-5"), str(mbt))
    req = ExportRequest("3-5", area_of_interest=json.dumps(aoi))
    a = export(str(mbt), req, str(tmp_path / "a.pmtiles"))
    b = export(str(sample_v2), req, str(tmp_path / "b.pmtiles"))
    got, want = _pm_tiles(tmp_path / "a.pmtiles"), _pm_tiles(tmp_path / "b.pmtiles")
    assert got == want and 0 < a.tiles == b.tiles == len(want) < len(_pm_tiles_all(sample_v2, tmp_path))


def _pm_tiles_all(src, tmp_path) -> dict:
    export(str(src), ExportRequest("3-5"), str(tmp_path / "all.pmtiles"))
    return _pm_tiles(tmp_path / "all.pmtiles")


def test_rows_deleted_after_planning_fail_the_block(sample_v2, tmp_path):
    import sqlite3

    import pytest

    from tilecrate.cache import open_cache
    from tilecrate.errors import BundleError
    from tilecrate.plan import make_plan
    from tilecrate.sinks.common import bundle_tiles, iter_bundles

    mbt = tmp_path / "src.mbtiles"
    export(str(sample_v2), ExportRequest("0-5"), str(mbt))
    with open_cache(str(mbt)) as cache:
        plan = make_plan(cache, ExportRequest("5"))
        bsel = next(iter_bundles(plan))
        rows, cols, tiles, _ = bundle_tiles(cache, plan, bsel)
        assert len(tiles) == bsel.tiles == len(rows) and all(len(t) for t in tiles)
        db = sqlite3.connect(mbt)
        db.execute("DELETE FROM tiles WHERE rowid IN (SELECT rowid FROM tiles WHERE zoom_level = 5 LIMIT 1)")
        db.commit()
        db.close()
        with pytest.raises(BundleError, match="selected tiles now"):
            bundle_tiles(cache, plan, bsel)

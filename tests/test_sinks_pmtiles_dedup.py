"""The PMTiles writer's exact deduplication (`tilecrate._dedup.Dedup`): (length, CRC-32) keys confirmed
by the bytes, so different tiles sharing a CRC (forged here) are both stored."""
from __future__ import annotations

import os
import tempfile
import zlib

import numpy as np
import pytest

from pmtiles.reader import Reader, all_tiles

from tilecrate.export import export
from tilecrate.request import ExportRequest
from tilecrate._dedup import GROUP_COMPARES, Dedup

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0xEDB88320 if _c & 1 else _c >> 1
    _TABLE.append(_c)
_BY_TOP = {t >> 24: i for i, t in enumerate(_TABLE)}


def forge(prefix: bytes, target: int) -> bytes:
    """`prefix` and 4 bytes more whose CRC-32 is `target` (CRC-32 is reversible one byte at a time)."""
    t, picks = target ^ 0xFFFFFFFF, []
    for _ in range(4):
        i = _BY_TOP[t >> 24]
        picks.append(i)
        t = ((t ^ _TABLE[i]) << 8) & 0xFFFFFFFF
    reg, out = zlib.crc32(prefix) ^ 0xFFFFFFFF, bytearray()
    for i in reversed(picks):
        out.append((reg ^ i) & 0xFF)
        reg = (reg >> 8) ^ _TABLE[i]
    return prefix + bytes(out)


def _run(dedup: Dedup, fd: int, bundles: list[list[bytes]]) -> list[list[int]]:
    data_len, out = 0, []
    for tiles in bundles:
        chunk, offs, data_len = dedup.place(tiles, np.arange(len(tiles)), data_len)
        os.write(fd, b"".join(bytes(c) for c in chunk))
        out.append(offs.tolist())
    return out


def test_many_tiles_forged_to_one_key_stay_distinct_and_cheap():
    """Past GROUP_COMPARES different tiles of one key, digests tell them apart (no quadratic compares)."""
    target = zlib.crc32(b"seed")
    forged = [forge(b"tile %04d" % i, target) for i in range(GROUP_COMPARES * 5)]
    assert len(set(forged)) == len(forged) and len({zlib.crc32(t) for t in forged}) == 1
    with tempfile.TemporaryFile() as f:
        d = Dedup(f.fileno(), 0)
        offs = _run(d, f.fileno(), [forged, forged[::-1], forged[::3]])
        first = list(range(0, 13 * len(forged), 13))
        assert offs == [first, first[::-1], first[::3]] and d.contents == len(forged) and d.distinct_keys == 1
        f.seek(0)
        assert f.read() == b"".join(forged)


def test_duplicates_within_and_across_bundles():
    with tempfile.TemporaryFile() as f:
        d = Dedup(f.fileno())
        offs = _run(d, f.fileno(), [[b"aaaa", b"bb", b"aaaa"], [b"bb", b"cc", memoryview(b"xaaaa")[1:]]])
        assert offs == [[0, 4, 0], [4, 6, 0]] and d.contents == 3
        f.seek(0)
        assert f.read() == b"aaaabbcc"


def test_same_key_different_bytes_are_both_stored():
    """Tiles of one length and one CRC-32 but other bytes: each stored, each duplicate found."""
    a = b"first tile\0\0\0\0"
    b = forge(b"other tile", zlib.crc32(a))
    c = forge(b"third tile", zlib.crc32(a))
    assert len({a, b, c}) == 3 and len({len(a), len(b), len(c)}) == 1 and len({zlib.crc32(t) for t in (a, b, c)}) == 1
    for hot in (0, 1 << 20):          # without the cache earlier bundles' tiles are read back from the file
        with tempfile.TemporaryFile() as f:
            d = Dedup(f.fileno(), hot)
            offs = _run(d, f.fileno(), [[a, b, a], [b, c, a, c], [c, b]])
            assert offs == [[0, 14, 0], [14, 28, 0, 28], [28, 14]] and d.contents == 3 and d.distinct_keys == 1
            f.seek(0)
            assert f.read() == a + b + c


def test_bad_arguments_are_refused():
    with tempfile.TemporaryFile() as f:
        d = Dedup(f.fileno())
        with pytest.raises(ValueError, match="order names tile"):
            d.place([b"a"], np.array([1]), 0)
        with pytest.raises(ValueError, match="order names tile"):
            d.place([b"a"], np.array([-1]), 0)
        with pytest.raises(ValueError, match="0 bytes"):
            d.place([b""], np.array([0]), 0)
        with pytest.raises(ValueError, match="negative"):
            d.place([b"a"], np.array([0]), -1)
        with pytest.raises(TypeError):
            d.place(["text"], np.array([0]), 0)
    with pytest.raises(ValueError):
        Dedup(-1)


def test_many_distinct_tiles_grow_the_table():
    tiles = [i.to_bytes(4, "little") for i in range(5000)]
    with tempfile.TemporaryFile() as f:
        d = Dedup(f.fileno())
        offs = _run(d, f.fileno(), [tiles, tiles[::-1]])
        assert offs[0] == list(range(0, 20000, 4)) and offs[1] == offs[0][::-1] and d.contents == 5000


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


def test_a_polygon_reads_only_its_tiles_of_an_mbtiles_block(sample_v2, tmp_path, monkeypatch):
    """The open sinks ask a block for the polygon's tiles only: from an MBTiles read by page, no tile outside
    the polygon is copied out of the file."""
    import json

    from tilecrate.sources import sqlite as sqlite_source

    aoi = {"rings": [[[0, 0], [2e6, 0], [0, 2e6], [0, 0]]], "spatialReference": {"wkid": 3857}}
    mbt = tmp_path / "src.mbtiles"
    export(str(sample_v2), ExportRequest("0-5"), str(mbt))
    read = []
    real = sqlite_source.SqliteBackend._read_cells

    def counted(self, level, got, into=None, at=None):
        read.append(len(got[0]))
        return real(self, level, got, into, at)

    monkeypatch.setattr(sqlite_source.SqliteBackend, "_read_cells", counted)
    a = export(str(mbt), ExportRequest("3-5", area_of_interest=json.dumps(aoi)), str(tmp_path / "a.pmtiles"))
    whole = export(str(mbt), ExportRequest("3-5"), str(tmp_path / "w.pmtiles"))
    assert sum(read) == a.tiles + whole.tiles and 0 < a.tiles < whole.tiles


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


def test_write_all_resumes_short_writes(monkeypatch):
    """Parts of every bytes-like kind land in order, also when each writev takes 2 bytes only (the
    writer the PMTiles sink, the zip writer, folder outputs and cluster tasks share)."""
    from tilecrate.package import kcopy

    parts = [b"abc", memoryview(b"xdefx")[1:4], bytearray(b"ghi"), b"", memoryview(bytes(range(256)))]
    want = b"abcdefghi" + bytes(range(256))
    with tempfile.TemporaryFile() as f:
        kcopy.write_all(f.fileno(), parts)
        f.seek(0)
        assert f.read() == want
    real = os.writev
    monkeypatch.setattr(kcopy.os, "writev", lambda fd, bufs: real(fd, [bytes(memoryview(bufs[0]).cast("B")[:2])]))
    with tempfile.TemporaryFile() as f:
        kcopy.write_all(f.fileno(), parts)
        f.seek(0)
        assert f.read() == want

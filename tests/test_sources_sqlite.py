"""The MBTiles/GeoPackage source's block reads (sources/sqlite.py, blocks.v2_layout): one range query per
block returning its tiles, laid out as a V2 bundle body without a per-tile Python copy; duplicate, empty,
NULL and text rows; the read-only, bounded connection; exports read each block once."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

import tilecrate
from tilecrate.cache import open_cache
from tilecrate.errors import CacheError
from tilecrate.sources import sqlite as sqlite_source
from tilecrate.sources.blocks import BLOCK_LIMIT, v2_body, v2_layout
from tilecrate.tiling import PACKET

PNG = b"\x89PNG\r\n\x1a\n"


def _mbtiles(path: Path, rows, scheme: str | None = None, index: bool = True) -> Path:
    """An MBTiles written with plain sqlite3 (no tilecrate): rows of (z, x, tms_y, data)."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
    meta = [("name", "t"), ("format", "png")] + ([("scheme", scheme)] if scheme else [])
    db.executemany("INSERT INTO metadata VALUES (?, ?)", meta)
    db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
    if index:
        db.execute("CREATE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
    db.commit()
    db.close()
    return path


def _tile(k: int, n: int = 40) -> bytes:
    return PNG + k.to_bytes(4, "little") * (n // 4)


def _check_body(data) -> dict[int, bytes]:
    """{index: bytes} of a BundleData, checking the V2 layout: a little-endian size before every tile."""
    buf = bytes(data.buf)
    out = {}
    for i in np.flatnonzero(data.sizes).tolist():
        off, n = int(data.offsets[i]), int(data.sizes[i])
        assert int.from_bytes(buf[off - 4:off], "little") == n
        out[i] = buf[off:off + n]
    assert len(buf) == sum(4 + len(t) for t in out.values())
    return out


def test_v2_layout_matches_the_dict_layout():
    rng = np.random.default_rng(3)
    idx = np.sort(rng.choice(PACKET * PACKET, 300, replace=False))
    tiles = [bytes(rng.integers(0, 256, int(rng.integers(1, 90)), dtype=np.uint8)) for _ in idx]
    buf, offsets, sizes = v2_layout(idx, tiles, "t")
    want = v2_body(dict(zip(idx.tolist(), tiles)), "t")
    assert bytes(buf) == bytes(want[0]) and (offsets == want[1]).all() and (sizes == want[2]).all()
    assert [bytes(buf[int(offsets[i]):int(offsets[i]) + int(sizes[i])]) for i in idx] == tiles
    empty = v2_layout(np.zeros(0, dtype=np.int64), [], "t")
    assert empty[0].nbytes == 0 and not empty[2].any()
    for bad in ([3, 3], [5, 4], [-1, 2], [0, PACKET * PACKET]):
        with pytest.raises(ValueError, match="ascending, unique and inside the block"):
            v2_layout(np.array(bad), [b"a", b"b"], "t")


def test_block_limit(monkeypatch):
    from tilecrate.sources import blocks
    monkeypatch.setattr(blocks, "BLOCK_LIMIT", 100)
    with pytest.raises(CacheError, match="t: one 128x128 block holds 108 bytes"):
        blocks.v2_layout(np.array([0, 1]), [b"x" * 50, b"y" * 50], "t")
    assert BLOCK_LIMIT == 1 << 30


@pytest.mark.parametrize("scheme", [None, "xyz"])
def test_block_read_once_in_row_major_order(tmp_path, scheme):
    z, n = 8, 256
    cells = [(x, y) for x in range(120, 140) for y in range(0, 130, 3)]
    rows = [(z, x, (n - 1 - y) if scheme is None else y, _tile(x * 1000 + y)) for x, y in cells]
    rows.reverse()                                               # stored in no useful order
    p = _mbtiles(tmp_path / "o.mbtiles", rows, scheme)
    with open_cache(p) as c:
        want = {(y, x): _tile(x * 1000 + y) for x, y in cells}
        got = {}
        for ref in c.bundles(z):
            with c.open_bundle(ref) as data:
                for i, t in _check_body(data).items():
                    got[(ref.row0 + i // PACKET, ref.col0 + i % PACKET)] = t
                offs = data.offsets[data.sizes > 0]
                assert (np.diff(offs.astype(np.int64)) > 0).all()          # laid out row-major
        assert got == want
        assert c.tile(z, 3, 121) == _tile(121003) and c.tile(z, 4, 121) is None


def test_duplicate_empty_null_and_text_rows(tmp_path):
    rows = [(1, 0, 1, _tile(1)), (1, 0, 1, _tile(2)),            # duplicate row: the first read is used
            (1, 1, 1, b""), (1, 0, 0, None),                     # empty and NULL: no tile
            (1, 1, 0, "text tile")]                              # text: its UTF-8 bytes
    p = _mbtiles(tmp_path / "d.mbtiles", rows, index=False)
    with open_cache(p) as c:
        ref = c.bundles(1)[0]
        with c.open_bundle(ref) as data:
            tiles = _check_body(data)
        first = c._store.query("SELECT tile_data FROM tiles WHERE zoom_level = 1 AND tile_column = 0 "
                               "AND tile_row = 1")[0][0]
        assert tiles == {0: first, PACKET + 1: b"text tile"}
        assert c._store.block_tiles(1, 0, 0)[1] == tiles


def test_non_integer_columns_are_an_error(tmp_path):
    p = _mbtiles(tmp_path / "r.mbtiles", [(2, 1, 1, _tile(1)), (2, 1.5, 2, _tile(2))])
    with open_cache(p) as c:
        with pytest.raises(CacheError, match="r.mbtiles: level 2 has tile rows whose column or row is not an integer"):
            c.level_summary()
    v = tmp_path / "v.mbtiles"                       # a view whose columns are reals of whole numbers
    with sqlite3.connect(v) as db:
        db.execute("CREATE TABLE t (z, x, y, d)")
        db.execute("INSERT INTO t VALUES (2, 1, 1, ?)", (_tile(1),))
        db.execute("CREATE VIEW tiles AS SELECT z AS zoom_level, x * 1.0 AS tile_column, y AS tile_row, "
                   "d AS tile_data FROM t")
    with open_cache(v) as c:
        with pytest.raises(CacheError, match="v.mbtiles: level 2 has tile rows whose column or row is not an integer"):
            c._store.block_body(2, 0, 0, "b")
        with pytest.raises(CacheError, match="column or row is not an integer"):
            c.level_summary()


def test_connections_read_only_without_mmap(tmp_path):
    p = _mbtiles(tmp_path / "c.mbtiles", [(0, 0, 0, _tile(0))])
    with open_cache(p) as c:
        conn = c._store.conn()
        assert conn.execute("PRAGMA mmap_size").fetchone()[0] == 0       # a truncated file: an error, not SIGBUS
        assert conn.execute("PRAGMA query_only").fetchone()[0] == 1
        assert conn.execute("PRAGMA cache_size").fetchone()[0] == -sqlite_source.CACHE_KIB
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("DELETE FROM tiles")


@pytest.mark.parametrize("pages", [True, False])
@pytest.mark.parametrize("out", ["o.pmtiles", "o.tpkx", "o.mbtiles"])
def test_export_reads_each_block_once(tmp_path, monkeypatch, out, pages):
    monkeypatch.setattr(sqlite_source, "PAGE_READS", pages)
    z, n = 9, 512
    cells = [(x, y) for x in range(100, 300, 2) for y in range(100, 120)]      # three blocks wide, one high
    p = _mbtiles(tmp_path / "e.mbtiles", [(z, x, n - 1 - y, _tile(x * 7 + y)) for x, y in cells])
    seen: list[str] = []
    real = sqlite_source.SqliteBackend.query

    def query(self, sql, args=()):
        seen.append(sql)
        return real(self, sql, args)

    monkeypatch.setattr(sqlite_source.SqliteBackend, "query", query)
    real_blobs = sqlite_source.SqliteBackend.query_blobs

    def query_blobs(self, sql, args, level, hint=0):
        seen.append(sql)
        return real_blobs(self, sql, args, level, hint)

    monkeypatch.setattr(sqlite_source.SqliteBackend, "query_blobs", query_blobs)
    real_cells = sqlite_source.SqliteBackend._read_cells

    def read_cells(self, level, got, *into):
        seen.append("pages")
        return real_cells(self, level, got, *into)

    monkeypatch.setattr(sqlite_source.SqliteBackend, "_read_cells", read_cells)
    res = tilecrate.export(str(p), tilecrate.ExportRequest(levels="9"), str(tmp_path / out))
    assert res.tiles == len(cells)
    reads = [s for s in seen if "tile_data FROM" in s and "length(" not in s and "LIMIT" not in s]
    # blocks (0,0), (0,128), (0,256): one read each, from the table's pages or by one query
    assert (seen.count("pages"), len(reads)) == ((3, 0) if pages else (0, 3))
    assert not [s for s in seen if "length(tile_data)" in s]    # sizes for selection come from the level scan


def test_non_integer_columns_block_by_block(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_source, "SCAN_LIMIT", 1)          # the level is read block by block
    v = tmp_path / "b.mbtiles"
    with sqlite3.connect(v) as db:
        db.execute("CREATE TABLE t (z, x, y, d)")
        db.executemany("INSERT INTO t VALUES (2, 1, ?, ?)", [(1, _tile(1)), (2, _tile(2))])
        db.execute("CREATE VIEW tiles AS SELECT z AS zoom_level, x AS tile_column, y * 1.0 AS tile_row, "
                   "d AS tile_data FROM t")
    with open_cache(v) as c:
        with pytest.raises(CacheError, match="b.mbtiles: level 2 has tile rows whose column or row is not an integer"):
            c.level_summary()


def test_cells_past_the_budget_are_read_through_sql(tmp_path, monkeypatch):
    """Where scanned tiles lie in the pages is kept up to CELLS_BUDGET a file: a level past it keeps only its
    sizes and its blocks are read through SQL, with the same bytes; a rewritten file's scans are dropped."""
    rows = [(z, x, (1 << z) - 1 - y, _tile(z * 1000 + x * 10 + y, 300)) for z in (3, 4) for x in range(8)
            for y in range(8)]
    p = _mbtiles(tmp_path / "b.mbtiles", rows)
    want = {(z, (1 << z) - 1 - y, x): t for z, x, y, t in rows}
    monkeypatch.setattr(sqlite_source, "CELLS_BUDGET", 64 * 24 + 10)     # one level's 64 tiles fit, not two
    with open_cache(p) as c:
        b = c._store
        assert b.reads_pages()
        kept = {}
        for z in (3, 4):
            b.block_index(z, 0, 0)                      # planning scans the level
            ident, idx, tiles = b.block_list(z, 0, 0)
            kept[z] = b._scans[z][1][(0, 0)][2] is not None
            assert {(z, i // PACKET, i % PACKET): bytes(t) for i, t in zip(idx.tolist(), tiles)} == \
                {k: v for k, v in want.items() if k[0] == z}
        assert kept == {3: True, 4: False}
        with sqlite3.connect(p) as db:                   # another version of the file: the old scans go
            db.execute("UPDATE tiles SET tile_data = ? WHERE zoom_level = 4 AND tile_column = 0", (_tile(7, 9),))
        b.block_index(4, 0, 0)
        ident, idx, tiles = b.block_list(4, 0, 0)
        assert set(b._scans) == {4} and b._scans[4][0] == b.identity()
        assert b._scans[4][1][(0, 0)][2] is not None     # alone now, its cells fit
        assert bytes(tiles[list(idx).index(7 * PACKET)]) == _tile(7, 9)

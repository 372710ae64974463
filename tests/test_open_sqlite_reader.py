"""tilecrate._sqlite.Reader (SQLite's C API, rows into arrays) against Python's sqlite3 on the same files."""
from __future__ import annotations

import os
import sqlite3
import threading

import numpy as np
import pytest

from tilecrate._sqlite import Reader, SqliteError

QUERY = "SELECT zoom_level * 1000 + tile_column, tile_data FROM tiles WHERE zoom_level >= ? ORDER BY rowid"


def _db(path, rows, wal=False) -> str:
    db = sqlite3.connect(path)
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE tiles (zoom_level, tile_column, tile_row, tile_data)")
    db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return str(path)


def _mbtiles(path, rows):
    """An MBTiles `tiles` table (with its unique index) of (zoom, column, row, data) rows."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.execute("CREATE UNIQUE INDEX t ON tiles (zoom_level, tile_column, tile_row)")
        db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
    return path


def _python_rows(path, sql, args):
    with sqlite3.connect(path) as db:
        return db.execute(sql, args).fetchall()


def _as_bytes(v) -> bytes:
    return v if isinstance(v, bytes) else v.encode() if isinstance(v, str) else b""


def test_blobs_and_ints_match_python_sqlite3(tmp_path):
    rng = np.random.default_rng(5)
    rows = [(z, c, c * 3, rng.bytes(int(rng.integers(1, 20000)))) for z in range(3) for c in range(40)]
    rows += [(3, 1, 1, "text tile é"), (3, 2, 2, None), (3, 3, 3, 42), (3, 4, 4, b"")]
    path = _db(tmp_path / "a.db", rows)
    r = Reader(path)
    keys, offs, buf = r.blobs(QUERY, (0,), hint=10)      # a small first size: the buffer grows
    want = _python_rows(path, QUERY, (0,))
    assert keys.tolist() == [k for k, _ in want]
    view = memoryview(buf)
    assert [bytes(view[a:b]) for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())] == [_as_bytes(d) for _, d in want]
    scan = "SELECT tile_column, tile_row, IFNULL(length(tile_data), 0) FROM tiles WHERE zoom_level = ?"
    for z in range(4):
        assert r.ints3(scan, (z,)).tolist() == [list(t) for t in _python_rows(path, scan, (z,))]
    assert r.ints3(scan, (9,)).shape == (0, 3)
    assert r.ints3(scan, (0,), limit=39) is None and r.ints3(scan, (0,), limit=40).shape == (40, 3)
    del r, keys, offs
    assert bytes(view[:1]) == _as_bytes(want[0][1])[:1]      # the buffer outlives the reader


def test_bad_results_and_statements(tmp_path):
    path = _db(tmp_path / "b.db", [(1, 1.5, "x", b"abc"), (1, 2, 2, b"defg")])
    r = Reader(path)
    with pytest.raises(SqliteError, match="should be an integer"):
        r.ints3("SELECT tile_column, tile_row, 0 FROM tiles", ())
    with pytest.raises(SqliteError, match="should be an integer"):
        r.blobs("SELECT tile_column, tile_data FROM tiles", ())
    with pytest.raises(MemoryError, match="pass 5 bytes"):
        r.blobs("SELECT zoom_level, tile_data FROM tiles", (), max_bytes=5)
    assert r.blobs("SELECT zoom_level, tile_data FROM tiles", (), max_bytes=7)[1].tolist() == [0, 3, 7]
    with pytest.raises(ValueError, match="3 columns"):
        r.ints3("SELECT 1, 2", ())
    with pytest.raises(ValueError, match="parameters"):
        r.ints3("SELECT ?, 2, 3", ())
    with pytest.raises(SqliteError, match="no such table"):
        r.ints3("SELECT a, b, c FROM missing_table", ())
    with pytest.raises(SqliteError, match="readonly"):
        r.ints3("INSERT INTO tiles VALUES (1, 2, 3, 4) RETURNING 1, 2, 3", ())
    with pytest.raises(SqliteError, match="interrupted"):
        r.ints3("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT i, i, i FROM n "
                "WHERE i < 0", (), seconds=0.05)
    with pytest.raises(OverflowError, match="64 bits"):
        r.ints3("SELECT ?, 2, 3", (1 << 63,))
    assert r.ints3("SELECT 1, 2, 3", ()).tolist() == [[1, 2, 3]]        # usable after each error
    r.close()
    with pytest.raises(SqliteError, match="closed"):
        r.ints3("SELECT 1, 2, 3", ())


def test_not_a_database_missing_and_truncated(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite" * 1000)
    with pytest.raises(SqliteError, match="not a database"):
        Reader(str(junk))
    with pytest.raises(SqliteError, match="unable to open"):
        Reader(str(tmp_path / "missing.db"))
    assert not (tmp_path / "missing.db").exists()              # mode=ro never creates the file
    path = _db(tmp_path / "t.db", [(1, i, i, os.urandom(30000)) for i in range(50)])
    r = Reader(path)
    os.truncate(path, os.path.getsize(path) // 2)              # truncated under an open reader
    with pytest.raises(SqliteError, match="malformed|disk I/O|short read"):
        r.blobs("SELECT tile_column, tile_data FROM tiles", ())


def test_wal_rows_not_yet_checkpointed_are_read(tmp_path):
    path = _db(tmp_path / "w.db", [(1, 1, 1, b"a")], wal=True)
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO tiles VALUES (1, 2, 2, x'0102')")
    writer.commit()
    assert os.path.getsize(path + "-wal") > 0
    keys, offs, buf = Reader(path).blobs("SELECT tile_column, tile_data FROM tiles ORDER BY tile_column", ())
    assert keys.tolist() == [1, 2] and bytes(buf) == b"a\x01\x02"
    writer.close()


def test_one_reader_one_thread_at_a_time(tmp_path):
    path = _db(tmp_path / "c.db", [(1, i, i, b"x") for i in range(10)])
    r = Reader(path)
    slow = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) "
            "SELECT i, i, i FROM n WHERE i = 3000000")
    errors: list[Exception] = []
    started = threading.Event()

    def other():
        started.set()
        try:
            r.ints3(slow, ())
        except SqliteError as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    started.wait()
    clashes = 0
    while t.is_alive():
        try:
            r.ints3("SELECT 1, 2, 3", ())
        except SqliteError as e:
            assert "in use by another thread" in str(e)
            clashes += 1
    t.join()
    assert not errors and clashes > 0
    assert r.ints3(slow, ()).tolist() == [[3000000] * 3]


@pytest.mark.parametrize("pages", [True, False])
def test_large_block_read_as_two_halves_matches_one_read(tmp_path, monkeypatch, pages):
    from tilecrate.sources import sqlite as sqlite_source
    from tilecrate.sources.blocks import BundleRef
    from tilecrate.sources.sqlite import open_sqlite

    monkeypatch.setattr(sqlite_source, "PAGE_READS", pages)     # halves of the table's pages, or of the query

    rng = np.random.default_rng(7)
    rows = [(8, c, 255 - r, rng.bytes(int(rng.integers(1, 3000)))) for c in range(3, 120) for r in range(5, 60)
            if (c * r) % 7]
    rows += [(8, 10, 255 - 6, b"second row for one tile"), (8, 100, 255 - 7, None), (8, 101, 255 - 7, b"")]
    path = tmp_path / "big.mbtiles"
    with sqlite3.connect(path) as db:          # no unique index: duplicate rows happen in third-party files
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
        db.execute("CREATE INDEX t ON tiles (zoom_level, tile_column, tile_row)")
    ref = BundleRef(8, 0, 0)
    got = {}
    monkeypatch.setattr(sqlite_source, "spare_core", lambda: True)      # whatever the machine's load
    for split in (10 ** 9, 1):
        monkeypatch.setattr(sqlite_source, "SPLIT_TILES", split)
        monkeypatch.setattr(sqlite_source, "SPLIT_BYTES", split)
        with open_sqlite(str(path)) as cache:
            idx, tiles = cache.open_tiles(ref)
            got[split] = (idx.tolist(), [bytes(t) for t in tiles])
            assert (cache._store._pool is not None) == (split == 1)      # the second half ran on the helper
            assert cache._store.reads_pages() == pages
    assert got[1] == got[10 ** 9]
    want = {}
    for z, c, r, d in rows:
        if d:
            want.setdefault((255 - r) * 128 + c, d)          # of duplicate rows the first is used
    assert got[1][0] == sorted(want) and got[1][1] == [want[i] for i in sorted(want)]


def test_large_level_scanned_as_two_halves_matches_one_scan(tmp_path, monkeypatch):
    from tilecrate.sources import sqlite as sqlite_source
    from tilecrate.sources.sqlite import open_sqlite

    monkeypatch.setattr(sqlite_source, "PAGE_READS", False)     # a located level is found in one walk, not split

    rng = np.random.default_rng(11)
    rows = [(z, c, (1 << z) - 1 - r, rng.bytes(int(rng.integers(1, 400))))
            for z, span in ((7, range(30, 100)), (8, range(60, 200))) for c in span for r in span if (c + r) % 5]
    path = tmp_path / "levels.mbtiles"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
        db.execute("CREATE UNIQUE INDEX t ON tiles (zoom_level, tile_column, tile_row)")
    got = {}
    monkeypatch.setattr(sqlite_source, "spare_core", lambda: True)
    for split in (10 ** 9, 100):
        monkeypatch.setattr(sqlite_source, "SPLIT_TILES", split)
        with open_sqlite(str(path)) as cache:
            backend = cache._store
            got[split] = {(ref.level, ref.row0, ref.col0): cache.index(ref)[1].tolist()
                          for ref in cache.bundles()}
            ident = backend.identity()
            assert (backend._scan_split(8, ident) is not None) == (split == 100)   # level 7 holds 3 920 tiles
            assert (backend._pool is not None) == (split == 100)
    assert got[100] == got[10 ** 9]
    assert sum(np.count_nonzero(v) for v in got[100].values()) == len(rows)


def test_connections_of_ended_threads_are_closed(tmp_path):
    """An open cache read by the threads of many exports keeps connections for the live threads only."""
    from tilecrate.sources.blocks import BundleRef
    from tilecrate.sources.sqlite import open_sqlite

    path = tmp_path / "t.mbtiles"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.executemany("INSERT INTO tiles VALUES (3, ?, 7, ?)", [(c, b"tile %d" % c) for c in range(8)])
    with open_sqlite(str(path)) as cache:
        for _ in range(30):
            t = threading.Thread(target=lambda: cache.open_tiles(BundleRef(3, 0, 0)))
            t.start()
            t.join()
        idx, tiles = cache.open_tiles(BundleRef(3, 0, 0))
        assert [bytes(t) for t in tiles] == [b"tile %d" % c for c in range(8)]
        kept = cache._store._conns
        assert len(kept) <= 3 and all(t.is_alive() for t, _ in kept)


def test_helper_threads_only_with_a_spare_core(monkeypatch):
    from tilecrate import cores

    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0, 1})
    for load, spare in ((0.2, True), (1.4, True), (1.6, False), (5.0, False)):
        monkeypatch.setattr(cores, "_last", (-1e9, True))
        monkeypatch.setattr(cores.os, "getloadavg", lambda: (load, 0.0, 0.0))
        assert cores.spare_core() is spare
    monkeypatch.setattr(cores.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cores.spare_core() is False              # checked at most once a second: the last answer
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(cores, "_last", (-1e9, True))
    assert cores.spare_core() is False              # one core: never a helper


def test_exports_identical_with_and_without_helper_threads(tmp_path, monkeypatch):
    import tilecrate
    from tilecrate.sources import sqlite as sqlite_source

    rng = np.random.default_rng(13)
    blobs = [rng.bytes(int(rng.integers(50, 900))) for _ in range(40)]
    rows = [(z, c, (1 << z) - 1 - r, blobs[(c * 7 + r + z) % 40]) for z in range(0, 9)
            for c in range(min(1 << z, 90)) for r in range(min(1 << z, 70))]
    path = tmp_path / "s.mbtiles"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.executemany("INSERT INTO metadata VALUES (?, ?)", [("name", "s"), ("format", "png")])
        db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
        db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
        db.execute("CREATE UNIQUE INDEX t ON tiles (zoom_level, tile_column, tile_row)")
    monkeypatch.setattr(sqlite_source, "SPLIT_TILES", 1000)
    outputs = {}
    for spare in (True, False):
        monkeypatch.setattr(sqlite_source, "spare_core", lambda: spare)
        for ext in ("pmtiles", "mbtiles"):
            out = tmp_path / f"{spare}.{ext}"
            assert tilecrate.export(str(path), tilecrate.ExportRequest(levels="0-8"), str(out)).tiles == len(rows)
            outputs[spare, ext] = out.read_bytes()
    assert outputs[True, "pmtiles"] == outputs[False, "pmtiles"]
    assert outputs[True, "mbtiles"] == outputs[False, "mbtiles"]


def test_page_reader_arguments_and_a_wal_beside_a_rollback_header(tmp_path):
    """read_into/read_cells refuse None (Cython lets None through a typed argument unless told); a -wal beside
    a file whose header says rollback is read by SQLite whatever the header says, so the page reader stands
    aside (pages_begin: None) and the backend serves SQLite's bytes."""
    import shutil

    from tilecrate._sqlite import new_buffer
    from tilecrate.sources.sqlite import open_sqlite

    p = tmp_path / "a.mbtiles"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
    c.execute("CREATE UNIQUE INDEX t ON tiles (zoom_level, tile_column, tile_row)")
    c.execute("INSERT INTO tiles VALUES (0, 0, 0, ?)", (b"OLD" * 10,))
    c.commit()
    r = Reader(str(p))
    header = r.pages_begin()
    try:
        with pytest.raises(TypeError):
            r.read_into(None, np.zeros((1, 3), np.uint64), [1], [0], header)
        with pytest.raises(TypeError):
            r.read_cells(np.zeros((1, 3), np.uint64), [1], None)
        with pytest.raises(ValueError, match="outside"):
            r.read_into(new_buffer(8), np.zeros((1, 3), np.uint64), [9], [0], header)
    finally:
        r.pages_end()
        r.close()
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute("UPDATE tiles SET tile_data = ?", (b"NEW" * 10,))
    c.commit()
    q = tmp_path / "b.mbtiles"
    shutil.copy(p, q)
    shutil.copy(str(p) + "-wal", str(q) + "-wal")
    c.close()
    with open(q, "r+b") as f:                       # the header says rollback journal; the -wal says otherwise
        f.seek(18)
        f.write(b"\x01\x01")
    r = Reader(str(q))
    try:
        assert r.pages_begin() is None
    finally:
        r.pages_end()
        r.close()
    with open_sqlite(str(q)) as cache:
        b = cache._store
        assert not b.reads_pages()
        b.block_index(0, 0, 0)
        assert bytes(b.block_list(0, 0, 0)[2][0]) == bytes(b.block_body(0, 0, 0, "t")[1][4:]) == b"NEW" * 10


def test_an_index_naming_one_row_twice_goes_through_sql(tmp_path):
    """A corrupt index whose two entries name one rowid (SQLite still reads it): the level is scanned through
    SQL instead of the page reader refusing the repeated rowid with a bare ValueError."""
    from tilecrate.sources.sqlite import open_sqlite

    p = tmp_path / "dup.mbtiles"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
    c.execute("CREATE INDEX ti ON tiles (zoom_level, tile_column, tile_row)")
    c.execute("INSERT INTO tiles VALUES (1, 0, 0, x'AA')")
    c.execute("INSERT INTO tiles VALUES (1, 0, 1, x'BB')")
    c.commit()
    page = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'ti'").fetchone()[0]
    size = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    data = bytearray(p.read_bytes())
    at = data.find(bytes([5, 9, 8, 9, 1, 2]), (page - 1) * size, page * size)   # the entry (1, 0, 1) -> rowid 2
    assert at > 0
    data[at + 5] = 1                                                            # ... now names rowid 1
    p.write_bytes(data)
    want = sqlite3.connect(p).execute("SELECT rowid FROM tiles WHERE zoom_level = 1 AND tile_column BETWEEN 0 AND 1 "
                                      "AND tile_row BETWEEN 0 AND 1").fetchall()
    assert want == [(1,), (1,)]
    with open_sqlite(str(p)) as cache:
        b = cache._store
        assert b.blocks(1) == {(0, 0)}
        assert b._scans[1][1][(0, 0)][2] is None            # sizes from SQL, no cells
        b.block_list(1, 0, 0)


def test_a_closed_source_starts_no_thread(tmp_path, monkeypatch):
    """After close(), a large body is read inline (no helper thread outlives the source), and a Dask recipe of
    a separate-tiles source is refused before any read (it has no bundle file to copy)."""
    from tilecrate.runners import tasks
    from tilecrate.sources import sqlite as sqlite_source
    from tilecrate.sources.sqlite import open_sqlite

    monkeypatch.setattr(sqlite_source, "BANDS_FROM", 16)
    rng = np.random.default_rng(3)
    p = _mbtiles(tmp_path / "c.mbtiles", [(4, x, y, rng.bytes(500 + x * y)) for x in range(16) for y in range(16)])
    cache = open_sqlite(str(p))
    b = cache._store
    b.block_index(4, 0, 0)
    banded = b.block_body(4, 0, 0, "t", bands=True)
    banded[4].wait(banded[4].total)
    b.close()
    inline = b.block_body(4, 0, 0, "t", bands=True)
    assert len(inline) == 4 and b._pool is None
    assert bytes(inline[1]) == bytes(banded[1])

    class Task:
        policy = None

    class Tiles:
        def open_tiles(self, ref):
            raise AssertionError("read")

    assert tasks.bundle_recipe(Task(), cache=Tiles()) is None


def test_freed_large_buffers_are_kept_for_reuse_within_a_bound():
    """A large Buffer's mapping goes back to a pool when freed (the next one of its size skips the kernel's
    zeroing of fresh pages), at most POOL_LIMIT bytes of them; a pooled buffer comes back at the size asked."""
    import gc

    from tilecrate._sqlite import POOL_LIMIT, new_buffer, pooled_bytes

    gc.collect()
    many = [new_buffer(8 << 20) for _ in range(12)]         # more than the pool keeps: it takes what it held
    assert all(len(b) == 8 << 20 for b in many)
    del many
    kept = pooled_bytes()
    assert 0 < kept <= POOL_LIMIT
    again = new_buffer(5 << 20)
    assert len(again) == 5 << 20 and kept - pooled_bytes() >= 6 << 20       # a pooled mapping, whole 2 MiB pages
    del again
    assert pooled_bytes() == kept
    small = new_buffer(1000)                                # malloc'd: never pooled
    del small
    assert pooled_bytes() == kept


def test_the_page_layout_is_worked_out_once_and_not_on_the_prefetch_thread(tmp_path, monkeypatch):
    """prefetch_scans works the table's page layout out on the calling thread's connection before its thread
    starts (which then opens no Python connection), and threads asking at once work it out once."""
    from tilecrate.sources import sqlite as sqlite_source
    from tilecrate.sources.sqlite import open_sqlite

    monkeypatch.setattr(sqlite_source, "spare_core", lambda: True)
    rng = np.random.default_rng(8)
    p = _mbtiles(tmp_path / "l.mbtiles",
                 [(z, x, y, rng.bytes(300)) for z in range(4) for x in range(1 << z) for y in range(1 << z)])
    worked, opened = [], []
    real_layout, real_connect = sqlite_source._table_layout, sqlite_source.connect
    monkeypatch.setattr(sqlite_source, "_table_layout", lambda c, t: worked.append(1) or real_layout(c, t))
    monkeypatch.setattr(sqlite_source, "connect",
                        lambda *a: opened.append(threading.current_thread().name) or real_connect(*a))
    with open_sqlite(str(p)) as cache:
        b = cache._store
        b.prefetch_scans([0, 1, 2, 3])
        assert len(worked) == 1
        for z in range(4):
            assert b.blocks(z) == {(0, 0)}
        assert not [name for name in opened if name.startswith("tilecrate-scan")], opened
        b._layout = None
        threads = [threading.Thread(target=b._page_layout, args=(b.identity(),)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(worked) == 2

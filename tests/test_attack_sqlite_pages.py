"""An attacker's and an operator's tests of the MBTiles/GeoPackage page reader (tilecrate._sqlite's pages_begin,
locate, read_cells; SqliteBackend.reads_pages): files of every layout SQLite writes, generated here with Python's
sqlite3, read through the backend and compared byte for byte with sqlite3's own rows; then files corrupted at
exactly one structure (found by tests/sqlite_file_format.py, an independent parser of SQLite's file format) and
files changed by another process between the reader's steps. Risky reads run in a child process with a timeout:
a crash (a signal) or a hang fails the test, as does any byte that is not SQLite's."""
from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sqlite_file_format as sff
from tilecrate.cache import open_cache
from tilecrate.errors import BundleError, CacheError
from tilecrate.tiling import PACKET

PNG = b"\x89PNG\r\n\x1a\n"
HERE = Path(__file__).resolve().parent
CHILD_SECONDS = 60


# -- generated files ---------------------------------------------------------------------------------------

def _blob(seed: int, n: int) -> bytes:
    """n bytes, the first 8 a PNG signature when they fit (format detection samples the first rows)."""
    body = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    return (PNG + body[8:]) if n >= 8 else body


SIZES = [40, 41, 0, 1, 7, 100, 400, 470, 477, 478, 479, 990, 1000, 1024, 1500, 4061, 4062, 4063, 4096, 5000,
         16000, 65500, 65536, 70000, 300_000]


def _cells() -> list[tuple[int, int, int]]:
    """(z, x, xyz_y) of the generated pyramid: levels 0-2 whole, level 8 in four blocks."""
    out = [(z, x, y) for z in range(3) for y in range(1 << z) for x in range(1 << z)]
    out += [(8, x, y) for x in range(125, 131) for y in (0, 1, 2, 126, 127, 128, 130)]
    return out


def _rows(seed: int = 1, sizes=SIZES, tms: bool = True) -> list[tuple[int, int, int, bytes]]:
    """(z, x, stored row, data): the first rows 40-byte tiles, then every size of `sizes` in turn."""
    out = []
    for i, (z, x, y) in enumerate(_cells()):
        n = 40 if i < 3 else sizes[i % len(sizes)]
        out.append((z, x, ((1 << z) - 1 - y) if tms else y, _blob(seed * 100_000 + i, n)))
    return out


def _sweep(usable: int, seed: int) -> list[tuple[int, int, int, bytes]]:
    """Rows whose payloads cross every spill boundary of a page's usable size: all on the page up to U - 35
    bytes, then a local part of K or M bytes (the formula's two branches), over one and two overflow pages."""
    sizes = list(range(usable - 80, usable + 10)) + list(range(2 * (usable - 4) - 90, 2 * (usable - 4) + 10))
    rows = [(0, 0, 0, _blob(seed, 40))]
    rows += [(9, 100 + i % 150, 300 + i // 150, _blob(seed * 1000 + i, n)) for i, n in enumerate(sizes)]
    return rows


def _deep(seed: int) -> list[tuple[int, int, int, bytes]]:
    """Tiles at levels 17, 24 and 30: columns and rows stored as 3- and 4-byte integers, at both grid edges."""
    rows = [(0, 0, 0, _blob(seed, 40))]
    for z in (17, 24, 30):
        n = 1 << z
        for i, (x, y) in enumerate([(0, 0), (n - 1, n - 1), (n // 2, 5), (n - 130, n // 3), (n - 129, n // 3)]):
            rows.append((z, x, y, _blob(seed * 100 + z * 10 + i, 30 + 97 * i)))
    return rows


def _mbtiles(path: Path, rows, *, page_size: int = 4096, create: str | None = None, columns: str = "", pre=(),
             index: str | None = "CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)",
             post=()) -> Path:
    """An MBTiles written with plain sqlite3: `pre` pragmas before any table, `create` the tiles table."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA page_size = {page_size}")
    for p in pre:
        db.execute(p)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.executemany("INSERT INTO metadata VALUES (?, ?)", [("name", "t"), ("format", "png")])
    db.execute(create or "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, "
               f"tile_data BLOB{columns})")
    db.executemany("INSERT INTO tiles (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)", rows)
    if index:
        db.execute(index)
    for p in post:
        if callable(p):
            p(db)
        else:
            db.execute(p)
    db.commit()
    db.close()
    return path


def _gpkg(path: Path, rows, page_size: int = 4096, table: str = "tiles_t") -> Path:
    """A GeoPackage tile pyramid (EPSG:3857, levels 0-8), its table with `id INTEGER PRIMARY KEY`."""
    half = 20037508.342789244
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA page_size = {page_size}")
    db.execute(f"PRAGMA application_id = {0x47504B47}")
    db.execute("CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT, srs_id INTEGER PRIMARY KEY, organization TEXT, "
               "organization_coordsys_id INTEGER, definition TEXT, description TEXT)")
    db.execute("INSERT INTO gpkg_spatial_ref_sys VALUES ('merc', 3857, 'EPSG', 3857, 'undefined', NULL)")
    db.execute("CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT, identifier TEXT, "
               "description TEXT, last_change TEXT, min_x REAL, min_y REAL, max_x REAL, max_y REAL, srs_id INTEGER)")
    db.execute("INSERT INTO gpkg_contents VALUES (?, 'tiles', ?, '', '', ?, ?, ?, ?, 3857)",
               (table, table, -half, -half, half, half))
    db.execute("CREATE TABLE gpkg_tile_matrix_set (table_name TEXT PRIMARY KEY, srs_id INTEGER, min_x REAL, "
               "min_y REAL, max_x REAL, max_y REAL)")
    db.execute("INSERT INTO gpkg_tile_matrix_set VALUES (?, 3857, ?, ?, ?, ?)", (table, -half, -half, half, half))
    db.execute("CREATE TABLE gpkg_tile_matrix (table_name TEXT, zoom_level INTEGER, matrix_width INTEGER, "
               "matrix_height INTEGER, tile_width INTEGER, tile_height INTEGER, pixel_x_size REAL, pixel_y_size REAL)")
    for z in range(9):
        px = 2 * half / (256 << z)
        db.execute("INSERT INTO gpkg_tile_matrix VALUES (?, ?, ?, ?, 256, 256, ?, ?)",
                   (table, z, 1 << z, 1 << z, px, px))
    db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, zoom_level INTEGER NOT NULL, "
               "tile_column INTEGER NOT NULL, tile_row INTEGER NOT NULL, tile_data BLOB NOT NULL, "
               "UNIQUE (zoom_level, tile_column, tile_row))")
    db.executemany(f"INSERT INTO {table} (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return path


def _reserved(path: Path, page_size: int, reserved: int) -> Path:
    """An empty database whose pages keep `reserved` bytes at their end (header byte 20, set before any table
    exists, with the empty schema page's content start moved to the usable end: SQLite honours both)."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA page_size = {page_size}")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    sff.patch(path, 20, bytes([reserved]))
    sff.patch(path, 105, struct.pack(">H", page_size - reserved))
    return path


def _then(path: Path, *edits) -> Path:
    """Edit a closed database file: (offset, bytes) patches, or bytes to append."""
    for e in edits:
        if isinstance(e, bytes):
            with open(path, "ab") as f:
                f.write(e)
        else:
            sff.patch(path, *e)
    return path


def _fragment(db: sqlite3.Connection) -> None:
    """Delete every other row, insert new ones into the freed pages, grow some: chains out of page order."""
    ids = [r[0] for r in db.execute("SELECT rowid FROM tiles ORDER BY rowid")]
    db.executemany("DELETE FROM tiles WHERE rowid = ?", [(i,) for i in ids[1::2]])
    db.commit()
    new = [(8, x, 200 + y, _blob(7000 + x * 10 + y, 900 + 2500 * ((x + y) % 5))) for x in range(125, 129)
           for y in range(4)]
    db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", new)
    db.commit()
    db.executemany("UPDATE tiles SET tile_data = ? WHERE rowid = ?",
                   [(_blob(9000 + i, 20_000 + 3000 * k), i) for k, i in enumerate(ids[0:40:4])])


def _alter_tile_data(db: sqlite3.Connection) -> None:
    """tile_data added by ALTER TABLE after rows exist: their records lack it and SQLite returns the default."""
    db.execute("CREATE TABLE old (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER)")
    db.executemany("INSERT INTO old VALUES (?, ?, ?)", [(8, x, 10) for x in range(120, 136)])
    db.execute("ALTER TABLE old ADD COLUMN tile_data BLOB DEFAULT x'89504E470D0A1A0A0102030405'")
    db.executemany("INSERT INTO old VALUES (8, ?, 11, ?)", [(x, _blob(x, 60)) for x in range(120, 136)])
    db.execute("DROP TABLE tiles")
    db.execute("ALTER TABLE old RENAME TO tiles")
    db.execute("CREATE UNIQUE INDEX tile_index2 ON tiles (zoom_level, tile_column, tile_row)")


def _big_rowids(db: sqlite3.Connection) -> None:
    """Rowids over the whole int64 range (nine-byte varints, negatives), the extremes among them."""
    ids = [r[0] for r in db.execute("SELECT rowid FROM tiles ORDER BY rowid")]
    spread = [((i * 0x9E3779B97F4A7C15) % (1 << 64)) - (1 << 63) for i in range(1, len(ids) + 1)]
    spread[:4] = [(1 << 63) - 1, -(1 << 63) + 1, -1, 0]
    db.executemany("UPDATE tiles SET rowid = ? WHERE rowid = ?", list(zip(spread, ids)))


def _wal(db: sqlite3.Connection) -> None:
    db.commit()
    db.execute("PRAGMA journal_mode = WAL")


def _rows_odd(rows):
    """Text, NULL, numbers and empty values among the tiles (a UTF-8 database)."""
    out = []
    for i, (z, x, y, d) in enumerate(rows):
        k = i % 9
        if i < 3:
            out.append((z, x, y, d))
        elif k == 0:
            out.append((z, x, y, "text tile " * (1 + i % 50)))
        elif k == 1:
            out.append((z, x, y, "tuile é ü 中文 " * (1 + i)))
        elif k == 2:
            out.append((z, x, y, None))
        elif k == 3:
            out.append((z, x, y, 5))
        elif k == 4:
            out.append((z, x, y, 2.5))
        elif k == 5:
            out.append((z, x, y, b""))
        elif k == 6:
            out.append((z, x, y, ""))
        elif k == 7:
            out.append((z, x, y, "x" * 5000))       # a text tile that overflows
        else:
            out.append((z, x, y, d))
    return out


def _dups(rows):
    """Each of some tiles twice, with different bytes (no unique index)."""
    return rows + [(z, x, y, _blob(50_000 + i, 30 + 700 * (i % 4))) for i, (z, x, y, d) in enumerate(rows[::3])]


TABLE = "CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB"
INDEX = "CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)"

# name -> (maker(path) -> the file, whether the backend reads its pages: a rowid table in a rollback-journal file)
VARIANTS = {
    "page512": (lambda p: _mbtiles(p, _rows(), page_size=512), True),
    "page1024": (lambda p: _mbtiles(p, _rows(), page_size=1024), True),
    "page4096": (lambda p: _mbtiles(p, _rows()), True),
    "page65536": (lambda p: _mbtiles(p, _rows(), page_size=65536), True),
    "reserved512": (lambda p: _mbtiles(_reserved(p, 512, 32), _rows(20), post=[_fragment]), True),
    "reserved4096": (lambda p: _mbtiles(_reserved(p, 4096, 255), _rows(21)), True),
    "sweep512r32": (lambda p: _mbtiles(_reserved(p, 512, 32), _sweep(480, 22)), True),
    "sweep1024": (lambda p: _mbtiles(p, _sweep(1024, 23), page_size=1024), True),
    "sweep4096r8": (lambda p: _mbtiles(_reserved(p, 4096, 8), _sweep(4088, 24)), True),
    "big_rowids": (lambda p: _mbtiles(p, _rows(25), page_size=512, post=[_big_rowids]), True),
    "int64_min_rowid": (lambda p: _mbtiles(p, _rows(26), post=[_big_rowids, "UPDATE tiles SET rowid = "
                                           "-9223372036854775808 WHERE rowid = -9223372036854775807"]), True),
    "reserved65536": (lambda p: _mbtiles(_reserved(p, 65536, 255), _rows(27), post=[_fragment]), True),
    # a header whose page count is stale (its version-valid-for differs: an old writer): the file's size counts
    "legacy_page_count": (lambda p: _then(_mbtiles(p, _rows(28), page_size=1024), (28, _u32(0x7FFFFFFF)),
                                          (92, _u32(0x12345678))), True),
    # pages past the header's (valid) page count: not the database's, never read
    "trailing_garbage": (lambda p: _then(_mbtiles(p, _rows(29), page_size=512), _blob(3, 512 * 9)), True),
    "deep_levels": (lambda p: _mbtiles(p, _deep(30), page_size=1024), True),
    "no_index": (lambda p: _mbtiles(p, _rows(), index=None), True),
    "auto_vacuum_full": (lambda p: _mbtiles(p, _rows(2), page_size=1024, pre=["PRAGMA auto_vacuum = FULL"],
                                             post=[_fragment]), True),
    "incremental_vacuum": (lambda p: _mbtiles(p, _rows(2), page_size=1024, pre=["PRAGMA auto_vacuum = INCREMENTAL"],
                                               post=[_fragment, "PRAGMA incremental_vacuum(5)"]), True),
    "fragmented": (lambda p: _mbtiles(p, _rows(3), page_size=1024, post=[_fragment]), True),
    "gpkg": (lambda p: _gpkg(p, _rows(4, tms=False)), True),
    "gpkg512": (lambda p: _gpkg(p, _rows(4, tms=False), page_size=512), True),
    "column_order": (lambda p: _mbtiles(p, _rows(5), create="CREATE TABLE tiles (tile_data BLOB, note TEXT DEFAULT "
                                        "'n', tile_row INTEGER, zoom_level INTEGER, tile_column INTEGER)"), True),
    "column_order_small": (lambda p: _mbtiles(p, _rows(5, sizes=[40, 0, 1, 300, 333]), create="CREATE TABLE tiles "
                                              "(tile_data BLOB, tile_row INTEGER, note TEXT DEFAULT 'n', zoom_level "
                                              "INTEGER, tile_column INTEGER)"), True),
    # a wide text column before tile_data: some blobs start in an overflow page (those rows go through SQL)
    "wide_before_blob": (lambda p: _mbtiles(p, _rows(31), page_size=1024, create="CREATE TABLE tiles (zoom_level "
                                            "INTEGER, tile_column INTEGER, tile_row INTEGER, note TEXT, "
                                            "tile_data BLOB)", post=["UPDATE tiles SET note = "
                                                                     "printf('%.*c', (rowid * 337) % 3000, 'n')"]),
                         True),
    "strict": (lambda p: _mbtiles(p, _rows(32), create=TABLE + ") STRICT"), True),
    # a column dropped after rows exist: SQLite rewrites every record, the positions after it move down
    "drop_column": (lambda p: _mbtiles(p, _rows(33), create="CREATE TABLE tiles (zoom_level INTEGER, gone TEXT "
                                       "DEFAULT 'gone', tile_column INTEGER, tile_row INTEGER, tile_data BLOB)",
                                       post=["ALTER TABLE tiles DROP COLUMN gone"]), True),
    "alter_add_column": (lambda p: _mbtiles(p, _rows(6), post=["ALTER TABLE tiles ADD COLUMN extra TEXT DEFAULT 'd'",
                                            "INSERT INTO tiles VALUES (8, 140, 3, x'89504E470D0A1A0AFF', 'e')"]), True),
    "alter_tile_data": (lambda p: _mbtiles(p, _rows(7), post=[_alter_tile_data]), True),
    "odd_values": (lambda p: _mbtiles(p, _rows_odd(_rows(8))), True),
    "utf16le": (lambda p: _mbtiles(p, _rows_odd(_rows(9)), pre=["PRAGMA encoding = 'UTF-16le'"]), True),
    "utf16be_blobs": (lambda p: _mbtiles(p, _rows(10), page_size=1024, pre=["PRAGMA encoding = 'UTF-16be'"]), True),
    "duplicates": (lambda p: _mbtiles(p, _dups(_rows(11)), index="CREATE INDEX tile_index ON tiles "
                                      "(zoom_level, tile_column, tile_row)"), True),
    "rowid_alias": (lambda p: _mbtiles(p, _rows(12), create=TABLE.replace("(", "(id INTEGER PRIMARY KEY, ", 1) + ")"),
                    True),
    "view": (lambda p: _view(p), False),
    "map_images": (lambda p: _map_images(p), False),
    "without_rowid": (lambda p: _mbtiles(p, _rows(15), create=TABLE + ", PRIMARY KEY (zoom_level, tile_column, "
                                         "tile_row)) WITHOUT ROWID", index=None), False),
    "wal": (lambda p: _mbtiles(p, _rows(16), post=[_wal]), False),
    "generated_virtual": (lambda p: _mbtiles(p, _rows(17), create="CREATE TABLE tiles (zoom_level INTEGER, g INTEGER "
                                             "GENERATED ALWAYS AS (zoom_level * 2) VIRTUAL, tile_column INTEGER, "
                                             "tile_row INTEGER, tile_data BLOB)"), False),
    "generated_stored": (lambda p: _mbtiles(p, _rows(18), create="CREATE TABLE tiles (zoom_level INTEGER, g INTEGER "
                                            "GENERATED ALWAYS AS (tile_column * 2) STORED, tile_column INTEGER, "
                                            "tile_row INTEGER, tile_data BLOB)"), False),
}


def _view(p: Path) -> Path:
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.execute(TABLE.replace("tiles", "tdata") + ")")
    db.executemany("INSERT INTO tdata VALUES (?, ?, ?, ?)", _rows(13))
    db.execute("CREATE VIEW tiles AS SELECT zoom_level, tile_column, tile_row, tile_data FROM tdata")
    db.commit()
    db.close()
    return p


def _map_images(p: Path) -> Path:
    db = sqlite3.connect(p)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.execute("CREATE TABLE map (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_id TEXT)")
    db.execute("CREATE TABLE images (tile_data BLOB, tile_id TEXT)")
    rows = _rows(14)
    db.executemany("INSERT INTO map VALUES (?, ?, ?, ?)", [(z, x, y, f"t{i % 20}") for i, (z, x, y, _) in
                                                          enumerate(rows)])
    db.executemany("INSERT INTO images VALUES (?, ?)", [(d, f"t{i}") for i, (_, _, _, d) in enumerate(rows[:20])])
    db.commit()
    db.close()
    return p


def make(tmp: Path, name: str) -> Path:
    """The file of one variant, generated once per test directory."""
    ext = ".gpkg" if name.startswith("gpkg") else ".mbtiles"
    path = tmp / (name + ext)
    if not path.exists():
        VARIANTS[name][0](path)
    return path


# -- what SQLite says ---------------------------------------------------------------------------------------

def _source(path: Path) -> tuple[str, bool]:
    """(the SELECT of (z, x, stored row, tile bytes, rowid), MBTiles flip) read through Python's sqlite3."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()
    if "gpkg_contents" in names:
        src, flip = "tiles_t", False
    elif "tiles" in names:
        src, flip = "tiles", True
    else:
        src, flip = ("(SELECT zoom_level, tile_column, tile_row, tile_data, map.rowid AS rowid FROM map JOIN images "
                     "ON images.tile_id = map.tile_id)"), True
    # SQLite's bytes: a blob as it is, text as its bytes in the database's encoding, anything else no tile
    rid = "rowid" if "without_rowid" not in path.name else "0"
    return (f"SELECT zoom_level, tile_column, tile_row, CASE typeof(tile_data) WHEN 'blob' THEN tile_data "
            f"WHEN 'text' THEN CAST(tile_data AS BLOB) END, {rid} FROM {src}", flip)


def sqlite_tiles(path: Path) -> dict[tuple[int, int, int], list[bytes | None]]:
    """{(z, ArcGIS row, column): [bytes of each row at that tile, None for a NULL or a number, by rowid]} from
    Python's sqlite3."""
    sql, flip = _source(path)
    out: dict = {}
    for key, data, _ in sorted(_keyed_rows(path, sql, flip), key=lambda r: r[2] or 0):
        out.setdefault(key, []).append(None if data is None else bytes(data))
    return out


def backend_tiles(path: Path, pages_only: bool = False) -> tuple[dict, dict, bool, dict]:
    """({(z, row, col): bytes} from block_list, {(z, row, col): size} from block_index, reads_pages(),
    {(z, row, col): bytes} from block_body, its V2 layout checked) of every block of every level, read through
    tilecrate's cache; `pages_only`: a block read through SQL fails."""
    with open_cache(str(path)) as cache:
        b = cache._store
        if pages_only:
            def no_sql(*args, **kwargs):
                raise AssertionError("a block read through SQL, not from the file's pages")
            b.query_blobs = no_sql
        tiles, sizes, bodies = {}, {}, {}
        for z in b.levels():
            for r0, c0 in sorted(b.blocks(z)):
                _, sz = b.block_index(z, r0, c0)
                for i in np.flatnonzero(sz).tolist():
                    sizes[(z, r0 + i // PACKET, c0 + i % PACKET)] = int(sz[i])
                _, idx, got = b.block_list(z, r0, c0)
                for i, t in zip(idx.tolist(), got):
                    tiles[(z, r0 + i // PACKET, c0 + i % PACKET)] = bytes(t)
                bodies.update(_body_tiles(z, r0, c0, b.block_body(z, r0, c0, "t")))
        pages = b.reads_pages()
    return tiles, sizes, pages, bodies


def _body_tiles(z: int, r0: int, c0: int, body) -> dict:
    """The tiles of a block_body, checking its V2 layout: each tile after its little-endian size, none overlapping."""
    _, buf, offsets, sizes = body
    data = bytes(buf)
    out, spans = {}, []
    for i in np.flatnonzero(sizes).tolist():
        off, n = int(offsets[i]), int(sizes[i])
        assert 4 <= off and off + n <= len(data) and int.from_bytes(data[off - 4:off], "little") == n
        spans.append((off - 4, off + n))
        out[(z, r0 + i // PACKET, c0 + i % PACKET)] = data[off:off + n]
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    return out


def _assert_same(path: Path, tiles: dict, sizes: dict | None = None, bodies: dict | None = None) -> None:
    """The backend's tiles are SQLite's: every tile whose rows hold bytes is there with a row's bytes (with
    duplicate rows the first by rowid when none is empty), no other; block_index's sizes are those lengths
    (the SQL path's length() counts a text's characters and a number's digits: such rows are not compared)."""
    want = sqlite_tiles(path)
    have = {k for k, v in want.items() if any(v)}
    maybe = {k for k, v in want.items() if any(v) and not all(v)}      # duplicates, one of them empty
    assert have - maybe <= set(tiles) <= have, f"tiles {sorted(set(tiles) ^ have)[:5]} differ"
    for k, t in tiles.items():
        assert t in want[k], f"{k}: {len(t)} bytes that are no row's ({[len(w or b'') for w in want[k]]})"
        if len(want[k]) == 1:
            assert t == want[k][0]
    if bodies is not None:          # block_body: the same tiles (of duplicates, any row's), laid out
        assert set(bodies) == set(tiles) or maybe, f"block_body's tiles {sorted(set(bodies) ^ set(tiles))[:5]}"
        assert have - maybe <= set(bodies) <= have
        for k, t in bodies.items():
            assert t in want[k] and (t == tiles.get(k) or len(want[k]) > 1), k
    if sizes is None:
        return
    plain = blob_keys(path)
    for k in set(sizes) | set(tiles):
        if k in plain and len(want[k]) > 1:         # duplicate rows: the index may size another of them
            assert sizes.get(k, 0) in [len(w or b"") for w in want[k]], f"{k}: size {sizes.get(k)} in the index"
        elif k in plain:
            assert sizes.get(k) == len(tiles[k]), f"{k}: size {sizes.get(k)} in the index"


def blob_keys(path: Path) -> set:
    """Tiles whose every row holds a blob (no text, number or NULL)."""
    sql, flip = _source(path)
    sql = sql.replace("CASE typeof(tile_data) WHEN 'blob' THEN tile_data WHEN 'text' THEN CAST(tile_data AS BLOB) END",
                      "typeof(tile_data)")
    kinds: dict = {}
    for key, kind, _ in _keyed_rows(path, sql, flip):
        kinds.setdefault(key, set()).add(kind)
    return {k for k, v in kinds.items() if v == {"blob"}}


def _keyed_rows(path: Path, sql: str, flip: bool) -> list:
    """((z, ArcGIS row, column), the data column, rowid) of each row `sql` (from _source) gives on the file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(sql).fetchall()
    finally:
        db.close()
    return [((z, ((1 << z) - 1 - y) if flip else y, x), data, rid) for z, x, y, data, rid in rows]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_reads_as_sqlite_does(tmp_path, name):
    """Every block of every level through block_index and block_list equals sqlite3's rows; reads_pages() says
    whether the bytes come from the file's pages (and for the layouts locate handles, no block goes through SQL)."""
    path = make(tmp_path, name)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    tiles, sizes, pages, bodies = backend_tiles(path, pages_only=name in _LOCATED)
    _assert_same(path, tiles, sizes, bodies)
    assert len(tiles) >= 16
    assert pages is VARIANTS[name][1], f"{name}: reads_pages() is {pages}"


# -- the independent parser ---------------------------------------------------------------------------------

# variant -> (table, record position of tile_data, of zoom_level)
_LAYOUT = {"big_rowids": ("tiles", 3, 0), "sweep512r32": ("tiles", 3, 0), "sweep4096r8": ("tiles", 3, 0),
           "page512": ("tiles", 3, 0), "page65536": ("tiles", 3, 0), "reserved512": ("tiles", 3, 0),
           "reserved4096": ("tiles", 3, 0), "auto_vacuum_full": ("tiles", 3, 0), "fragmented": ("tiles", 3, 0),
           "gpkg": ("tiles_t", 4, 1), "column_order": ("tiles", 0, 3), "odd_values": ("tiles", 3, 0),
           "utf16le": ("tiles", 3, 0), "generated_stored": ("tiles", 4, 0), "generated_virtual": ("tiles", 3, 0)}


@pytest.mark.parametrize("name", sorted(_LAYOUT))
def test_the_file_format_parser_reads_what_sqlite_reads(tmp_path, name):
    """The test parser decodes every record of the tiles table as SQLite does (or the attacks below would
    corrupt the wrong bytes): rowids, tile bytes, overflow chains that end where the payload does."""
    path = make(tmp_path, name)
    table, data_at, zoom_at = _LAYOUT[name]
    f = sff.Db(path)
    root = sff.root_page(path, table)
    tree = f.tree(root)
    cells = f.cells(root)
    db = sqlite3.connect(path)
    enc = {1: "utf-8", 2: "utf-16-le", 3: "utf-16-be"}[f.encoding]
    want = {r: (z, d) for r, z, d in db.execute(f"SELECT rowid, zoom_level, tile_data FROM {table}")}
    db.close()
    assert [c.rowid for c in cells] == sorted(want)
    assert set(tree.leaves) == {c.page for c in cells}
    for c in cells:
        rec = f.record(c)
        data = rec[data_at]
        if isinstance(data, tuple):
            data = data[1].decode(enc)
        elif isinstance(data, float) and want[c.rowid][1] is not None and not isinstance(want[c.rowid][1], float):
            data = want[c.rowid][1]
        assert rec[zoom_at] == want[c.rowid][0] and data == want[c.rowid][1], c
        assert (len(c.overflow) > 0) == (c.payload_size > f.local_size(c.payload_size)) == (c.local < c.payload_size)
    if name in ("page512", "reserved512", "fragmented"):
        assert tree.interior and any(len(c.overflow) > 20 for c in cells)
    if name == "fragmented":       # chains out of page order: the attacks on overflow pages meet real reuse
        assert any(any(b <= a for a, b in zip(c.overflow, c.overflow[1:])) for c in cells)
    assert sff.decode_record(bytes([3, 1, 0x0F, 9, ord("a")])) == [9, ("text", b"a")]
    assert sff.varint(sff.encode_varint(1 << 60), 0) == (1 << 60, 9)
    assert sff.varint(sff.encode_varint(300, 5), 0) == (300, 5)


# -- corrupt files --------------------------------------------------------------------------------------------

def _attack_file(path: Path) -> Path:
    """512-byte pages, 720 small tiles (a table b-tree three pages deep) and a few with overflow chains of
    3-40 pages, in two blocks of level 9."""
    rows = []
    for i, (x, y) in enumerate((x, y) for x in range(100, 140) for y in range(18)):
        n = (3000 + 4000 * (i % 5)) if i % 97 == 5 else 20 + i % 40
        rows.append((9, x, 511 - y, _blob(70_000 + i, n)))
    return _mbtiles(path, rows, page_size=512)


CHILD = r'''
import pickle, sys, traceback
from pathlib import Path
from tilecrate.errors import BundleError, CacheError
path, out = sys.argv[1], sys.argv[2]
try:
    from tilecrate._sqlite import SqliteError
    from test_attack_sqlite_pages import backend_tiles     # the child runs in tests/
    tiles, sizes, pages, bodies = backend_tiles(Path(path))
    res = {"tiles": tiles, "sizes": sizes, "pages": pages, "bodies": bodies}
except (CacheError, BundleError, SqliteError) as e:
    res = {"error": type(e).__name__, "message": str(e)}
except BaseException as e:
    res = {"crash": traceback.format_exc()}
with open(out, "wb") as f:
    pickle.dump(res, f)
'''


def run_child(path: Path, code: str = CHILD, *args) -> dict:
    """Run `code` on `path` in a child process: it must end, by itself, within CHILD_SECONDS, and not by a signal."""
    out = path.with_suffix(".result")
    try:
        p = subprocess.run([sys.executable, "-c", code, str(path), str(out), *map(str, args)], capture_output=True,
                           timeout=CHILD_SECONDS, cwd=HERE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path.name} took more than {CHILD_SECONDS} s (a loop in the page walk?)")
    assert p.returncode >= 0, f"the reader died of signal {signal.Signals(-p.returncode).name}: {p.stderr[-2000:]}"
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    with open(out, "rb") as f:
        res = pickle.load(f)
    assert "crash" not in res, res.get("crash")
    return res


def sqlite_lookups(path: Path, keys) -> dict:
    """{(z, ArcGIS row, col): bytes, None (no row or not a tile), or 'error'} of each tile looked up alone by
    Python's sqlite3 (through the index, as the backend finds rows) in a possibly corrupt MBTiles."""
    out = {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for z, r, c in keys:
            try:
                got = db.execute("SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND "
                                 "tile_row = ?", (z, c, (1 << z) - 1 - r)).fetchall()
            except sqlite3.DatabaseError:
                out[(z, r, c)] = "error"
                continue
            out[(z, r, c)] = bytes(got[0][0]) if got and isinstance(got[0][0], bytes) and got[0][0] else None
    finally:
        db.close()
    return out


def assert_sqlite_or_clean_error(path: Path, original: dict, res: dict) -> str:
    """A corrupt file read through the backend gave a one-line CacheError/BundleError, or only bytes SQLite itself
    returns for those tiles (or their bytes before the corruption), every tile SQLite can read present.
    Returns what happened, for the test's own checks."""
    if "error" in res:
        assert res["error"] in ("CacheError", "BundleError"), res
        assert "\n" not in res["message"] and len(res["message"]) < 600, res["message"]
        assert path.name in res["message"] or str(path) in res["message"], res["message"]
        return "error"
    now = sqlite_lookups(path, original)
    for k, t in [*res["tiles"].items(), *res["bodies"].items()]:
        assert k in original, f"{k}: a tile that was never written"
        assert t == now[k] or t == original[k][0], f"{k}: {len(t)} bytes neither SQLite's nor the original's"
    for k, v in now.items():
        if isinstance(v, bytes):
            assert k in res["tiles"], f"{k}: SQLite reads this tile, the backend lost it"
    return "tiles"


def _u32(v: int) -> bytes:
    return struct.pack(">I", v & 0xFFFFFFFF)


def _inner(f: sff.Db, tree: sff.Tree) -> int:
    """An interior page below the root (the attack file's tree is three deep)."""
    return next(n for n in tree.interior if tree.depth[n] == 1)


def _child_to(target):
    """Corrupt the first child pointer of an interior page below the root to point at `target(f, tree, page)`."""
    def corrupt(path, f, tree, cells):
        n = _inner(f, tree)
        off, _, _ = f.interior_cells(n)[0]
        sff.patch(path, f.page_offset(n) + off, _u32(target(f, tree, n)))
    return corrupt


def _root_child_to_root(path, f, tree, cells):
    off, _, _ = f.interior_cells(tree.root)[0]
    sff.patch(path, f.page_offset(tree.root) + off, _u32(tree.root))


def _right_to_self(path, f, tree, cells):
    n = _inner(f, tree)
    sff.patch(path, f.page_offset(n) + 8, _u32(n))


def _keys_out_of_order(path, f, tree, cells):
    """Two cell pointers of an interior page swapped: each child keeps its key, the keys fall out of order."""
    n = _inner(f, tree)
    hd = f.btree_header(n)
    at = f.page_offset(n) + hd["ptrs"]
    p = f.page(n)
    a, b = p[hd["ptrs"]:hd["ptrs"] + 2], p[hd["ptrs"] + 6:hd["ptrs"] + 8]
    sff.patch(path, at, b)
    sff.patch(path, at + 6, a)


def _leaf(tree: sff.Tree, cells) -> int:
    """A leaf page in the middle of the table whose cells are all on their page."""
    by_page: dict = {}
    for c in cells:
        by_page.setdefault(c.page, []).append(c)
    pages = [n for n in tree.leaves if all(not c.overflow for c in by_page[n])]
    return pages[len(pages) // 2]


def _cell_pointer(value):
    def corrupt(path, f, tree, cells):
        n = _leaf(tree, cells)
        sff.patch(path, f.page_offset(n) + f.btree_header(n)["ptrs"] + 2, struct.pack(">H", value(f)))
    return corrupt


def _cell_count(page_kind: str):
    def corrupt(path, f, tree, cells):
        n = _leaf(tree, cells) if page_kind == "leaf" else _inner(f, tree)
        sff.patch(path, f.page_offset(n) + 3, struct.pack(">H", 0xFFFF))
    return corrupt


def _page_type(value: int):
    def corrupt(path, f, tree, cells):
        n = _leaf(tree, cells)
        sff.patch(path, f.page_offset(n), bytes([value]))
    return corrupt


def _small_cell(f, tree, cells) -> sff.Cell:
    n = _leaf(tree, cells)
    return next(c for c in cells if c.page == n)


def _rewrite_cell(build):
    """Replace a small cell by bytes of the same length built from (payload size, rowid, record)."""
    def corrupt(path, f, tree, cells):
        c = _small_cell(f, tree, cells)
        rec = f.payload(c)
        new = build(c, rec)
        assert len(new) == c.header_len + c.local
        sff.patch(path, f.page_offset(c.page) + c.offset, new)
    return corrupt


def _payload_varint9(c, rec):
    """A payload size of 2**62 in a nine-byte varint; the record shortened to keep the cell's length."""
    head = sff.encode_varint(1 << 62, 9) + sff.encode_varint(c.rowid)
    return head + rec[:c.header_len + c.local - len(head)]


def _header_too_long(c, rec):
    """The record's header claims 127 bytes, more than the whole local payload."""
    assert rec[0] < 0x80 and c.local < 127
    return sff.encode_varint(c.payload_size) + sff.encode_varint(c.rowid) + bytes([0x7F]) + rec[1:]


def _serial_1gb(c, rec):
    """tile_data's serial type says a 1 GB blob (a five-byte varint; the bytes it adds taken from the blob's end)."""
    t, at, k = sff.record_types(rec)[3]
    grow = 5 - k
    new_types = rec[1:at] + sff.encode_varint(2 * (1 << 30) + 12, 5) + rec[at + k:rec[0]]
    new = bytes([rec[0] + grow]) + new_types + rec[rec[0]:len(rec) - grow]
    assert len(new) == len(rec) and rec[0] + grow < 0x80
    return sff.encode_varint(c.payload_size) + sff.encode_varint(c.rowid) + new


def _chain(cells, at_least: int = 3) -> sff.Cell:
    return next(c for c in cells if len(c.overflow) >= at_least)


def _overflow_to(target):
    """The first overflow pointer of a cell with a chain of 3 pages or more set to `target(f, cell, cells)`."""
    def corrupt(path, f, tree, cells):
        c = _chain(cells)
        sff.patch(path, f.page_offset(c.page) + c.pointer_at, _u32(target(f, c, cells)))
    return corrupt


def _overflow_loop(path, f, tree, cells):
    """The chain's second page points back at its first."""
    c = _chain(cells)
    sff.patch(path, f.page_offset(c.overflow[1]), _u32(c.overflow[0]))


def _overflow_end_early(path, f, tree, cells):
    """The chain's second page says it is the last (pointer 0) though the payload goes on."""
    c = _chain(cells)
    sff.patch(path, f.page_offset(c.overflow[1]), _u32(0))


def _truncate_half(path, f, tree, cells):
    os.truncate(path, f.pages // 2 * f.page_size)


def _truncate_mid_page(path, f, tree, cells):
    os.truncate(path, (f.pages - 3) * f.page_size + 100)


ATTACKS = {
    "child_to_itself": _child_to(lambda f, t, n: n),
    "child_to_ancestor": _child_to(lambda f, t, n: t.root),
    "root_child_to_root": _root_child_to_root,
    "right_most_to_itself": _right_to_self,
    "child_past_the_end": _child_to(lambda f, t, n: f.pages + 1000),
    "child_to_page_1": _child_to(lambda f, t, n: 1),
    "child_to_page_0": _child_to(lambda f, t, n: 0),
    "child_to_2**32-1": _child_to(lambda f, t, n: 0xFFFFFFFF),
    "child_to_an_overflow_page": _child_to(lambda f, t, n: _chain(f.cells(t.root)).overflow[1]),
    "interior_keys_out_of_order": _keys_out_of_order,
    "cell_pointer_past_the_page": _cell_pointer(lambda f: 0xFFFF),
    "cell_pointer_at_the_page_end": _cell_pointer(lambda f: f.page_size - 1),
    "cell_pointer_into_the_header": _cell_pointer(lambda f: 2),
    "leaf_cell_count_65535": _cell_count("leaf"),
    "interior_cell_count_65535": _cell_count("interior"),
    "leaf_page_typed_interior": _page_type(0x05),
    "leaf_page_typed_index": _page_type(0x0A),
    "payload_size_nine_byte_varint": _rewrite_cell(_payload_varint9),
    "record_header_longer_than_the_payload": _rewrite_cell(_header_too_long),
    "serial_type_of_a_1gb_blob": _rewrite_cell(_serial_1gb),
    "overflow_to_page_0": _overflow_to(lambda f, c, cells: 0),
    "overflow_to_page_1": _overflow_to(lambda f, c, cells: 1),
    "overflow_past_the_end": _overflow_to(lambda f, c, cells: f.pages + 7),
    "overflow_to_another_chain": _overflow_to(lambda f, c, cells: next(o for o in cells if o.overflow and
                                                                        o.rowid != c.rowid).overflow[0]),
    "overflow_to_a_leaf": _overflow_to(lambda f, c, cells: cells[0].page),
    "overflow_loop": _overflow_loop,
    "overflow_chain_ends_early": _overflow_end_early,
    "truncated_to_half": _truncate_half,
    "truncated_mid_page": _truncate_mid_page,
}


@pytest.fixture(scope="module")
def attack_source(tmp_path_factory) -> tuple[Path, dict]:
    """The pristine attack file and its tiles as SQLite reads them."""
    path = _attack_file(tmp_path_factory.mktemp("attack") / "pristine.mbtiles")
    return path, sqlite_tiles(path)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_corrupt_structure_gives_sqlite_bytes_or_a_clean_error(tmp_path, attack_source, attack):
    src, original = attack_source
    path = tmp_path / f"{attack}.mbtiles"
    path.write_bytes(src.read_bytes())
    f = sff.Db(path)
    tree = f.tree(sff.root_page(path, "tiles"))
    assert max(tree.depth.values()) >= 2
    cells = f.cells(tree.root)
    ATTACKS[attack](path, f, tree, cells)
    assert path.read_bytes() != src.read_bytes()
    res = run_child(path)
    assert_sqlite_or_clean_error(path, original, res)


# -- the compiled reader itself -------------------------------------------------------------------------------

def _rowid_rows(path: Path, table: str = "tiles") -> list[tuple]:
    """(rowid, zoom_level, tile_column, tile_row, tile bytes or None) of every row, by rowid, from Python's sqlite3."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [(r, z, x, y, bytes(d) if isinstance(d, bytes) else None) for r, z, x, y, d in db.execute(
            f"SELECT rowid, zoom_level, tile_column, tile_row, tile_data FROM {table} ORDER BY rowid")]
    finally:
        db.close()


def _fields(path: Path, table: str) -> tuple[int, int, int, int]:
    """Record positions of zoom_level, tile_column, tile_row, tile_data (table_xinfo's order: no hidden columns)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[1] for r in db.execute(f"PRAGMA table_xinfo({table})")]
    finally:
        db.close()
    return tuple(names.index(n) for n in ("zoom_level", "tile_column", "tile_row", "tile_data"))


def locate_and_read(path: Path, table: str, rowids=None, between=None):
    """(header, values, cells, offsets, buffer) of a table's rows located and read by tilecrate._sqlite.Reader, the
    locate and the read in two transactions as the backend runs them; `between()` runs between the two. values
    is None (and nothing is read) when locate hands the rows back to SQL."""
    from tilecrate._sqlite import Reader

    rows = _rowid_rows(path, table)
    ids = np.array([r[0] for r in rows] if rowids is None else rowids, dtype=np.int64)
    root = sff.root_page(path, table)
    r = Reader(str(path))
    try:
        header = r.pages_begin()
        try:
            found = r.locate(ids, root, _fields(path, table), True) if header is not None else None
        finally:
            r.pages_end()
        if found is None:
            return header, None, None, None, None
        values, cells = found
        if between is not None:
            between()
        try:
            r.pages_begin()
            offs, buf = r.read_cells(cells, values[:, 3], header)
        finally:
            r.pages_end()
        return header, values, cells, offs, buf
    finally:
        r.close()


# variants whose rows locate must find itself (no fallback to SQL); the others may hand them back
_LOCATED = ["strict", "drop_column", "deep_levels", "reserved65536", "legacy_page_count", "trailing_garbage",
            "big_rowids", "sweep512r32", "sweep1024", "sweep4096r8", "page512", "page1024", "page4096", "page65536",
            "reserved512", "reserved4096", "no_index", "fragmented", "auto_vacuum_full", "incremental_vacuum",
            "gpkg", "gpkg512", "column_order_small", "alter_add_column", "duplicates", "rowid_alias", "odd_values",
            "utf16be_blobs"]


@pytest.mark.parametrize("name", _LOCATED + ["wide_before_blob", "int64_min_rowid", "alter_tile_data", "utf16le",
                                             "generated_stored", "column_order"])
def test_locate_and_read_cells_give_sqlite_bytes(tmp_path, name):
    """The reader's own answer, row by row, for every layout: zoom, column, row and the tile's bytes as sqlite3
    gives them (text as its UTF-8 bytes, NULL and numbers empty), or None where it hands the rows to SQL."""
    path = make(tmp_path, name)
    table = "tiles_t" if name.startswith("gpkg") else "tiles"
    header, values, cells, offs, buf = locate_and_read(path, table)
    assert header is not None and header == path.read_bytes()[:100]
    if values is None:
        assert name not in _LOCATED, f"{name}: locate handed its rows to SQL"
        return
    rows = _rowid_rows(path, table)
    db = sqlite3.connect(path)
    text = dict(db.execute(f"SELECT rowid, CAST(tile_data AS BLOB) FROM {table} WHERE typeof(tile_data) = 'text'"))
    db.close()
    assert cells[:, 2].astype(np.int64).tolist() == [r[0] for r in rows]
    view = memoryview(buf)
    for i, (rid, z, x, y, data) in enumerate(rows):
        want = data if data is not None else text.get(rid, b"")
        assert values[i, :3].tolist() == [z, x, y]
        assert values[i, 3] == len(want), (rid, values[i, 3], len(want))
        assert bytes(view[offs[i]:offs[i + 1]]) == want, rid


def test_read_cells_in_any_order_and_subset(tmp_path):
    """read_cells takes locate's cells in any order (the backend sorts them by page) and any subset."""
    from tilecrate._sqlite import Reader

    path = make(tmp_path, "fragmented")
    header, values, cells, offs, buf = locate_and_read(path, "tiles")
    want = [bytes(memoryview(buf)[offs[i]:offs[i + 1]]) for i in range(len(values))]
    pick = np.random.default_rng(5).permutation(len(values))[: len(values) // 2]
    r = Reader(str(path))
    try:
        assert r.pages_begin() == header
        o2, b2 = r.read_cells(cells[pick], values[pick, 3], header)
        with pytest.raises(MemoryError):
            r.read_cells(cells, values[:, 3], header, int(values[:, 3].sum()) - 1)
    finally:
        r.pages_end()
        r.close()
    assert [bytes(memoryview(b2)[o2[k]:o2[k + 1]]) for k in range(len(pick))] == [want[i] for i in pick]


def _writer(path: Path, *sql: str, timeout: float = 5.0) -> subprocess.CompletedProcess:
    """Run statements in another process through Python's sqlite3 (a writer tilecrate does not know of)."""
    code = ("import sqlite3, sys\n"
            f"db = sqlite3.connect(sys.argv[1], timeout={timeout}, isolation_level=None)\n"
            "for s in sys.argv[2:]:\n"
            "    db.execute(s)\n"
            "db.close()\n")
    return subprocess.run([sys.executable, "-c", code, str(path), *sql], capture_output=True, timeout=60)


_CHANGES = {
    "update_to_other_bytes": ["UPDATE tiles SET tile_data = randomblob(length(tile_data)) WHERE rowid % 3 = 0"],
    "update_same_length_one_row": ["UPDATE tiles SET tile_data = zeroblob(length(tile_data)) WHERE rowid = "
                                   "(SELECT max(rowid) FROM tiles WHERE length(tile_data) > 100)"],
    "delete_and_insert": ["DELETE FROM tiles WHERE rowid % 2 = 0",
                          "INSERT INTO tiles SELECT zoom_level, tile_column, tile_row + 300, randomblob(3000) "
                          "FROM tiles"],
    "vacuum": ["DELETE FROM tiles WHERE rowid % 5 = 0", "VACUUM"],
    "vacuum_only": ["VACUUM"],
    "switch_to_wal": ["PRAGMA journal_mode = WAL", "UPDATE tiles SET tile_data = randomblob(50) WHERE rowid = 1"],
}


@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_write_between_locate_and_read_cells_raises_pages_changed(tmp_path, change):
    """SQLite's lock is released between the locate's transaction and the read's: any commit in between changes
    the header (its change counter) and read_cells refuses the old cells."""
    from tilecrate._sqlite import PagesChanged, SqliteError

    path = make(tmp_path, "fragmented")
    done = []

    def write():
        p = _writer(path, *_CHANGES[change])
        assert p.returncode == 0, p.stderr.decode()
        done.append(path.read_bytes()[:100])

    # a database now in WAL: pages_begin says None and read_cells refuses to run outside a page transaction
    with pytest.raises(SqliteError if change == "switch_to_wal" else PagesChanged) as e:
        locate_and_read(path, "tiles", between=write)
    assert done and issubclass(PagesChanged, SqliteError)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change", list(_CHANGES))
@pytest.mark.parametrize("frozen", [False, True], ids=["identity", "identity_blind"])
def test_a_write_between_the_scan_and_the_block_read_gives_sqlite_bytes_or_bundle_error(tmp_path, change, frozen):
    """Through the backend: levels scanned (their cells located), another process writes, then the blocks are
    read: each block is either SQLite's rows as they are now or a one-line BundleError asking for a retry. With
    the file's identity blind to the write (a file system whose times do not move), the header's change counter
    alone must catch it."""
    path = make(tmp_path, "fragmented")
    with open_cache(str(path)) as cache:
        b = cache._store
        assert b.reads_pages()
        if frozen:
            ident = b.identity()
            b.identity = lambda: ident
        blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]
        for z, r0, c0 in blocks:
            b.block_index(z, r0, c0)
        p = _writer(path, *_CHANGES[change])
        assert p.returncode == 0, p.stderr.decode()
        now = sqlite_tiles(path)
        refused = 0
        for z, r0, c0 in blocks:
            try:
                _, idx, got = b.block_list(z, r0, c0)
                body = _body_tiles(z, r0, c0, b.block_body(z, r0, c0, "t"))
            except BundleError as e:
                assert "\n" not in str(e) and "retry" in str(e)
                refused += 1
                continue
            for i, t in zip(idx.tolist(), got):
                k = (z, r0 + i // PACKET, c0 + i % PACKET)
                assert k in now and bytes(t) in now[k], k
            for k, t in body.items():
                assert k in now and t in now[k], k
        assert blocks and refused <= len(blocks)


def test_a_file_truncated_between_locate_and_read_cells_is_a_clean_error(tmp_path):
    """Truncated by something that is not SQLite (no lock, no change counter): a short read, a SqliteError."""
    from tilecrate._sqlite import SqliteError

    path = make(tmp_path, "fragmented")
    size = path.stat().st_size
    with pytest.raises(SqliteError, match="truncated|no longer|changed|malformed|I/O"):
        locate_and_read(path, "tiles", between=lambda: os.truncate(path, size // 3))


def test_a_writer_waits_while_pages_begin_holds_the_lock(tmp_path):
    """Between pages_begin and pages_end the SHARED lock is held: a writer in another process cannot commit (it
    gets SQLITE_BUSY after its short timeout), and commits once pages_end released the lock."""
    from tilecrate._sqlite import Reader

    path = make(tmp_path, "page1024")
    r = Reader(str(path))
    try:
        header = r.pages_begin()
        assert header is not None
        p = _writer(path, "UPDATE tiles SET tile_data = x'00' WHERE rowid = 1", timeout=0.3)
        assert p.returncode != 0 and b"database is locked" in p.stderr, p.stderr.decode()
        assert path.read_bytes()[:100] == header
        values, cells = r.locate(np.array([1, 2, 3]), sff.root_page(path, "tiles"), (0, 1, 2, 3), True)
        offs, buf = r.read_cells(cells, values[:, 3], header)
        assert bytes(buf)[:offs[1]] == _rowid_rows(path)[0][4]
        r.pages_end()
        p = _writer(path, "UPDATE tiles SET tile_data = x'00' WHERE rowid = 1", timeout=0.3)
        assert p.returncode == 0, p.stderr.decode()
        assert path.read_bytes()[:100] != header
    finally:
        r.pages_end()
        r.close()


def test_pages_begin_says_none_for_wal_and_the_backend_uses_sql(tmp_path):
    from tilecrate._sqlite import Reader

    path = make(tmp_path, "wal")
    r = Reader(str(path))
    try:
        assert r.pages_begin() is None
    finally:
        r.pages_end()
        r.close()


READER_CHILD = r'''
import pickle, sys
import numpy as np
from tilecrate._sqlite import PagesChanged, Reader, SqliteError
path, out, spec = sys.argv[1], sys.argv[2], pickle.load(open(sys.argv[3], "rb"))
res = {}
r = None
try:
    r = Reader(path)
    header = r.pages_begin()
    try:
        found = r.locate(np.array(spec["rowids"], dtype=np.int64), spec["root"], spec["fields"], True)
    finally:
        r.pages_end()
    res["located"] = None if found is None else (found[0].tolist(), found[1].tolist())
    if found is not None or "cells" in spec:
        values, cells = found if found is not None else (None, None)
        cells = spec.get("cells", cells)
        lengths = spec.get("lengths", values[:, 3] if values is not None else None)
        r.pages_begin()
        try:
            offs, buf = r.read_cells(np.asarray(cells, dtype=np.uint64), np.asarray(lengths, dtype=np.int64),
                                     spec.get("header", header))
        finally:
            r.pages_end()
        res["tiles"] = [bytes(memoryview(buf)[offs[i]:offs[i + 1]]) for i in range(len(offs) - 1)]
except (SqliteError, ValueError, MemoryError, OverflowError) as e:
    res["error"] = (type(e).__name__, str(e))
if r is not None:
    r.close()
pickle.dump(res, open(out, "wb"))
'''


def run_reader(path: Path, spec: dict) -> dict:
    """Run locate (and read_cells when it located the rows or `spec` forges cells) in a child process."""
    at = path.with_suffix(".spec")
    with open(at, "wb") as f:
        pickle.dump(spec, f)
    return run_child(path, READER_CHILD, at)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_locate_on_a_corrupt_file_hands_back_or_reads_what_sqlite_reads(tmp_path, attack_source, attack):
    """The compiled walk itself on each corrupt file (the backend would cover some of its answers with SQL):
    None, a clean error, or for every row the values and bytes SQLite gives (or gave before the corruption)."""
    src, _ = attack_source
    before = {r[0]: r for r in _rowid_rows(src)}
    path = tmp_path / f"{attack}.mbtiles"
    path.write_bytes(src.read_bytes())
    f = sff.Db(path)
    tree = f.tree(sff.root_page(path, "tiles"))
    ATTACKS[attack](path, f, tree, f.cells(tree.root))
    res = run_reader(path, {"rowids": sorted(before), "root": tree.root, "fields": (0, 1, 2, 3)})
    if "error" in res:
        assert res["error"][0] in ("SqliteError", "PagesChanged") and "\n" not in res["error"][1], res
        return
    if res["located"] is None:
        return
    values, cells = res["located"]
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    for i, rid in enumerate(sorted(before)):
        try:
            now = db.execute("SELECT rowid, zoom_level, tile_column, tile_row, tile_data FROM tiles WHERE rowid = ?",
                             (rid,)).fetchone()
        except sqlite3.DatabaseError:
            now = None
        ok = [before[rid]] + ([now] if now is not None else [])
        assert any(values[i][:3] == list(o[1:4]) and res["tiles"][i] == o[4] for o in ok), rid
    db.close()


def test_forged_arguments_never_read_outside_the_file(tmp_path, attack_source):
    """read_cells and locate validate what they are given: cells naming other pages, offsets past the page,
    lengths past the payload, an index page as the root, fields past the record, rowids the table lacks; each
    gives None, a clean error or bytes of the file, never a crash."""
    src, _ = attack_source
    path = tmp_path / "forged.mbtiles"
    path.write_bytes(src.read_bytes())
    f = sff.Db(path)
    root = sff.root_page(path, "tiles")
    ids = [r[0] for r in _rowid_rows(path)]
    header, values, cells, offs, buf = locate_and_read(path, "tiles")
    data = path.read_bytes()
    rng = np.random.default_rng(9)
    index_root = sqlite3.connect(path).execute("SELECT rootpage FROM sqlite_master WHERE type = 'index'").fetchone()[0]
    forged = {
        "random_cells": {"cells": rng.integers(0, 1 << 63, (50, 3), dtype=np.uint64), "lengths": np.full(50, 400)},
        "cell_offset_past_page": {"cells": cells[:5] | np.uint64(0xFFFF << 32) * np.array([1, 0, 0], np.uint64),
                                  "lengths": values[:5, 3]},
        "page_past_end": {"cells": (cells[:5] & ~np.uint64(0xFFFFFFFF)) | np.uint64(f.pages + 5) *
                          np.array([1, 0, 0], np.uint64), "lengths": values[:5, 3]},
        "lengths_past_payload": {"cells": cells[:20], "lengths": values[:20, 3] + 1000},
        "lengths_4gib": {"cells": cells[:2], "lengths": np.array([0xFFFFFFFF, 0xFFFFFFFF])},
        "lengths_negative": {"cells": cells[:2], "lengths": np.array([-1, 5])},
        "header_of_another_file": {"cells": cells, "lengths": values[:, 3], "header": b"\0" * 100},
        "header_short": {"cells": cells, "lengths": values[:, 3], "header": header[:50]},
        "cells_wrong_shape": {"cells": cells[:, :2], "lengths": values[:, 3]},
        "blob_offset_moved": {"cells": cells + np.uint64(7 << 32) * np.array([0, 1, 0], np.uint64),
                              "lengths": values[:, 3]},
        "overflow_page_moved": {"cells": cells + np.array([0, 1, 0], np.uint64), "lengths": values[:, 3]},
    }
    for name, spec in forged.items():
        res = run_reader(path, {"rowids": ids[:1], "root": root, "fields": (0, 1, 2, 3), **spec})
        if "error" in res:
            assert "\n" not in res["error"][1], (name, res)
            continue
        for t in res["tiles"]:
            assert t in data, f"{name}: bytes that are not in the file"
    located = {
        "index_page_as_root": {"rowids": ids, "root": index_root, "fields": (0, 1, 2, 3)},
        "page_1_as_root": {"rowids": [1, 2, 3], "root": 1, "fields": (0, 1, 2, 3)},
        "root_past_end": {"rowids": ids, "root": f.pages + 1, "fields": (0, 1, 2, 3)},
        "root_2**40": {"rowids": ids, "root": 1 << 40, "fields": (0, 1, 2, 3)},
        "fields_past_record": {"rowids": ids, "root": root, "fields": (0, 1, 2, 30)},
        "fields_32767": {"rowids": ids, "root": root, "fields": (0, 1, 2, 32767)},
        "fields_negative": {"rowids": ids, "root": root, "fields": (0, 1, 2, -1)},
        "rowids_missing": {"rowids": ids + [ids[-1] + 10], "root": root, "fields": (0, 1, 2, 3)},
        "rowids_negative": {"rowids": [-(1 << 63) + 1, -5] + ids, "root": root, "fields": (0, 1, 2, 3)},
        "rowids_descending": {"rowids": ids[::-1], "root": root, "fields": (0, 1, 2, 3)},
        "rowids_int64_min": {"rowids": [-(1 << 63)] + ids, "root": root, "fields": (0, 1, 2, 3)},
        "blob_as_zoom": {"rowids": ids, "root": root, "fields": (3, 1, 2, 3)},
    }
    for name, spec in located.items():
        res = run_reader(path, spec)
        assert "error" in res or res["located"] is None, (name, res)
        if "error" in res:
            assert res["error"][0] in ("ValueError", "SqliteError") and "\n" not in res["error"][1], (name, res)


@pytest.mark.parametrize("name", ["fragmented", "page65536"])
def test_export_to_pmtiles_reads_back_tile_for_tile(tmp_path, name):
    """End to end: a file whose pages are read here exported to .pmtiles, read back by the `pmtiles` package."""
    from pmtiles.reader import Reader as PMReader, all_tiles

    from tilecrate.export import export
    from tilecrate.request import ExportRequest

    path = make(tmp_path, name)
    with open_cache(str(path)) as cache:
        assert cache._store.reads_pages()
    out = tmp_path / "out.pmtiles"
    export(str(path), ExportRequest("0-8"), str(out))
    data = out.read_bytes()
    reader = PMReader(lambda off, n: data[off:off + n])
    got = dict(all_tiles(reader.get_bytes))
    want = {(z, c, r): v[0] for (z, r, c), v in sqlite_tiles(path).items() if v[0]}
    assert len(want) > 40 and max(map(len, want.values())) >= 20_000
    assert got == want


_KILLED_WRITER = r'''
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size = 2")           # spill uncommitted pages into the file before the commit
db.execute("BEGIN")
db.execute("UPDATE tiles SET tile_data = zeroblob(length(tile_data))")
os.kill(os.getpid(), signal.SIGKILL)
'''


def _kill_a_writer(path: Path) -> None:
    """A writer SIGKILLed mid-transaction: uncommitted pages in the file, a hot journal beside it."""
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)], capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert Path(str(path) + "-journal").stat().st_size > 0
    assert path.read_bytes().count(b"\0" * 1024) > 10          # the zeroed tiles are in the file


def test_a_writer_killed_mid_transaction_leaves_no_uncommitted_byte_readable(tmp_path):
    """A hot journal: SQLite's read-only connection cannot roll it back and says so; the page reader must not
    read the uncommitted pages the file now holds, neither at open nor between the locate and the read."""
    from tilecrate._sqlite import SqliteError

    path = make(tmp_path, "fragmented")
    with pytest.raises(SqliteError):
        locate_and_read(path, "tiles", between=lambda: _kill_a_writer(path))
    (tmp_path / "again").mkdir()
    other = make(tmp_path / "again", "fragmented")
    _kill_a_writer(other)
    with pytest.raises(CacheError, match="readonly|read-only|cannot read") as e:
        backend_tiles(other)
    assert "\n" not in str(e.value)


_VBLOB = r'''
import numpy as np
def vblob(rowid, version):
    """Tile bytes that say whose and which they are: (rowid, version), then a pattern of both."""
    n = (60, 900, 2500, 7000)[(rowid + version) % 4]
    body = ((np.arange(n, dtype=np.int64) * 7 + rowid * 31 + version) % 251).astype(np.uint8).tobytes()
    return rowid.to_bytes(4, "big") + version.to_bytes(4, "big") + body
'''

_RACING_WRITER = _VBLOB + r'''
import os, random, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
stop, rng, v = time.monotonic() + float(sys.argv[2]), random.Random(3), 1
while time.monotonic() < stop and not os.path.exists(sys.argv[1] + ".stop"):
    v += 1
    db.execute("BEGIN IMMEDIATE")
    for rid in rng.sample(range(1, 301), 40):
        if rid % 7 == 0:            # the row moves: deleted and inserted again under its rowid
            db.execute("DELETE FROM tiles WHERE rowid = ?", (rid,))
            db.execute("INSERT INTO tiles (rowid, zoom_level, tile_column, tile_row, tile_data) "
                       "VALUES (?, 9, ?, 7, ?)", (rid, rid, vblob(rid, v)))
        else:
            db.execute("UPDATE tiles SET tile_data = ? WHERE rowid = ?", (vblob(rid, v), rid))
    db.execute("COMMIT")
    time.sleep(0.002)
print(v)
'''


def test_reads_racing_a_writer_are_each_a_committed_version_or_pages_changed(tmp_path):
    """Another process commits new versions of the tiles (new sizes, moved rows, overflow pages reused) while
    this one locates and reads, in two transactions each time: every tile read is exactly a version some
    commit wrote for that row, or read_cells raises PagesChanged. Never a mix of two versions."""
    from tilecrate._sqlite import PagesChanged, Reader

    ns: dict = {}
    exec(_VBLOB, ns)
    vblob = ns["vblob"]
    path = tmp_path / "race.mbtiles"
    _mbtiles(path, [(9, rid, 7, vblob(rid, 1)) for rid in range(1, 301)], page_size=1024)
    root = sff.root_page(path, "tiles")
    first = path.read_bytes()[:100]
    writer = subprocess.Popen([sys.executable, "-c", _RACING_WRITER, str(path), "30"], stdout=subprocess.PIPE)
    r = Reader(str(path))
    read = changed = 0

    def read_all() -> bool:
        header = r.pages_begin()
        try:
            values, cells = r.locate(np.arange(1, 301), root, (0, 1, 2, 3), True)
        finally:
            r.pages_end()
        time.sleep(0.001 * (read % 4))
        r.pages_begin()
        try:
            offs, buf = r.read_cells(cells, values[:, 3], header)
        except PagesChanged:
            return False
        finally:
            r.pages_end()
        view = memoryview(buf)
        for i in range(300):
            t = bytes(view[offs[i]:offs[i + 1]])
            rid, v = int.from_bytes(t[:4], "big"), int.from_bytes(t[4:8], "big")
            assert rid == i + 1 and t == vblob(rid, v), f"rowid {i + 1}: bytes of no committed version"
        return True

    try:
        deadline = time.monotonic() + 30
        while path.read_bytes()[:100] == first and time.monotonic() < deadline:     # the writer's first commit
            time.sleep(0.01)
        stop = time.monotonic() + 2.5
        while time.monotonic() < stop:
            if read_all():
                read += 1
            else:
                changed += 1
        Path(str(path) + ".stop").touch()
        out, _ = writer.communicate(timeout=60)
        assert read_all()                   # the writer gone, a read always succeeds
    finally:
        Path(str(path) + ".stop").touch()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        r.close()
    assert writer.returncode == 0 and int(out) > 10
    assert changed > 0, (read, changed)



_INTO_CHILD = r'''
import pickle, sys
import numpy as np
from tilecrate._sqlite import PagesChanged, Reader, SqliteError, new_buffer
path, out, spec = sys.argv[1], sys.argv[2], pickle.load(open(sys.argv[3], "rb"))
res = []
r = Reader(path)
for size, cells, lengths, at, prefix in spec["calls"]:
    buf = new_buffer(size)
    r.pages_begin()
    try:
        r.read_into(buf, np.asarray(cells, dtype=np.uint64), np.asarray(lengths, dtype=np.int64),
                    np.asarray(at, dtype=np.int64), spec["header"], prefix)
        res.append(("ok", bytes(buf)))
    except (SqliteError, ValueError, MemoryError, OverflowError) as e:
        res.append((type(e).__name__, str(e)))
    finally:
        r.pages_end()
r.close()
pickle.dump(res, open(out, "wb"))
'''


def test_read_into_writes_only_where_it_is_told_and_checks_every_destination(tmp_path, attack_source):
    """Reader.read_into (tiles copied into a caller's buffer, each after its 4-byte size for a bundle body): the
    bytes of read_cells at the given offsets; a destination before 4 (with its size prefix), past the end,
    negative or overlapping the end by one byte is a ValueError, not a write outside the buffer."""
    src, _ = attack_source
    path = tmp_path / "into.mbtiles"
    path.write_bytes(src.read_bytes())
    header, values, cells, offs, buf = locate_and_read(path, "tiles")
    tiles = [bytes(memoryview(buf)[offs[i]:offs[i + 1]]) for i in range(len(values))]
    lens = values[:, 3]
    k = 40
    at = 4 + np.concatenate([[0], np.cumsum(lens[:k] + 4)[:-1]])
    size = int(at[-1] + lens[k - 1]) + 16
    bad = [(-1, True), (0, True), (3, True), (size - int(lens[0]) + 1, False), (size, False), (1 << 62, False),
           (-(1 << 62), False)]
    calls = [(size, cells[:k], lens[:k], at, True), (size, cells[:k], lens[:k], at - 4, False)]
    calls += [(size, cells[:1], lens[:1], [a], p) for a, p in bad]
    calls += [(size, cells[:2], [lens[0], 1 << 40], at[:2], True), (size, cells[:2], [-1, 5], at[:2], True),
              (size, cells[:k, :2], lens[:k], at, True), (0, cells[:0], lens[:0], at[:0], True)]
    at_path = tmp_path / "into.spec"
    with open(at_path, "wb") as f:
        pickle.dump({"calls": calls, "header": header}, f)
    res = run_child(path, _INTO_CHILD, at_path)
    assert res[0][0] == "ok" and res[1][0] == "ok", res[:2]
    for i in range(k):      # the buffer is not cleared: only the tiles' places are compared
        assert res[0][1][at[i] - 4:at[i]] == int(lens[i]).to_bytes(4, "little")
        assert res[0][1][at[i]:at[i] + lens[i]] == tiles[i]
        assert res[1][1][at[i] - 4:at[i] - 4 + lens[i]] == tiles[i]
    for (a, p), got in zip(bad, res[2:2 + len(bad)]):
        assert got[0] == "ValueError", (a, p, got)
    for got in res[2 + len(bad):-1]:
        assert got[0] in ("ValueError", "PagesChanged"), got
    assert res[-1] == ("ok", b"")


@pytest.mark.parametrize("name", ["fragmented", "reserved512"])
def test_export_to_tpkx_holds_sqlite_bytes(tmp_path, monkeypatch, name):
    """End to end through the bundle path (blocks laid out from the pages by read_into, none through SQL): the
    .tpkx's tiles, read back through its compact bundles, are sqlite3's."""
    from tilecrate.export import export
    from tilecrate.request import ExportRequest
    from tilecrate.sources import sqlite as sqlite_source

    def no_sql(*args, **kwargs):
        raise AssertionError("a block read through SQL, not from the file's pages")

    monkeypatch.setattr(sqlite_source.SqliteBackend, "query_blobs", no_sql)
    path = make(tmp_path, name)
    out = tmp_path / "out.tpkx"
    export(str(path), ExportRequest("0-8"), str(out))
    with open_cache(str(out)) as cache:
        got = {(z, r, c): bytes(d) for z, r, c, d in cache.iter_tiles()}
    want = {k: v[0] for k, v in sqlite_tiles(path).items() if v[0]}
    assert len(want) > 30 and got == want


def test_a_body_filled_in_bands_equals_the_body_read_at_once(tmp_path, monkeypatch):
    """block_body(bands=True): a large located body copied band after band on the helper thread; waiting for
    all of it gives the bytes of the body read at once; a write between two bands fails the wait cleanly."""
    from tilecrate.sources import sqlite as sqlite_source

    monkeypatch.setattr(sqlite_source, "BANDS_FROM", 1 << 10)
    monkeypatch.setattr(sqlite_source, "BAND_FIRST", 1 << 10)
    monkeypatch.setattr(sqlite_source, "BAND_MOST", 4 << 10)
    path = make(tmp_path, "fragmented")
    with open_cache(str(path)) as cache:
        b = cache._store
        blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]
        banded = 0
        for z, r0, c0 in blocks:
            whole = b.block_body(z, r0, c0, "t")
            got = b.block_body(z, r0, c0, "t", bands=True)
            if len(got) == 5:
                got[4].wait(got[4].total)
                banded += 1
            assert bytes(got[1]) == bytes(whole[1]) and (got[2] == whole[2]).all() and (got[3] == whole[3]).all()
        assert banded >= 2
        ident = b.identity()
        b.identity = lambda: ident              # only the header's change counter can tell
        real = b._fill_band
        calls = []

        def fill_then_write(level, got, lo, hi):
            real(level, got, lo, hi)
            if got[1].size >= 4 and hi < got[1].size:
                calls.append(lo)
            if len(calls) == 1 and lo == 0 and hi < got[1].size:       # after a large body's first band
                p = _writer(path, "UPDATE tiles SET tile_data = randomblob(length(tile_data))")
                assert p.returncode == 0, p.stderr.decode()

        b._fill_band = fill_then_write
        for z, r0, c0 in blocks:
            got = b.block_body(z, r0, c0, "t", bands=True)
            if len(got) == 5 and np.count_nonzero(got[3]) >= 4:
                with pytest.raises(BundleError, match="changed"):
                    got[4].wait(got[4].total)
                assert calls == [0]
                break
            if len(got) == 5:
                got[4].wait(got[4].total)
        else:
            pytest.fail("no block large enough for several bands")


def _streamed(body, runs=None) -> bytes:
    """The bytes block_body(stream=True) gives through its Stream over `runs` (default: the whole body)."""
    stream = body[4]
    if runs is None:
        runs = [(4, stream.total - 4, 0, 0)]
    try:
        return b"".join(bytes(v) for v in stream.slices(runs))
    finally:
        stream.close()


def _stream_small(monkeypatch) -> None:
    from tilecrate.sources import sqlite as sqlite_source

    monkeypatch.setattr(sqlite_source, "BANDS_FROM", 1 << 10)
    monkeypatch.setattr(sqlite_source, "STREAM_BAND", 4 << 10)
    monkeypatch.setattr(sqlite_source, "STREAM_BUFFERS", 2)


def test_a_streamed_body_equals_the_body_read_at_once(tmp_path, monkeypatch):
    """block_body(stream=True): a large located body read band by band into two reused buffers gives, over the
    whole body and over runs that leave tiles out (a polygon's selection), the bytes of the body read at once."""
    from tilecrate.sources.sqlite import Stream

    _stream_small(monkeypatch)
    for name in ("fragmented", "gpkg512"):
        path = make(tmp_path, name)
        with open_cache(str(path)) as cache:
            b = cache._store
            streamed = 0
            for z in b.levels():
                for r0, c0 in sorted(b.blocks(z)):
                    whole = b.block_body(z, r0, c0, "t")
                    data = bytes(whole[1])
                    got = b.block_body(z, r0, c0, "t", bands=True, stream=True)
                    assert (got[2] == whole[2]).all() and (got[3] == whole[3]).all()
                    if len(got) == 4:
                        assert bytes(got[1]) == data
                        continue
                    assert isinstance(got[1], Stream) and got[4] is got[1] and len(got[1]) == len(data)
                    streamed += 1
                    if streamed % 2:
                        assert _streamed(got) == data
                        continue
                    present = np.flatnonzero(whole[3])[::3]             # every third tile, each its own run
                    runs = [(int(whole[2][i]), int(whole[3][i]), 0, 1) for i in present]
                    runs.sort()
                    assert _streamed(got, runs) == b"".join(data[o - 4:o + n] for o, n, _, _ in runs)
            assert streamed >= 3, name


def test_a_write_between_two_streamed_bands_fails_the_stream(tmp_path, monkeypatch):
    """A commit by another process between two bands of a stream: the writer taking the body gets BundleError
    ("changed"), never bytes of two versions, and the reading thread ends."""
    _stream_small(monkeypatch)
    path = make(tmp_path, "fragmented")
    with open_cache(str(path)) as cache:
        b = cache._store
        blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]
        for z, r0, c0 in blocks:
            b.block_index(z, r0, c0)
        ident = b.identity()
        b.identity = lambda: ident              # only the header's change counter can tell
        real = b._fill_band
        calls = []

        def fill_then_write(level, got, lo, hi, into=None, base=0):
            real(level, got, lo, hi, into, base)
            if into is not None and lo == 0 and hi < got[1].size and not calls:
                calls.append(lo)
                p = _writer(path, "UPDATE tiles SET tile_data = randomblob(length(tile_data))")
                assert p.returncode == 0, p.stderr.decode()

        b._fill_band = fill_then_write
        for z, r0, c0 in blocks:
            got = b.block_body(z, r0, c0, "t", bands=True, stream=True)
            if len(got) < 5:
                continue
            try:
                _streamed(got)
            except BundleError as e:
                assert calls == [0] and "changed" in str(e)
                got[4].future.result(timeout=30)        # the reading thread ended
                break
            assert not calls, "a stream gave bytes read across a commit"
        else:
            pytest.fail("no block large enough for several bands")


def test_a_stream_given_up_or_its_source_closed_ends(tmp_path, monkeypatch):
    """A writer that takes one slice and gives up (an export failing mid-bundle): the reading thread stops at
    its next band. Streams pending when the source closes, one never taken: each ends with its whole body,
    right, or with a BundleError; none waits for ever, nor does close()."""
    import threading

    _stream_small(monkeypatch)
    path = make(tmp_path, "fragmented")
    cache = open_cache(str(path))
    b = cache._store
    blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]
    whole = {blk: bytes(b.block_body(*blk, "t")[1]) for blk in blocks}
    big = [blk for blk in blocks if len(whole[blk]) > 3 * (4 << 10)]
    assert big
    got = b.block_body(*big[0], "t", bands=True, stream=True)
    first = next(got[4].slices([(4, got[4].total - 4, 0, 0)]))
    assert bytes(first) == whole[big[0]][:len(first)]
    got[4].close()
    got[4].future.result(timeout=30)           # the reading ended (its take() refused) instead of waiting
    streams = [(blk, b.block_body(*blk, "t", bands=True, stream=True)) for blk in blocks * 3]
    assert any(len(s) == 5 for _, s in streams)
    lone = b.block_body(*big[0], "t", bands=True, stream=True)      # never taken: its reading waits for buffers
    closer = threading.Thread(target=cache.close)
    closer.start()
    outcomes = []
    for blk, s in streams:
        if len(s) == 5:
            try:
                data = _streamed(s)
            except BundleError as e:
                assert "\n" not in str(e)
                outcomes.append("refused")
                continue
        else:
            data = bytes(s[1])
        assert data == whole[blk]
        outcomes.append("read")
    closer.join(60)
    assert not closer.is_alive(), "close() hung"
    assert len(outcomes) == len(streams)
    assert lone[4].future.done()
    with pytest.raises(BundleError, match="stopped"):
        _streamed(lone)


def test_a_stream_nobody_takes_ends_after_its_stall_limit(tmp_path, monkeypatch):
    """A stream dropped without a close (a path that forgot it): its reading gives up after STREAM_STALL seconds
    without a band taken, freeing the source's helper thread; a late writer gets that error, not a wait."""
    from tilecrate.sources import sqlite as sqlite_source

    _stream_small(monkeypatch)
    monkeypatch.setattr(sqlite_source, "STREAM_BUFFERS", 1)
    monkeypatch.setattr(sqlite_source, "STREAM_STALL", 0.5)
    path = make(tmp_path, "fragmented")
    with open_cache(str(path)) as cache:
        b = cache._store
        blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]
        whole = {blk: b.block_body(*blk, "t") for blk in blocks}
        blk = max(blocks, key=lambda k: np.count_nonzero(whole[k][3]))
        body = b.block_body(*blk, "t", bands=True, stream=True)
        assert len(body) == 5
        body[4].future.result(timeout=30)       # ended by itself
        with pytest.raises(BundleError, match="took nothing"):
            _streamed(body)
        after = b.block_body(*blk, "t", bands=True, stream=True)       # the helper thread is free again
        assert _streamed(after) == bytes(whole[blk][1])


def test_a_stalled_writer_holds_up_only_its_own_stream(tmp_path, monkeypatch):
    """A stream whose writer takes nothing (stalled on its output) keeps its own thread only: another stream of
    the same source, and a body laid out whole on the helper thread, are read meanwhile."""
    from tilecrate.sources import sqlite as sqlite_source

    _stream_small(monkeypatch)
    monkeypatch.setattr(sqlite_source, "STREAM_BUFFERS", 1)
    monkeypatch.setattr(sqlite_source, "BAND_FIRST", 1 << 10)
    path = make(tmp_path, "fragmented")
    with open_cache(str(path)) as cache:
        b = cache._store
        blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]
        whole = {blk: bytes(b.block_body(*blk, "t")[1]) for blk in blocks}
        blk = max(blocks, key=lambda k: len(whole[k]))
        stalled = b.block_body(*blk, "t", bands=True, stream=True)
        assert len(stalled) == 5
        t0 = time.monotonic()
        other = b.block_body(*blk, "t", bands=True, stream=True)
        assert _streamed(other) == whole[blk]
        filled = b.block_body(*blk, "t", bands=True)            # laid out whole on the helper thread
        filled[4].wait(filled[4].total)
        assert bytes(filled[1]) == whole[blk]
        assert time.monotonic() - t0 < 30 and not stalled[4].future.done()
        stalled[4].close()


def test_exports_through_streamed_bodies_are_the_files_tiles(tmp_path, monkeypatch):
    """.tpkx and cache-folder exports of located blocks streamed in 4 KiB bands: every tile is sqlite3's."""
    _stream_small(monkeypatch)
    from tilecrate.export import export
    from tilecrate.request import ExportRequest

    path = make(tmp_path, "fragmented")
    want = {k: v[0] for k, v in sqlite_tiles(path).items() if v[0]}
    for out, folder in ((tmp_path / "s.tpkx", False), (tmp_path / "folder", True)):
        export(str(path), ExportRequest("0-8", tile_package=not folder), str(out))
        with open_cache(str(out)) as cache:
            got = {(z, r, c): bytes(d) for z, r, c, d in cache.iter_tiles()}
        assert len(want) > 30 and got == want


@pytest.mark.parametrize("failure", ["cancel", "prepare"])
def test_an_export_failing_mid_stream_leaves_the_open_source_usable(tmp_path, monkeypatch, failure):
    """A long-lived open source (a server's service, a worker's cache): an export cancelled as the writer takes a
    streamed bundle, or whose bundle planning fails after its stream started, stops that stream (its
    reading waits for a writer that will not come, on the source's one helper thread); the next export of
    the same open source runs and gives sqlite3's tiles instead of waiting behind it for ever."""
    import threading

    from tilecrate.errors import TilecrateError
    from tilecrate.export import export
    from tilecrate.request import ExportRequest
    from tilecrate.runners import inprocess, tasks
    from tilecrate.sources.sqlite import Stream

    from tilecrate.sources import sqlite as sqlite_source

    def small_streams():
        _stream_small(monkeypatch)
        monkeypatch.setattr(sqlite_source, "STREAM_BUFFERS", 1)     # a body of two bands waits for its writer

    def several_bands(plan) -> bool:
        """Whether the plan's body is a Stream read in two bands or more (its reading then waits for the writer)."""
        if not isinstance(plan.source, Stream):
            return False
        bands, room = 0, 0
        for n in (plan.tile_sizes.astype(np.int64) + 4).tolist():     # _stream's bands: whole tiles, at least one
            if n > room:
                bands, room = bands + 1, sqlite_source.STREAM_BAND
            room -= n
        return bands >= 2

    small_streams()
    path = make(tmp_path, "fragmented")
    want = {k: v[0] for k, v in sqlite_tiles(path).items() if v[0]}
    cache = open_cache(str(path))
    try:
        cancel = threading.Event()
        streams = []
        if failure == "cancel":
            real = inprocess._wait

            def taken_then_cancelled(fut, flag):
                prep = real(fut, flag)
                if prep is not None and several_bands(prep.plan):
                    streams.append(prep.plan.filling)
                    cancel.set()        # the writer has taken this bundle: the cancel is seen before its write
                return prep

            monkeypatch.setattr(inprocess, "_wait", taken_then_cancelled)
        else:
            real = tasks._check_count

            def check(plan, task, label):
                if several_bands(plan):
                    streams.append(plan.source)
                    raise BundleError(f"{label}: holds fewer of the selected tiles now; the source changed")
                real(plan, task, label)

            monkeypatch.setattr(tasks, "_check_count", check)
        with pytest.raises(TilecrateError):
            export(cache, ExportRequest("0-8"), str(tmp_path / "a.tpkx"), cancel=cancel, threads=1)
        monkeypatch.undo()
        small_streams()
        assert streams
        done = {}

        def again():
            try:
                done["result"] = export(cache, ExportRequest("0-8"), str(tmp_path / "b.tpkx"), threads=1)
            except BaseException as e:          # reported below
                done["result"] = e

        t = threading.Thread(target=again, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the next export of the same open source hung"
        assert not isinstance(done["result"], BaseException), done["result"]
        for s in streams:
            s.future.result(timeout=30)          # each dropped stream's reading ended
    finally:
        cache.close()
    with open_cache(str(tmp_path / "b.tpkx")) as out:
        got = {(z, r, c): bytes(d) for z, r, c, d in out.iter_tiles()}
    assert got == want


@pytest.mark.parametrize("budget", [0, 24 * 30, 24 * 100])
def test_past_the_cells_budget_levels_read_through_sql_give_the_same_tiles(tmp_path, monkeypatch, budget):
    """Cells kept for at most CELLS_BUDGET bytes a file: the levels past it are read through SQL (sizes from the
    walk); every block of every level, through block_list and block_body, still sqlite3's bytes."""
    from tilecrate.sources import sqlite as sqlite_source

    monkeypatch.setattr(sqlite_source, "CELLS_BUDGET", budget)
    for name in ("fragmented", "gpkg512"):
        path = make(tmp_path, name)
        tiles, sizes, pages, bodies = backend_tiles(path)
        _assert_same(path, tiles, sizes, bodies)
        assert pages


def test_threads_sharing_a_backend_read_the_same_tiles(tmp_path, monkeypatch):
    """Four threads read every block at once, again and again, through block_list and banded block_body (the
    bands on the backend's one helper thread, beside the scans'): every read is sqlite3's bytes, none hangs."""
    import threading

    from tilecrate.sources import sqlite as sqlite_source

    monkeypatch.setattr(sqlite_source, "BANDS_FROM", 1 << 10)
    monkeypatch.setattr(sqlite_source, "BAND_FIRST", 1 << 10)
    path = make(tmp_path, "fragmented")
    want = {k: v[0] for k, v in sqlite_tiles(path).items() if v[0]}
    errors: list = []
    with open_cache(str(path)) as cache:
        b = cache._store
        blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]

        def work(k: int) -> None:
            try:
                for n in range(6):
                    for z, r0, c0 in blocks[k % 2::1 + n % 2]:
                        _, idx, got = b.block_list(z, r0, c0)
                        for i, t in zip(idx.tolist(), got):
                            assert bytes(t) == want[(z, r0 + i // PACKET, c0 + i % PACKET)]
                        body = b.block_body(z, r0, c0, "t", bands=True)
                        if len(body) == 5:
                            body[4].wait(body[4].total)
                        for key, t in _body_tiles(z, r0, c0, body[:4]).items():
                            assert t == want[key]
            except BaseException as e:          # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a reader hung"
    assert not errors, errors[0]


def test_closing_the_source_while_bands_are_pending_ends_every_wait(tmp_path, monkeypatch):
    """Bodies requested in bands, then the source closed at once (a cancelled export): each wait ends with the
    body complete and right, or a BundleError; none waits for ever."""
    import threading

    from tilecrate.sources import sqlite as sqlite_source

    monkeypatch.setattr(sqlite_source, "BANDS_FROM", 1 << 10)
    monkeypatch.setattr(sqlite_source, "BAND_FIRST", 1 << 10)
    path = make(tmp_path, "fragmented")
    want = {k: v[0] for k, v in sqlite_tiles(path).items() if v[0]}
    cache = open_cache(str(path))
    b = cache._store
    blocks = [(z, r0, c0) for z in b.levels() for r0, c0 in sorted(b.blocks(z))]
    for z, r0, c0 in blocks:
        b.block_index(z, r0, c0)
    bodies = [((z, r0, c0), b.block_body(z, r0, c0, "t", bands=True)) for z, r0, c0 in blocks * 3]
    assert any(len(body) == 5 for _, body in bodies)
    closer = threading.Thread(target=cache.close)
    closer.start()
    outcomes = []
    for (z, r0, c0), body in bodies:
        if len(body) == 5:
            try:
                body[4].wait(body[4].total)
            except BundleError as e:
                assert "\n" not in str(e)
                outcomes.append("refused")
                continue
        for key, t in _body_tiles(z, r0, c0, body[:4]).items():
            assert t == want[key]
        outcomes.append("read")
    closer.join(60)
    assert not closer.is_alive(), "close() hung"
    assert len(outcomes) == len(bodies)


# -- what these tests found (each failed before the fix in sources/sqlite.py or _sqlite.pyx) ------------------

@pytest.mark.parametrize("attack", ["overflow_to_a_leaf", "overflow_chain_ends_early"])
def test_a_corrupt_file_nobody_writes_is_not_reported_as_changed(tmp_path, attack_source, attack):
    """A broken overflow chain in a file nobody writes: SQLite calls it malformed; the backend must not ask the
    operator to retry a request that fails the same way every time."""
    src, original = attack_source
    path = tmp_path / f"{attack}.mbtiles"
    path.write_bytes(src.read_bytes())
    f = sff.Db(path)
    tree = f.tree(sff.root_page(path, "tiles"))
    ATTACKS[attack](path, f, tree, f.cells(tree.root))
    before = os.stat(path)
    res = run_child(path)
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns
    if assert_sqlite_or_clean_error(path, original, res) == "error":
        assert "changed" not in res["message"] and "retry" not in res["message"], res["message"]


def test_a_file_replaced_by_rename_is_read_anew_or_refused(tmp_path):
    """An operator replaces the file (a new database renamed over it) while the cache is open: later block reads
    give the new file's bytes or a BundleError, never the old file's bytes under the new file's identity."""
    path = make(tmp_path, "page1024")
    (tmp_path / "new").mkdir()
    new = _mbtiles(tmp_path / "new" / "x.mbtiles", _rows(99), page_size=1024)
    with open_cache(str(path)) as cache:
        b = cache._store
        z = b.levels()[-1]
        blocks = sorted(b.blocks(z))
        for r0, c0 in blocks:
            b.block_list(z, r0, c0)
        os.replace(new, path)
        now = sqlite_tiles(path)
        for r0, c0 in blocks:
            try:
                ident, idx, got = b.block_list(z, r0, c0)
            except BundleError:
                continue
            assert ident == b.identity()
            for i, t in zip(idx.tolist(), got):
                k = (z, r0 + i // PACKET, c0 + i % PACKET)
                assert bytes(t) in now.get(k, []), f"{k}: the replaced file's bytes"


def _payload_past_the_file(claim: int):
    """A small cell rewritten to claim a `claim`-byte blob whose overflow chain loops over two pages of another
    chain (A -> B -> A): more overflow pages than the file holds, which SQLite calls malformed."""
    def corrupt(path, f, tree, cells):
        u = f.usable
        m = ((u - 12) * 32 // 255) - 23
        payload = m + (u - 4) * ((claim - m) // (u - 4))         # its local part is M bytes
        assert f.local_size(payload) == m and (payload - m) // (u - 4) > f.pages
        c = next(c for c in cells if not c.overflow and c.header_len + c.local >= 9 + 2 + m + 4)
        z, x, y = sff.decode_record(f.payload(c))[:3]
        body = bytes([z]) + x.to_bytes(2, "big") + y.to_bytes(2, "big")
        header = bytes([9, 1, 2, 2]) + sff.encode_varint(2 * (payload - 9 - len(body)) + 12, 5)
        local = (header + body + bytes(m))[:m]
        a, b = next(o for o in cells if len(o.overflow) >= 2).overflow[:2]
        sff.patch(path, f.page_offset(c.page) + c.offset,
                  sff.encode_varint(payload) + sff.encode_varint(c.rowid) + local + _u32(a))
        sff.patch(path, f.page_offset(b), _u32(a))
    return corrupt


def test_a_payload_longer_than_the_file_is_refused_as_sqlite_does(tmp_path, attack_source):
    """A 150 KB file whose one cell claims a 20 MB tile over a looping chain: SQLite refuses the row (malformed:
    more overflow pages than the file has); the page reader must not hand out 20 MB of looped pages instead
    (nor, with a 900 MB claim, allocate and fill 900 MB from a 150 KB file)."""
    src, original = attack_source
    path = tmp_path / "claim.mbtiles"
    path.write_bytes(src.read_bytes())
    f = sff.Db(path)
    tree = f.tree(sff.root_page(path, "tiles"))
    _payload_past_the_file(20 << 20)(path, f, tree, f.cells(tree.root))
    res = run_child(path)
    assert_sqlite_or_clean_error(path, original, res)
    rows = _rowid_rows(src)
    got = run_reader(path, {"rowids": [r[0] for r in rows], "root": tree.root, "fields": (0, 1, 2, 3)})
    assert "error" in got or got["located"] is None or max(map(len, got["tiles"])) < 1 << 20, \
        "locate accepted a payload of more overflow pages than the file holds"



def _dup_reused_pages(db: sqlite3.Connection) -> None:
    """Duplicates inserted after deletes: their higher rowids land in leaf pages freed below the originals'."""
    rows = db.execute("SELECT zoom_level, tile_column, tile_row FROM tiles WHERE rowid > 41").fetchall()
    db.execute("DELETE FROM tiles WHERE rowid <= 40")
    db.commit()
    db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", [(z, x, y, _blob(777 + i, 50 + 10 * i))
                                                             for i, (z, x, y) in enumerate(rows)])


def test_of_duplicate_rows_every_path_picks_the_same(tmp_path):
    """Two rows for one tile (no unique index): block_list, block_body and tile() give the same one, the lowest
    rowid's as SQL does, whichever leaf page each row lives in (else a .tpkx and a .pmtiles export of one
    source hold different tiles)."""
    path = _mbtiles(tmp_path / "dups.mbtiles", _rows(40), page_size=512, post=[_dup_reused_pages],
                    index="CREATE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
    tiles, _, pages, bodies = backend_tiles(path)
    want = sqlite_tiles(path)
    dups = [k for k, v in want.items() if len(v) > 1 and all(v)]
    assert pages and len(dups) > 10
    with open_cache(str(path)) as cache:
        one = {k: cache._store.tile(*k) for k in dups}
    for k in dups:
        assert one[k] == want[k][0] and bodies[k] == want[k][0]
        assert tiles[k] == want[k][0], f"{k}: block_list gives rowid order {want[k].index(tiles[k])}"


def test_a_virtual_table_is_not_read_by_page(tmp_path):
    """A `tiles` virtual table (an R*Tree with auxiliary columns: rootpage 0 in sqlite_master) has no pages to
    read: its tiles come through SQL, and reads_pages() says so."""
    path = tmp_path / "vt.mbtiles"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.executemany("INSERT INTO metadata VALUES (?, ?)", [("name", "t"), ("format", "png")])
    db.execute("CREATE VIRTUAL TABLE tiles USING rtree(id, minx, maxx, +zoom_level, +tile_column, +tile_row, "
               "+tile_data)")
    db.executemany("INSERT INTO tiles VALUES (?, 0, 1, ?, ?, ?, ?)", [(i + 1, *r) for i, r in enumerate(_rows(50))])
    db.commit()
    db.close()
    tiles, sizes, pages, bodies = backend_tiles(path)
    _assert_same(path, tiles, sizes, bodies)
    assert pages is False, "reads_pages() is True for a virtual table"

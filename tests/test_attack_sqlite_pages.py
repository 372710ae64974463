"""An attacker's and an operator's tests of the MBTiles/GeoPackage page reader (tilecrate._sqlite's pages_begin,
locate, read_cells; SqliteBackend.reads_pages): files of every layout SQLite writes, generated here with Python's
sqlite3, read through the backend and compared byte for byte with sqlite3's own rows; then files corrupted at
exactly one structure (found by tests/sqlite_file_format.py, an independent parser of SQLite's file format) and
files changed by another process between the reader's steps. Risky reads run in a child process with a timeout:
a crash (a signal) or a hang fails the test, as does any byte that is not SQLite's."""
from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
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
        db.execute("INSERT INTO gpkg_tile_matrix VALUES (?, ?, ?, ?, 256, 256, ?, ?)", (table, z, 1 << z, 1 << z, px, px))
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

# name -> (maker(path) -> path opened, does the backend read pages: True, False, or None when either is right)
VARIANTS = {
    "page512": (lambda p: _mbtiles(p, _rows(), page_size=512), True),
    "page1024": (lambda p: _mbtiles(p, _rows(), page_size=1024), True),
    "page4096": (lambda p: _mbtiles(p, _rows()), True),
    "page65536": (lambda p: _mbtiles(p, _rows(), page_size=65536), True),
    "reserved512": (lambda p: _mbtiles(_reserved(p, 512, 32), _rows(20), post=[_fragment]), True),
    "reserved4096": (lambda p: _mbtiles(_reserved(p, 4096, 255), _rows(21)), True),
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
    "alter_add_column": (lambda p: _mbtiles(p, _rows(6), post=["ALTER TABLE tiles ADD COLUMN extra TEXT DEFAULT 'd'",
                                            "INSERT INTO tiles VALUES (8, 140, 3, x'89504E470D0A1A0AFF', 'e')"]), True),
    "alter_tile_data": (lambda p: _mbtiles(p, _rows(7), post=[_alter_tile_data]), True),
    "odd_values": (lambda p: _mbtiles(p, _rows_odd(_rows(8))), True),
    "utf16le": (lambda p: _mbtiles(p, _rows_odd(_rows(9)), pre=["PRAGMA encoding = 'UTF-16le'"]), None),
    "utf16be_blobs": (lambda p: _mbtiles(p, _rows(10), page_size=1024, pre=["PRAGMA encoding = 'UTF-16be'"]), None),
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
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(sql).fetchall()
    finally:
        db.close()
    out: dict = {}
    for z, x, y, data, rid in sorted(rows, key=lambda r: r[4] or 0):
        out.setdefault((z, ((1 << z) - 1 - y) if flip else y, x), []).append(None if data is None else bytes(data))
    return out


def backend_tiles(path: Path) -> tuple[dict, dict, bool | None]:
    """({(z, row, col): bytes} from block_list, {(z, row, col): size} from block_index, reads_pages()) of every
    block of every level, read through tilecrate's cache."""
    with open_cache(str(path)) as cache:
        b = cache._store
        tiles, sizes = {}, {}
        for z in b.levels():
            for r0, c0 in sorted(b.blocks(z)):
                _, sz = b.block_index(z, r0, c0)
                for i in np.flatnonzero(sz).tolist():
                    sizes[(z, r0 + i // PACKET, c0 + i % PACKET)] = int(sz[i])
                _, idx, got = b.block_list(z, r0, c0)
                for i, t in zip(idx.tolist(), got):
                    tiles[(z, r0 + i // PACKET, c0 + i % PACKET)] = bytes(t)
        pages = b.reads_pages() if hasattr(b, "reads_pages") else None
    return tiles, sizes, pages


def _assert_same(path: Path, tiles: dict, sizes: dict | None = None) -> None:
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
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(sql).fetchall()
    finally:
        db.close()
    kinds: dict = {}
    for z, x, y, kind, _ in rows:
        kinds.setdefault((z, ((1 << z) - 1 - y) if flip else y, x), set()).add(kind)
    return {k for k, v in kinds.items() if v == {"blob"}}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_reads_as_sqlite_does(tmp_path, name):
    path = make(tmp_path, name)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    tiles, sizes, pages = backend_tiles(path)
    _assert_same(path, tiles, sizes)
    assert len(tiles) > 20
    want = VARIANTS[name][1]
    if pages is None:       # the page reader has not landed yet: the SQL path's bytes were checked above
        return
    if want is not None:
        assert pages is want, f"{name}: reads_pages() is {pages}, expected {want}"


# -- the independent parser ---------------------------------------------------------------------------------

# variant -> (table, record position of tile_data, of zoom_level)
_LAYOUT = {"page512": ("tiles", 3, 0), "page65536": ("tiles", 3, 0), "reserved512": ("tiles", 3, 0),
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

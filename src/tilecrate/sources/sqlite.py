"""MBTiles and GeoPackage tile pyramids (SQLite), read through `blocks.BlockCache`.

Files are opened read-only (`mode=ro` URI; not `immutable`, so a file changed by another process
is seen as SQLite sees it), one connection per thread. A block's identity is the file's (and its
-wal's) identity: a database changed between planning and export fails that export clearly.
SQLite errors (truncated, corrupt, not a database) become one-line CacheErrors naming the file.
"""
from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections import deque

import numpy as np

from tilecrate._sqlite import PagesChanged, Reader, SqliteError, new_buffer
from tilecrate.cores import spare_core
from tilecrate.errors import BundleError, CacheError
from tilecrate.sourcefiles import file_id
from tilecrate.sources.blocks import (BLOCK_LIMIT, FORMAT_NAMES, BlockCache, detect_format, parse_bounds,
                                      tile_pixel_size, v2_index, v2_layout)
from tilecrate.sources.item import ItemInfo, from_metadata
from tilecrate.tiling import (
    INCHES_PER_METRE,
    LOD,
    PACKET,
    WEB_MERCATOR,
    Extent,
    SpatialRef,
    TileScheme,
    web_mercator_scheme,
)

MAX_ZOOM = 30
SCAN_LIMIT = 2_000_000     # levels up to this many tiles are indexed with one scan (48 MB of arrays)...
SCAN_BLOCKS = 20_000      # ...in at most this many blocks
CELLS_BUDGET = 64 << 20   # where scanned levels' tiles lie in the file's pages is kept (24 bytes a tile) up to this
                          # much a file; the blocks of levels past it are read through SQL
SPLIT_BYTES = 4 << 20     # a block holding more tile bytes than this is read as two halves at once (two threads,
SPLIT_TILES = 4096        # two connections: SQLite's page reads overlap) ... or more tiles than this
QUERY_SECONDS = 60.0      # one statement (and the reading of its rows) may take this long
CACHE_KIB = 2000          # page cache per connection (SQLite's default): 16 MiB measured slower (its pages are allocated per connection)
_META_ROWS = 10000
_META_VALUE = 1 << 20
_GPKG_IDS = (0x47504B47, 0x47503130)
PAGE_READS = True         # read a table's tile bytes from its pages where the file allows (off: always through SQL,
                          # the baseline benchmarks/bench_open_formats.py compares against)
_DEG_METRES = 2 * math.pi * 6378137.0 / 360.0   # ArcGIS's scale for degrees: metres per degree


_BLOCK_WHERE = f"zoom_level = ? AND tile_column IN ({', '.join('?' * PACKET)}) AND tile_row BETWEEN ? AND ?"


_NOT_INTEGER = "a result that should be an integer is not"
_TAKEN = object()         # _scan(wait=False): another thread is scanning that level


def _sql_error(label: str, e: Exception) -> CacheError:
    if "interrupted" in str(e):
        return CacheError(f"{label}: a query ran longer than {QUERY_SECONDS:g} s and was stopped (is `tiles` a view "
                          "over a large join?)")
    return CacheError(f"{label}: cannot read the SQLite database ({e})")


class SqliteBackend:
    """Tiles in a SQLite table or view with zoom_level, tile_column, tile_row, tile_data."""

    def __init__(self, path: str, label: str, source: str, flip: bool, widths: dict[int, tuple[int, int]],
                 warn, table: str | None = None):
        self.path = path
        self.label = label
        self._src = source              # a table name or a parenthesised SELECT
        self._table = table             # the table's name when the source is a table (its pages may be read)
        self._layout: tuple | None = None   # (identity, page layout of _table or None): see _page_layout
        self._layout_lock = threading.Lock()    # one thread works the layout out, the others wait for it
        self._flip = flip               # MBTiles: tile_row counts from the bottom (TMS)
        self._widths = widths           # level -> (matrix width, matrix height)
        self._warn = warn
        self._local = threading.local()
        self._conns: list[tuple[threading.Thread, object]] = []     # (thread, its connection or Reader)
        self._scans: dict[int, tuple] = {}      # level -> (identity, {block: (indices, sizes, cells, header)} or None)
        self._lock = threading.Lock()
        self._pool = None               # the helper thread of _read_block, started on first use
        self._streamers = None          # the threads reading streamed bodies (see block_body), started on first use
        self._prefetch = None           # the thread of prefetch_scans, started on first use
        self._claims: dict[int, threading.Event] = {}   # level -> set when the scan under way ends
        self._streams: weakref.WeakSet = weakref.WeakSet()   # block_body's Streams (close() ends them)
        self._closed = False

    # -- connections ---------------------------------------------------------------------------

    def conn(self) -> sqlite3.Connection:
        """This thread's read-only connection, to the file the path names now."""
        now = self._file_now()
        c, at = getattr(self._local, "conn", (None, None))
        if c is None or at != now:
            self._drop(c)
            c = connect(self.path, self.label)
            self._local.conn = (c, self._opened(now))
            self._keep(c)
        return c

    def reader(self) -> Reader:
        """This thread's compiled reader (tilecrate._sqlite), to the file the path names now: the scans and
        block reads, rows into arrays or read from the table's pages."""
        now = self._file_now()
        r, at = getattr(self._local, "reader", (None, None))
        if r is None or at != now:
            self._drop(r)
            try:
                r = Reader(self.path, CACHE_KIB)
            except SqliteError as e:
                raise CacheError(f"{self.label}: not a readable SQLite database ({e})") from None
            self._local.reader = (r, self._opened(now))
            self._keep(r)
        return r

    def _drop(self, c) -> None:
        """Close this thread's connection to a file the path no longer names."""
        if c is None:
            return
        with self._lock:
            self._conns = [(t, old) for t, old in self._conns if old is not c]
        try:
            c.close()
        except (sqlite3.Error, SqliteError):
            pass

    def _file_now(self) -> tuple | None:
        """(device, inode) of the file the path names now."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _opened(self, before: tuple | None) -> tuple | None:
        """The file a connection just opened: the path's (device, inode) if it named that file before and after
        the open (a file replaced by rename in between: None, so the next call opens again)."""
        return before if before is not None and self._file_now() == before else None

    def _keep(self, c) -> None:
        """Remember a new connection of this thread, closing those of threads that ended: an open cache
        outlives the thread pools of many exports, and each of their threads opened its own."""
        me = threading.current_thread()
        with self._lock:
            ended = [(t, old) for t, old in self._conns if not t.is_alive()]
            self._conns = [(t, old) for t, old in self._conns if t.is_alive()]
            self._conns.append((me, c))
        for _, old in ended:
            try:
                old.close()
            except (sqlite3.Error, SqliteError):
                pass

    def query_blobs(self, sql: str, args: tuple, level: int, hint: int = 0) -> tuple:
        """(keys, offsets, buffer) of an (integer, blob) query through this thread's compiled reader; SQLite
        errors, a key that is not an integer and a block past BLOCK_LIMIT bytes as CacheError."""
        try:
            return self.reader().blobs(sql, args, hint, BLOCK_LIMIT, QUERY_SECONDS)
        except SqliteError as e:
            if str(e).startswith(_NOT_INTEGER):    # a real among a view's columns or rows makes its index one too
                raise CacheError(f"{self.label}: level {level} has tile rows whose column or row is not an integer") \
                    from None
            raise _sql_error(self.label, e) from None
        except MemoryError as e:
            raise CacheError(f"{self.label}: one 128x128 block at level {level} holds more than the "
                             f"{BLOCK_LIMIT >> 20} MiB of tiles a block may hold in memory ({e})") from None

    def query(self, sql: str, args=()) -> list:
        """Rows of a query; SQLite errors as CacheError."""
        try:
            return self.conn().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise _sql_error(self.label, e) from None

    def identity(self) -> tuple:
        """The database's identity now (the file and its write-ahead log)."""
        try:
            main = file_id(os.stat(self.path))
        except OSError as e:
            raise CacheError(f"{self.label}: cannot read ({e.strerror})") from None
        try:
            wal = file_id(os.stat(self.path + "-wal"))
        except OSError:
            wal = None
        return main, wal

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
            pools = [self._pool, self._prefetch, self._streamers]
            self._pool = self._prefetch = self._streamers = None
            streams = list(self._streams)
        for body in streams:        # a stream's reading waits for its writer: stopped, so the pool's thread ends
            body.close()
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        me = threading.current_thread()
        for t, c in conns:
            if t is not me and t.is_alive():
                # another thread may be inside a statement on it (a thumbnail still rendering after a failed
                # export): closing it under that statement crashed the interpreter. Dropped here, it is
                # closed when that thread lets go of it (its thread-local goes with self._local below).
                continue
            try:
                c.close()
            except (sqlite3.Error, SqliteError):      # in use by a thread still reading: closed when collected
                pass
        self._local = threading.local()

    # -- grid ------------------------------------------------------------------------------------

    def _size(self, level: int) -> tuple[int, int]:
        return self._widths.get(level, (1 << level, 1 << level))

    def _row_sql(self) -> str:
        return "(? - tile_row)" if self._flip else "(tile_row + 0 * ?)"

    def _range(self, level: int, row0: int, col0: int, cols: tuple[int, int] | None = None) -> tuple[str, list]:
        """The WHERE clause and its arguments of a block's rows (of its columns cols[0] <= c < cols[1] when given)."""
        w, h = self._size(level)
        r1 = min(row0 + PACKET, h) - 1
        c1 = min(col0 + PACKET, w) - 1
        if cols is not None:
            col0, c1 = max(col0, cols[0]), min(c1, cols[1] - 1)
        if self._flip:
            lo, hi = h - 1 - r1, h - 1 - row0
        else:
            lo, hi = row0, r1
        # the block's columns listed, so the (zoom, column, row) index is searched for the block's rows
        # in each column instead of scanning every row of 128 columns (the whole height of the level)
        # (always PACKET values, the last repeated past the grid's edge: one statement text, cached; a bound
        # on tile_column as well makes SQLite's planner drop the IN list)
        cols = list(range(col0, c1 + 1))
        if not cols:                            # a block past the grid's edge: a range nothing is in
            cols, lo, hi = [col0], 1, 0
        return _BLOCK_WHERE, [level, *cols, *[cols[-1]] * (PACKET - len(cols)), lo, hi]

    def _cells(self, level: int, cols, rows) -> tuple[np.ndarray, np.ndarray]:
        """Columns and rows as integer arrays; a real or text among them (a view's column) is an error."""
        cols, rows = np.array(cols), np.array(rows)
        if cols.dtype.kind not in "iu" or rows.dtype.kind not in "iu":
            raise CacheError(f"{self.label}: level {level} has tile rows whose column or row is not an integer")
        return cols, rows

    def _index(self, level: int, row0: int, rows, cols, col0: int) -> np.ndarray:
        h = self._size(level)[1]
        rows = np.asarray(rows, dtype=np.int64)
        if self._flip:
            rows = h - 1 - rows
        return (rows - row0) * PACKET + (np.asarray(cols, dtype=np.int64) - col0)

    # -- protocol --------------------------------------------------------------------------------

    def levels(self) -> list[int]:
        """Zoom levels holding tiles, each found by an index seek."""
        out, z = [], -1
        while True:
            got = self.query(f"SELECT MIN(zoom_level) FROM {self._src} WHERE zoom_level > ?", (z,))
            z = got[0][0] if got else None
            if z is None:
                return out
            if not isinstance(z, int) or z > MAX_ZOOM:
                self._warn(f"{self.label}: tiles at zoom level {z!r} (past {MAX_ZOOM} or not a number); skipped")
                return out
            if z >= 0 and (self._widths == {} or z in self._widths):
                out.append(z)

    def prefetch_scans(self, levels: list[int]) -> None:
        """Scan these levels' indexes on a thread of their own, the finest first, while the caller plans from
        the coarsest (when a core is spare): the two meet in the middle and no level is scanned twice."""
        if len(levels) < 2 or not spare_core():
            return
        try:
            self._page_layout(self.identity())     # here, on this thread's connection: none opened for the prefetch
        except CacheError:
            return                                  # the planning thread meets the error itself
        pool = self._threads("_prefetch", 1, "tilecrate-scan")
        if pool is not None:
            pool.submit(self._scan_down, sorted(set(levels), reverse=True))

    def _scan_down(self, levels: list[int]) -> None:
        try:
            ident = self.identity()
            for level in levels:
                if self._closed or self._scan(level, ident, split=False, wait=False) is _TAKEN:
                    return
        except Exception:       # the planning thread scans the level again and reports the error itself
            return

    def _scan(self, level: int, ident: tuple, split: bool = True, wait: bool = True):
        """{(row0, col0): sizes} of a whole level from one index scan, kept while the file is the same;
        None for a level of more than SCAN_LIMIT tiles (those are read block by block). A level another
        thread is scanning is waited for (`wait`), else _TAKEN is returned."""
        while True:
            with self._lock:
                hit = self._scans.get(level)
                if hit is not None and hit[0] == ident:
                    return hit[1]
                busy = self._claims.get(level)
                if busy is None:
                    done = self._claims[level] = threading.Event()
                    break
            if not wait:
                return _TAKEN
            busy.wait()             # its result, or after its failure a scan here (which reports the error)
        try:
            found = self._scan_level(level, ident, split)
            with self._lock:
                # scans of an earlier version of the file go (their cells would point into pages since rewritten)
                self._scans = {lv: scan for lv, scan in self._scans.items() if scan[0] == ident}
                self._scans[level] = (ident, found)
            return found
        finally:
            with self._lock:
                del self._claims[level]
            done.set()

    def _scan_level(self, level: int, ident: tuple, split: bool) -> dict | None:
        layout = self._page_layout(ident)
        located = self._locate_level(level, layout) if layout is not None else None
        if located is _SPARSE:
            return None
        if located is not None:
            rows, cells, header = located
            if not self._cells_fit(ident, cells.nbytes):
                cells = header = None           # the sizes are kept, the blocks read through SQL
            return self._blocks_of(level, rows, cells, header)
        w = self._size(level)[0]
        split = self._scan_split(level, ident) if split else None
        helper = self._helper() if split is not None else None
        if helper is None:
            a = self._scan_cols(level, 0, w - 1)
        else:
            # a large level: its left and right columns scanned at once on two connections
            right = helper.submit(self._scan_cols, level, split, w - 1)
            try:
                a = self._scan_cols(level, 0, split - 1)
            finally:
                right.exception()               # waited for either way: an error here leaves no query running
            b = right.result()
            a = None if a is None or b is None or len(a) + len(b) > SCAN_LIMIT else np.concatenate([a, b])
        return None if a is None else self._blocks_of(level, a)

    # -- the file's pages (tilecrate._sqlite: Reader.pages_begin, locate, read_cells) -----------------

    def reads_pages(self) -> bool:
        """Whether tile bytes are read from the file's pages here rather than through SQL (a rowid table
        in a rollback-journal database, its columns stored in its records)."""
        return self._page_layout(self.identity()) is not None

    def _page_layout(self, ident: tuple) -> tuple | None:
        """(schema version, root page, record positions of zoom_level, tile_column, tile_row, tile_data) of
        the table, kept while the file is the same; None when its pages are not read here."""
        with self._lock:
            if self._layout is not None and self._layout[0] == ident:
                return self._layout[1]
        with self._layout_lock:
            return self._work_out_layout(ident)

    def _work_out_layout(self, ident: tuple) -> tuple | None:
        """_page_layout's work, under _layout_lock (the planning thread and the prefetch's both start with it:
        it took each of them ~1 ms, with a connection opened for it on the prefetch's thread)."""
        with self._lock:
            if self._layout is not None and self._layout[0] == ident:
                return self._layout[1]
        layout = None
        if self._table is not None and PAGE_READS:
            layout = _table_layout(self.conn(), self._table)
            if layout is not None:
                r = self.reader()
                try:
                    if r.pages_begin() is None:         # WAL: the file alone is not the database
                        layout = None
                except SqliteError as e:
                    raise _sql_error(self.label, e) from None
                finally:
                    r.pages_end()
        with self._lock:
            self._layout = (ident, layout)
        return layout

    def _locate_level(self, level: int, layout: tuple):
        """((column, row, length) rows, cells, header) of a level, its rows found by an index-only query
        and its table's pages read here, all in one read transaction; _SPARSE past SCAN_LIMIT tiles; None
        when the pages are not as SQL says (a schema changed since the layout, a record locate does not
        read): the caller then asks SQL."""
        version, root, fields = layout
        w, h = self._size(level)
        r = self.reader()
        try:
            header = r.pages_begin()
            if header is None or int.from_bytes(header[40:44], "big") != version:
                with self._lock:
                    self._layout = None
                return None
            rows = r.ints3(f"SELECT rowid, tile_column, tile_row FROM {self._src} WHERE zoom_level = ? "
                           "AND tile_column BETWEEN 0 AND ? AND tile_row BETWEEN 0 AND ?", (level, w - 1, h - 1),
                           SCAN_LIMIT, QUERY_SECONDS)
            if rows is None:
                return _SPARSE
            rows = rows[np.argsort(rows[:, 0], kind="stable")]
            if rows.size and np.any(rows[1:, 0] == rows[:-1, 0]):
                return None                 # an index naming one row twice (corrupt): SQL decides
            found = r.locate(rows[:, 0], root, fields, True) if rows.size else (np.zeros((0, 4), np.int64),
                                                                                  np.zeros((0, 3), np.uint64))
        except SqliteError as e:
            if str(e).startswith(_NOT_INTEGER):
                raise CacheError(f"{self.label}: level {level} has tile rows whose column or row is not an integer") \
                    from None
            raise _sql_error(self.label, e) from None
        finally:
            r.pages_end()
        if found is None:
            return None
        values, cells = found
        if not (np.array_equal(values[:, 0], np.full(len(rows), level)) and np.array_equal(values[:, 1], rows[:, 1])
                and np.array_equal(values[:, 2], rows[:, 2])):
            return None                     # the records do not say what the index says: SQL decides
        rows[:, 0], rows[:, 1], rows[:, 2] = values[:, 1], h - 1 - values[:, 2] if self._flip else values[:, 2], \
            values[:, 3]
        return rows, cells, header

    def _cells_fit(self, ident: tuple, more: int) -> bool:
        """Whether `more` bytes of cells fit in CELLS_BUDGET beside those kept for this file version."""
        with self._lock:
            held = sum(got[2].nbytes for scan in self._scans.values() if scan[0] == ident and scan[1]
                       for got in scan[1].values() if got[2] is not None)
        return held + more <= CELLS_BUDGET

    def _read_cells(self, level: int, got: tuple, into=None, at=None) -> tuple:
        """(keys, offsets, buffer) of a block's tiles copied from the pages its scan located them in; with
        `into`, each tile goes to into[at[i]:], after its size (a bundle body), and `into` is returned."""
        idx, sizes, cells, header = got
        r = self.reader()
        try:
            if r.pages_begin() != header:
                raise PagesChanged("the database was written since its rows were located")
            if into is None:
                offs, buf = r.read_cells(cells, sizes, header, BLOCK_LIMIT)
            else:
                r.read_into(into, cells, sizes, at, header, True)
                offs, buf = at, into
        except PagesChanged:
            raise BundleError(f"{self.label}: the file changed while it was being read; retry the request") from None
        except SqliteError as e:
            if "truncated" in str(e):       # a short read: shorter than when located
                raise BundleError(f"{self.label}: the file changed while it was being read ({e}); retry the "
                                  "request") from None
            raise _sql_error(self.label, e) from None
        except MemoryError as e:
            raise CacheError(f"{self.label}: one 128x128 block at level {level} holds more than the "
                             f"{BLOCK_LIMIT >> 20} MiB of tiles a block may hold in memory ({e})") from None
        finally:
            r.pages_end()
        return idx.astype(np.int64), offs, buf

    def _scan_cols(self, level: int, c0: int, c1: int) -> np.ndarray | None:
        """(column, row, length) rows of a level's columns c0..c1 (an (n, 3) int64 array); None past SCAN_LIMIT."""
        h = self._size(level)[1]
        try:
            return self.reader().ints3(
                f"SELECT tile_column, {self._row_sql()}, IFNULL(length(tile_data), 0) FROM {self._src} "
                "WHERE zoom_level = ? AND tile_column BETWEEN ? AND ? AND tile_row BETWEEN 0 AND ?",
                (h - 1, level, c0, c1, h - 1), SCAN_LIMIT, QUERY_SECONDS)
        except SqliteError as e:
            if str(e).startswith(_NOT_INTEGER):
                raise CacheError(f"{self.label}: level {level} has tile rows whose column or row is not an integer") \
                    from None
            raise _sql_error(self.label, e) from None

    def _scan_split(self, level: int, ident: tuple) -> int | None:
        """Where to split a level's scan in two (the first column of the right half), or None: the level above
        was scanned and held SPLIT_TILES tiles or more (so this one likely holds four times as many), split
        below the children of its median column."""
        with self._lock:
            above = self._scans.get(level - 1)
        if above is None or above[0] != ident or not above[1] or not spare_core():
            return None
        if sum(got[0].size for got in above[1].values()) < SPLIT_TILES:
            return None
        cols = np.concatenate([c0 + got[0].astype(np.int64) % PACKET for (_, c0), got in above[1].items()])
        split = 2 * int(np.median(cols)) + 2
        return split if 0 < split < self._size(level)[0] else None

    def _blocks_of(self, level: int, a: np.ndarray, cells: np.ndarray | None = None,
                   header: bytes | None = None) -> dict | None:
        """{(row0, col0): (block indices, sizes, cells, header)} of a level's (column, row, length) rows and
        where their pages hold them (cells, ordered by page in each block; None when read through SQL);
        None when sparse."""
        found: dict = {}
        if not a.size:
            return found
        if np.any(a[:, 2] > 0xFFFFFFFF):
            raise CacheError(f"{self.label}: a tile at level {level} is larger than 4 GiB")
        key = ((a[:, 1] >> 7) << 32) | (a[:, 0] >> 7)
        order = np.argsort(key, kind="stable")
        keys, starts = np.unique(key[order], return_index=True)
        if keys.size > SCAN_BLOCKS:          # sparse: per-block state would outweigh the scan
            return None
        for k, lo, hi in zip(keys.tolist(), starts.tolist(), np.append(starts[1:], order.size).tolist()):
            sel = a[order[lo:hi]]
            r0, c0 = (k >> 32) * PACKET, (k & 0xFFFFFFFF) * PACKET
            idx = ((sel[:, 1] - r0) * PACKET + (sel[:, 0] - c0)).astype(np.uint16)
            if len(np.unique(idx)) != len(idx):
                self._warn(f"{self.label}: several rows for the same tile at level {level} "
                           "(no unique index); one of them is used")
            if cells is None:
                found[(r0, c0)] = (idx, sel[:, 2].astype(np.uint32), None, None)   # compact: 6 bytes a tile
            else:
                mine = cells[order[lo:hi]]
                # of duplicate rows the lowest rowid's, as the index hands them to SQL (and tile() reads)
                first = np.lexsort((mine[:, 2], idx))
                first = first[np.r_[True, idx[first][1:] != idx[first][:-1]]]
                by_page = first[np.argsort(mine[first, 0] & 0xFFFFFFFF, kind="stable")]  # each leaf page read once
                found[(r0, c0)] = (idx[by_page], sel[by_page, 2].astype(np.uint32), mine[by_page], header)
        return found

    def blocks(self, level: int):
        """Blocks holding tiles at `level` (tiles outside the level's grid are not counted)."""
        scan = self._scan(level, self.identity())
        if scan is not None:
            return set(scan)
        w, h = self._size(level)
        rows = self.query(
            f"SELECT DISTINCT tile_column >> 7, {self._row_sql()} >> 7 FROM {self._src} "
            "WHERE zoom_level = ? AND tile_column BETWEEN 0 AND ? AND tile_row BETWEEN 0 AND ?",
            (h - 1, level, w - 1, h - 1))
        return {(int(r) * PACKET, int(c) * PACKET) for c, r in rows}

    def block_index(self, level: int, row0: int, col0: int):
        """(identity, sizes) of a block from length(tile_data)."""
        ident = self.identity()
        scan = self._scan(level, ident)
        if scan is not None:
            sizes = np.zeros(PACKET * PACKET, dtype=np.uint32)
            got = scan.get((row0, col0))
            if got is not None:
                sizes[got[0]] = got[1]
            return ident, sizes
        where, args = self._range(level, row0, col0)
        got = self.query(f"SELECT tile_column, tile_row, length(tile_data) FROM {self._src} WHERE {where}", args)
        sizes = np.zeros(PACKET * PACKET, dtype=np.uint32)
        if got:
            cols, rows, lens = zip(*got)
            cols, rows = self._cells(level, cols, rows)
            idx = self._index(level, row0, rows, cols, col0)
            lens = np.asarray([n or 0 for n in lens], dtype=np.int64)
            if np.any(lens > 0xFFFFFFFF):
                raise CacheError(f"{self.label}: a tile at level {level} is larger than 4 GiB")
            sizes[idx] = lens
            if len(set(idx.tolist())) != len(idx):
                self._warn(f"{self.label}: several rows for the same tile at level {level} (no unique index); "
                           "one of them is used")
        if self.identity() != ident:
            raise BundleError(f"{self.label}: the file changed while it was being read; retry the request")
        return ident, sizes

    def _read_block(self, level: int, row0: int, col0: int,
                    wanted: np.ndarray | None = None) -> tuple[tuple, np.ndarray, list]:
        """(identity, ascending unique block indices, their tiles' bytes: memoryviews of the compiled reader's
        buffers) from one range query, or two at once (a left and a right half) for a large block. With
        `wanted` (block indices), a block whose rows were located in the table's pages reads only those
        tiles (others: the whole block, as without)."""
        ident = self.identity()
        with self._lock:
            scan = self._scans.get(level)
        got = scan[1].get((row0, col0)) if scan is not None and scan[0] == ident and scan[1] is not None else None
        if got is not None and got[2] is not None and wanted is not None:
            keep = np.isin(got[0], np.asarray(wanted, dtype=np.int64))
            got = (got[0][keep], got[1][keep], got[2][keep], got[3])
        if got is None:
            parts = [self._read_cols(level, row0, col0, None, 0)]
        elif got[2] is not None:
            total = int(got[1].sum(dtype=np.int64))
            helper = self._helper() if (total > SPLIT_BYTES or got[0].size > SPLIT_TILES) and spare_core() else None
            if helper is not None:
                # the first half of the pages (by bytes) here, the second on the helper's connection
                cut = int(np.searchsorted(np.cumsum(got[1], dtype=np.int64), total // 2)) + 1
                half = helper.submit(self._read_cells, level, tuple(a[cut:] for a in got[:3]) + got[3:])
                parts = [_with_half(half, self._read_cells, level, tuple(a[:cut] for a in got[:3]) + got[3:]),
                         half.result()]
            else:
                parts = [self._read_cells(level, got)]
        else:
            # each buffer sized from the scan: grown (copied) only if the file grew since
            sizes = np.zeros(PACKET, dtype=np.int64)
            np.add.at(sizes, got[0].astype(np.int64) % PACKET, got[1].astype(np.int64))
            helper = self._helper() if (int(sizes.sum()) > SPLIT_BYTES or got[0].size > SPLIT_TILES) and spare_core() \
                else None
            if helper is not None:
                mid = col0 + int(np.searchsorted(np.cumsum(sizes), sizes.sum() / 2)) + 1
                half = helper.submit(self._read_cols, level, row0, col0, (mid, col0 + PACKET),
                                     int(sizes[mid - col0:].sum()))
                parts = [_with_half(half, self._read_cols, level, row0, col0, (col0, mid),
                                    int(sizes[:mid - col0].sum())), half.result()]
            else:
                parts = [self._read_cols(level, row0, col0, None, int(sizes.sum()))]
        if self.identity() != ident:
            raise BundleError(f"{self.label}: the file changed while it was being read; retry the request")
        keys = np.concatenate([k for k, _, _ in parts])
        if not keys.size:
            return ident, np.zeros(0, dtype=np.int64), []
        lens = np.concatenate([o[1:] - o[:-1] for _, o, _ in parts])
        order = np.argsort(keys, kind="stable")      # row-major; of duplicate rows the first read is used
        idx = keys[order]
        keep = np.ones(idx.size, dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= lens[order] > 0                       # NULL, numbers and empty blobs are no tile
        sel = order[keep]
        if len(parts) == 1:
            offs, view = parts[0][1], memoryview(parts[0][2])
            return ident, idx[keep], list(map(view.__getitem__, map(slice, offs[sel].tolist(),
                                                                     offs[sel + 1].tolist())))
        tiles: list = [None] * sel.size
        first = 0
        for k, offs, buf in parts:
            mine = np.flatnonzero((sel >= first) & (sel < first + k.size))
            local = sel[mine] - first
            view = memoryview(buf)
            for at, t in zip(mine.tolist(), map(view.__getitem__, map(slice, offs[local].tolist(),
                                                                      offs[local + 1].tolist()))):
                tiles[at] = t
            first += k.size
        return ident, idx[keep], tiles

    def _read_cols(self, level: int, row0: int, col0: int, cols: tuple[int, int] | None, hint: int) -> tuple:
        """(keys, offsets, buffer) of a block's rows (of columns cols[0] <= c < cols[1]): keys are block indices."""
        where, args = self._range(level, row0, col0, cols)
        h = self._size(level)[1]
        # SQLite computes each row's index in the block: one number a row
        row = "(? - tile_row)" if self._flip else "(tile_row + 0 * ?)"
        return self.query_blobs(
            f"SELECT ({row} - ?) * {PACKET} + (tile_column - ?), tile_data FROM {self._src} WHERE {where}",
            (h - 1, row0, col0, *args), level, hint)

    def _threads(self, name: str, workers: int, prefix: str):
        """The thread pool kept in attribute `name` (each thread its own connection), started on first use;
        stopped by close(), and None after it (the caller then reads inline: no thread outlives the source)."""
        with self._lock:
            if self._closed:
                return None
            pool = getattr(self, name)
            if pool is None:
                from concurrent.futures import ThreadPoolExecutor

                pool = ThreadPoolExecutor(workers, thread_name_prefix=prefix)
                setattr(self, name, pool)
            return pool

    def _helper(self):
        """A thread for the second half of large blocks and a body's bands (see _threads)."""
        return self._threads("_pool", 1, "tilecrate-sqlite")

    def _streamer(self):
        """The threads that read streamed bodies, apart from the helper: a stream's reading waits for its writer,
        and a writer stalled on its output must not hold up the split reads, bands and other exports' streams
        of this source (see _threads)."""
        return self._threads("_streamers", STREAM_THREADS, "tilecrate-stream")

    def block_tiles(self, level: int, row0: int, col0: int):
        """(identity, {index: bytes}) of a block's tiles."""
        ident, idx, tiles = self._read_block(level, row0, col0)
        return ident, dict(zip(idx.tolist(), tiles))

    def block_list(self, level: int, row0: int, col0: int,
                   wanted: np.ndarray | None = None) -> tuple[tuple, np.ndarray, list]:
        """(identity, ascending unique block indices, their tiles' bytes) of a block, from one query (only the
        `wanted` indices' when lays_out says the block is read from the table's pages)."""
        return self._read_block(level, row0, col0, wanted)

    def block_body(self, level: int, row0: int, col0: int, label: str, bands: bool = False, stream: bool = False):
        """(identity, buffer, offsets, sizes) of a block laid out as a V2 bundle body: copied into place from
        the table's pages when its scan located them (see lays_out), else read with one query and laid out.
        With `bands`, a large located body is returned with a fifth item, a `Filling`: its bytes are copied
        in band after band, in order, on the helper thread while the caller writes those already in. With
        `stream` as well, the buffer and the fifth item are one `Stream`: the bands are read on a stream thread
        into a few reused buffers and the body is taken once, in order, through Stream.slices."""
        ident = self.identity()
        got = self._located(level, row0, col0, ident)
        if got is None:
            ident, idx, tiles = self._read_block(level, row0, col0)
            return (ident, *v2_layout(idx, tiles, label))
        idx, sizes, cells, header = got
        order = np.argsort(idx, kind="stable")      # one row a cell (see _blocks_of); empty ones are no tile
        sel = order[sizes[order] > 0]
        lens = sizes[sel].astype(np.int64)
        at, offsets, out_sizes, total = v2_index(idx[sel].astype(np.int64), lens, label)
        streamer = self._streamer() if bands and stream and total > BANDS_FROM else None
        if streamer is not None:
            body = Stream(total)
            with self._lock:
                # under the lock close() takes its list of streams by: each is in it, or sees the source closed
                if not self._closed:
                    self._streams.add(body)
                    body.future = streamer.submit(self._stream, level, ident,
                                                  (idx, sel, lens, cells, header, None, at), body)
            if body.future is not None:
                return ident, body, offsets, out_sizes, body
        helper = self._helper() if bands and total > BANDS_FROM else None
        buf = new_buffer(total)
        got = (idx, sel, lens, cells, header, buf, at)
        if helper is not None:
            filling = Filling(total)
            filling.future = helper.submit(self._fill, level, ident, got, filling)
            return ident, memoryview(buf), offsets, out_sizes, filling
        self._fill_band(level, got, 0, sel.size)
        if self.identity() != ident:
            raise BundleError(f"{self.label}: the file changed while it was being read; retry the request")
        return ident, memoryview(buf), offsets, out_sizes

    def _fill_band(self, level: int, got: tuple, lo: int, hi: int, into=None, base: int = 0) -> None:
        """Copy the body's tiles lo..hi (in body order) into place, in page order (each leaf page read once):
        into the body's buffer, or into `into` holding the body from byte `base` on."""
        idx, sel, lens, cells, header, buf, at = got
        part = sel[lo:hi]
        by_page = np.argsort(part, kind="stable") + lo      # the scan's order of a block is its pages' order
        rows = sel[by_page]
        self._read_cells(level, (idx[rows], lens[by_page], cells[rows], header), buf if into is None else into,
                         at[by_page] - base)

    def _stream(self, level: int, ident: tuple, got: tuple, body: "Stream") -> None:
        """block_body's stream, on a stream thread: bands of about STREAM_BAND bytes (whole tiles) read in
        order into the Stream's buffers; the end after the file's identity is checked."""
        lens, at = got[2], got[6]
        try:
            ends = at + lens
            lo = 0
            while lo < lens.size:
                start = int(at[lo]) - 4
                hi = max(lo + 1, int(np.searchsorted(ends, start + STREAM_BAND, side="right")))
                end = int(ends[hi - 1])
                buf = body.take(end - start)
                self._fill_band(level, got, lo, hi, buf, start)
                body.put(start, end, buf)
                lo = hi
            if self.identity() != ident:
                raise BundleError(f"{self.label}: the file changed while it was being read; retry the request")
            body.finish()
        except BaseException as e:
            body.fail(e)

    def _fill(self, level: int, ident: tuple, got: tuple, filling: "Filling") -> None:
        """block_body's bands, on the helper thread: each band's bytes announced once in; the last after the
        file's identity is checked (a file changed under the reads fails the waiting writer)."""
        lens, at = got[2], got[6]
        try:
            ends = at + lens
            lo, band = 0, BAND_FIRST
            while lo < lens.size:
                hi = max(lo + 1, int(np.searchsorted(ends, int(at[lo]) - 4 + band, side="right")))
                self._fill_band(level, got, lo, hi)
                if hi < lens.size:
                    filling.advance(int(ends[hi - 1]))
                lo, band = hi, min(2 * band, BAND_MOST)
            if self.identity() != ident:
                raise BundleError(f"{self.label}: the file changed while it was being read; retry the request")
            filling.advance(filling.total)
        except BaseException as e:
            filling.fail(e)

    def lays_out(self, level: int, row0: int, col0: int) -> bool:
        """Whether block_body copies the block's tiles into place from the table's pages (no copy beyond
        the one any read makes), which a bundle writer then takes as runs of that body."""
        return self._located(level, row0, col0, self.identity()) is not None

    def _located(self, level: int, row0: int, col0: int, ident: tuple) -> tuple | None:
        """The block's (indices, sizes, cells, header) when its level's scan of this file version located
        its rows in the table's pages; else None."""
        scan = self._scan(level, ident)
        got = scan.get((row0, col0)) if scan is not None else None
        return got if got is not None and got[2] is not None else None

    def tile(self, level: int, row: int, col: int) -> bytes | None:
        """One tile's bytes, or None."""
        w, h = self._size(level)
        if not (0 <= row < h and 0 <= col < w):
            return None
        trow = h - 1 - row if self._flip else row
        got = self.query(f"SELECT tile_data FROM {self._src} WHERE zoom_level = ? AND tile_column = ? "
                         "AND tile_row = ? LIMIT 1", (level, col, trow))
        if not got or not got[0][0]:
            return None
        data = got[0][0]
        return data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def first_tiles(self, n: int = 8) -> list[bytes]:
        """A few tiles (to tell their format and size)."""
        got = self.query(f"SELECT tile_data FROM {self._src} WHERE zoom_level >= 0 LIMIT ?", (n,))
        return [bytes(g[0]) for g in got if isinstance(g[0], bytes) and g[0]]


class _Connection(sqlite3.Connection):
    """A connection whose statements are interrupted after QUERY_SECONDS (a `tiles` view over a huge
    join, or a recursive one, would otherwise run for ever)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = float("inf")
        self.set_progress_handler(self._tick, 20000)

    def _tick(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0

    def execute(self, sql, parameters=()):
        """Run a statement (it and the reading of its rows get QUERY_SECONDS)."""
        self.deadline = time.monotonic() + QUERY_SECONDS
        return super().execute(sql, parameters)


def connect(path: str, label: str) -> sqlite3.Connection:
    """A read-only connection (mode=ro, never creating a file), bounded lock waits and statements."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        c = sqlite3.connect(uri, uri=True, timeout=2.0, check_same_thread=False, factory=_Connection)
        c.execute("PRAGMA query_only = 1")
        # no mapping: a file truncated under us must be an SQLite error, not SIGBUS
        c.execute("PRAGMA mmap_size = 0")
        c.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        c.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise CacheError(f"{label}: not a readable SQLite database ({e})") from None
    return c


def _tables(c: sqlite3.Connection, label: str) -> dict[str, str]:
    try:
        return {n: t for n, t in c.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view')")}
    except sqlite3.Error as e:
        raise _sql_error(label, e) from None


def _columns(c: sqlite3.Connection, table: str) -> set[str]:
    try:
        return {r[1].lower() for r in c.execute(f"PRAGMA table_info({_quote(table)})")}
    except sqlite3.Error:
        return set()


def _with_half(half, read, *args):
    """read(*args) while `half` (the other half, on the helper) runs; on an error here, after waiting for it
    (no query of ours left running), this error."""
    try:
        return read(*args)
    except BaseException:
        half.exception()
        raise


_SPARSE = object()      # _locate_level: more than SCAN_LIMIT tiles
BANDS_FROM = 2 << 20    # block_body(bands=True): bodies larger than this are filled band by band...
BAND_FIRST = 256 << 10  # ...the first band this large (the writer starts early), each next one twice as large...
BAND_MOST = 2 << 20     # ...up to this
STREAM_BAND = 2 << 20       # block_body(stream=True): bands of about this many bytes...
STREAM_BUFFERS = 3          # ...read into this many reused buffers (a band each: fewer, larger bands cost fewer hand-overs)
STREAM_STALL = 300.0        # a stream's side waiting this long for the other gives up (BundleError)
STREAM_THREADS = 4          # streams read at once from one source (more wait their turn)


class Filling:
    """A body being copied into place in order on another thread: wait(end) returns once its bytes [0, end)
    are in, and raises what stopped the copy (a file changed under it) instead."""

    def __init__(self, total: int):
        self.total = total
        self.future = None              # the copy's task: cancelled unstarted when the source is closed
        self._done = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, upto: int) -> None:
        """Bytes [0, upto) are in."""
        with self._cond:
            self._done = max(self._done, upto)
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The copy stopped with `error`: every wait raises it."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def wait(self, end: int) -> None:
        """Until bytes [0, end) are in (or the copy failed: its error)."""
        with self._cond:
            while self._done < end and self._error is None:
                if self.future is not None and self.future.cancelled():
                    raise BundleError("the source was closed before the block was read; retry the request")
                self._cond.wait(0.5)
            if self._error is not None:
                raise self._error


class Stream:
    """A body read band by band, in order, on another thread into a few reused buffers (STREAM_BUFFERS of
    STREAM_BAND bytes, a band of one larger tile its own): the writer takes each band's bytes while the
    next is read, so no buffer the size of the body is filled and then read back (for a 15 MB block that
    round trip through memory cost more than the copy). Taken once: `slices`, then `close`."""

    def __init__(self, total: int):
        self.total = total
        self.future = None              # the reading task: cancelled unstarted when the source is closed
        self._cond = threading.Condition()
        self._bands: deque = deque()    # (start, end, buffer) read, in body order
        self._free: list = []           # STREAM_BAND buffers to reuse
        self._out = 0                   # buffers read into and not yet given back
        self._done = False
        self._error: BaseException | None = None
        self._closed = False

    def __len__(self) -> int:
        return self.total

    # -- the reading side

    def take(self, size: int):
        """A buffer for a band of `size` bytes, once fewer than STREAM_BUFFERS are out; BundleError once closed,
        or when the writer took no band for STREAM_STALL seconds (then it never will: its export failed and
        the stream was dropped unclosed; the source's stream thread must not wait for it for ever)."""
        with self._cond:
            since = time.monotonic()
            while self._out >= STREAM_BUFFERS and not self._closed:
                if time.monotonic() - since > STREAM_STALL:
                    self._stop(BundleError(f"the block's writer took nothing for {STREAM_STALL:g} s; its reading "
                                           "was stopped"))
                    break
                self._cond.wait(0.5)
            if self._closed:
                raise self._error or BundleError("the block's reading was stopped")
            self._out += 1
            buf = self._free.pop() if size <= STREAM_BAND and self._free else None
        return buf if buf is not None else new_buffer(max(size, STREAM_BAND))

    def put(self, start: int, end: int, buf) -> None:
        """Bytes [start, end) of the body are in `buf`."""
        with self._cond:
            self._bands.append((start, end, buf))
            self._cond.notify_all()

    def finish(self) -> None:
        """Every band is in and the file was the same throughout."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The reading stopped with `error`: the writer gets it (the first error, if close() came first)."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    # -- the writing side

    def slices(self, runs: list):
        """Memoryviews of the body's bytes over `runs` ((offset of the first tile, bytes, ...) in body order,
        each tile after its 4-byte prefix), each valid until the next is asked for; the last once the
        reading ended well."""
        band = None
        for off, length, *_ in runs:
            at, end = off - 4, off + length
            while at < end:
                if band is None or at >= band[1]:
                    band = self._next(at, band)
                upto = min(end, band[1])
                yield memoryview(band[2])[at - band[0]:upto - band[0]]
                at = upto
        self._next(self.total, band)

    def _next(self, at: int, done) -> tuple | None:
        """The band holding byte `at` (None for the body's end, after the reading ended well), giving back
        `done` and the bands before `at` (tiles the plan leaves out); BundleError when the reading gave
        nothing for STREAM_STALL seconds (its thread held up: no wait is for ever)."""
        with self._cond:
            if done is not None:
                self._give(done)
            since = time.monotonic()
            while True:
                if time.monotonic() - since > STREAM_STALL:
                    self._stop(BundleError(f"the block's reading gave nothing for {STREAM_STALL:g} s; retry the "
                                           "request"))
                if self._error is not None:
                    raise self._error
                while self._bands and self._bands[0][1] <= at:
                    self._give(self._bands.popleft())
                if self._bands and at < self.total:
                    band = self._bands.popleft()
                    if band[0] > at:                # bands cover the body back to back: never a gap
                        raise BundleError(f"the block's body has no bytes at {at}")
                    return band
                if self._done and (at >= self.total or not self._bands):
                    if at < self.total:
                        raise BundleError("the block's body ended early")      # the bands' contract broken
                    return None
                if self.future is not None and self.future.cancelled():
                    raise BundleError("the source was closed before the block was read; retry the request")
                self._cond.wait(0.5)

    def _give(self, band: tuple) -> None:
        self._out -= 1
        if len(band[2]) == STREAM_BAND:
            self._free.append(band[2])
        self._cond.notify_all()

    def close(self) -> None:
        """The writer is done or gave up, or the source is closing: the reading stops at its next band, the
        buffers go, and a writer still taking the body gets a BundleError."""
        with self._cond:
            self._stop(None if self._done else BundleError("the block's reading was stopped (the source closed or "
                                                            "the export gave it up); retry the request"))
            self._bands.clear()
            self._free.clear()

    def _stop(self, error: BaseException | None) -> None:
        """Under the condition: no more bands; `error` is what the writer gets, unless an earlier one stands."""
        self._closed = True
        if self._error is None:
            self._error = error
        self._cond.notify_all()


def _table_layout(c: sqlite3.Connection, table: str) -> tuple | None:
    """(schema version, root page, record positions of zoom_level, tile_column, tile_row, tile_data) of a
    rowid table whose four columns are stored in its records; None for anything else (a WITHOUT ROWID
    table, hidden or generated columns, one of the four the rowid's alias, a column named like the rowid)."""
    try:
        version = c.execute("PRAGMA schema_version").fetchone()[0]
        got = c.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchall()
        cols = c.execute(f"PRAGMA table_xinfo({_quote(table)})").fetchall()
        c.execute(f"SELECT rowid FROM {_quote(table)} LIMIT 0").fetchall()        # fails WITHOUT ROWID
        if c.execute("PRAGMA schema_version").fetchone()[0] != version:
            return None
    except sqlite3.Error:
        return None
    if len(got) != 1 or not isinstance(got[0][0], int) or got[0][0] < 2 or not cols:
        return None                         # (a virtual table's rootpage is 0: it has no pages of its own)
    names = [str(col[1]).lower() for col in cols]
    if any(col[6] for col in cols) or {"rowid", "oid", "_rowid_"} & set(names):
        return None
    try:
        fields = tuple(names.index(n) for n in ("zoom_level", "tile_column", "tile_row", "tile_data"))
    except ValueError:
        return None
    keys = [col for col in cols if col[5]]
    if len(keys) == 1 and str(keys[0][2]).upper() == "INTEGER" and keys[0][0] in fields:
        return None                         # the rowid's alias: its value is not in the record
    return version & 0xFFFFFFFF, got[0][0], fields


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def open_sqlite(path: str, table: str | None = None) -> BlockCache:
    """Open a .mbtiles or .gpkg (told apart by application_id, then by the tables it holds)."""
    c = connect(path, path)
    try:
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        tables = _tables(c, path)
    except sqlite3.Error as e:
        raise _sql_error(path, e) from None
    finally:
        c.close()
    if app_id in _GPKG_IDS or "gpkg_tile_matrix_set" in tables:
        return open_gpkg(path, tables, table)
    return open_mbtiles(path, tables)


def open_mbtiles(path: str, tables: dict[str, str]) -> BlockCache:
    """Open an MBTiles file: the `tiles` table or view, else the `map` and `images` pair."""
    label = path
    c = connect(path, label)
    try:
        if "tiles" in tables and {"zoom_level", "tile_column", "tile_row", "tile_data"} <= _columns(c, "tiles"):
            source = "tiles"
        elif "map" in tables and "images" in tables:
            source = ("(SELECT map.zoom_level AS zoom_level, map.tile_column AS tile_column, map.tile_row AS "
                      "tile_row, images.tile_data AS tile_data FROM map JOIN images ON images.tile_id = map.tile_id)")
        else:
            raise CacheError(f"{label}: not an MBTiles file (no tiles table or view with zoom_level, tile_column, "
                             "tile_row, tile_data, and no map/images pair)")
        meta: dict[str, str] = {}
        warnings = []
        if "metadata" in tables:
            try:
                total = 0
                for n, v in c.execute(f"SELECT name, value FROM metadata LIMIT {_META_ROWS}"):
                    if isinstance(n, str) and v is not None:
                        meta[n.strip().lower()[:256]] = value = str(v)[:_META_VALUE]
                        total += len(value)
                        if total > 16 * _META_VALUE:
                            warnings.append(f"{label}: more than {16 * _META_VALUE >> 20} MiB of metadata; "
                                            "the rest is not read")
                            break
            except sqlite3.Error as e:
                raise _sql_error(label, e) from None
        else:
            warnings.append(f"{label}: no metadata table; format and zoom levels are taken from the tiles")
    finally:
        c.close()
    backend = SqliteBackend(path, label, source, flip=meta.get("scheme", "tms").lower() != "xyz", widths={},
                            warn=warnings.append, table="tiles" if source == "tiles" and tables["tiles"] == "table"
                            else None)
    samples = backend.first_tiles()
    fmt = FORMAT_NAMES.get(meta.get("format", "").strip().lower())
    found = detect_format(samples) if samples else None
    if fmt is None or (found and found not in ("UNKNOWN",) and fmt != found and fmt in ("PNG", "JPEG")):
        fmt = found or "PNG"
    size = tile_pixel_size(samples[0]) if samples and fmt in ("PNG", "JPEG", "MIXED") else (512 if fmt == "pbf" else 256)
    levels = backend.levels()
    top = max(levels) if levels else int(_num(meta.get("maxzoom"), 0))
    scheme = web_mercator_scheme(min(max(top, 0), MAX_ZOOM) + 1, size)
    bounds = meta.get("bounds", "")
    extent = parse_bounds(bounds)
    if extent is None and bounds:
        warnings.append(f"{label}: metadata bounds {bounds[:80]!r} are not four numbers west < east, south < north; "
                        "ignored")
    name = meta.get("name") or os.path.splitext(os.path.basename(path))[0]
    cache = BlockCache.create(os.path.abspath(path), "mbtiles", name, scheme, fmt, backend, extent)
    backend._warn = cache._warn
    for w in warnings:
        cache._warn(w)
    cache.item = from_metadata(meta)
    cache.source_metadata = meta
    return cache


def _num(v, default):
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _gpkg_srs(c: sqlite3.Connection, srs_id: int, label: str) -> SpatialRef:
    try:
        row = c.execute("SELECT organization, organization_coordsys_id, definition FROM gpkg_spatial_ref_sys "
                        "WHERE srs_id = ?", (srs_id,)).fetchone()
    except sqlite3.Error:
        row = None
    if row is None:
        if srs_id in (3857, 4326):
            row = ("EPSG", srs_id, None)
        else:
            raise CacheError(f"{label}: spatial reference {srs_id} is not in gpkg_spatial_ref_sys")
    org, code, wkt = row
    if str(org or "").upper() == "EPSG" and code == 3857:
        return WEB_MERCATOR
    if str(org or "").upper() in ("EPSG", "ESRI") and isinstance(code, int) and code > 0:
        return SpatialRef(code, code)
    return SpatialRef(None, None, wkt if isinstance(wkt, str) and wkt.strip() else None)


def open_gpkg(path: str, tables: dict[str, str], table: str | None) -> BlockCache:
    """Open a GeoPackage tile pyramid: `table` names it when the file holds several."""
    label = path
    c = connect(path, label)
    warnings: list[str] = []
    try:
        try:
            names = [r[0] for r in c.execute("SELECT table_name FROM gpkg_contents WHERE data_type = 'tiles' "
                                              "ORDER BY table_name")]
        except sqlite3.Error as e:
            raise CacheError(f"{label}: not a GeoPackage with tiles ({e})") from None
        if not names:
            raise CacheError(f"{label}: the GeoPackage holds no tile pyramid (no gpkg_contents row with data_type 'tiles')")
        if table is None:
            table = names[0]
            if len(names) > 1:
                warnings.append(f"{label}: holds tile tables {', '.join(names)}; reading {table} "
                                f"(open '{os.path.basename(path)}#<table>' for another)")
        elif table not in names:
            raise CacheError(f"{label}: no tile table {table!r}; it holds {', '.join(names)}")
        try:
            tms = c.execute("SELECT srs_id, min_x, min_y, max_x, max_y FROM gpkg_tile_matrix_set WHERE table_name = ?",
                            (table,)).fetchone()
            matrices = c.execute("SELECT zoom_level, matrix_width, matrix_height, tile_width, tile_height, "
                                 "pixel_x_size, pixel_y_size FROM gpkg_tile_matrix WHERE table_name = ? "
                                 "ORDER BY zoom_level", (table,)).fetchall()
            contents = c.execute("SELECT identifier, description, min_x, min_y, max_x, max_y, srs_id "
                                 "FROM gpkg_contents WHERE table_name = ?", (table,)).fetchone()
        except sqlite3.Error as e:
            raise CacheError(f"{label}: incomplete GeoPackage tile tables ({e})") from None
        if tms is None:
            raise CacheError(f"{label}: no gpkg_tile_matrix_set row for {table}")
        if not matrices:
            raise CacheError(f"{label}: no gpkg_tile_matrix rows for {table}")
        srs_id, min_x, min_y, max_x, max_y = tms
        sr = _gpkg_srs(c, srs_id, label)
        if table not in tables or not {"zoom_level", "tile_column", "tile_row", "tile_data"} <= _columns(c, table):
            raise CacheError(f"{label}: tile table {table} is missing or lacks zoom_level/tile_column/tile_row/tile_data")
    finally:
        c.close()
    try:
        min_x, min_y, max_x, max_y = (float(v) for v in (min_x, min_y, max_x, max_y))
    except (TypeError, ValueError):
        raise CacheError(f"{label}: the tile matrix set's bounding box is not numbers") from None
    if not (min_x < max_x and min_y < max_y):
        raise CacheError(f"{label}: the tile matrix set's bounding box is empty")
    lods, widths, size = [], {}, None
    prev = None
    uneven = False
    for z, mw, mh, tw, th, px, py in matrices:
        if not all(isinstance(v, (int, float)) and v > 0 for v in (mw, mh, tw, th, px, py)) or not (0 <= z <= MAX_ZOOM):
            raise CacheError(f"{label}: tile matrix at zoom {z} has a zero, negative or missing value")
        if size is None:
            size = (int(tw), int(th))
        elif size != (int(tw), int(th)):
            raise CacheError(f"{label}: tile sizes differ between zoom levels ({size} and {(tw, th)}); "
                             "a tile scheme has one tile size")
        if abs(px - py) > 1e-9 * max(px, py):
            raise CacheError(f"{label}: zoom {z} has non-square pixels ({px} x {py})")
        for span, n, t, pix, what in ((max_x - min_x, mw, tw, px, "width"), (max_y - min_y, mh, th, py, "height")):
            if abs(n * t * pix - span) > 0.01 * span + 1e-6:
                raise CacheError(f"{label}: the matrix at zoom {z} ({n} tiles of {t} px at {pix}) does not span the "
                                 f"tile matrix set's {what} ({span})")
        if prev is not None:
            if not px < prev[1]:
                raise CacheError(f"{label}: pixel sizes must shrink as zoom grows (zoom {prev[0]}: {prev[1]}, "
                                 f"zoom {z}: {px})")
            ratio = prev[1] / px * (2 ** -(z - prev[0]))
            if abs(ratio - 1) > 1e-6 and not uneven:
                uneven = True
                warnings.append(f"{label}: zoom levels {prev[0]} and {z} do not halve the pixel size "
                                "(allowed only by a GeoPackage extension); read as declared")
        prev = (z, px)
        metres = _DEG_METRES if sr.is_geographic else 1.0
        lods.append(LOD(int(z), float(px), float(px) * metres * 96 * INCHES_PER_METRE))
        widths[int(z)] = (int(mw), int(mh))
    if size[0] > 8192 or size[1] > 8192:
        raise CacheError(f"{label}: tile size {size} is out of range")
    scheme = TileScheme(min_x, max_y, size[0], size[1], 96, tuple(lods), sr)
    backend = SqliteBackend(path, label, _quote(table), flip=False, widths=widths, warn=warnings.append,
                            table=table if tables.get(table) == "table" else None)
    fmt = detect_format(backend.first_tiles())
    extent = None
    if contents is not None and all(isinstance(v, (int, float)) for v in contents[2:6]) and contents[6] == srs_id:
        e = Extent(float(contents[2]), float(contents[3]), float(contents[4]), float(contents[5]), sr)
        extent = e if e.is_valid else None
    if extent is None:
        extent = Extent(min_x, min_y, max_x, max_y, sr)
    cache = BlockCache.create(os.path.abspath(path) if len(names) == 1 else os.path.abspath(path) + "#" + table,
                              "gpkg", (contents[0] if contents and contents[0] else table), scheme, fmt, backend,
                              extent)
    backend._warn = cache._warn
    for w in warnings:
        cache._warn(w)
    ident, desc = (contents[0], contents[1]) if contents else (None, None)
    cache.item = ItemInfo(name=table, title=ident or None, description=desc or None)
    return cache

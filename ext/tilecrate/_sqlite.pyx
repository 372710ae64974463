# cython: cdivision=True
"""Query rows straight into numpy arrays and one buffer, through SQLite's own C API.

Python's sqlite3 builds a tuple and an object per column for every row: on 22 000 small tiles
that was half of an MBTiles export (the planning scan of (column, row, length) and the tile
reads). SQLite still parses the file (every page and offset checked by it, WAL, views, locks),
so this module adds no reader of the file format: it only moves the rows into arrays with the
GIL released for the whole statement, which also lets two threads read at once.

A `Reader` is one read-only connection (mode=ro, query_only, mmap off so a file truncated under
us is an SQLite error and never SIGBUS, a bounded page cache, bounded lock waits) and is used by
one thread at a time (a second caller gets an error, not a race). Statements are stopped past
their deadline by a progress handler, as tilecrate.sources.sqlite's connections are.
"""
import numpy as np
cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, strcmp
from posix.mman cimport MADV_HUGEPAGE, MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, madvise, mmap, munmap
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cnp.import_array()


cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3:
        pass
    ctypedef struct sqlite3_stmt:
        pass
    int SQLITE_OK, SQLITE_ROW, SQLITE_DONE, SQLITE_INTEGER, SQLITE_TEXT, SQLITE_BLOB
    int SQLITE_OPEN_READONLY, SQLITE_OPEN_URI, SQLITE_OPEN_NOMUTEX
    int sqlite3_open_v2(const char* filename, sqlite3** db, int flags, const char* vfs)
    int sqlite3_close_v2(sqlite3* db)
    int sqlite3_exec(sqlite3* db, const char* sql, int (*cb)(void*, int, char**, char**) noexcept nogil, void* arg,
                     char** err)
    int sqlite3_busy_timeout(sqlite3* db, int ms)
    void sqlite3_progress_handler(sqlite3* db, int n, int (*cb)(void*) noexcept nogil, void* arg)
    const char* sqlite3_errmsg(sqlite3* db)
    int sqlite3_prepare_v2(sqlite3* db, const char* sql, int n, sqlite3_stmt** stmt, const char** tail)
    int sqlite3_finalize(sqlite3_stmt* stmt)
    int sqlite3_step(sqlite3_stmt* stmt)
    int sqlite3_bind_int64(sqlite3_stmt* stmt, int i, long long v)
    int sqlite3_bind_parameter_count(sqlite3_stmt* stmt)
    int sqlite3_column_count(sqlite3_stmt* stmt)
    int sqlite3_column_type(sqlite3_stmt* stmt, int i)
    long long sqlite3_column_int64(sqlite3_stmt* stmt, int i)
    const void* sqlite3_column_blob(sqlite3_stmt* stmt, int i)
    int sqlite3_column_bytes(sqlite3_stmt* stmt, int i)
    int sqlite3_get_autocommit(sqlite3* db)
    int sqlite3_file_control(sqlite3* db, const char* name, int op, void* arg)
    int SQLITE_FCNTL_FILE_POINTER
    ctypedef struct sqlite3_file
    ctypedef struct sqlite3_io_methods:
        int (*xRead)(sqlite3_file* f, void* buf, int amount, long long offset) nogil
        int (*xFileSize)(sqlite3_file* f, long long* size) nogil
    ctypedef struct sqlite3_file:
        const sqlite3_io_methods* pMethods


class SqliteError(Exception):
    """An SQLite error (its message), or a result column of the wrong type."""


class PagesChanged(SqliteError):
    """The file is not as `Reader.locate` found it: written, truncated or rewritten in place since."""


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int _past_deadline(void* arg) noexcept nogil:
    return 1 if _now() > (<double*>arg)[0] else 0


# -- the file format, read by page (see Reader.pages_begin) -----------------------------------------

cdef enum:
    MAX_DEPTH = 20          # SQLite's own bound on a b-tree's depth (BTCURSOR_MAX_DEPTH)
    WINDOW = 1 << 20        # pages are read ahead this many bytes at most...
    BEHIND = 8              # ...from this many pages before the one asked for
    MAX_FIELD = 32767       # SQLite's hard limit on a table's columns
    PAYLOAD_MAX = 0x7FFFFFFF

cdef struct _Pages:
    sqlite3_file* f         # the connection's own file handle
    long long npages        # pages the file holds (the header's count, bounded by the file's size)
    int pgsz                # page size
    int usable              # page size less the reserved bytes at each page's end
    int utf8                # text is stored as UTF-8
    unsigned char* win      # pages read ahead: `held` pages from page `first`, room for `cap`
    long long first, held, cap, want, used
    int rc                  # SQLite's code of the last failed read
    unsigned char seen[100] # the file's header when the window was read (see pages_begin)
    long long seen_size     # ...and its size
    int live                # a pages_begin transaction is open: `f` and the window may be read


cdef const unsigned char* _page(_Pages* pg, long long no, int* err) noexcept nogil:
    """Page `no` of the file, from the read-ahead window (valid until the next call); NULL with err 1 for
    a page the file does not hold, 2 for a failed read. One read fills the window from a little before
    `no` onwards: SQLite writes a table's leaf pages and their overflow chains mostly in file order, so
    the next pages asked for are there; when they were not (a scattered file), it reads less next time."""
    return _page_near(pg, no, no, no, err)


cdef const unsigned char* _page_near(_Pages* pg, long long no, long long lo, long long hi, int* err) noexcept nogil:
    """_page, told that pages lo..hi (around `no`) come next: a read it makes starts at lo and reaches hi
    when the window can hold them. A row's overflow chain mostly lies just before its leaf page (SQLite
    fills a cell's overflow pages before the leaf that takes the cell splits), so reading from the leaf
    onwards read the chain in a second read and the next leaf in a third: a 4-12 KiB read a page turn."""
    cdef long long start, n
    if no < 1 or no > pg.npages:
        err[0] = 1
        return NULL
    if pg.first <= no < pg.first + pg.held:
        pg.used += 1
        return pg.win + (no - pg.first) * pg.pgsz
    if pg.held:
        # half the pages read unused: read less (a table's leaves among its overflow pages, read without
        # them); three quarters used: read more (a run of overflow pages, or a table of small rows)
        if pg.used * 2 < pg.held:
            pg.want = max(1, pg.want // 2)
        elif pg.used * 4 >= 3 * pg.held:
            pg.want = min(pg.cap, 2 * pg.want)
    start = max(1, no - BEHIND) if pg.want > 4 * BEHIND else no
    if 1 <= lo < start and no - lo < pg.cap:
        start = lo
    # every bound keeps `no` in: no - start < cap, no <= npages
    n = min(max(start + pg.want - 1, hi, no) - start + 1, pg.cap, pg.npages - start + 1)
    pg.held = 0
    pg.rc = pg.f.pMethods.xRead(pg.f, pg.win, <int>(n * pg.pgsz), (start - 1) * <long long>pg.pgsz)
    if pg.rc != SQLITE_OK:
        err[0] = 2
        return NULL
    pg.first, pg.held, pg.used = start, n, 1
    return pg.win + (no - start) * pg.pgsz

cdef struct _Walk:
    _Pages* pg
    unsigned char* bufs     # one page a depth
    const int64_t* rowids
    int fields[4]           # record positions of zoom_level, tile_column, tile_row, tile_data
    int needed              # fields to decode: the largest position + 1
    int text_ok
    int64_t* vals           # (n, 4): zoom, column, row, tile length
    uint64_t* cells         # (n, 3): page | cell offset << 32 | local bytes << 48, overflow | blob offset << 32, rowid
    int err                 # 1: something locate does not handle (or an inconsistency); 2: an I/O error


def _read_failed(int rc):
    """The error of a failed read of the file by page (a short read: the file is shorter than it was)."""
    return SqliteError(f"cannot read the database file (SQLite I/O error {rc}: truncated?)")


cdef int _journal_mode(void* arg, int n, char** values, char** names) noexcept nogil:
    """sqlite3_exec's callback for PRAGMA journal_mode: sets *arg when the mode is WAL."""
    if n >= 1 and values != NULL and values[0] != NULL and strcmp(values[0], b"wal") == 0:
        (<int*>arg)[0] = 1
    return 0


cdef inline unsigned int _be16(const unsigned char* p) noexcept nogil:
    return (<unsigned int>p[0] << 8) | p[1]


cdef inline unsigned int _be32(const unsigned char* p) noexcept nogil:
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3]


cdef inline int _varint(const unsigned char* p, const unsigned char* end, uint64_t* out) noexcept nogil:
    """The bytes (1-9) of the varint at p, 0 when it runs past `end`."""
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        if p + i >= end:
            return 0
        v = (v << 7) | (p[i] & 0x7F)
        if not (p[i] & 0x80):
            out[0] = v
            return i + 1
    if p + 8 >= end:
        return 0
    out[0] = (v << 8) | p[8]
    return 9


cdef inline long long _serial_size(uint64_t t) noexcept nogil:
    """Content bytes of a record field of serial type t; -1 for the reserved types 10 and 11."""
    if t <= 4:
        return <long long>t
    if t == 5:
        return 6
    if t == 6 or t == 7:
        return 8
    if t <= 9:
        return 0
    if t < 12:
        return -1
    return <long long>((t - 12) >> 1)


cdef inline long long _local_bytes(long long payload, int usable) noexcept nogil:
    """The bytes of a table leaf cell's payload kept on its page (the rest is in overflow pages)."""
    cdef long long most = usable - 35
    cdef long long least = ((usable - 12) * 32 // 255) - 23
    cdef long long k
    if payload <= most:
        return payload
    k = least + (payload - least) % (usable - 4)
    return k if k <= most else least


cdef int _record(_Walk* w, const unsigned char* page, long long no, int cell, int start, uint64_t payload,
                 int64_t rowid, Py_ssize_t j) noexcept nogil:
    """Decode the fields of the matched row j from its cell (payload from `start`); 1 when not handled."""
    cdef int usable = w.pg.usable
    cdef long long local, ovf = 0, off, size, blen = 0, b0 = 0, v
    cdef uint64_t hs, t
    cdef int nh, nt, f, k, i
    cdef const unsigned char* q
    cdef const unsigned char* hend
    cdef int64_t got[3]
    if payload > PAYLOAD_MAX:
        return 1
    local = _local_bytes(<long long>payload, usable)
    if start + local > usable:
        return 1
    if <long long>payload > local:
        if start + local + 4 > usable:
            return 1
        ovf = _be32(page + start + local)
        if ovf < 2 or ovf > w.pg.npages or (<long long>payload - local + usable - 5) // (usable - 4) >= w.pg.npages:
            return 1                            # (more overflow pages than the file holds: SQLite's "malformed")
    nh = _varint(page + start, page + start + local, &hs)
    if nh == 0 or hs > <uint64_t>local or hs < <uint64_t>nh:
        return 1
    q = page + start + nh
    hend = page + start + hs
    off = <long long>hs
    for f in range(w.needed):
        if q >= hend:
            return 1                        # a short record (a column added later): its default is not here
        nt = _varint(q, hend, &t)
        if nt == 0:
            return 1
        q += nt
        size = _serial_size(t)
        if size < 0 or size > PAYLOAD_MAX or off + size > <long long>payload:
            return 1
        for k in range(3):
            if f == w.fields[k]:
                if not (1 <= t <= 6 or t == 8 or t == 9) or off + size > local:
                    return 1
                if t >= 8:
                    v = <long long>(t - 8)
                else:
                    v = -1 if page[start + off] & 0x80 else 0
                    for i in range(size):
                        v = (v << 8) | page[start + off + i]
                got[k] = v
        if f == w.fields[3] and t >= 12:
            if (t & 1) and not w.text_ok:
                return 1
            blen, b0 = size, off
        off += size
    if blen > 0xFFFFFFFFLL or (blen > 0 and b0 >= local):
        return 1                            # a blob starting in an overflow page (wide columns before it)
    w.vals[4 * j] = got[0]
    w.vals[4 * j + 1] = got[1]
    w.vals[4 * j + 2] = got[2]
    w.vals[4 * j + 3] = blen
    w.cells[3 * j] = <uint64_t>no | (<uint64_t>cell << 32) | (<uint64_t>local << 48)
    w.cells[3 * j + 1] = <uint64_t>ovf | (<uint64_t>(b0 if blen else 0) << 32)
    w.cells[3 * j + 2] = <uint64_t>rowid
    return 0


cdef int _descend(_Walk* w, long long no, Py_ssize_t lo, Py_ssize_t hi, int64_t kmin, int64_t kmax,
                  int depth) noexcept nogil:
    """Find rowids[lo:hi] (all in (kmin, kmax]) under page `no`; sets w.err and returns -1 when it cannot."""
    cdef unsigned char* page
    cdef const unsigned char* got
    cdef const unsigned char* end
    cdef int hdr, ptrs, ncell, i, cell, nk, np_, nr
    cdef unsigned int flag
    cdef uint64_t key, payload, rid
    cdef int64_t prev = kmin, k
    cdef Py_ssize_t j = lo, j2
    if depth > MAX_DEPTH:
        w.err = 1
        return -1
    got = _page(w.pg, no, &w.err)
    if got == NULL:
        return -1
    hdr = 100 if no == 1 else 0
    flag = got[hdr]
    if flag == 0x05:                            # an interior page is held while the pages below it are read
        page = w.bufs + depth * w.pg.pgsz
        memcpy(page, got, w.pg.pgsz)
    else:
        page = <unsigned char*>got               # a leaf is done before the next read
    end = page + w.pg.usable
    ncell = _be16(page + hdr + 3)
    ptrs = hdr + (12 if flag == 0x05 else 8)
    if (flag != 0x05 and flag != 0x0D) or ptrs + 2 * ncell > w.pg.usable:
        w.err = 1
        return -1
    if flag == 0x05:
        for i in range(ncell):
            cell = _be16(page + ptrs + 2 * i)
            if cell < ptrs + 2 * ncell or cell + 5 > w.pg.usable:
                w.err = 1
                return -1
            nk = _varint(page + cell + 4, end, &key)
            k = <int64_t>key
            if nk == 0 or k <= prev or k > kmax:
                w.err = 1
                return -1
            j2 = j
            while j2 < hi and w.rowids[j2] <= k:
                j2 += 1
            if j2 > j and _descend(w, _be32(page + cell), j, j2, prev, k, depth + 1) < 0:
                return -1
            j, prev = j2, k
            if j == hi:
                return 0
        return _descend(w, _be32(page + hdr + 8), j, hi, prev, kmax, depth + 1)
    for i in range(ncell):
        if j == hi:
            return 0
        cell = _be16(page + ptrs + 2 * i)
        if cell < ptrs + 2 * ncell or cell >= w.pg.usable:
            w.err = 1
            return -1
        np_ = _varint(page + cell, end, &payload)
        nr = _varint(page + cell + np_, end, &rid) if np_ else 0
        k = <int64_t>rid
        if nr == 0 or k <= prev or k > kmax or k > w.rowids[j]:
            w.err = 1                       # out of order, or a rowid the index holds is not in the table
            return -1
        prev = k
        if k == w.rowids[j]:
            if _record(w, page, no, cell, cell + np_ + nr, payload, k, j):
                w.err = 1
                return -1
            j += 1
    if j < hi:
        w.err = 1
        return -1
    return 0


cdef int _copy_cells(_Pages* pg, const uint64_t* cells, const int64_t* lens, const int64_t* at, Py_ssize_t n,
                     char* base, int prefix) noexcept nogil:
    """Copy n tiles' bytes to base + at[i] from the pages `cells` name, following each overflow chain (each
    after its 4-byte little-endian size when `prefix`): 0, 1 (a page no longer holds what locate found
    there) or 2 (a failed read, its code in pg.rc). The caller checked every destination."""
    cdef char* out
    cdef Py_ssize_t i
    cdef long long no, local, need, take, cur, left, b0, room = pg.usable - 4
    cdef int cell, np_, nr, start, hdr, err = 0
    cdef uint64_t payload, rid
    cdef const unsigned char* leaf
    cdef const unsigned char* over
    for i in range(n):
        need = lens[i]
        if need == 0:
            continue
        no = <long long>(cells[3 * i] & 0xFFFFFFFFULL)
        cell = <int>((cells[3 * i] >> 32) & 0xFFFF)
        local = <long long>(cells[3 * i] >> 48)
        b0 = <long long>(cells[3 * i + 1] >> 32)
        # the chain's pages, if it runs on from its first page (as SQLite mostly writes it): read with the leaf
        cur = <long long>(cells[3 * i + 1] & 0xFFFFFFFFULL)
        left = (need - min(need, max(0, local - b0)) + room - 1) // room
        if cur >= 2 and left > 0:
            leaf = _page_near(pg, no, min(no, cur), max(no, cur + left - 1), &err)
        else:
            leaf = _page(pg, no, &err)
        if leaf == NULL:
            return err
        hdr = 100 if no == 1 else 0
        if leaf[hdr] != 0x0D or cell >= pg.usable:
            return 1
        np_ = _varint(leaf + cell, leaf + pg.usable, &payload)
        nr = _varint(leaf + cell + np_, leaf + pg.usable, &rid) if np_ else 0
        start = cell + np_ + nr
        if (nr == 0 or rid != cells[3 * i + 2] or payload > PAYLOAD_MAX
                or _local_bytes(<long long>payload, pg.usable) != local or start + local > pg.usable
                or b0 >= local or b0 + need > <long long>payload):
            return 1
        cur = 0
        if <long long>payload > local:
            if start + local + 4 > pg.usable:
                return 1
            cur = _be32(leaf + start + local)
        if cur != <long long>(cells[3 * i + 1] & 0xFFFFFFFFULL):
            return 1
        out = base + at[i]
        if prefix:
            out[-4], out[-3], out[-2], out[-1] = need & 0xFF, (need >> 8) & 0xFF, (need >> 16) & 0xFF, need >> 24
        take = min(need, local - b0)
        memcpy(out, leaf + start + b0, take)
        out += take
        need -= take
        left = (<long long>payload - local + room - 1) // room        # overflow pages of the whole payload
        if left >= pg.npages:
            return 1
        while need > 0:
            if cur < 2 or left <= 0:
                return 1
            over = _page(pg, cur, &err)
            if over == NULL:
                return err
            take = min(need, room)
            memcpy(out, over + 4, take)
            out += take
            need -= take
            left -= 1
            cur = _be32(over)
    return 0


cdef enum:
    HUGE = 2 << 20          # a transparent huge page
    HUGE_FROM = 1 << 20     # buffers from this size are mapped in huge pages
    POOL_SLOTS = 8          # mappings of freed Buffers kept for the next ones...
    POOL_BYTES = 64 << 20   # ...holding at most this many bytes in all

# The mappings of freed large Buffers, already faulted in: the kernel zeroes each fresh huge page on its
# first touch, and for an export's bodies that zeroing cost more than the copy into them (5 ms of
# 47 ms of CPU an MBTiles -> .tpkx export of 21 MB). Reached with the GIL held only (Buffer's
# allocation and deallocation), so the GIL guards it.
cdef char* _pool_at[POOL_SLOTS + 1]     # one slot more: _pool_give adds before it evicts
cdef size_t _pool_len[POOL_SLOTS + 1]
cdef int _pooled = 0


cdef char* _pool_take(size_t span, size_t* got) noexcept:
    """The smallest pooled mapping of at least `span` bytes (its length in got), or NULL."""
    global _pooled
    cdef int i, best = -1
    cdef char* p
    for i in range(_pooled):
        if _pool_len[i] >= span and (best < 0 or _pool_len[i] < _pool_len[best]):
            best = i
    if best < 0:
        return NULL
    p, got[0] = _pool_at[best], _pool_len[best]
    _pooled -= 1
    _pool_at[best], _pool_len[best] = _pool_at[_pooled], _pool_len[_pooled]
    return p


cdef void _pool_give(char* p, size_t span) noexcept:
    """Keep a freed mapping for reuse; past POOL_SLOTS or POOL_BYTES the smallest ones are unmapped."""
    global _pooled
    cdef int i, least
    cdef size_t total = span
    _pool_at[_pooled], _pool_len[_pooled] = p, span
    _pooled += 1
    for i in range(_pooled - 1):
        total += _pool_len[i]
    while _pooled > 0 and (_pooled > POOL_SLOTS or total > POOL_BYTES):
        least = 0
        for i in range(1, _pooled):
            if _pool_len[i] < _pool_len[least]:
                least = i
        munmap(_pool_at[least], _pool_len[least])
        total -= _pool_len[least]
        _pooled -= 1
        _pool_at[least], _pool_len[least] = _pool_at[_pooled], _pool_len[_pooled]


POOL_LIMIT = POOL_BYTES


def pooled_bytes() -> int:
    """Bytes of freed Buffers' mappings kept for reuse (at most POOL_LIMIT)."""
    cdef size_t total = 0
    cdef int i
    for i in range(_pooled):
        total += _pool_len[i]
    return total


cdef class Buffer:
    """Bytes read by a query, owned here (no copy into a bytes object): slice a memoryview of it."""

    cdef char* _data
    cdef Py_ssize_t _size
    cdef size_t _mapped     # the length of _data's own mapping (0: from malloc)

    cdef int _allocate(self, Py_ssize_t size) except -1:
        """Room for `size` bytes. A large one is its own mapping in transparent huge pages where the kernel
        gives them (madvise): filling fresh 4 KiB pages took a fault each, 0.6 ms a MB on this machine's VM,
        more than the copy into them; huge pages take one a 2 MiB."""
        cdef size_t span, head
        cdef char* base
        if size < HUGE_FROM:
            self._data = <char*>malloc(max(size, 1))
        else:
            span = (<size_t>size + HUGE - 1) & ~(<size_t>HUGE - 1)
            self._data = _pool_take(span, &self._mapped)
            if self._data != NULL:
                self._size = size
                return 0
            base = <char*>mmap(NULL, span + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if <void*>base != MAP_FAILED:
                head = (HUGE - (<size_t>base & (HUGE - 1))) & (HUGE - 1)   # huge pages need 2 MiB alignment
                if head:
                    munmap(base, head)
                munmap(base + head + span, HUGE - head)
                self._data, self._mapped = base + head, span
                madvise(self._data, span, MADV_HUGEPAGE)        # a hint: without it, plain pages
        if self._data == NULL:
            raise MemoryError(f"no memory for {size} bytes of tiles")
        self._size = size
        return 0

    def __len__(self):
        return self._size

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self._data if self._data != NULL else <char*>"", self._size, 1, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __dealloc__(self):
        if self._mapped:
            _pool_give(self._data, self._mapped)
        else:
            free(self._data)
        self._data = NULL


def new_buffer(Py_ssize_t size) -> Buffer:
    """A Buffer of `size` bytes (not cleared) for Reader.read_into."""
    if size < 0:
        raise ValueError("a negative size")
    cdef Buffer buf = Buffer.__new__(Buffer)
    buf._allocate(size)
    return buf


cdef class Reader:
    """One read-only SQLite connection whose queries fill arrays (see the module's docstring)."""

    cdef sqlite3* _db
    cdef double _deadline
    cdef bint _busy
    cdef readonly str path
    cdef _Pages _pages              # _pages.live between pages_begin and pages_end when the file can be read by page

    def __init__(self, str path, int cache_kib=2000, int busy_ms=2000):
        if cache_kib <= 0 or busy_ms < 0:
            raise ValueError("a positive page cache and a non-negative lock wait are needed")
        import os
        import urllib.parse

        self.path = path
        uri = ("file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro").encode()
        cdef int rc = sqlite3_open_v2(uri, &self._db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX,
                                      NULL)
        if rc != SQLITE_OK:
            msg = self._message()
            self.close()
            raise SqliteError(msg)
        self._deadline = 1e300
        sqlite3_busy_timeout(self._db, busy_ms)
        sqlite3_progress_handler(self._db, 20000, _past_deadline, &self._deadline)
        for pragma in (b"PRAGMA query_only = 1", b"PRAGMA mmap_size = 0",
                       b"PRAGMA cache_size = -%d" % cache_kib, b"SELECT count(*) FROM sqlite_master"):
            if sqlite3_exec(self._db, pragma, NULL, NULL, NULL) != SQLITE_OK:
                msg = self._message()
                self.close()
                raise SqliteError(msg)

    def __dealloc__(self):
        if self._db != NULL:
            sqlite3_close_v2(self._db)
            self._db = NULL
        free(self._pages.win)
        self._pages.win = NULL

    def close(self) -> None:
        """Close the connection (later queries raise SqliteError)."""
        if self._busy:
            raise SqliteError("the connection is in use by another thread")
        if self._db != NULL:
            sqlite3_close_v2(self._db)
            self._db = NULL

    cdef str _message(self):
        if self._db == NULL:
            return "out of memory"
        return sqlite3_errmsg(self._db).decode("utf-8", "replace")

    cdef sqlite3_stmt* _prepare(self, str sql, tuple args, int columns, double seconds) except NULL:
        if self._db == NULL:
            raise SqliteError("the connection is closed")
        if self._busy:
            raise SqliteError("the connection is in use by another thread (one Reader a thread)")
        cdef sqlite3_stmt* stmt = NULL
        cdef bytes text = sql.encode("utf-8")
        self._busy = True           # set with the GIL held, before the connection is touched: a second thread sees it
        try:
            return self._bind(stmt, text, args, columns, seconds)
        except BaseException:
            self._busy = False
            raise

    cdef sqlite3_stmt* _bind(self, sqlite3_stmt* stmt, bytes text, tuple args, int columns,
                             double seconds) except NULL:
        values = [int(a) for a in args]
        if any(not (-(1 << 63) <= v < (1 << 63)) for v in values):
            raise OverflowError("a query parameter does not fit in 64 bits")
        if sqlite3_prepare_v2(self._db, text, len(text), &stmt, NULL) != SQLITE_OK or stmt == NULL:
            msg = self._message()
            sqlite3_finalize(stmt)
            raise SqliteError(msg)
        if sqlite3_column_count(stmt) != columns or sqlite3_bind_parameter_count(stmt) != len(args):
            sqlite3_finalize(stmt)
            raise ValueError(f"the statement must return {columns} columns and take {len(args)} parameters")
        cdef int i
        for i in range(len(args)):
            if sqlite3_bind_int64(stmt, i + 1, <long long>values[i]) != SQLITE_OK:
                msg = self._message()
                sqlite3_finalize(stmt)
                raise SqliteError(msg)
        self._deadline = _now() + seconds
        return stmt

    def ints3(self, str sql, tuple args=(), Py_ssize_t limit=-1, double seconds=60.0):
        """An (n, 3) int64 array of a query's rows of three integers; None past `limit` rows (-1: none).
        A column that is not an integer (a real or text from a view) raises SqliteError."""
        cdef sqlite3_stmt* stmt = self._prepare(sql, args, 3, seconds)
        cdef Py_ssize_t cap = 1024, n = 0
        cdef int64_t* rows = NULL
        cdef int64_t* grown
        cdef int rc = SQLITE_ROW, bad = 0, nomem = 0, over = 0
        try:
            with nogil:
                rows = <int64_t*>realloc(NULL, cap * 3 * sizeof(int64_t))
                if rows == NULL:
                    nomem = 1
                while rows != NULL:
                    rc = sqlite3_step(stmt)
                    if rc != SQLITE_ROW:
                        break
                    if limit >= 0 and n >= limit:
                        over = 1
                        break
                    if (sqlite3_column_type(stmt, 0) != SQLITE_INTEGER or sqlite3_column_type(stmt, 1) != SQLITE_INTEGER
                            or sqlite3_column_type(stmt, 2) != SQLITE_INTEGER):
                        bad = 1
                        break
                    if n == cap:
                        cap *= 2
                        grown = <int64_t*>realloc(rows, cap * 3 * sizeof(int64_t))
                        if grown == NULL:
                            nomem = 1
                            break
                        rows = grown
                    rows[3 * n] = sqlite3_column_int64(stmt, 0)
                    rows[3 * n + 1] = sqlite3_column_int64(stmt, 1)
                    rows[3 * n + 2] = sqlite3_column_int64(stmt, 2)
                    n += 1
            if nomem:
                raise MemoryError("no memory for the query's rows")
            if bad:
                raise SqliteError("a result that should be an integer is not (a real, text or NULL)")
            if over:
                return None
            if rc != SQLITE_DONE:
                raise SqliteError(self._message())
            out = np.empty((n, 3), dtype=np.int64)
            if n:
                memcpy(cnp.PyArray_DATA(out), rows, n * 3 * sizeof(int64_t))
            return out
        finally:
            sqlite3_finalize(stmt)
            self._busy = False
            free(rows)

    def blobs(self, str sql, tuple args=(), Py_ssize_t hint=0, Py_ssize_t max_bytes=-1, double seconds=60.0):
        """(keys int64 (n,), offsets int64 (n + 1,), Buffer) of a query's (integer key, blob) rows: row i's
        bytes are buffer[offsets[i]:offsets[i + 1]]. Text counts as its UTF-8 bytes; NULL and numbers as
        empty. A key that is not an integer raises SqliteError, more than `max_bytes` of blobs (-1: no bound)
        MemoryError. `hint`: the bytes expected (the buffer's first size: growing it copies)."""
        cdef sqlite3_stmt* stmt = self._prepare(sql, args, 2, seconds)
        cdef Py_ssize_t cap = 256, n = 0, size = 0, room = max(hint, 4096), need
        cdef int64_t* keys = NULL
        cdef int64_t* offs = NULL
        cdef int64_t* grown
        cdef char* data = NULL
        cdef char* more
        cdef const void* blob
        cdef int rc = SQLITE_ROW, bad = 0, nomem = 0, over = 0, kind, nbytes
        cdef Buffer buf
        if max_bytes >= 0:
            room = min(room, max_bytes + 1)
        try:
            with nogil:
                keys = <int64_t*>realloc(NULL, cap * sizeof(int64_t))
                offs = <int64_t*>realloc(NULL, (cap + 1) * sizeof(int64_t))
                data = <char*>realloc(NULL, room)
                if keys == NULL or offs == NULL or data == NULL:
                    nomem = 1
                else:
                    offs[0] = 0
                while not nomem:
                    rc = sqlite3_step(stmt)
                    if rc != SQLITE_ROW:
                        break
                    if sqlite3_column_type(stmt, 0) != SQLITE_INTEGER:
                        bad = 1
                        break
                    if n == cap:
                        cap *= 2
                        grown = <int64_t*>realloc(keys, cap * sizeof(int64_t))
                        if grown == NULL:
                            nomem = 1
                            break
                        keys = grown
                        grown = <int64_t*>realloc(offs, (cap + 1) * sizeof(int64_t))
                        if grown == NULL:
                            nomem = 1
                            break
                        offs = grown
                    keys[n] = sqlite3_column_int64(stmt, 0)
                    kind = sqlite3_column_type(stmt, 1)
                    nbytes = 0
                    if kind == SQLITE_BLOB or kind == SQLITE_TEXT:
                        blob = sqlite3_column_blob(stmt, 1)
                        nbytes = sqlite3_column_bytes(stmt, 1)
                        if blob == NULL or nbytes < 0:
                            nbytes = 0
                    if nbytes:
                        need = size + nbytes
                        if max_bytes >= 0 and need > max_bytes:
                            over = 1
                            break
                        if need > room:
                            room = max(need, room * 2)
                            more = <char*>realloc(data, room)
                            if more == NULL:
                                nomem = 1
                                break
                            data = more
                        memcpy(data + size, blob, nbytes)
                        size = need
                    n += 1
                    offs[n] = size
            if nomem:
                raise MemoryError("no memory for the query's rows")
            if over:
                raise MemoryError(f"the query's blobs pass {max_bytes} bytes")
            if bad:
                raise SqliteError("a result that should be an integer is not (a real, text or NULL)")
            if rc != SQLITE_DONE:
                raise SqliteError(self._message())
            key_arr = np.empty(n, dtype=np.int64)
            off_arr = np.empty(n + 1, dtype=np.int64)
            if n:
                memcpy(cnp.PyArray_DATA(key_arr), keys, n * sizeof(int64_t))
            memcpy(cnp.PyArray_DATA(off_arr), offs, (n + 1) * sizeof(int64_t))
            buf = Buffer.__new__(Buffer)
            buf._data, buf._size = data, size
            data = NULL                     # the Buffer owns it now
            return key_arr, off_arr, buf
        finally:
            sqlite3_finalize(stmt)
            self._busy = False
            free(keys)
            free(offs)
            free(data)

    # -- the file format, read by page ------------------------------------------------------------
    # SQLite's reads go page by page through its cache (a pread of each page, then a copy of each row):
    # for large tiles that was most of an export from MBTiles. Inside a read transaction SQLite opened
    # (its SHARED lock held, so no SQLite writer changes the file until pages_end), `locate` walks a
    # table's b-tree itself to where each row lies and `read_cells` copies the tiles' bytes from those
    # pages, runs of overflow pages in one read, through the connection's own file handle (no second
    # descriptor whose closing would drop SQLite's POSIX locks). Every page number, offset and size read
    # from the file is checked against the page before it is used; anything else it meets is handed back
    # to SQL. A later transaction compares the file's header, whose change counter every rollback-journal
    # commit bumps (SQLite's own test of its cache), before trusting where locate found the rows.

    def pages_begin(self):
        """Begin a read transaction (SHARED lock until pages_end); the file's 100-byte header when its
        pages can be read here (a rollback journal, not WAL), else None."""
        cdef sqlite3_file* f = NULL
        cdef unsigned char head[100]
        cdef long long size = 0, counted
        cdef int rc = SQLITE_OK, pgsz, step = 0, wal = 0
        if self._db == NULL:
            raise SqliteError("the connection is closed")
        if self._busy or not sqlite3_get_autocommit(self._db):
            raise SqliteError("the connection is in use (one Reader a thread, one pages_begin at a time)")
        self._busy = True                       # close() from another thread waits for it
        self._deadline = _now() + 60.0
        try:
            with nogil:                         # the lock may be waited for (busy_timeout): not with the GIL
                if sqlite3_exec(self._db, b"BEGIN", NULL, NULL, NULL) != SQLITE_OK:
                    step = 1
                elif sqlite3_exec(self._db, b"PRAGMA schema_version", NULL, NULL, NULL) != SQLITE_OK:
                    step = 2                    # (the statement that takes the SHARED lock)
                elif sqlite3_exec(self._db, b"PRAGMA journal_mode", _journal_mode, &wal, NULL) != SQLITE_OK:
                    step = 2
                elif wal:                       # a -wal beside the file is read by SQLite whatever the header says
                    step = 3
                elif (sqlite3_file_control(self._db, b"main", SQLITE_FCNTL_FILE_POINTER, &f) != SQLITE_OK
                        or f == NULL or f.pMethods == NULL):
                    step = 3
                else:
                    rc = f.pMethods.xRead(f, head, 100, 0)
                    if rc == SQLITE_OK:
                        rc = f.pMethods.xFileSize(f, &size)
            if step == 1 or step == 2:
                msg = self._message()
                if step == 2:
                    sqlite3_exec(self._db, b"ROLLBACK", NULL, NULL, NULL)
                raise SqliteError(msg)
        finally:
            self._busy = False
        if step == 3:
            return None
        if rc != SQLITE_OK:
            raise _read_failed(rc)
        pgsz = _be16(head + 16)
        if pgsz == 1:
            pgsz = 65536
        if (memcmp(head, b"SQLite format 3\0", 16) != 0 or pgsz < 512 or pgsz & (pgsz - 1) or head[18] != 1
                or head[19] != 1 or pgsz - head[20] < 480):
            return None
        counted = _be32(head + 28)
        self._pages.pgsz = pgsz
        self._pages.usable = pgsz - head[20]
        self._pages.npages = size // pgsz
        if counted and _be32(head + 24) == _be32(head + 92):
            self._pages.npages = min(self._pages.npages, counted)
        self._pages.utf8 = _be32(head + 56) == 1
        if self._pages.win == NULL:
            self._pages.win = <unsigned char*>malloc(WINDOW)
            if self._pages.win == NULL:
                raise MemoryError("no memory for reading pages")
        self._pages.cap = WINDOW // pgsz
        if (self._pages.held == 0 or f != self._pages.f or size != self._pages.seen_size
                or memcmp(head, self._pages.seen, 100) != 0):
            # pages read in an earlier transaction may have changed since. Not when the header is the same:
            # every transaction that writes the file changes its change counter (bytes 24-27), the rule
            # SQLite keeps its own page cache by between transactions; the file's size counts too. A body
            # read band by band, a transaction a band, then reads each page once
            self._pages.want = 1
            self._pages.held = self._pages.used = 0
        memcpy(self._pages.seen, head, 100)
        self._pages.seen_size = size
        self._pages.f = f
        self._pages.live = 1
        return bytes(head[:100])

    def pages_end(self) -> None:
        """End the transaction of pages_begin."""
        if self._busy:
            raise SqliteError("the connection is in use by another thread (one Reader a thread)")
        self._pages.live = 0                # the window stays, for the next transaction to keep if the file is the same
        if self._db != NULL and not sqlite3_get_autocommit(self._db):
            if sqlite3_exec(self._db, b"COMMIT", NULL, NULL, NULL) != SQLITE_OK:
                sqlite3_exec(self._db, b"ROLLBACK", NULL, NULL, NULL)

    cdef int _pages_ready(self) except -1:
        if self._db == NULL:
            raise SqliteError("the connection is closed")
        if self._busy:
            raise SqliteError("the connection is in use by another thread (one Reader a thread)")
        if not self._pages.live or self._pages.f == NULL or sqlite3_get_autocommit(self._db):
            raise SqliteError("no pages_begin transaction readable by page is open")
        return 0

    def locate(self, rowids, long long root, tuple fields, bint text_ok):
        """(values (n, 4) int64: zoom, column, row, tile length; cells (n, 3) uint64: where each lies) of a
        table's rows by ascending rowid, from its b-tree at page `root`; `fields`: the record positions of
        zoom_level, tile_column, tile_row, tile_data. None when the walk meets what it does not handle (a
        short record, an integer that is not, a blob starting past its page, text when not `text_ok` or
        not UTF-8) or anything inconsistent: ask SQL instead. Between pages_begin and pages_end."""
        cdef const int64_t[::1] ids = np.array(rowids, dtype=np.int64, order="C", copy=True).reshape(-1)
        cdef Py_ssize_t n = ids.shape[0], i
        cdef _Walk w
        if len(fields) != 4 or not all(isinstance(v, int) and 0 <= v < MAX_FIELD for v in fields):
            raise ValueError("fields: four record positions")
        for i in range(1, n):
            if ids[i] <= ids[i - 1]:
                raise ValueError("rowids must ascend")
        values = np.empty((n, 4), dtype=np.int64)
        cells = np.empty((n, 3), dtype=np.uint64)
        w.pg, w.err, w.bufs = &self._pages, 0, NULL
        for i in range(4):
            w.fields[i] = fields[i]
        w.needed = max(fields) + 1
        w.vals = <int64_t*>cnp.PyArray_DATA(values)
        w.cells = <uint64_t*>cnp.PyArray_DATA(cells)
        self._pages_ready()
        self._busy = True                       # no Python runs from the check to here: close() waits for it
        try:
            if n == 0:
                return values, cells
            if root < 2 or root > self._pages.npages or ids[0] == INT64_MIN:
                return None
            w.rowids = &ids[0]
            w.text_ok = text_ok and self._pages.utf8
            w.bufs = <unsigned char*>malloc((MAX_DEPTH + 1) * <size_t>self._pages.pgsz)
            if w.bufs == NULL:
                raise MemoryError("no memory for the b-tree's pages")
            with nogil:
                _descend(&w, root, 0, n, INT64_MIN, INT64_MAX, 0)
        finally:
            self._busy = False
            free(w.bufs)
        if w.err == 2:
            raise _read_failed(self._pages.rc)
        return None if w.err else (values, cells)

    def read_cells(self, cells, lengths, bytes header not None, Py_ssize_t max_bytes=-1):
        """(offsets int64 (n + 1,), Buffer) of the tiles `locate` found (`cells`, `lengths` from its result,
        in any order and subset), row i being buffer[offsets[i]:offsets[i + 1]]. Raises PagesChanged when
        the file's header is not `header` (pages_begin's when locate ran) or a page no longer holds its row,
        SqliteError on a short read or a page that does not hold its row (a malformed file). Between
        pages_begin and pages_end."""
        lv = np.ascontiguousarray(lengths, dtype=np.int64)
        if lv.ndim != 1 or (lv.size and (lv.min() < 0 or lv.max() > 0xFFFFFFFF)):
            raise ValueError("tile lengths: 0 to 4 GiB")
        offsets = np.zeros(lv.size + 1, dtype=np.int64)
        np.cumsum(lv, out=offsets[1:])
        if max_bytes >= 0 and offsets[-1] > max_bytes:
            raise MemoryError(f"the tiles pass {max_bytes} bytes")
        buf = new_buffer(int(offsets[-1]))
        self.read_into(buf, cells, lv, offsets[:-1], header)
        return offsets, buf

    def read_into(self, Buffer buf not None, cells, lengths, at, bytes header not None, bint prefix=False) -> None:
        """Copy the tiles `locate` found (`cells`, `lengths`: any order and subset) into `buf`, tile i at byte
        at[i] (after its 4-byte little-endian size when `prefix`: a bundle body). Raises as read_cells;
        ValueError for a destination outside `buf`. Between pages_begin and pages_end."""
        # copies: the caller's arrays could change under the checks below (another thread) before the copy reads them
        cdef const uint64_t[:, ::1] cv = np.array(cells, dtype=np.uint64, order="C", copy=True).reshape(-1, 3)
        cdef const int64_t[::1] lv = np.array(lengths, dtype=np.int64, order="C", copy=True).reshape(-1)
        cdef const int64_t[::1] av = np.array(at, dtype=np.int64, order="C", copy=True).reshape(-1)
        cdef Py_ssize_t n = cv.shape[0], i
        cdef long long low = 4 if prefix else 0
        cdef unsigned char head[100]
        cdef int err = 0, rc
        if lv.shape[0] != n or av.shape[0] != n or len(header) != 100:
            raise ValueError("cells (n, 3), lengths (n,), destinations (n,) and a 100-byte header are needed")
        for i in range(n):
            if lv[i] < 0 or lv[i] > 0xFFFFFFFFLL:
                raise ValueError("a tile length out of range")
            if lv[i] and (av[i] < low or av[i] > buf._size - lv[i]):
                raise ValueError("a tile's destination is outside the buffer")
        self._pages_ready()
        self._busy = True                       # no Python runs from the check to here: close() waits for it
        try:
            rc = self._pages.f.pMethods.xRead(self._pages.f, head, 100, 0)
            if rc != SQLITE_OK:
                raise _read_failed(rc)
            if memcmp(head, <const char*>header, 100) != 0:
                raise PagesChanged("the database was written since its rows were located")
            with nogil:
                err = _copy_cells(&self._pages, &cv[0, 0] if n else NULL, &lv[0] if n else NULL,
                                  &av[0] if n else NULL, n, buf._data, prefix)
        finally:
            self._busy = False
        if err == 2:
            raise _read_failed(self._pages.rc)
        if err:
            # the header, whose change counter every SQLite commit bumps, is as when locate ran
            raise SqliteError("database disk image is malformed (a page does not hold the row its b-tree points to, "
                              "or a program other than SQLite rewrote it)")

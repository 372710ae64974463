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
from libc.stdint cimport int64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
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
    int sqlite3_exec(sqlite3* db, const char* sql, void* cb, void* arg, char** err)
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


class SqliteError(Exception):
    """An SQLite error (its message), or a result column of the wrong type."""


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int _past_deadline(void* arg) noexcept nogil:
    return 1 if _now() > (<double*>arg)[0] else 0


cdef class Buffer:
    """Bytes read by a query, owned here (no copy into a bytes object): slice a memoryview of it."""

    cdef char* _data
    cdef Py_ssize_t _size

    def __len__(self):
        return self._size

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self._data if self._data != NULL else <char*>"", self._size, 1, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __dealloc__(self):
        free(self._data)
        self._data = NULL


cdef class Reader:
    """One read-only SQLite connection whose queries fill arrays (see the module's docstring)."""

    cdef sqlite3* _db
    cdef double _deadline
    cdef bint _busy
    cdef readonly str path

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

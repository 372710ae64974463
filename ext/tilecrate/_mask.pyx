# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Area-of-interest rasterization onto a tile grid, by scanline spans, never a level-wide grid.

Coordinates are fractional tile coordinates of one level: ``col = (x - origin_x) / tile_width``,
``row = (origin_y - y) / tile_height``; tile (row, col) is the closed square
``[col, col + 1] x [row, row + 1]``.

Convention (conservative): a tile is selected iff its closed square intersects the closed polygon
(interior or boundary). A tile that only touches the polygon at an edge or a corner is in. The
polygon is given as edges of closed rings; rings combine by the even-odd rule, which is what a
valid polygon with holes and several parts needs (the geometry layer makes rings valid first).

How: a tile is in iff (a) some polygon edge meets its closed square, or (b) its centre is inside
the polygon. If no edge meets the square, the square lies wholly inside or wholly outside, and
its centre decides. (a) is the x-range of each edge clipped to the row's closed strip; (b) is the
even-odd crossings of the row's centre line. Both are column intervals; a row's result is their
merged union. Arithmetic is exact for vertices with few significant bits (x is computed as
``x0 + ((y - y0) * dx) / dy``), so exact touches are decided exactly.

Rows are swept in ascending order with an active edge table (edges sorted by first row), so a
sweep over R rows costs O(E log E + sum of active edges) and memory is O(E + spans of one band).

Bounds checks are off: every array handed in is checked for shape and consistency first, and
every index written is clipped to the array it writes.
"""
import threading

import numpy as np
cimport numpy as cnp
from libc.math cimport ceil, floor, isfinite
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc

cnp.import_array()

cdef enum:
    PACKET = 128
    N = 16384

# tile coordinates beyond this lose integer precision in doubles; the geometry layer refuses them
MAX_COORD = 2.0 ** 50


cdef int cmp_double(const void* a, const void* b) noexcept nogil:
    cdef double x = (<const double*>a)[0]
    cdef double y = (<const double*>b)[0]
    return (x > y) - (x < y)


cdef int cmp_span(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const int64_t*>a)[0]
    cdef int64_t y = (<const int64_t*>b)[0]
    return (x > y) - (x < y)


cdef inline double x_at(double x0, double y0, double x1, double y1, double y) noexcept nogil:
    # multiply before dividing: exact whenever the true value is representable
    if y == y0:
        return x0
    if y == y1:
        return x1
    return x0 + ((y - y0) * (x1 - x0)) / (y1 - y0)


cdef struct Buf:
    int64_t* data      # pairs (start, end), inclusive columns
    Py_ssize_t n       # pairs in use
    Py_ssize_t cap     # pairs allocated


cdef int buf_reserve(Buf* b, Py_ssize_t pairs) noexcept nogil:
    cdef Py_ssize_t cap
    cdef int64_t* p
    if pairs <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 64
    while cap < pairs:
        cap *= 2
    p = <int64_t*>realloc(b.data, cap * 2 * sizeof(int64_t))
    if p == NULL:
        return -1
    b.data = p
    b.cap = cap
    return 0


cdef class Rasterizer:
    """Scanline sweep of one level's polygon edges (array (n, 4): x0, y0, x1, y1 in tile units)."""

    cdef double[:, ::1] edges          # sorted by first row
    cdef int64_t[::1] rstart           # first row whose closed strip meets the edge
    cdef int64_t[::1] rend             # last such row
    cdef Py_ssize_t n
    cdef Py_ssize_t next_edge          # first edge not yet activated
    cdef Py_ssize_t* active
    cdef Py_ssize_t n_active
    cdef double* xs                    # crossings of one row (capacity n)
    cdef Buf row_spans                 # unmerged intervals of one row
    cdef Buf out                       # merged spans of the current call
    cdef int64_t next_row              # the sweep position (rows below it are done)
    cdef readonly int64_t row_min, row_max, col_min, col_max
    cdef object lock                   # one sweep at a time: the GIL is released while it runs

    def __cinit__(self, edges):
        self.lock = threading.Lock()
        self.active = NULL
        self.xs = NULL
        self.row_spans.data = NULL
        self.row_spans.n = self.row_spans.cap = 0
        self.out.data = NULL
        self.out.n = self.out.cap = 0

    def __init__(self, edges):
        arr = np.ascontiguousarray(edges, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError("edges must be an array of shape (n, 4): x0, y0, x1, y1")
        if arr.shape[0] and not np.isfinite(arr).all():
            raise ValueError("edges hold a non-finite coordinate")
        if arr.shape[0] and np.abs(arr).max() > MAX_COORD:
            raise ValueError("edges lie too far from the tile origin for exact tile arithmetic")
        ymin = np.minimum(arr[:, 1], arr[:, 3])
        ymax = np.maximum(arr[:, 1], arr[:, 3])
        rs = (np.ceil(ymin) - 1).astype(np.int64)
        re = np.floor(ymax).astype(np.int64)
        order = np.argsort(rs, kind="stable")
        self.edges = np.ascontiguousarray(arr[order])
        self.rstart = np.ascontiguousarray(rs[order])
        self.rend = np.ascontiguousarray(re[order])
        self.n = arr.shape[0]
        cdef Py_ssize_t cap = self.n if self.n else 1
        self.active = <Py_ssize_t*>malloc(cap * sizeof(Py_ssize_t))
        self.xs = <double*>malloc(cap * sizeof(double))
        if self.active == NULL or self.xs == NULL:
            raise MemoryError()
        if self.n:
            xmin = np.minimum(arr[:, 0], arr[:, 2]).min()
            xmax = np.maximum(arr[:, 0], arr[:, 2]).max()
            self.row_min, self.row_max = int(rs.min()), int(re.max())
            self.col_min, self.col_max = int(np.ceil(xmin)) - 1, int(np.floor(xmax))
        else:
            self.row_min, self.row_max, self.col_min, self.col_max = 0, -1, 0, -1
        self._reset()

    def __dealloc__(self):
        free(self.active)
        free(self.xs)
        free(self.row_spans.data)
        free(self.out.data)

    @property
    def edge_count(self) -> int:
        """Number of edges."""
        return self.n

    cdef void _reset(self) noexcept nogil:
        self.next_edge = 0
        self.n_active = 0
        self.next_row = self.row_min

    cdef int _advance_to(self, int64_t r) noexcept nogil:
        """Make the active table hold exactly the edges whose row range contains r."""
        cdef Py_ssize_t i, k = 0
        # rows only go forward; a call for earlier rows restarts the sweep
        if r < self.next_row:
            self._reset()
        while self.next_edge < self.n and self.rstart[self.next_edge] <= r:
            self.active[self.n_active] = self.next_edge
            self.n_active += 1
            self.next_edge += 1
        for i in range(self.n_active):
            if self.rend[self.active[i]] >= r:
                self.active[k] = self.active[i]
                k += 1
        self.n_active = k
        self.next_row = r + 1
        return 0

    cdef int _row(self, int64_t r) noexcept nogil:
        """Merged selected column intervals of row r into self.row_spans; -1 on allocation failure."""
        cdef Py_ssize_t i, j, e, nx = 0
        cdef double x0, y0, x1, y1, ya, yb, xa, xb, t, yc
        cdef double top = <double>r, bottom = <double>(r + 1)
        cdef int64_t s, en
        cdef Buf* b = &self.row_spans
        self._advance_to(r)
        b.n = 0
        if self.n_active == 0:
            return 0
        if buf_reserve(b, self.n_active + self.n_active // 2 + 2) < 0:
            return -1
        yc = top + 0.5
        for i in range(self.n_active):
            e = self.active[i]
            x0 = self.edges[e, 0]
            y0 = self.edges[e, 1]
            x1 = self.edges[e, 2]
            y1 = self.edges[e, 3]
            # (a) the part of the edge inside the closed strip [r, r + 1]
            if y0 == y1:
                xa = x0
                xb = x1
            else:
                ya = y0 if y0 < y1 else y1
                yb = y1 if y0 < y1 else y0
                if ya < top:
                    ya = top
                if yb > bottom:
                    yb = bottom
                xa = x_at(x0, y0, x1, y1, ya)
                xb = x_at(x0, y0, x1, y1, yb)
            if xa > xb:
                t = xa
                xa = xb
                xb = t
            b.data[2 * b.n] = <int64_t>ceil(xa) - 1
            b.data[2 * b.n + 1] = <int64_t>floor(xb)
            b.n += 1
            # (b) even-odd crossings of the row's centre line
            if (y0 > yc) != (y1 > yc):
                self.xs[nx] = x_at(x0, y0, x1, y1, yc)
                nx += 1
        if nx > 1:
            qsort(self.xs, nx, sizeof(double), cmp_double)
            j = 0
            while j + 1 < nx:
                s = <int64_t>ceil(self.xs[j] - 0.5)
                en = <int64_t>floor(self.xs[j + 1] - 0.5)
                if en >= s:
                    b.data[2 * b.n] = s
                    b.data[2 * b.n + 1] = en
                    b.n += 1
                j += 2
        # merge: sort by start, fold overlapping or adjacent intervals
        qsort(b.data, b.n, 2 * sizeof(int64_t), cmp_span)
        j = 0
        for i in range(1, b.n):
            if b.data[2 * i] <= b.data[2 * j + 1] + 1:
                if b.data[2 * i + 1] > b.data[2 * j + 1]:
                    b.data[2 * j + 1] = b.data[2 * i + 1]
            else:
                j += 1
                b.data[2 * j] = b.data[2 * i]
                b.data[2 * j + 1] = b.data[2 * i + 1]
        if b.n:
            b.n = j + 1
        return 0

    def spans(self, int64_t row_start, Py_ssize_t nrows):
        """Selected column spans of rows [row_start, row_start + nrows): (row_ptr int64[nrows + 1],
        spans int64[m, 2] inclusive (first, last) columns, ascending and disjoint per row)."""
        if nrows < 0:
            raise ValueError("nrows must be >= 0")
        row_ptr = np.zeros(nrows + 1, dtype=np.int64)
        cdef int64_t[::1] rp = row_ptr
        cdef Py_ssize_t i, k
        cdef int64_t r
        cdef int failed = 0
        cdef int64_t[:, ::1] ov
        cdef Buf* o = &self.out
        with self.lock:
            o.n = 0
            with nogil:
                for i in range(nrows):
                    r = row_start + i
                    if r < self.row_min or r > self.row_max:
                        rp[i + 1] = o.n
                        continue
                    if self._row(r) < 0 or buf_reserve(o, o.n + self.row_spans.n) < 0:
                        failed = 1
                        break
                    for k in range(2 * self.row_spans.n):
                        o.data[2 * o.n + k] = self.row_spans.data[k]
                    o.n += self.row_spans.n
                    rp[i + 1] = o.n
            if failed:
                raise MemoryError()
            out = np.empty((o.n, 2), dtype=np.int64)
            ov = out
            for k in range(o.n):
                ov[k, 0] = o.data[2 * k]
                ov[k, 1] = o.data[2 * k + 1]
        return row_ptr, out

    def count(self, int64_t row_first, int64_t row_last, int64_t col_first, int64_t col_last):
        """How many tiles of rows [row_first, row_last] x cols [col_first, col_last] are selected."""
        cdef int64_t total = 0, r, s, e, stop
        cdef Py_ssize_t k
        cdef int failed = 0
        cdef Buf* b = &self.row_spans
        with self.lock:
            with nogil:
                r = row_first if row_first > self.row_min else self.row_min
                stop = row_last if row_last < self.row_max else self.row_max
                while r <= stop:
                    if self._row(r) < 0:
                        failed = 1
                        break
                    for k in range(b.n):
                        s = b.data[2 * k]
                        e = b.data[2 * k + 1]
                        if s < col_first:
                            s = col_first
                        if e > col_last:
                            e = col_last
                        if e >= s:
                            total += e - s + 1
                    # nothing active and the next edge starts later: jump there
                    if self.n_active == 0:
                        if self.next_edge >= self.n:
                            break
                        if self.rstart[self.next_edge] > r + 1:
                            r = self.rstart[self.next_edge]
                            continue
                    r += 1
        if failed:
            raise MemoryError()
        return total


def _check_spans(row_ptr, spans, Py_ssize_t nrows):
    rp = np.ascontiguousarray(row_ptr, dtype=np.int64)
    sp = np.ascontiguousarray(spans, dtype=np.int64)
    if sp.ndim != 2 or sp.shape[1] != 2:
        sp = sp.reshape(-1, 2)
    if rp.ndim != 1 or rp.shape[0] < nrows + 1:
        raise ValueError(f"row_ptr must have at least {nrows + 1} entries")
    cdef int64_t[::1] v = rp
    cdef Py_ssize_t i, m = sp.shape[0]
    cdef bint ok = v[0] >= 0 and v[nrows] <= m
    for i in range(nrows):
        if v[i + 1] < v[i]:
            ok = False
    if not ok:
        raise ValueError("row_ptr is not a valid index into spans")
    return rp, sp


def window_mask(row_ptr, spans, int64_t col0):
    """The 128x128 uint8 mask of a bundle whose first column is col0, from the spans of its 128
    rows (as returned by Rasterizer.spans(row0, 128)); returns (mask, selected count)."""
    rp_a, sp_a = _check_spans(row_ptr, spans, PACKET)
    cdef int64_t[::1] rp = rp_a
    cdef int64_t[:, ::1] sp = sp_a
    mask = np.zeros((PACKET, PACKET), dtype=np.uint8)
    cdef uint8_t[:, ::1] m = mask
    cdef Py_ssize_t i, k
    cdef int64_t s, e, c, n = 0
    with nogil:
        for i in range(PACKET):
            for k in range(rp[i], rp[i + 1]):
                s = sp[k, 0] - col0
                e = sp[k, 1] - col0
                if s < 0:
                    s = 0
                if e > PACKET - 1:
                    e = PACKET - 1
                c = s
                while c <= e:
                    m[i, c] = 1
                    c += 1
                if e >= s:
                    n += e - s + 1
    return mask, n


def apply_presence(mask, sizes):
    """AND a bundle mask with its tiles that exist (size > 0), in place; returns (tiles, bytes)."""
    if not (isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.shape == (PACKET, PACKET)
            and mask.flags.c_contiguous):
        raise ValueError("mask must be a C-contiguous uint8 array of shape (128, 128)")
    sz_a = np.ascontiguousarray(sizes, dtype=np.uint32)
    if sz_a.ndim != 1 or sz_a.shape[0] != N:
        raise ValueError("sizes must hold 16384 entries")
    cdef uint8_t[:, ::1] m = mask
    cdef uint32_t[::1] sz = sz_a
    cdef Py_ssize_t i
    cdef uint8_t* mp = &m[0, 0]
    cdef int64_t tiles = 0
    cdef uint64_t nbytes = 0
    with nogil:
        for i in range(N):
            if mp[i]:
                if sz[i] == 0:
                    mp[i] = 0
                else:
                    tiles += 1
                    nbytes += sz[i]
    return tiles, nbytes

# cython: cdivision=False
"""Area-of-interest rasterization onto a tile grid, by scanline spans, never a level-wide grid.

Coordinates are fractional tile coordinates of one level: ``col = (x - origin_x) / tile_width``,
``row = (origin_y - y) / tile_height``; tile (row, col) is the closed square
``[col, col + 1] x [row, row + 1]``.

Convention (conservative): a tile is selected iff its closed square intersects the closed area
(interior or boundary). A tile that only touches the area at an edge or a corner is in.

Fill rule: the area is given as edges of closed rings, each edge tagged with a group (one
geometry: an Esri polygon, a GeoJSON Polygon, one feature). Within a group rings combine by the
even-odd rule (a point is inside iff a ray from it crosses the group's rings an odd number of
times: Esri's rings-with-holes for valid input, and a defined answer for any input, valid or
not); groups combine by union. The closed area is that interior plus every edge, so no repair
(make_valid, union) is needed before rasterizing.

How: a tile is in iff (a) some edge meets its closed square, or (b) its centre is inside. If no
edge meets the square, the square lies wholly inside or wholly outside every group, and its
centre decides. (a) is the x-range of each edge clipped to the row's closed strip; (b) is the
even-odd crossings of the row's centre line, paired within each group. Both are column
intervals; a row's result is their merged union. Arithmetic is exact for vertices with few
significant bits (x is computed as ``x0 + ((y - y0) * dx) / dy``), so exact touches are decided
exactly.

Rows are swept in ascending order with an active edge table (edges sorted by first row), so a
sweep over R rows costs O(E log E + sum of active edges) and memory is O(E + spans of one band).

Every public entry point checks its arguments (shapes, dtypes, ranges) before any loop; bounds
checks are turned off only in the functions whose indexes those checks (or the sweep's own
invariants, noted there) prove in range.
"""
cimport cython
import threading

import numpy as np
cimport numpy as cnp
from libc.math cimport ceil, floor
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy, memset

cnp.import_array()

cdef enum:
    PACKET = 128
    N = 16384

# tile coordinates beyond this lose integer precision in doubles; the geometry layer refuses them
MAX_COORD = 2.0 ** 50
# rows or columns given to spans/count/window_mask beyond this are refused: every sum of two of
# them stays far inside int64
MAX_INDEX = 2 ** 62
# rows one spans() call may return (callers ask for one bundle row, 128)
MAX_SPAN_ROWS = 1 << 20


cdef struct Cross:
    double x           # where a row's centre line crosses an edge
    int64_t g          # the edge's group


cdef int cmp_cross(const void* a, const void* b) noexcept nogil:
    cdef const Cross* p = <const Cross*>a
    cdef const Cross* q = <const Cross*>b
    if p.g != q.g:
        return (p.g > q.g) - (p.g < q.g)
    return (p.x > q.x) - (p.x < q.x)


cdef int cmp_span(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const int64_t*>a)[0]
    cdef int64_t y = (<const int64_t*>b)[0]
    return (x > y) - (x < y)


@cython.cdivision(True)   # every caller has y0 != y1 whenever y lies strictly between them
cdef inline double x_at(double x0, double y0, double x1, double y1, double y) noexcept nogil:
    # multiply before dividing: exact whenever the true value is representable
    if y == y0:
        return x0
    if y == y1:
        return x1
    return x0 + ((y - y0) * (x1 - x0)) / (y1 - y0)


# Rows with many active edges sort thousands of spans and crossings each: an LSD radix sort (8-bit
# digits, digits every key shares skipped) costs O(n) per digit where qsort costs O(n log n)
# calls through a function pointer. Below RADIX_MIN items qsort is faster.
cdef enum:
    RADIX_MIN = 64


cdef inline uint64_t double_key(double x) noexcept nogil:
    # IEEE-754 bits mapped so that unsigned order is numeric order
    cdef uint64_t u
    memcpy(&u, &x, sizeof(double))
    if u >> 63:
        return ~u
    return u | (<uint64_t>1 << 63)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void radix_pairs(int64_t* a, int64_t* tmp, Py_ssize_t n) noexcept nogil:
    """Sort n (start, end) pairs by start, stably; tmp holds n pairs."""
    cdef Py_ssize_t count[256]
    cdef Py_ssize_t i, pos, total
    cdef int64_t lo = a[0], hi = a[0]
    cdef uint64_t key
    cdef int shift = 0, d
    cdef int64_t* src = a
    cdef int64_t* dst = tmp
    cdef int64_t* t
    for i in range(1, n):
        if a[2 * i] < lo:
            lo = a[2 * i]
        if a[2 * i] > hi:
            hi = a[2 * i]
    # starts lie within +-(MAX_COORD + 1), so hi - lo fits
    cdef uint64_t span = <uint64_t>(hi - lo)
    while shift < 64 and (span >> shift) != 0:
        memset(count, 0, sizeof(count))
        for i in range(n):
            count[((<uint64_t>(src[2 * i] - lo)) >> shift) & 255] += 1
        total = 0
        for d in range(256):
            pos = count[d]
            count[d] = total
            total += pos
        for i in range(n):
            key = ((<uint64_t>(src[2 * i] - lo)) >> shift) & 255
            pos = count[key]
            count[key] = pos + 1
            dst[2 * pos] = src[2 * i]
            dst[2 * pos + 1] = src[2 * i + 1]
        t = src
        src = dst
        dst = t
        shift += 8
    if src != a:
        memcpy(a, src, n * 2 * sizeof(int64_t))


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void radix_cross(Cross* a, Cross* tmp, Py_ssize_t n, bint by_group) noexcept nogil:
    """Sort n crossings by (group, x), stably; tmp holds n crossings."""
    cdef Py_ssize_t count[256]
    cdef Py_ssize_t i, pos, total
    cdef uint64_t key, first, diff = 0
    cdef int shift, d, pass_
    cdef Cross* src = a
    cdef Cross* dst = tmp
    cdef Cross* t
    for pass_ in range(2 if by_group else 1):
        # pass 0: x (least significant); pass 1: the group, stable over x
        first = double_key(src[0].x) if pass_ == 0 else <uint64_t>src[0].g
        diff = 0
        for i in range(1, n):
            key = double_key(src[i].x) if pass_ == 0 else <uint64_t>src[i].g
            diff |= key ^ first
        shift = 0
        while shift < 64 and (diff >> shift) != 0:
            if ((diff >> shift) & 255) == 0:      # every key has this digit: nothing to move
                shift += 8
                continue
            memset(count, 0, sizeof(count))
            for i in range(n):
                key = double_key(src[i].x) if pass_ == 0 else <uint64_t>src[i].g
                count[(key >> shift) & 255] += 1
            total = 0
            for d in range(256):
                pos = count[d]
                count[d] = total
                total += pos
            for i in range(n):
                key = double_key(src[i].x) if pass_ == 0 else <uint64_t>src[i].g
                key = (key >> shift) & 255
                pos = count[key]
                count[key] = pos + 1
                dst[pos] = src[i]
            t = src
            src = dst
            dst = t
            shift += 8
    if src != a:
        memcpy(a, src, n * sizeof(Cross))


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
    """Scanline sweep of one level's edges (array (n, 4): x0, y0, x1, y1 in tile units), with an
    optional group per edge (int64 (n,): even-odd within a group, union across groups)."""

    cdef double[:, ::1] edges          # sorted by first row
    cdef int64_t[::1] group            # group of each (sorted) edge
    cdef int64_t[::1] rstart           # first row whose closed strip meets the edge
    cdef int64_t[::1] rend             # last such row
    cdef Py_ssize_t n
    cdef Py_ssize_t next_edge          # first edge not yet activated
    cdef Py_ssize_t* active
    cdef Py_ssize_t n_active
    cdef Cross* xs                     # crossings of one row (capacity n)
    cdef Cross* xs_tmp                 # radix sort scratch (capacity n)
    cdef bint groups                   # more than one group: crossings sort by group too
    cdef Buf sort_tmp                  # radix sort scratch for row_spans
    cdef Buf row_spans                 # unmerged intervals of one row
    cdef Buf out                       # merged spans of the current call
    cdef int64_t next_row              # the sweep position (rows below it are done)
    cdef bint ready                    # __init__ completed: the memoryviews are set
    cdef readonly int64_t row_min, row_max, col_min, col_max
    cdef object lock                   # one sweep at a time: the GIL is released while it runs

    def __cinit__(self, *args, **kwargs):
        self.lock = threading.Lock()
        self.ready = False
        self.active = NULL
        self.xs = NULL
        self.xs_tmp = NULL
        self.sort_tmp.data = NULL
        self.sort_tmp.n = self.sort_tmp.cap = 0
        self.row_spans.data = NULL
        self.row_spans.n = self.row_spans.cap = 0
        self.out.data = NULL
        self.out.n = self.out.cap = 0

    def __init__(self, edges, groups=None):
        if self.ready:
            raise RuntimeError("a Rasterizer is initialised once; make a new one for other edges")
        arr = np.ascontiguousarray(edges, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError("edges must be an array of shape (n, 4): x0, y0, x1, y1")
        if arr.shape[0] and not np.isfinite(arr).all():
            raise ValueError("edges hold a non-finite coordinate")
        if arr.shape[0] and np.abs(arr).max() > MAX_COORD:
            raise ValueError("edges lie too far from the tile origin for exact tile arithmetic")
        if groups is None:
            grp = np.zeros(arr.shape[0], dtype=np.int64)
        else:
            grp = np.asarray(groups)
            if grp.ndim != 1 or grp.shape[0] != arr.shape[0] or not (
                    grp.dtype.kind in "iu" or (grp.dtype.kind == "b" and grp.shape[0] == 0)):
                raise ValueError("groups must be an integer array with one entry per edge")
            if grp.dtype.kind == "u" and grp.shape[0] and grp.max() > INT64_MAX:
                raise ValueError("groups must fit in int64")
            grp = grp.astype(np.int64)
            if grp.shape[0] and grp.min() < 0:
                # ranks: the same partition, with keys the radix sort can take as unsigned
                grp = np.unique(grp, return_inverse=True)[1].astype(np.int64).reshape(-1)
        ymin = np.minimum(arr[:, 1], arr[:, 3])
        ymax = np.maximum(arr[:, 1], arr[:, 3])
        rs = (np.ceil(ymin) - 1).astype(np.int64)
        re = np.floor(ymax).astype(np.int64)
        # edges handed in by first row already (geometry.Area sorts them once for every level) stay put
        if rs.shape[0] > 1 and not (rs[1:] >= rs[:-1]).all():
            order = np.argsort(rs)   # any order among edges of the same first row
        else:
            order = slice(None)
        cdef Py_ssize_t n = arr.shape[0]
        cdef Py_ssize_t cap = n if n else 1
        active = <Py_ssize_t*>malloc(cap * sizeof(Py_ssize_t))
        xs = <Cross*>malloc(cap * sizeof(Cross))
        xs_tmp = <Cross*>malloc(cap * sizeof(Cross))
        if active == NULL or xs == NULL or xs_tmp == NULL:
            free(active)
            free(xs)
            free(xs_tmp)
            raise MemoryError()
        self.active = active
        self.xs = xs
        self.xs_tmp = xs_tmp
        self.groups = bool(n and grp.min() != grp.max())
        self.edges = np.ascontiguousarray(arr[order])
        self.group = np.ascontiguousarray(grp[order])
        self.rstart = np.ascontiguousarray(rs[order])
        self.rend = np.ascontiguousarray(re[order])
        self.n = n
        if n:
            xmin = np.minimum(arr[:, 0], arr[:, 2]).min()
            xmax = np.maximum(arr[:, 0], arr[:, 2]).max()
            self.row_min, self.row_max = int(rs.min()), int(re.max())
            self.col_min, self.col_max = int(np.ceil(xmin)) - 1, int(np.floor(xmax))
        else:
            self.row_min, self.row_max, self.col_min, self.col_max = 0, -1, 0, -1
        self._reset()
        self.ready = True

    def __dealloc__(self):
        free(self.active)
        free(self.xs)
        free(self.xs_tmp)
        free(self.sort_tmp.data)
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

    # indexes: next_edge < n (loop condition), active[] holds at most n entries (each edge is
    # activated once per sweep) and every entry is < n
    @cython.boundscheck(False)
    @cython.wraparound(False)
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

    # indexes: e comes from active[] (< n); spans written < n_active + n_active // 2 + 1 pairs,
    # which buf_reserve made room for; crossings < n_active <= n, the capacity of xs
    @cython.boundscheck(False)
    @cython.wraparound(False)
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
            # (b) crossings of the row's centre line (half-open in y, so a vertex counts once)
            if (y0 > yc) != (y1 > yc):
                self.xs[nx].x = x_at(x0, y0, x1, y1, yc)
                self.xs[nx].g = self.group[e]
                nx += 1
        if nx > 1:
            # even-odd within each group: sorted by (group, x), the group's crossings pair up
            if nx < RADIX_MIN:
                qsort(self.xs, nx, sizeof(Cross), cmp_cross)
            else:
                radix_cross(self.xs, self.xs_tmp, nx, self.groups)
            j = 0
            while j + 1 < nx:
                if self.xs[j].g != self.xs[j + 1].g:
                    j += 1          # a group with an odd count (rings not closed): its last one is alone
                    continue
                s = <int64_t>ceil(self.xs[j].x - 0.5)
                en = <int64_t>floor(self.xs[j + 1].x - 0.5)
                if en >= s:
                    b.data[2 * b.n] = s
                    b.data[2 * b.n + 1] = en
                    b.n += 1
                j += 2
        # merge: sort by start, fold overlapping or adjacent intervals
        if b.n < RADIX_MIN:
            qsort(b.data, b.n, 2 * sizeof(int64_t), cmp_span)
        elif buf_reserve(&self.sort_tmp, b.n) < 0:
            return -1
        else:
            radix_pairs(b.data, self.sort_tmp.data, b.n)
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

    cdef void _check_ready(self) except *:
        if not self.ready:
            raise RuntimeError("the Rasterizer was not initialised with edges")

    # indexes: rp has nrows + 1 entries and i < nrows; ov has o.n rows and k < o.n
    @cython.boundscheck(False)
    @cython.wraparound(False)
    def spans(self, int64_t row_start, Py_ssize_t nrows):
        """Selected column spans of rows [row_start, row_start + nrows): (row_ptr int64[nrows + 1],
        spans int64[m, 2] inclusive (first, last) columns, ascending and disjoint per row)."""
        self._check_ready()
        if not 0 <= nrows <= MAX_SPAN_ROWS:
            raise ValueError(f"nrows must be from 0 to {MAX_SPAN_ROWS}")
        if not -MAX_INDEX <= row_start <= MAX_INDEX:
            raise ValueError("row_start is out of range")
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

    # indexes: b.data holds 2 * b.n entries (filled by _row); rstart is read at next_edge < n
    @cython.boundscheck(False)
    @cython.wraparound(False)
    def count(self, int64_t row_first, int64_t row_last, int64_t col_first, int64_t col_last):
        """How many tiles of rows [row_first, row_last] x cols [col_first, col_last] are selected."""
        self._check_ready()
        cdef int64_t total = 0, r, s, e, stop
        cdef Py_ssize_t k
        cdef int failed = 0
        cdef Buf* b = &self.row_spans
        with self.lock:
            with nogil:
                # row_min/row_max lie within +-(MAX_COORD + 1): r + 1 never overflows
                r = row_first if row_first > self.row_min else self.row_min
                stop = row_last if row_last < self.row_max else self.row_max
                while r <= stop:
                    if self._row(r) < 0:
                        failed = 1
                        break
                    for k in range(b.n):
                        # span ends lie within +-(MAX_COORD + 1), so e - s cannot overflow
                        s = b.data[2 * k]
                        e = b.data[2 * k + 1]
                        if s < col_first:
                            s = col_first
                        if e > col_last:
                            e = col_last
                        if e >= s:
                            if total > INT64_MAX - (e - s + 1):
                                failed = 2
                                break
                            total += e - s + 1
                    if failed:
                        break
                    # nothing active and the next edge starts later: jump there
                    if self.n_active == 0:
                        if self.next_edge >= self.n:
                            break
                        if self.rstart[self.next_edge] > r + 1:
                            r = self.rstart[self.next_edge]
                            continue
                    r += 1
        if failed == 2:
            raise OverflowError("the count of selected tiles exceeds 2**63")
        if failed:
            raise MemoryError()
        return total


def _check_spans(row_ptr, spans, Py_ssize_t nrows):
    rp = np.ascontiguousarray(row_ptr, dtype=np.int64)
    sp = np.ascontiguousarray(spans, dtype=np.int64)
    if sp.ndim != 2 or sp.shape[1] != 2:
        if sp.size % 2:
            raise ValueError("spans must be an array of (first, last) column pairs")
        sp = sp.reshape(-1, 2)
    if rp.ndim != 1 or rp.shape[0] < nrows + 1:
        raise ValueError(f"row_ptr must have at least {nrows + 1} entries")
    # min and max, not abs (abs(INT64_MIN) wraps to itself and would pass); strictly inside
    # +-MAX_INDEX, like col0, so that a column minus col0 stays under 2**63
    if sp.shape[0] and (sp.min() <= -MAX_INDEX or sp.max() >= MAX_INDEX):
        raise ValueError("spans hold a column out of range")
    cdef int64_t[::1] v = rp
    cdef Py_ssize_t i, m = sp.shape[0]
    cdef bint ok = v[0] >= 0 and v[nrows] <= m
    for i in range(nrows):
        if v[i + 1] < v[i]:
            ok = False
    if not ok:
        raise ValueError("row_ptr is not a valid index into spans")
    return rp, sp


# indexes: _check_spans proved 0 <= rp[i] <= rp[i + 1] <= len(sp) for i < PACKET; columns are
# clipped to 0..PACKET - 1 before m is written, and col0 and the spans lie strictly within +-MAX_INDEX
@cython.boundscheck(False)
@cython.wraparound(False)
def window_mask(row_ptr, spans, int64_t col0):
    """The 128x128 uint8 mask of a bundle whose first column is col0, from the spans of its 128
    rows (as returned by Rasterizer.spans(row0, 128)); returns (mask, selected count)."""
    if not -MAX_INDEX < col0 < MAX_INDEX:
        raise ValueError("col0 is out of range")
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


# indexes: mask is checked to be C-contiguous (128, 128) and sizes to hold N entries; i < N
@cython.boundscheck(False)
@cython.wraparound(False)
def apply_presence(mask, sizes):
    """AND a bundle mask with its tiles that exist (size > 0), in place; returns (tiles, bytes)."""
    if not (isinstance(mask, np.ndarray) and mask.dtype == np.uint8 and mask.shape == (PACKET, PACKET)
            and mask.flags.c_contiguous and mask.flags.writeable):
        raise ValueError("mask must be a writable C-contiguous uint8 array of shape (128, 128)")
    sz_a = np.ascontiguousarray(sizes)
    if sz_a.ndim != 1 or sz_a.shape[0] != N:
        raise ValueError("sizes must hold 16384 entries")
    if sz_a.dtype != np.uint32:
        if sz_a.dtype.kind not in "iu" or (sz_a.size and (sz_a.min() < 0 or sz_a.max() > 0xFFFFFFFF)):
            raise ValueError("sizes must be whole numbers from 0 to 2**32 - 1")
        sz_a = sz_a.astype(np.uint32)
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

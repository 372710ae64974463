# cython: cdivision=True
"""Compact bundle indexes (V1 and V2) parsed into one model, with every offset checked.

The model, shared by both formats: two arrays of 16 384 entries in row-major order
(``i = 128 * (row % 128) + (col % 128)``), ``offsets`` (uint64, absolute offset of the first tile
byte inside the bundle) and ``sizes`` (uint32, 0 = no tile). Every entry with a size is proven to
lie inside the bundle before it is returned, so callers can slice without further checks.

Bounds checks are off only in the functions whose loops index memoryviews after a length check
above them proved every index in range (marked with the decorators); raw pointer reads are done
only after the same checks. `parse_v1_fd` reads the V1 size prefixes with pread of exactly the
bytes needed (no mapping: a file truncated under us is an error, never SIGBUS).
"""
import numpy as np
cimport cython
cimport numpy as cnp
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from posix.stat cimport fstat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport pread

from tilecrate.errors import BundleError

cnp.import_array()

cdef enum:
    N = 16384
    PACKET = 128
cdef uint64_t OFFSET_MASK = (<uint64_t>1 << 40) - 1
cdef uint64_t MAX_FILE = (<uint64_t>1 << 62)     # fits off_t with room for base + length
# size prefixes closer together than this are read with one pread (dense small tiles)
cdef enum:
    WINDOW = 16384

V2_HEADER_SIZE = 64
V2_INDEX_SIZE = N * 8
V2_DATA_START = 64 + N * 8            # 131136: the minimal (empty) V2 bundle
V1_HEADER_SIZE = 60
V1_DATA_START = 60 + N * 4            # 65596: first tile record after the zero table
BUNDLX_SIZE = 16 + N * 5 + 16         # 81952
BUNDLX_SIZE_NO_FOOTER = 16 + N * 5    # 81936 (GeoTools' hand-made files)
TILES_PER_BUNDLE = N
PACKET_SIZE = PACKET
MAX_TILE_SIZE = (1 << 24) - 1
MAX_OFFSET = (1 << 40) - 1


cdef inline uint32_t rd_u32(const uint8_t* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t rd_u40(const uint8_t* p) noexcept nogil:
    return (<uint64_t>p[0] | (<uint64_t>p[1] << 8) | (<uint64_t>p[2] << 16)
            | (<uint64_t>p[3] << 24) | (<uint64_t>p[4] << 32))


cdef inline uint64_t rd_u64(const uint8_t* p) noexcept nogil:
    return <uint64_t>rd_u32(p) | (<uint64_t>rd_u32(p + 4) << 32)


def v2_header_problem(const uint8_t[::1] buf):
    """Why ``buf`` is not a readable compact V2 bundle, or None when its header is fine."""
    cdef Py_ssize_t n = buf.shape[0]
    if n < V2_DATA_START:
        return f"truncated: {n} bytes, a compact V2 bundle needs at least {V2_DATA_START} (header + index)"
    cdef const uint8_t* p = &buf[0]
    if rd_u32(p) != 3:
        return f"not a compact V2 bundle: version field is {rd_u32(p)}, expected 3"
    if rd_u32(p + 12) != 5:
        return f"offset byte count is {rd_u32(p + 12)}, expected 5"
    if rd_u64(p + 32) != 40:
        return f"user header offset is {rd_u64(p + 32)}, expected 40"
    if rd_u32(p + 60) != N * 8:
        return f"index size is {rd_u32(p + 60)}, expected {N * 8}"
    return None


def parse_v2(const uint8_t[::1] buf, str name="bundle"):
    """Parse a compact V2 bundle (the whole file's bytes) into (offsets, sizes), row-major."""
    return parse_v2_index(buf, <uint64_t>buf.shape[0], name)


@cython.boundscheck(False)
@cython.wraparound(False)
def parse_v2_index(const uint8_t[::1] buf, uint64_t length, str name="bundle"):
    """Parse a V2 bundle's header and index (its first bytes, at least 131 136 of them) into
    (offsets, sizes), checking every entry against ``length``, the size of the whole file."""
    if <uint64_t>buf.shape[0] > length:
        raise BundleError(f"{name}: {buf.shape[0]} bytes read from a file of {length}")
    problem = v2_header_problem(buf)
    if problem is not None:
        if buf.shape[0] < V2_DATA_START and length >= V2_DATA_START:
            problem = f"only {buf.shape[0]} bytes of the header and index could be read"
        raise BundleError(f"{name}: {problem}")
    offsets_arr = np.zeros(N, dtype=np.uint64)
    sizes_arr = np.zeros(N, dtype=np.uint32)
    cdef uint64_t[::1] offsets = offsets_arr
    cdef uint32_t[::1] sizes = sizes_arr
    cdef const uint8_t* index = &buf[0] + 64
    cdef uint64_t rec, off, size
    cdef Py_ssize_t i, bad = -1
    with nogil:
        for i in range(N):
            rec = rd_u64(index + 8 * i)
            size = rec >> 40
            if size == 0:
                continue
            off = rec & OFFSET_MASK
            if off + size > length:
                bad = i
                break
            offsets[i] = off
            sizes[i] = <uint32_t>size
    if bad >= 0:
        rec = rd_u64(index + 8 * bad)
        raise BundleError(
            f"{name}: tile at row {bad // PACKET}, column {bad % PACKET} of the bundle has offset "
            f"{rec & MAX_OFFSET} and size {rec >> 40}, past the end of the file ({length} bytes)"
        )
    return offsets_arr, sizes_arr


def v1_header_problem(const uint8_t[::1] bundlx, const uint8_t[::1] bundle):
    """Why this .bundlx/.bundle pair is not a readable compact V1 bundle, or None."""
    cdef Py_ssize_t nx = bundlx.shape[0], nb = bundle.shape[0]
    if nx != BUNDLX_SIZE and nx != BUNDLX_SIZE_NO_FOOTER:
        return (f".bundlx is {nx} bytes, expected {BUNDLX_SIZE} "
                f"(or {BUNDLX_SIZE_NO_FOOTER} without footer)")
    cdef const uint8_t* x = &bundlx[0]
    if rd_u32(x) != 3 or rd_u32(x + 12) != 5:
        return f".bundlx header is ({rd_u32(x)}, {rd_u32(x + 4)}, {rd_u32(x + 8)}, {rd_u32(x + 12)}), expected (3, 16, 16384, 5)"
    if nb < V1_HEADER_SIZE:
        return f"truncated: .bundle is {nb} bytes, a compact V1 bundle needs a {V1_HEADER_SIZE}-byte header"
    if rd_u32(&bundle[0]) != 3:
        return f"not a compact V1 bundle: version field is {rd_u32(&bundle[0])}, expected 3"
    return None


@cython.boundscheck(False)
@cython.wraparound(False)
def parse_v1(const uint8_t[::1] bundlx, const uint8_t[::1] bundle, str name="bundle"):
    """Parse a compact V1 pair (.bundlx bytes, .bundle bytes) into (offsets, sizes), row-major."""
    problem = v1_header_problem(bundlx, bundle)
    if problem is not None:
        raise BundleError(f"{name}: {problem}")
    cdef uint64_t length = <uint64_t>bundle.shape[0]
    offsets_arr = np.zeros(N, dtype=np.uint64)
    sizes_arr = np.zeros(N, dtype=np.uint32)
    cdef uint64_t[::1] offsets = offsets_arr
    cdef uint32_t[::1] sizes = sizes_arr
    cdef const uint8_t* index = &bundlx[0] + 16
    cdef const uint8_t* data = &bundle[0]
    cdef uint64_t off, size
    cdef Py_ssize_t i, j, bad = -1
    cdef int why = 0
    with nogil:
        for i in range(N):
            off = rd_u40(index + 5 * i)
            if off == 0:
                continue              # MapProxy's "missing"; ArcGIS points at the zero table
            if off + 4 > length:
                bad = i
                why = 1
                break
            size = rd_u32(data + off)
            if size == 0:
                continue
            if off + 4 + size > length:
                bad = i
                why = 2
                break
            # .bundlx is column-major (i = 128 * col + row); the model is row-major
            j = (i % PACKET) * PACKET + i // PACKET
            offsets[j] = off + 4
            sizes[j] = <uint32_t>size
    if bad >= 0:
        off = rd_u40(index + 5 * bad)
        where = f"tile at row {bad % PACKET}, column {bad // PACKET} of the bundle"
        if why == 1:
            raise BundleError(f"{name}: {where} points at offset {off}, past the end of the .bundle ({length} bytes)")
        raise BundleError(
            f"{name}: {where} has size {rd_u32(data + off)} at offset {off}, past the end of the .bundle ({length} bytes)"
        )
    return offsets_arr, sizes_arr


cdef int _pread_full(int fd, uint8_t* dst, uint64_t n, uint64_t at) noexcept nogil:
    """Read exactly n bytes at `at`: 0, 1 when the file ends first, -errno on an error."""
    cdef ssize_t got
    while n > 0:
        got = pread(fd, dst, n, <off_t>at)
        if got < 0:
            if errno == 4:      # EINTR
                continue
            return -errno
        if got == 0:
            return 1
        dst += got
        n -= <uint64_t>got
        at += <uint64_t>got
    return 0


@cython.boundscheck(False)
@cython.wraparound(False)
def parse_v1_fd(const uint8_t[::1] bundlx, int fd, uint64_t base, uint64_t length, str name="bundle"):
    """Parse a compact V1 bundle whose .bundle bytes are ``length`` bytes at ``base`` of the open file
    ``fd``, reading only its header and the size prefixes with pread; returns (offsets, sizes) as
    `parse_v1` does. A file that ends early is a BundleError (it changed after it was measured)."""
    if fd < 0:
        raise ValueError("fd must be an open file descriptor")
    if base > MAX_FILE or length > MAX_FILE:
        raise ValueError(f"base {base} or length {length} is out of range")
    cdef Py_ssize_t nx = bundlx.shape[0]
    if nx != BUNDLX_SIZE and nx != BUNDLX_SIZE_NO_FOOTER:
        raise BundleError(f"{name}: .bundlx is {nx} bytes, expected {BUNDLX_SIZE} "
                          f"(or {BUNDLX_SIZE_NO_FOOTER} without footer)")
    cdef const uint8_t* x = &bundlx[0]
    if rd_u32(x) != 3 or rd_u32(x + 12) != 5:
        raise BundleError(f"{name}: .bundlx header is ({rd_u32(x)}, {rd_u32(x + 4)}, {rd_u32(x + 8)}, "
                          f"{rd_u32(x + 12)}), expected (3, 16, 16384, 5)")
    if length < V1_HEADER_SIZE:
        raise BundleError(f"{name}: truncated: .bundle is {length} bytes, a compact V1 bundle needs a "
                          f"{V1_HEADER_SIZE}-byte header")
    cdef uint8_t head[4]
    cdef int rc
    with nogil:
        rc = _pread_full(fd, head, 4, base)
    if rc < 0:
        raise OSError(-rc, f"{name}: cannot read")
    if rc > 0:
        raise BundleError(f"{name}: the file ends before its header; it changed while being read")
    if rd_u32(head) != 3:
        raise BundleError(f"{name}: not a compact V1 bundle: version field is {rd_u32(head)}, expected 3")
    raw_arr = np.zeros(N, dtype=np.uint64)
    cdef uint64_t[::1] raw = raw_arr
    cdef Py_ssize_t i, k, m, bad = -1
    cdef uint64_t off
    with nogil:
        for i in range(N):
            off = rd_u40(x + 16 + 5 * i)
            raw[i] = off
            if off != 0 and off + 4 > length:
                bad = i
                break
    if bad >= 0:
        raise BundleError(f"{name}: tile at row {bad % PACKET}, column {bad // PACKET} of the bundle points at "
                          f"offset {raw[bad]}, past the end of the .bundle ({length} bytes)")
    # the cells that point somewhere, in file order, so prefixes close together are read with one pread
    cells = np.flatnonzero(raw_arr)
    order_arr = np.ascontiguousarray(cells[np.argsort(raw_arr[cells])], dtype=np.int64)
    cdef int64_t[::1] order = order_arr
    cdef Py_ssize_t n_order = order_arr.shape[0]
    offsets_arr = np.zeros(N, dtype=np.uint64)
    sizes_arr = np.zeros(N, dtype=np.uint32)
    cdef uint64_t[::1] offsets = offsets_arr
    cdef uint32_t[::1] sizes = sizes_arr
    cdef uint8_t* win = <uint8_t*>malloc(WINDOW + 4)
    if win == NULL:
        raise MemoryError()
    cdef uint64_t start = 0, end = 0, size = 0, last
    cdef int why = 0
    rc = 0
    with nogil:
        k = 0
        while k < n_order:      # offset 0 (MapProxy's "missing") is not in `order`
            i = order[k]
            off = raw[i]
            if not (start <= off and off + 4 <= end):
                # one read from this prefix to the last prefix within WINDOW bytes of it
                start = off
                last = off + 4
                m = k + 1
                while m < n_order and raw[order[m]] + 4 - start <= WINDOW:
                    last = raw[order[m]] + 4
                    m += 1
                rc = _pread_full(fd, win, last - start, base + start)
                if rc != 0:
                    bad = i
                    break
                end = last
            size = rd_u32(win + (off - start))
            if size != 0:
                if off + 4 + size > length:
                    bad = i
                    why = 2
                    break
                m = (i % PACKET) * PACKET + i // PACKET          # .bundlx is column-major
                offsets[m] = off + 4
                sizes[m] = <uint32_t>size
            k += 1
    free(win)
    if rc < 0:
        raise OSError(-rc, f"{name}: cannot read")
    if bad >= 0:
        where = f"tile at row {bad % PACKET}, column {bad // PACKET} of the bundle"
        if why == 2:
            raise BundleError(f"{name}: {where} has size {size} at offset {raw[bad]}, past the end of the "
                              f".bundle ({length} bytes)")
        raise BundleError(f"{name}: the file ends before the size prefix of the {where}; "
                          "it changed while being read")
    return offsets_arr, sizes_arr


def pread_checked(int fd, uint64_t offset, Py_ssize_t n, tuple fid):
    """``n`` bytes at ``offset`` of the open file ``fd`` and whether the file is still the version
    ``fid`` = (device, inode, size, mtime_ns, ctime_ns) after the read: ``(bytes or None, current)``. None
    when the file ended first. The read and the fstat run in C without the GIL (the tile route's
    per-read validation costs one fstat, no Python objects)."""
    if fd < 0:
        raise ValueError("fd must be an open file descriptor")
    if n < 0 or n > MAX_TILE_SIZE or offset > MAX_FILE:
        raise ValueError(f"{n} bytes at offset {offset} is out of range")
    if len(fid) != 5:
        raise ValueError("fid must be (device, inode, size, mtime_ns, ctime_ns)")
    cdef uint64_t dev = fid[0], ino = fid[1], size = fid[2]
    cdef int64_t mtime = fid[3], ctime = fid[4]
    data = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(data)
    cdef int rc, frc
    cdef struct_stat st
    with nogil:
        rc = _pread_full(fd, dst, <uint64_t>n, offset)
        frc = fstat(fd, &st)
    if rc < 0:
        raise OSError(-rc, "cannot read")
    if frc != 0:
        raise OSError(errno, "cannot fstat")
    current = (<uint64_t>st.st_dev == dev and <uint64_t>st.st_ino == ino and <uint64_t>st.st_size == size
               and <int64_t>st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec == mtime
               and <int64_t>st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec == ctime)
    return (data if rc == 0 else None), current

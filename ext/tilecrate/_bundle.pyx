# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compact bundle indexes (V1 and V2) parsed into one model, with every offset checked.

The model, shared by both formats: two arrays of 16 384 entries in row-major order
(``i = 128 * (row % 128) + (col % 128)``), ``offsets`` (uint64, absolute offset of the first tile
byte inside the bundle) and ``sizes`` (uint32, 0 = no tile). Every entry with a size is proven to
lie inside the bundle before it is returned, so callers can slice without further checks.

Bounds checks are off for this module: each function checks lengths up front, then loops.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from tilecrate.errors import BundleError

cnp.import_array()

cdef enum:
    N = 16384
    PACKET = 128
cdef uint64_t OFFSET_MASK = (<uint64_t>1 << 40) - 1

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

# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Copy plans for output bundles: which byte ranges land where, the output size, header and index.

An output bundle is the concatenation of *segments*, each either a byte range of the source
bundle (kind 0) or of the plan's own ``aux`` buffer (kind 1: the header, the index, and any size
prefix that the source does not already hold right before its tile). Tiles are written in source
file order so that tiles stored back to back in the source (the usual case) become one range;
every tile keeps its 4-byte size prefix (V1 records, V2 legacy prefix).

Every offset and size is checked against the source length before the plan is made, so a writer
may slice the source with the segments without further checks. Bounds checks are off: the
functions check lengths up front, then loop.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from posix.mman cimport MADV_DONTNEED, madvise
from posix.unistd cimport sysconf, _SC_PAGESIZE

from tilecrate.errors import BundleError

cnp.import_array()

cdef enum:
    N = 16384
    PACKET = 128

V2_HEADER_SIZE = 64
V2_DATA_START = 64 + N * 8            # 131136
V1_HEADER_SIZE = 60
V1_DATA_START = 60 + N * 4            # 65596
BUNDLX_SIZE = 16 + N * 5 + 16         # 81952
cdef enum:
    K_SOURCE = 0
    K_AUX = 1
SEG_SOURCE = K_SOURCE
SEG_AUX = K_AUX
cdef uint64_t MAX_TILE = (1 << 24) - 1
cdef uint64_t RELEASE_WINDOW = 8 << 20


cdef inline void drop_range(const uint8_t* lo, const uint8_t* hi) noexcept nogil:
    """Unmap the whole pages inside [lo, hi) of a file-backed shared mapping (they stay in the page cache)."""
    cdef uintptr_t page = <uintptr_t>sysconf(_SC_PAGESIZE)
    cdef uintptr_t a = (<uintptr_t>lo + page - 1) & ~(page - 1)
    cdef uintptr_t b = (<uintptr_t>hi) & ~(page - 1)
    if b > a:
        madvise(<void*>a, b - a, MADV_DONTNEED)
cdef uint64_t MAX_V2_OFFSET = (<uint64_t>1 << 40) - 1


cdef inline void wr_u32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline void wr_u64(uint8_t* p, uint64_t v) noexcept nogil:
    wr_u32(p, <uint32_t>v)
    wr_u32(p + 4, <uint32_t>(v >> 32))


cdef inline void wr_u40(uint8_t* p, uint64_t v) noexcept nogil:
    wr_u32(p, <uint32_t>v)
    p[4] = (v >> 32) & 0xFF


cdef inline uint32_t rd_u32(const uint8_t* p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


def bundle_sizes(const uint32_t[::1] sizes, const uint8_t[:, ::1] mask, int version):
    """(tiles, tile bytes, .bundle bytes, .bundlx bytes) an output bundle will have, from the index alone."""
    if sizes.shape[0] != N or mask.shape[0] != PACKET or mask.shape[1] != PACKET:
        raise ValueError("sizes must have 16384 entries and mask must be 128 x 128")
    cdef const uint8_t* m = &mask[0, 0]
    cdef Py_ssize_t i
    cdef uint64_t tiles = 0, nbytes = 0
    with nogil:
        for i in range(N):
            if m[i] and sizes[i]:
                tiles += 1
                nbytes += sizes[i]
    if tiles == 0:
        return 0, 0, 0, 0
    if version == 1:
        return tiles, nbytes, V1_DATA_START + 4 * tiles + nbytes, BUNDLX_SIZE
    return tiles, nbytes, V2_DATA_START + 4 * tiles + nbytes, 0


def make_plan(const uint8_t[::1] src, const uint64_t[::1] offsets, const uint32_t[::1] sizes,
              const uint8_t[:, ::1] mask, int version, long row0, long col0, str name="bundle",
              bint release_pages=False):
    """Plan one output bundle from a source bundle's bytes, index and a 128 x 128 selection mask.

    ``release_pages`` (only for a read-only, file-backed shared mmap) unmaps the source pages
    behind the scan as it goes, so planning a huge bundle does not grow the process's RSS.

    Returns ``(aux, segments, size, tiles, tile_bytes, bundlx)``: ``aux`` a bytearray, ``segments``
    an int64 array of (kind, offset, length) rows, ``size`` the output .bundle bytes, ``bundlx``
    the V1 index file (bytes) or None for V2.
    """
    if offsets.shape[0] != N or sizes.shape[0] != N:
        raise ValueError("offsets and sizes must have 16384 entries")
    if mask.shape[0] != PACKET or mask.shape[1] != PACKET:
        raise ValueError("mask must be 128 x 128")
    if version not in (1, 2):
        raise ValueError("version must be 1 or 2")
    cdef uint64_t length = <uint64_t>src.shape[0]
    cdef const uint8_t* m = &mask[0, 0]
    cdef const uint8_t* s = &src[0] if length > 0 else NULL
    cdef Py_ssize_t i, k, n = 0, bad = -1
    cdef uint64_t tile_bytes = 0, max_size = 0, sz, off
    sel_arr = np.empty(N, dtype=np.int64)
    cdef int64_t[::1] sel = sel_arr
    with nogil:
        for i in range(N):
            if m[i] and sizes[i]:
                sz = sizes[i]
                off = offsets[i]
                if off > length or sz > length - off or sz > MAX_TILE:
                    bad = i
                    break
                sel[n] = i
                n += 1
                tile_bytes += sz
                if sz > max_size:
                    max_size = sz
    if bad >= 0:
        raise BundleError(
            f"{name}: tile at row {bad // PACKET}, column {bad % PACKET} of the bundle has offset "
            f"{offsets[bad]} and size {sizes[bad]}, outside the bundle ({length} bytes) or over 16 MiB"
        )
    # source file order: tiles stored back to back become one range
    order_arr = sel_arr[:n][np.argsort(np.asarray(offsets)[sel_arr[:n]], kind="stable")]
    cdef int64_t[::1] order = order_arr
    cdef uint64_t data_start = V2_DATA_START if version == 2 else V1_DATA_START
    cdef uint64_t total = data_start + 4 * <uint64_t>n + tile_bytes
    if version == 2 and total - 4 > MAX_V2_OFFSET:
        raise BundleError(f"{name}: the output bundle would exceed the 1 TiB a compact V2 offset can address")
    # aux: header (+ index for V2, + zero table for V1) and room for one prefix per tile
    aux = bytearray(data_start + 4 * n)
    cdef uint8_t[::1] a = aux
    cdef uint8_t* ap = &a[0]
    bundlx = None
    cdef uint8_t[::1] bx
    cdef uint8_t* bxp = NULL
    if version == 1:
        bundlx = bytearray(BUNDLX_SIZE)
        bx = bundlx
        bxp = &bx[0]
    segs_arr = np.empty((2 * n + 1, 3), dtype=np.int64)
    cdef int64_t[:, ::1] segs = segs_arr
    cdef Py_ssize_t nseg = 0, j
    cdef uint64_t pos = data_start, aux_end = data_start, src_off, seg_len, dropped = 0
    cdef int64_t kind
    cdef bint prefixed
    with nogil:
        # header
        if version == 2:
            wr_u32(ap, 3)
            wr_u32(ap + 4, N)
            wr_u32(ap + 8, <uint32_t>max_size)
            wr_u32(ap + 12, 5)
            wr_u64(ap + 16, 0)
            wr_u64(ap + 24, total)
            wr_u64(ap + 32, 40)
            wr_u32(ap + 40, 20 + N * 8)
            wr_u32(ap + 44, 3)
            wr_u32(ap + 48, 16)
            wr_u32(ap + 52, N)
            wr_u32(ap + 56, 5)
            wr_u32(ap + 60, N * 8)
            # empty cells as ArcGIS writes them: offset 4, size 0
            for i in range(N):
                wr_u64(ap + 64 + 8 * i, 4)
        else:
            wr_u32(ap, 3)
            wr_u32(ap + 4, N)
            wr_u32(ap + 8, <uint32_t>max_size)
            wr_u32(ap + 12, 5)
            wr_u64(ap + 16, 4 * <uint64_t>n)
            wr_u64(ap + 24, total)
            wr_u64(ap + 32, 40)
            wr_u32(ap + 40, 16)
            wr_u32(ap + 44, <uint32_t>row0)
            wr_u32(ap + 48, <uint32_t>(row0 + PACKET - 1))
            wr_u32(ap + 52, <uint32_t>col0)
            wr_u32(ap + 56, <uint32_t>(col0 + PACKET - 1))
            # the zero table is already zero; .bundlx: header, empty cells into the zero table, footer
            wr_u32(bxp, 3)
            wr_u32(bxp + 4, 16)
            wr_u32(bxp + 8, N)
            wr_u32(bxp + 12, 5)
            for i in range(N):
                wr_u40(bxp + 16 + 5 * i, 60 + 4 * <uint64_t>i)
            wr_u32(bxp + 16 + 5 * N, 0)
            wr_u32(bxp + 20 + 5 * N, 16)
            wr_u32(bxp + 24 + 5 * N, 16)
            wr_u32(bxp + 28 + 5 * N, 0)
        segs[0, 0] = K_AUX
        segs[0, 1] = 0
        segs[0, 2] = <int64_t>data_start
        nseg = 1
        for k in range(n):
            i = order[k]
            sz = sizes[i]
            off = offsets[i]
            # index entry for this tile
            if version == 2:
                wr_u64(ap + 64 + 8 * i, (pos + 4) | (sz << 40))
            else:
                j = (i % PACKET) * PACKET + i // PACKET      # .bundlx is column-major
                wr_u40(bxp + 16 + 5 * j, pos)
            if release_pages and off > dropped + RELEASE_WINDOW:
                drop_range(s + dropped, s + off - 4)
                dropped = off - 4
            prefixed = off >= 4 and rd_u32(s + off - 4) == sz
            if prefixed:
                kind = K_SOURCE
                src_off = off - 4
                seg_len = sz + 4
            else:
                wr_u32(ap + aux_end, <uint32_t>sz)
                kind = K_AUX
                src_off = aux_end
                seg_len = 4
                aux_end += 4
            # append, merging with the previous segment when contiguous in the same buffer
            if segs[nseg - 1, 0] == kind and <uint64_t>(segs[nseg - 1, 1] + segs[nseg - 1, 2]) == src_off:
                segs[nseg - 1, 2] += <int64_t>seg_len
            else:
                segs[nseg, 0] = kind
                segs[nseg, 1] = <int64_t>src_off
                segs[nseg, 2] = <int64_t>seg_len
                nseg += 1
            if not prefixed:
                if segs[nseg - 1, 0] == K_SOURCE and <uint64_t>(segs[nseg - 1, 1] + segs[nseg - 1, 2]) == off:
                    segs[nseg - 1, 2] += <int64_t>sz
                else:
                    segs[nseg, 0] = K_SOURCE
                    segs[nseg, 1] = <int64_t>off
                    segs[nseg, 2] = <int64_t>sz
                    nseg += 1
            pos += 4 + sz
        if release_pages and length > dropped:
            drop_range(s + dropped, s + length)
    aux = aux[:aux_end]     # a copy: the buffer is still exported to the memoryview
    return aux, segs_arr[:nseg].copy(), total, n, tile_bytes, (bytes(bundlx) if bundlx is not None else None)


def pack_tiles(list tiles):
    """Tiles (row-major list of bytes) packed as size-prefixed records: (buffer, offsets, sizes of the packed)."""
    cdef Py_ssize_t n = len(tiles), k
    cdef uint64_t total = 0
    for t in tiles:
        total += 4 + len(t)
    buf = bytearray(total)
    offs = np.empty(n, dtype=np.uint64)
    lens = np.empty(n, dtype=np.uint32)
    cdef uint64_t pos = 0
    cdef uint8_t[::1] b = buf
    for k in range(n):
        t = tiles[k]
        if len(t) > MAX_TILE:
            raise BundleError(f"a re-encoded tile is {len(t)} bytes, over the 16 MiB a compact bundle can hold")
        wr_u32(&b[pos], <uint32_t>len(t))
        buf[pos + 4:pos + 4 + len(t)] = t
        offs[k] = pos + 4
        lens[k] = len(t)
        pos += 4 + len(t)
    return buf, offs, lens

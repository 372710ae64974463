# cython: cdivision=True
"""Copy plans for output bundles: which byte ranges land where, the output size, header and index.

An output bundle is its header block (`aux`: V2 header + index, or V1 header + zero table)
followed by *runs*. Tiles are written in source file order; a run is a sequence of tiles stored
back to back in the source with exactly 4 bytes between them (where the size prefix sits), so a
run is copied with one read of the source range ``[first tile, last tile end)``. The writer reads
a run into a buffer 4 bytes in, then `fill_prefixes` writes every tile's 4-byte size prefix into
the buffer (over the 4 bytes the source had there, right or wrong: the spec calls the V2 prefix
legacy and some writers leave garbage). Planning reads only the index, never tile bytes.

Every offset and size is checked against the source length before a plan is made, so a writer
may read the runs without further checks. Every public function validates its arguments (shapes,
version, positions, run ranges, buffer sizes); bounds checks are off only in the functions whose
loops run after such a check proved every index in range (marked with the decorators).
"""
import numpy as np
cimport cython
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

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
cdef uint64_t MAX_TILE = (1 << 24) - 1
cdef uint64_t MAX_V2_OFFSET = (<uint64_t>1 << 40) - 1
MAX_TILE_SIZE = MAX_TILE
cdef uint64_t MAX_LENGTH = (<uint64_t>1 << 62)
MAX_POSITION = (1 << 32) - PACKET       # V1 headers store the bundle's rows and columns as uint32


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


@cython.boundscheck(False)
@cython.wraparound(False)
def bundle_sizes(const uint32_t[::1] sizes, const uint8_t[:, ::1] mask, int version):
    """(tiles, tile bytes, .bundle bytes, .bundlx bytes) an output bundle will have, from the index alone."""
    if sizes.shape[0] != N or mask.shape[0] != PACKET or mask.shape[1] != PACKET:
        raise ValueError("sizes must have 16384 entries and mask must be 128 x 128")
    if version not in (1, 2):
        raise ValueError("version must be 1 or 2")
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


@cython.boundscheck(False)
@cython.wraparound(False)
def make_plan(uint64_t length, const uint64_t[::1] offsets, const uint32_t[::1] sizes,
              const uint8_t[:, ::1] mask, int version, long row0, long col0, str name="bundle",
              uint64_t max_run=8 << 20):
    """Plan one output bundle from a source bundle's length, index and a 128 x 128 selection mask.

    Returns ``(aux, runs, tile_offsets, tile_sizes, size, tiles, tile_bytes, bundlx)``: ``aux`` the
    header block (bytearray); ``runs`` int64 rows (source offset, source length, first tile,
    tile count), each at most ``max_run`` output bytes unless one tile is larger; the selected
    tiles' source offsets and sizes in writing order; ``size`` the output .bundle bytes;
    ``bundlx`` the V1 index file (bytes) or None for V2.
    """
    if offsets.shape[0] != N or sizes.shape[0] != N:
        raise ValueError("offsets and sizes must have 16384 entries")
    if mask.shape[0] != PACKET or mask.shape[1] != PACKET:
        raise ValueError("mask must be 128 x 128")
    if version not in (1, 2):
        raise ValueError("version must be 1 or 2")
    if length > MAX_LENGTH:
        raise ValueError(f"source length {length} is out of range")
    if not (0 <= row0 <= MAX_POSITION and 0 <= col0 <= MAX_POSITION) or row0 % PACKET or col0 % PACKET:
        raise ValueError(f"bundle position ({row0}, {col0}) is not a multiple of 128 in [0, 2^32 - 128]")
    if max_run == 0:
        raise ValueError("max_run must be at least 1")
    cdef const uint8_t* m = &mask[0, 0]
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
    # source file order: tiles stored back to back become one run
    order_arr = sel_arr[:n][np.argsort(np.asarray(offsets)[sel_arr[:n]], kind="stable")]
    cdef int64_t[::1] order = order_arr
    cdef uint64_t data_start = V2_DATA_START if version == 2 else V1_DATA_START
    cdef uint64_t total = data_start + 4 * <uint64_t>n + tile_bytes
    if version == 2 and total - 4 > MAX_V2_OFFSET:
        raise BundleError(f"{name}: the output bundle would exceed the 1 TiB a compact V2 offset can address")
    aux = bytearray(data_start)
    cdef uint8_t[::1] a = aux
    cdef uint8_t* ap = &a[0]
    bundlx = None
    cdef uint8_t[::1] bx
    cdef uint8_t* bxp = NULL
    if version == 1:
        bundlx = bytearray(BUNDLX_SIZE)
        bx = bundlx
        bxp = &bx[0]
    toff_arr = np.empty(n, dtype=np.uint64)
    tsize_arr = np.empty(n, dtype=np.uint32)
    runs_arr = np.empty((n, 4), dtype=np.int64)
    cdef uint64_t[::1] toff = toff_arr
    cdef uint32_t[::1] tsize = tsize_arr
    cdef int64_t[:, ::1] runs = runs_arr
    cdef Py_ssize_t nrun = 0, j
    cdef uint64_t pos = data_start, run_end = 0, run_out = 0
    with nogil:
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
        for k in range(n):
            i = order[k]
            sz = sizes[i]
            off = offsets[i]
            toff[k] = off
            tsize[k] = <uint32_t>sz
            if version == 2:
                wr_u64(ap + 64 + 8 * i, (pos + 4) | (sz << 40))
            else:
                j = (i % PACKET) * PACKET + i // PACKET      # .bundlx is column-major
                wr_u40(bxp + 16 + 5 * j, pos)
            # extend the current run when this tile follows the previous one 4 bytes later
            if nrun > 0 and off == run_end + 4 and run_out + 4 + sz <= max_run:
                runs[nrun - 1, 1] += <int64_t>(4 + sz)
                runs[nrun - 1, 3] += 1
                run_out += 4 + sz
            else:
                runs[nrun, 0] = <int64_t>off
                runs[nrun, 1] = <int64_t>sz
                runs[nrun, 2] = k
                runs[nrun, 3] = 1
                nrun += 1
                run_out = 4 + sz
            run_end = off + sz
            pos += 4 + sz
    return (aux, runs_arr[:nrun].copy(), toff_arr, tsize_arr, total, n, tile_bytes,
            (bytes(bundlx) if bundlx is not None else None))


@cython.boundscheck(False)
@cython.wraparound(False)
def fill_prefixes(uint8_t[::1] buf, const uint64_t[::1] tile_offsets, const uint32_t[::1] tile_sizes,
                  Py_ssize_t first, Py_ssize_t count):
    """Write the size prefixes of a run into `buf`, which holds 4 spare bytes then the run's source bytes."""
    # count > shape - first, not first + count > shape: the sum of two huge values wraps negative
    if (first < 0 or count < 0 or first > tile_offsets.shape[0] or count > tile_offsets.shape[0] - first
            or tile_sizes.shape[0] != tile_offsets.shape[0]):
        raise ValueError("run outside the plan's tiles")
    if count == 0:
        return
    if buf.shape[0] < 4:
        raise ValueError(f"a buffer of {buf.shape[0]} bytes cannot hold a size prefix (4 bytes)")
    cdef uint64_t base = tile_offsets[first]
    cdef uint64_t last = tile_offsets[first + count - 1] - base + tile_sizes[first + count - 1] + 4
    if last > <uint64_t>buf.shape[0]:
        raise ValueError(f"buffer of {buf.shape[0]} bytes is too small for a run of {last}")
    # every tile, not only the last: offsets that go back (or jump past the end) must not write
    # outside the buffer (off - base wraps to a huge value when off < base)
    cdef Py_ssize_t k, bad = -1, back = -1
    cdef uint64_t cap = <uint64_t>buf.shape[0], rel
    with nogil:
        for k in range(first, first + count):
            if k > first and tile_offsets[k] < tile_offsets[k - 1]:
                back = k
                break
            rel = tile_offsets[k] - base
            if rel > cap - 4 or tile_sizes[k] > cap - 4 - rel:
                bad = k
                break
    if back >= 0:
        raise ValueError(f"tile {back - first} of the run (offset {tile_offsets[back]}) lies before the tile "
                         f"ahead of it (offset {tile_offsets[back - 1]}): a run's offsets must not go backwards")
    if bad >= 0:
        raise ValueError(f"tile {bad - first} of the run (offset {tile_offsets[bad]}, {tile_sizes[bad]} bytes) "
                         f"lies outside the {cap}-byte buffer of a run starting at {base}")
    cdef uint8_t* b = &buf[0]
    with nogil:
        for k in range(first, first + count):
            wr_u32(b + (tile_offsets[k] - base), tile_sizes[k])


def pack_tiles(list tiles):
    """Tiles (row-major list of bytes) packed as size-prefixed records: (buffer, offsets, sizes of the packed)."""
    cdef Py_ssize_t n = len(tiles), k
    cdef uint64_t total = 0
    for t in tiles:
        if not isinstance(t, (bytes, bytearray)):
            raise TypeError(f"tiles must be bytes, not {type(t).__name__}")
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

# cython: cdivision=True
"""Batch JPEG re-encoding over libjpeg-turbo's libjpeg API, GIL released, spread over OpenMP threads.

Two methods, both per tile, both with per-tile error handling:
  * METHOD_PIXEL: decode to the source colour space (no colour conversion either way), encode at the
    requested quality with the source's chroma sampling;
  * METHOD_DCT: read the quantized DCT coefficients, requantize each component to
    max(source step, requested step) with dead-zone rounding (an integer reciprocal multiply, no
    divide; with 8-bit steps a whole block at a time in 16-bit lanes, AVX2 where the CPU has it
    (checked once at import) else SSE2, a block whose coefficients are too large for them taking
    the 64-bit scalar rule), write the coefficients
    (no IDCT, colour conversion or FDCT).
Both write optimized Huffman tables and keep ICC profiles (APP2); other APPn/COM segments are
dropped (they are size, not pixels). The Huffman statistics are counted by our own bitmask walk
over each block's nonzero coefficients in zigzag order (the mask permuted from natural order by
table; fused with requantization on the DCT path, swapped in for libjpeg's encode_mcu_gather on the
pixel path); tc_gen_optimal_table builds libjpeg's tables from
them, so the bytes are identical to libjpeg's optimize_coding at a fraction of its cost. Images
larger than the caller's bound (the cache's tile size) are refused right after the header is read.
A tile whose bytes do not start FF D8 FF is left alone; a tile
that libjpeg rejects or warns about (corrupt or truncated data) keeps its original bytes and gets
a message. libjpeg's error_exit and warnings longjmp back to the tile's entry point, so no libjpeg
error can reach exit() or cross a tile boundary. One decompress + compress struct per thread,
reused across tiles.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport calloc, free
from cython.parallel cimport prange
cimport openmp

import time

import numpy as np
cimport numpy as cnp

cnp.import_array()
tc_init_zigzag()

cdef extern from "tc_jpeg.h":
    enum:
        TC_MSG
        TC_OK
        TC_NOT_JPEG
        TC_FAILED
        TC_NOT_SMALLER
        TC_PIXEL
        TC_DCT
        TC_MAX_SIDE
    ctypedef struct tc_ctx:
        pass
    ctypedef struct tc_tables:
        pass
    int tc_ctx_init(tc_ctx *x) nogil
    void tc_ctx_free(tc_ctx *x) nogil
    void tc_init_zigzag() nogil
    void tc_make_tables(tc_tables *t, int quality, int roff, int optimize, unsigned int max_w,
                        unsigned int max_h) nogil
    int tc_recode(tc_ctx *x, const unsigned char *src, size_t len, int method, int quality,
                  const tc_tables *t, int allow_larger, unsigned char **out, size_t *outlen,
                  char *msg) nogil
    void tc_requant_selftest(int roff, uint32_t s_max, uint32_t t_max, uint32_t a_max, uint64_t out[3]) nogil
    void tc_requant_selftest16(int roff, uint32_t s_max, uint32_t t_max, uint32_t a_max, uint64_t out[3]) nogil
    int tc_simd_level(int want) nogil
    int tc_compare_tables(tc_ctx *x, const long *freq, unsigned char out[4][257]) nogil


OK = TC_OK                    # re-encoded: new bytes returned
NOT_JPEG = TC_NOT_JPEG        # bytes do not start FF D8 FF: left alone
FAILED = TC_FAILED            # libjpeg rejected or warned, or the image is too large: original bytes kept, message given
NOT_SMALLER = TC_NOT_SMALLER  # re-encoding did not shrink the tile: original bytes kept
CANCELLED = 4                 # not attempted: the batch was cancelled first (new bytes None)
METHODS = {"pixel": TC_PIXEL, "dct": TC_DCT}
MAX_SIDE = TC_MAX_SIDE        # the largest width or height ever accepted
DEFAULT_DEADZONE = 0.49609375  # 127/256: round to nearest, exact halves toward zero; recompress.py says why
CANCEL_SLICE = 0.05           # seconds of work between two looks at the cancel flag
# libgomp ends the process (no error to catch) when it cannot create a thread, and each thread gets
# a codec context (~17 KB, touched at creation): a larger count is refused before any of that
MAX_THREADS = 1024


def max_threads() -> int:
    """The OpenMP thread count a batch uses when threads=0."""
    return openmp.omp_get_max_threads()


def _index_array(values, dtype, str name):
    """values as a contiguous 1-D array of dtype, refusing what would wrap or truncate on the way."""
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, not {a.ndim}-D")
    if a.size == 0:
        return np.zeros(0, dtype=dtype)
    if a.dtype.kind not in "ui":
        raise ValueError(f"{name} must be integers, not {a.dtype}")
    if a.dtype.kind == "i" and int(a.min()) < 0:
        raise ValueError(f"{name} must not be negative")
    if int(a.max()) > np.iinfo(dtype).max:
        raise ValueError(f"{name} must fit in {np.dtype(dtype).name}")
    return np.ascontiguousarray(a, dtype=dtype)


def _cancel_probe(cancel):
    """A no-argument callable telling whether to stop: from an Event-like (is_set) or a callable."""
    if cancel is None:
        return None
    probe = getattr(cancel, "is_set", None)
    if callable(probe):
        return probe
    if callable(cancel):
        return cancel
    raise TypeError("cancel must be an object with is_set() (threading.Event) or a callable returning bool")


cdef void _run(tc_ctx *ctxs, int nt, Py_ssize_t start, Py_ssize_t stop, const uint8_t *base,
               const uint64_t *offs, const uint32_t *lens, int m, int q, const tc_tables *tables, int larger,
               signed char *status, unsigned char **outs, size_t *outlens, char *msgs) noexcept nogil:
    # raw pointers: recode checked every offset + length against the buffer and every array's length
    cdef Py_ssize_t i
    cdef tc_ctx *cx
    for i in prange(start, stop, num_threads=nt, schedule="dynamic", chunksize=1):
        cx = &ctxs[openmp.omp_get_thread_num()]
        status[i] = <signed char>tc_recode(cx, base + offs[i], lens[i], m, q, tables, larger,
                                           &outs[i], &outlens[i], msgs + i * TC_MSG)


def recode(buf, offsets, sizes, int quality, str method="dct", int threads=0,
           double deadzone=DEFAULT_DEADZONE, bint allow_larger=False, int optimize=2,
           int max_width=0, int max_height=0, cancel=None):
    """Re-encode tiles buf[offsets[i]:offsets[i]+sizes[i]] -> (list of bytes|None, status int8[n], {i: message}).

    None means "keep the original bytes" (status says why). The GIL is released while tiles are
    coded, spread over `threads` OpenMP threads (0 = all). optimize: 0 = standard Huffman tables,
    1 = libjpeg's optimize pass, 2 = optimal tables from statistics gathered during requantization
    (byte-identical to 1, much cheaper: fused with requantization on the DCT path, a bitmask
    counter in place of libjpeg's encode_mcu_gather on the pixel path). max_width/max_height
    (0 = MAX_SIDE) refuse larger images per tile (FAILED, with a message) before libjpeg allocates
    for them: pass the cache's tile size. cancel (a threading.Event or a callable) is looked at
    between slices of about CANCEL_SLICE seconds of work; once it is set, tiles not yet started
    get CANCELLED and None.
    """
    if optimize not in (0, 1, 2):
        raise ValueError("optimize must be 0, 1 or 2")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use 'dct' or 'pixel'")
    if not (1 <= quality <= 100):
        raise ValueError(f"quality must be 1-100, not {quality}")
    if not (0.0 <= deadzone <= 0.5):
        raise ValueError(f"deadzone rounding offset must be in [0, 0.5], not {deadzone}")
    if not (0 <= threads <= MAX_THREADS):
        raise ValueError(f"threads must be 0 (all cores) to {MAX_THREADS}, not {threads}")
    if not (0 <= max_width <= TC_MAX_SIDE and 0 <= max_height <= TC_MAX_SIDE):
        raise ValueError(f"max_width and max_height must be 0-{TC_MAX_SIDE}, not {max_width}x{max_height}")
    probe = _cancel_probe(cancel)
    cdef const uint8_t[::1] data = buf
    cdef const uint64_t[::1] offs = _index_array(offsets, np.uint64, "offsets")
    cdef const uint32_t[::1] lens = _index_array(sizes, np.uint32, "sizes")
    cdef Py_ssize_t n = offs.shape[0], i
    if lens.shape[0] != n:
        raise ValueError("offsets and sizes differ in length")
    cdef uint64_t total = <uint64_t>data.shape[0]
    for i in range(n):
        if offs[i] > total or <uint64_t>lens[i] > total - offs[i]:
            raise ValueError(f"tile {i}: bytes {offs[i]}+{lens[i]} lie outside the {total}-byte buffer")
    status_arr = np.zeros(n, dtype=np.int8)
    cdef signed char[::1] status = status_arr
    if n == 0:
        return [], status_arr, {}

    cdef int m = METHODS[method]
    cdef int nt = threads if threads > 0 else openmp.omp_get_max_threads()
    if nt > n:
        nt = <int>n
    if nt < 1:
        nt = 1
    cdef tc_tables tables
    tc_make_tables(&tables, quality, <int>(deadzone * 256 + 0.5), optimize, <unsigned int>max_width,
                   <unsigned int>max_height)
    cdef int q = quality, larger = allow_larger
    cdef tc_ctx *ctxs = <tc_ctx *>calloc(nt, sizeof(tc_ctx))
    cdef unsigned char **outs = <unsigned char **>calloc(n, sizeof(unsigned char *))
    cdef size_t *outlens = <size_t *>calloc(n, sizeof(size_t))
    cdef char *msgs = <char *>calloc(n, TC_MSG)
    cdef const uint8_t *base = &data[0] if data.shape[0] > 0 else NULL
    cdef const uint64_t *po = &offs[0]
    cdef const uint32_t *pl = &lens[0]
    cdef signed char *ps = &status[0]
    cdef int t
    cdef Py_ssize_t start = 0, stop, step
    if ctxs == NULL or outs == NULL or outlens == NULL or msgs == NULL:
        free(ctxs); free(outs); free(outlens); free(msgs)
        raise MemoryError("cannot allocate the re-encoding batch")
    result = [None] * n
    messages = {}
    try:
        for t in range(nt):
            if not tc_ctx_init(&ctxs[t]):
                raise MemoryError("cannot create libjpeg codecs")
        # without a cancel flag, one slice; with one, slices sized from the rate so far so that a
        # cancel waits about CANCEL_SLICE s (a first slice of one tile per thread measures it)
        step = n if probe is None else nt
        while start < n:
            if probe is not None and probe():
                status_arr[start:] = CANCELLED
                break
            stop = min(n, start + step)
            began = time.perf_counter()
            with nogil:
                _run(ctxs, nt, start, stop, base, po, pl, m, q, &tables, larger, ps, outs, outlens, msgs)
            took = time.perf_counter() - began
            if probe is not None:
                per_tile = max(took, 1e-6) / (stop - start)
                step = max(nt, min(n, int(CANCEL_SLICE / per_tile)))
            start = stop
        for i in range(n):
            if status[i] == TC_OK:
                result[i] = PyBytes_FromStringAndSize(<char *>outs[i], <Py_ssize_t>outlens[i])
                free(outs[i])
                outs[i] = NULL
            elif status[i] == TC_FAILED:
                messages[i] = (msgs + i * TC_MSG)[:TC_MSG].split(b"\0", 1)[0].decode("ascii", "replace")
    finally:
        for i in range(n):
            free(outs[i])
        for t in range(nt):
            tc_ctx_free(&ctxs[t])
        free(ctxs); free(outs); free(outlens); free(msgs)
    return result, status_arr, messages


def _check_selftest_args(int roff, int s_max, int t_max, int a_max):
    """Raise ValueError unless the requantization self-tests' ranges are valid."""
    if not (0 <= roff <= 255):
        raise ValueError(f"roff must be 0-255, not {roff}")
    if not (1 <= s_max <= 65535 and 1 <= t_max <= 65535 and 0 <= a_max <= 32768):
        raise ValueError("s_max and t_max must be 1-65535, a_max 0-32768")


def _requant_selftest(int roff, int s_max, int t_max, int a_max):
    """(reciprocal vs exact, doubles vs exact, cases): disagreements of the requantization rules over
    every source step 1..s_max, target step s..max(s, t_max) and magnitude 0..a_max (a test hook)."""
    _check_selftest_args(roff, s_max, t_max, a_max)
    cdef uint64_t out[3]
    with nogil:
        tc_requant_selftest(roff, <uint32_t>s_max, <uint32_t>t_max, <uint32_t>a_max, out)
    return int(out[0]), int(out[1]), int(out[2])


def _simd_level(int want=0) -> int:
    """The lanes the DCT path requantizes in: 2 = AVX2, 1 = SSE2. want=1 forces SSE2, want=2 asks for AVX2
    (granted where the CPU has it), 0 only reports (a test hook: not for use while a batch runs)."""
    if want not in (0, 1, 2):
        raise ValueError("want must be 0, 1 or 2")
    return tc_simd_level(want)


def _requant_selftest16(int roff, int s_max, int t_max, int a_max):
    """(disagreements, cases in lanes, cases left to the scalar rule): the 16-bit SIMD requantizer against
    the exact rule over every source step 1..s_max, target step s..max(s, t_max) and both signs of every
    magnitude 0..a_max; with AVX2 in use (_simd_level), its 16 lanes must also agree with the SSE2 ones
    (a test hook; x86 builds without SSE2 report no cases)."""
    _check_selftest_args(roff, s_max, t_max, a_max)
    cdef uint64_t out[3]
    with nogil:
        tc_requant_selftest16(roff, <uint32_t>s_max, <uint32_t>t_max, <uint32_t>a_max, out)
    return int(out[0]), int(out[1]), int(out[2])


def _optimal_tables(freq):
    """((bits, huffval) ours, (bits, huffval) libjpeg's) for 257 symbol counts (a test hook)."""
    f = np.asarray(freq)
    if f.shape != (257,) or f.dtype.kind not in "ui":
        raise ValueError("freq must be 257 integer counts")
    # the total in Python ints: numpy's int64 sum wraps (4 * 2**62 is 0) and C's `total` would too
    if int(f.min()) < 0 or sum(int(v) for v in f.tolist()) >= 1000000000:
        raise ValueError("freq counts must be >= 0 and total under 1e9")
    cdef long cf[257]
    cdef unsigned char out[4][257]
    cdef int k, rc
    for k in range(257):
        cf[k] = <long>int(f[k])
    cdef tc_ctx *cx = <tc_ctx *>calloc(1, sizeof(tc_ctx))
    if cx == NULL:
        raise MemoryError("cannot allocate a codec")
    try:
        if not tc_ctx_init(cx):
            raise MemoryError("cannot create libjpeg codecs")
        rc = tc_compare_tables(cx, cf, out)
    finally:
        tc_ctx_free(cx)
        free(cx)
    if rc <= 0:
        raise ValueError("ours refused the counts" if rc == 0 else "libjpeg refused the counts")
    ours = (bytes(out[0][:17]), bytes(out[1][:256]))
    lib = (bytes(out[2][:17]), bytes(out[3][:256]))
    return ours, lib

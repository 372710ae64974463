# cython: cdivision=True
"""Exact deduplication of tile contents for the PMTiles writer, with flat memory.

A distinct tile is known by its key (length << 32 | CRC-32, isal's: 7x zlib's speed here) and the
offset of its first copy in the data section: an open-addressing table of two arrays (16 bytes a
distinct tile, grown by doubling). A key seen before is confirmed by comparing the bytes (memcmp)
against this bundle's new tiles, a bounded cache of tiles that recurred, or the copy read back from
the data file, so two different tiles sharing a key are both stored (`_other`). A CRC is easy to
forge: past GROUP_COMPARES different tiles of one key, further tiles of that key are told apart by
a 128-bit BLAKE2b digest, so hostile input cannot make the comparisons quadratic.

The per-tile loop runs here because it is the writer's cost on many small tiles: in Python it
took about 1 us a tile (key, dict, compare).
"""
import os
from hashlib import blake2b

from isal.isal_zlib import crc32 as _crc32

import numpy as np
cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp

cnp.import_array()

ctypedef uint32_t (*crc_fn)(uint32_t, const unsigned char*, uint64_t) noexcept nogil


cdef crc_fn _isal_crc():
    """isal's own crc32_gzip_refl, which its Python module exports: the per-tile Python call cost more than
    the CRC of a small tile. NULL (the Python call then) unless it gives the module's CRC on test bytes."""
    try:
        import ctypes

        import isal.isal_zlib as module
        address = ctypes.cast(ctypes.CDLL(module.__file__).crc32_gzip_refl, ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return NULL
    if not address:
        return NULL
    cdef crc_fn fn = <crc_fn><size_t>address
    cdef bytes probe = bytes(range(256)) * 5 + b"tilecrate"
    if fn(0, probe, len(probe)) != _crc32(probe) or fn(0, b"", 0) != 0:
        return NULL
    return fn


cdef crc_fn CRC = _isal_crc()

cdef uint64_t MAX_TILE = 0xFFFFFFFF
GROUP_COMPARES = 8                # different tiles of one key compared byte for byte; more: digests


cdef class Dedup:
    """Offsets of tile contents already written to a PMTiles data section (in the file `fd` from `base`)."""

    cdef object _fd
    cdef object _base                   # where the data section starts in the file
    cdef cnp.ndarray _keys_arr          # owns the table; _keys/_offs point into it
    cdef cnp.ndarray _offs_arr
    cdef uint64_t* _keys
    cdef int64_t* _offs
    cdef uint64_t _mask
    cdef Py_ssize_t _used
    cdef dict _more
    cdef dict _hot
    cdef Py_ssize_t _hot_left
    cdef public Py_ssize_t contents

    def __init__(self, int fd, Py_ssize_t hot_bytes=8 << 20, int64_t base=0):
        if fd < 0 or hot_bytes < 0 or base < 0:
            raise ValueError("a file descriptor, a non-negative cache size and data offset are needed")
        self._fd = fd
        self._base = base
        self._keys_arr = np.zeros(1024, dtype=np.uint64)
        self._offs_arr = np.zeros(1024, dtype=np.int64)
        self._keys = <uint64_t*>cnp.PyArray_DATA(self._keys_arr)
        self._offs = <int64_t*>cnp.PyArray_DATA(self._offs_arr)
        self._mask = 1023
        self._used = 0
        self._more = {}
        self._hot = {}
        self._hot_left = hot_bytes
        self.contents = 0

    @property
    def distinct_keys(self) -> int:
        """Keys in the table (distinct (length, CRC-32) pairs written)."""
        return self._used

    cdef int _grow(self) except -1:
        cdef cnp.ndarray old_k = self._keys_arr, old_o = self._offs_arr
        cdef uint64_t* ok = self._keys
        cdef int64_t* oo = self._offs
        cdef Py_ssize_t old_cap = <Py_ssize_t>(self._mask + 1), i
        cdef cnp.ndarray new_k = np.zeros(2 * old_cap, dtype=np.uint64)
        cdef cnp.ndarray new_o = np.zeros(2 * old_cap, dtype=np.int64)
        cdef uint64_t* nk = <uint64_t*>cnp.PyArray_DATA(new_k)
        cdef int64_t* no = <int64_t*>cnp.PyArray_DATA(new_o)
        cdef uint64_t slot, mask = <uint64_t>(2 * old_cap - 1)
        for i in range(old_cap):         # i < old_cap: inside the old arrays; slot & mask: inside the new
            if ok[i] != 0:
                slot = _mix(ok[i]) & mask
                while nk[slot] != 0:
                    slot = (slot + 1) & mask
                nk[slot] = ok[i]
                no[slot] = oo[i]
        self._keys_arr, self._offs_arr, self._keys, self._offs, self._mask = new_k, new_o, nk, no, mask
        return 0

    cdef int64_t _lookup(self, uint64_t key, int64_t fresh) except -1:
        """The offset stored for `key`, or `fresh` after storing it for `key`."""
        if 2 * (self._used + 1) > <Py_ssize_t>(self._mask + 1):
            self._grow()
        # at most half full: the probe ends at an empty slot; every slot is masked into the table
        cdef uint64_t* keys = self._keys
        cdef int64_t* offs = self._offs
        cdef uint64_t slot = _mix(key) & self._mask
        while keys[slot] != 0:
            if keys[slot] == key:
                return offs[slot]
            slot = (slot + 1) & self._mask
        keys[slot] = key
        offs[slot] = fresh
        self._used += 1
        return fresh

    cdef object _bytes_at(self, int64_t at, Py_ssize_t n, dict pending):
        got = pending.get(at) if pending is not None else None
        if got is None:
            got = self._hot.get(at)
        if got is None:
            got = os.pread(self._fd, n, self._base + at)
            if len(got) != n:
                raise OSError(5, "the PMTiles data file is shorter than written")
            if n <= self._hot_left:          # a tile that recurs tends to recur again (sea, blank)
                self._hot[at] = got
                self._hot_left -= n
        return got

    cdef bint _same(self, object prev, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_buffer view
        PyObject_GetBuffer(prev, &view, PyBUF_SIMPLE)
        try:
            return view.len == n and memcmp(view.buf, p, n) == 0
        finally:
            PyBuffer_Release(&view)

    def place(self, list tiles, order, int64_t data_len):
        """(new tiles to append, in order; int64 offsets of the tiles of `order`; the data length after)."""
        cdef cnp.ndarray order_arr = np.ascontiguousarray(order, dtype=np.int64)
        if order_arr.ndim != 1:
            raise ValueError("order must be one-dimensional")
        cdef int64_t[::1] ords = order_arr
        cdef Py_ssize_t n = len(tiles), m = ords.shape[0], i, j, held = 0, fresh = 0
        if data_len < 0:
            raise ValueError("the data length cannot be negative")
        for i in range(m):
            if ords[i] < 0 or ords[i] >= n:
                raise ValueError(f"order names tile {ords[i]} of {n}")
        cdef cnp.ndarray out_arr = np.empty(m, dtype=np.int64)
        cdef int64_t[::1] out = out_arr
        cdef list chunk = []
        # this call's tiles stay acquired until it returns, so a repeat within the call is compared with
        # the first copy's bytes through a pointer (new_at ascending: a binary search), not a dict of objects
        cdef Py_buffer* views = <Py_buffer*>calloc(max(m, 1), sizeof(Py_buffer))
        cdef int64_t* new_at = <int64_t*>malloc(max(m, 1) * sizeof(int64_t))
        cdef Py_ssize_t* new_pos = <Py_ssize_t*>malloc(max(m, 1) * sizeof(Py_ssize_t))
        if views == NULL or new_at == NULL or new_pos == NULL:
            free(views)
            free(new_at)
            free(new_pos)
            raise MemoryError()
        cdef uint64_t key, crc
        cdef int64_t at
        cdef Py_ssize_t size
        cdef const unsigned char* p
        cdef bint same
        try:
            for i in range(m):
                blob = tiles[ords[i]]
                PyObject_GetBuffer(blob, &views[i], PyBUF_SIMPLE)
                held = i + 1
                size = views[i].len
                p = <const unsigned char*>views[i].buf
                if size <= 0 or <uint64_t>size > MAX_TILE:
                    raise ValueError(f"a tile of {size} bytes (1 byte to 4 GiB are stored)")
                crc = CRC(0, p, <uint64_t>size) if CRC != NULL else _crc32(blob)
                key = (<uint64_t>size << 32) | crc
                at = self._lookup(key, data_len)
                if at != data_len:
                    j = _find(new_at, fresh, at)
                    if j >= 0:
                        same = views[new_pos[j]].len == size and memcmp(views[new_pos[j]].buf, p, size) == 0
                    else:
                        same = self._same(self._bytes_at(at, size, None), p, size)
                    if not same:
                        at = self._other(key, size, p, _pending(tiles, ords, new_at, new_pos, fresh), data_len)
                if at == data_len:              # new content
                    chunk.append(blob)
                    new_at[fresh] = at
                    new_pos[fresh] = i
                    fresh += 1
                    data_len += size
                    self.contents += 1
                out[i] = at
        finally:
            for j in range(held):
                PyBuffer_Release(&views[j])
            free(views)
            free(new_at)
            free(new_pos)
        return chunk, out_arr, data_len

    cdef int64_t _other(self, uint64_t key, Py_ssize_t size, const unsigned char* p, dict pending,
                        int64_t data_len) except -1:
        """The offset of a tile whose key an earlier, different tile has (data_len if it is new)."""
        group = self._more.get(key)
        if group is None:
            group = self._more[key] = ([], {})
        others, digests = group
        for at in others:
            if self._same(self._bytes_at(at, size, pending), p, size):
                return at
        if len(others) < GROUP_COMPARES:
            others.append(data_len)
            return data_len
        # a forged or unlucky key: a digest per further tile instead of a compare with each
        return digests.setdefault(blake2b(<const unsigned char[:size]>p, digest_size=16).digest(), data_len)


cdef inline Py_ssize_t _find(const int64_t* sorted_at, Py_ssize_t n, int64_t at) noexcept nogil:
    """The index of `at` in the ascending sorted_at[0:n], or -1."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:                      # lo <= mid < hi <= n: inside the array
        mid = (lo + hi) >> 1
        if sorted_at[mid] < at:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < n and sorted_at[lo] == at else -1


cdef dict _pending(list tiles, const int64_t[::1] ords, const int64_t* new_at, const Py_ssize_t* new_pos,
                   Py_ssize_t fresh):
    """{offset: tile} of this call's new tiles so far (for the rare key shared by different tiles)."""
    return {new_at[k]: tiles[ords[new_pos[k]]] for k in range(fresh)}


cdef inline uint64_t _mix(uint64_t k) nogil:
    # splitmix64's finaliser: lengths and CRCs of similar tiles differ in few bits
    k ^= k >> 30
    k *= <uint64_t>0xbf58476d1ce4e5b9
    k ^= k >> 27
    k *= <uint64_t>0x94d049bb133111eb
    k ^= k >> 31
    return k


NATIVE_CRC = CRC != NULL       # whether isal's C function is called directly (else through its Python module)

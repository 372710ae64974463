"""Which tiles each bundle holds, kept in LMDB so repeated estimates need not reread bundle indexes.

A record is keyed by the bundle's location and the identity of its content (device, inode, size,
mtime_ns and ctime_ns of the file, and of the .bundlx for V1: `Cache.bundle_key`), so a rewritten or replaced
bundle gets a new key and stale records are never used; a miss is stored under the identity of the
version its index was actually read from (`Cache.index_with_key`), never under an older one.
The value is a presence bitmap (16 384 bits, row-major) followed by the sizes of the present
tiles (uint32 each): from it the full `sizes` array of the index is rebuilt exactly. Misses are read from the bundle and written
back in one transaction per batch.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading

import lmdb
import numpy as np

from tilecrate.cache import BundleRef, Cache
from tilecrate.errors import CacheError

N = 16384
_MAGIC = b"TCP1"
_BITMAP = N // 8


def _key(bundle_key: tuple[str, tuple]) -> bytes:
    where, identity = bundle_key
    # LMDB keys are at most 511 bytes; paths can be longer, so hash them
    return hashlib.blake2b(f"{where}\0{identity!r}".encode("utf-8", "surrogatepass"), digest_size=20).digest()


def encode(sizes: np.ndarray) -> bytes:
    """A record: magic, tile count, bitmap of present tiles, their sizes in row-major order."""
    sizes = np.ascontiguousarray(sizes, dtype=np.uint32)
    present = sizes > 0
    return (_MAGIC + struct.pack("<I", int(present.sum())) + np.packbits(present).tobytes()
            + sizes[present].astype("<u4").tobytes())


def decode(value: bytes) -> np.ndarray | None:
    """The `sizes` array of a record, or None if the record is not one of ours or is damaged."""
    if len(value) < 8 + _BITMAP or value[:4] != _MAGIC:
        return None
    (count,) = struct.unpack_from("<I", value, 4)
    if len(value) != 8 + _BITMAP + 4 * count:
        return None
    present = np.unpackbits(np.frombuffer(value, dtype=np.uint8, count=_BITMAP, offset=8)).astype(bool)
    if int(present.sum()) != count:
        return None
    sizes = np.zeros(N, dtype=np.uint32)
    sizes[present] = np.frombuffer(value, dtype="<u4", count=count, offset=8 + _BITMAP)
    return sizes


class PresenceStore:
    """An LMDB file of bundle presence records; thread-safe; use as a context manager or close()."""

    def __init__(self, path: str, *, map_size: int = 1 << 34, readonly: bool = False):
        if not readonly:
            os.makedirs(path, exist_ok=True)
        self.readonly = readonly
        try:
            self.env = lmdb.open(path, map_size=map_size, subdir=True, readonly=readonly, lock=True,
                                 max_dbs=0, metasync=False, readahead=False)
        except lmdb.Error as e:
            raise CacheError(f"{path}: cannot open the presence store ({e})") from None
        self._pending: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def sizes(self, cache: Cache, ref: BundleRef) -> np.ndarray:
        """The bundle's per-tile sizes (uint32[16384], 0 = absent), from the store or from its index."""
        where, identity = cache.bundle_key(ref)
        with self.env.begin(buffers=True) as txn:
            value = txn.get(_key((where, identity)))
            sizes = decode(bytes(value)) if value is not None else None
        if sizes is not None:
            self.hits += 1
            return sizes
        identity, _, sizes = cache.index_with_key(ref)
        key = _key((where, identity))
        with self._lock:
            self.misses += 1
            if not self.readonly:
                self._pending[key] = encode(sizes)
        return sizes

    def flush(self) -> None:
        """Write the records read since the last flush, in one transaction."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            with self.env.begin(write=True) as txn:
                for k, v in pending.items():
                    txn.put(k, v)
        except lmdb.MapFullError:
            raise CacheError("the presence store is full; remove it or open it with a larger map_size") from None

    def close(self) -> None:
        """Flush and close."""
        try:
            self.flush()
        finally:
            self.env.close()

    def __enter__(self) -> "PresenceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

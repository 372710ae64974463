"""The model every source presents: bundles of 128x128 tiles (`BundleRef`), a bundle's index and
bytes (`BundleData`), and checked plain reads of the file holding a bundle (`BundleReader`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tilecrate.esri.common import COMPACT_V1, COMPACT_V2, EXPLODED
from tilecrate.sourcefiles import FileRange, Source, changed, file_id, open_regular
from tilecrate.tiling import PACKET

__all__ = ["COMPACT_V1", "COMPACT_V2", "EXPLODED", "BundleData", "BundleReader", "BundleRef", "FileRange"]



class BundleRef(NamedTuple):
    """A bundle by position: level and the (row, col) of its top-left tile."""

    level: int
    row0: int
    col0: int


class _FileBytes:
    """A bundle's bytes read on demand from one open file: slicing preads and checks the file is
    still the version the index was read from (BundleError otherwise). Stands where a mapping stood."""

    def __init__(self, src: Source):
        self._src = src
        self.nbytes = src.length

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, key) -> bytes:
        if isinstance(key, int):
            return self[key:key + 1][0] if key >= 0 else self[self.nbytes + key]
        start, stop, step = key.indices(self.nbytes)
        if step != 1:
            raise ValueError("bundle bytes are read in contiguous slices")
        data = self._src.pread(start, max(0, stop - start))
        self._src.check()
        return data

    def __bytes__(self) -> bytes:
        return self[:]

    def tobytes(self) -> bytes:
        """The whole bundle (for small bundles and tests)."""
        return self[:]

    def cast(self, fmt: str) -> memoryview:
        """The whole bundle in memory as a memoryview (callers that need a buffer)."""
        return memoryview(self[:]).cast(fmt)

    def release(self) -> None:
        """Kept for callers written for a mapping; the file closes with its BundleData."""


@dataclass
class BundleData:
    """One bundle's parsed index and access to its bytes (`buf`: sliceable; a memoryview for
    in-memory bundles, file reads for files); close() when done."""

    ref: BundleRef
    buf: object
    offsets: np.ndarray
    sizes: np.ndarray
    _closer: object = None
    where: FileRange | None = None        # the file the index was read from (None: memory only)

    @property
    def length(self) -> int:
        """Bytes of the .bundle."""
        return len(self.buf) if not isinstance(self.buf, memoryview) else self.buf.nbytes

    def tile(self, row: int, col: int) -> bytes | None:
        """Bytes of a tile of this bundle (absolute row/col), or None if absent."""
        i = (row - self.ref.row0) * PACKET + (col - self.ref.col0)
        if not (0 <= row - self.ref.row0 < PACKET and 0 <= col - self.ref.col0 < PACKET):
            raise IndexError(f"tile ({row}, {col}) is not in bundle {self.ref}")
        size = int(self.sizes[i])
        if size == 0:
            return None
        off = int(self.offsets[i])
        return bytes(self.buf[off:off + size])

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if isinstance(self.buf, memoryview):
            self.buf.release()
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __enter__(self) -> "BundleData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



class BundleReader:
    """Plain reads from the file holding a bundle, each checked against the version whose index was
    read (`where.file_id` when known, else its size): a changed bundle is an error, never wrong bytes."""

    def __init__(self, where: tuple[str, int, int], label: str):
        self.path, self.base, size = where
        self.label = label
        self._fd, st = open_regular(self.path, label)
        self._id = getattr(where, "file_id", None)
        now = file_id(st)
        if (self._id is not None and now != self._id) or now[2] != size:
            self.close()
            raise changed(label)
        self._id = now

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill `view` from `offset` of the bundle (GIL released in the read), then check the file."""
        n = len(view)
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], self.base + offset + done)
            if got <= 0:
                raise changed(self.label)
            done += got
        if file_id(os.fstat(self._fd)) != self._id:
            raise changed(self.label)

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


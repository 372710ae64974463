"""Output bundles (compact V1 and V2) planned from a source bundle and a selection mask.

The compiled core (`tilecrate._plan`) makes the plan from the source index alone: the header
block (header and index), and the runs of tiles stored back to back in the source, each copied
with one read and one write. Writers stream a plan through one buffer of at most a run; nothing
holds a whole bundle in memory except re-encoded tiles. A plan made from a bundle file reads its
runs from that file with pread (`cache.BundleReader`), each read checked against the identity of
the version whose index the plan was made from: a bundle changed under an export is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from isal import isal_zlib

from tilecrate import _plan
from tilecrate.cache import BundleData, BundleReader, BundleRef, Cache, FileRange

RUN = 8 << 20                    # a run (one read, one write) holds at most this many bytes, unless one tile is larger
GATHER = 1 << 20                 # plan_tiles plans: bytes of one gathered write (cache-sized groups)
_GATHER_TILES = 500              # ...and at most this many tiles (two buffers a tile: writev takes IOV_MAX = 1024)
FILL_SLICE = 1 << 20             # a body still being read is written in slices of this many bytes


@dataclass
class BundlePlan:
    """One output bundle: `aux` (header block), then each run of source tiles with its size prefixes."""

    ref: BundleRef
    version: int
    source: memoryview | bytes | bytearray   # the source bundle's bytes (or packed re-encoded tiles)
    aux: bytearray                           # V2 header + index, or V1 header + zero table
    runs: np.ndarray                         # int64 (n, 4): source offset, source length, first tile, tiles
    tile_offsets: np.ndarray                 # uint64: source offsets of the tiles, in writing order
    tile_sizes: np.ndarray                   # uint32: their sizes
    size: int                                # bytes of the .bundle
    tiles: int
    tile_bytes: int
    bundlx: bytes | None                     # the V1 .bundlx, None for V2
    crc: int | None = None                   # CRC-32 of the .bundle (when asked for)
    bundlx_crc: int | None = None
    file: str | None = None                  # the file holding `source` (see source_file), if known
    file_offset: int = 0                     # where `source` starts in it
    file_size: int = 0                       # the file's size when planned (a changed file is an error)
    file_id: tuple | None = None             # (device, inode, size, mtime_ns, ctime_ns) of that file when planned
    held: list | None = None                 # the tiles' bytes, when planned from tiles held apart (plan_tiles)
    held_at: np.ndarray | None = None        # per tile in writing order, its index in `held`
    filling: object | None = None            # `source` still being copied in, in order: wait(end) before use
                                             # (a Filling), or read band by band into reused buffers (a Stream)

    def gathered(self):
        """The output .bundle's bytes as lists of buffers (the header block, then groups of about GATHER
        bytes: each tile's size prefix and bytes) of a plan made by `plan_tiles`, for gathered writes
        (writev) with no copy into a joined body."""
        if self.held is None:
            raise ValueError("gathered() needs a plan made by plan_tiles")
        yield [memoryview(self.aux)]
        if len(self.tile_sizes):
            prefixes = memoryview(np.ascontiguousarray(self.tile_sizes, dtype="<u4").tobytes())
            yield from _groups(prefixes, self.tile_sizes, [self.held[i] for i in self.held_at.tolist()])

    def release(self) -> None:
        """Drop the bytes the plan holds (a source buffer, or held tiles; a stream still being read stops)."""
        self.source = b""
        self.held = None
        close = getattr(self.filling, "close", None)
        if close is not None:
            close()

    def chunks(self):
        """The output .bundle's bytes as memoryviews, each valid until the next one is asked for.

        A run is read into one reused buffer (with pread when the source file is known: as fast
        as `cp` and nothing is mapped; else copied from the source's memory), then the compiled
        core writes the tiles' size prefixes into it. A source in memory whose prefixes are already
        the tiles' sizes (a block laid out by `sources.blocks.v2_layout`) is yielded in slices.
        """
        if self.held is not None:
            # tiles held apart: each group joined (about GATHER bytes, cache-sized) for writers of one buffer
            for k, group in enumerate(self.gathered()):
                yield group[0] if k == 0 else memoryview(b"".join(group))
            return
        yield memoryview(self.aux)
        if not len(self.runs):
            return
        slices = getattr(self.filling, "slices", None)
        if slices is not None:
            # a body read band by band into a few reused buffers (SQLite pages, `sources.sqlite.Stream`): each
            # slice once its band is in, the last after the read's final check
            yield from slices(self.runs.tolist())
            return
        longest = int((self.runs[:, 1]).max()) + 4
        buf = bytearray(longest)
        view = memoryview(buf)
        if self.file is not None:
            where = FileRange(self.file, self.file_offset, self.file_size, self.file_id)
            with BundleReader(where, self.file) as reader:
                for off, length, first, count in self.runs.tolist():
                    reader.read_into(view[4:4 + length], off)
                    _plan.fill_prefixes(buf, self.tile_offsets, self.tile_sizes, first, count)
                    yield view[:4 + length]
            return
        src = memoryview(self.source).cast("B") if not isinstance(self.source, memoryview) else self.source
        if self.filling is not None:
            # a body laid out with its prefixes as it is read (SQLite pages): each slice once its bytes are in
            for off, length, _, _ in self.runs.tolist():
                at, end = off - 4, off + length
                while at < end:
                    upto = min(end, at + FILL_SLICE)
                    self.filling.wait(upto)
                    yield src[at:upto]
                    at = upto
            self.filling.wait(self.filling.total)       # the copy's last check passed: the bytes are the file's
            return
        if _prefixed(src, self.tile_offsets, self.tile_sizes):
            # the source holds every tile's size prefix already (a block laid out in memory): each run
            # is a slice of it, prefixes included, with no copy
            for off, length, _, _ in self.runs.tolist():
                yield src[off - 4:off + length]
            return
        for off, length, first, count in self.runs.tolist():
            view[4:4 + length] = src[off:off + length]
            _plan.fill_prefixes(buf, self.tile_offsets, self.tile_sizes, first, count)
            yield view[:4 + length]

    def compute_crc(self) -> None:
        """Fill `crc` (and `bundlx_crc`) with isal's CRC-32 over the bytes the writer will stream."""
        crc = 0
        for chunk in self.chunks():
            crc = isal_zlib.crc32(chunk, crc)
        self.crc = crc
        if self.bundlx is not None:
            self.bundlx_crc = isal_zlib.crc32(self.bundlx)

    def to_bytes(self) -> bytes:
        """The whole .bundle (for tests and small outputs)."""
        return b"".join(bytes(c) for c in self.chunks())


def _prefixed(src: memoryview, offsets: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether the 4 bytes before every tile of `src` are its size, little-endian (what the output holds)."""
    n = len(offsets)
    if n == 0 or len(sizes) != n or src.ndim != 1 or src.itemsize != 1:
        return False
    offs = np.asarray(offsets, dtype=np.uint64)
    if int(offs.min()) < 4 or int((offs + np.asarray(sizes, dtype=np.uint64)).max()) > src.nbytes:
        return False
    raw = np.frombuffer(src, dtype=np.uint8)
    at = offs.astype(np.int64) - 4
    got = (raw[at].astype(np.uint32) | raw[at + 1].astype(np.uint32) << 8 | raw[at + 2].astype(np.uint32) << 16
           | raw[at + 3].astype(np.uint32) << 24)
    return bool(np.array_equal(got, np.asarray(sizes, dtype=np.uint32)))


def source_file(cache: Cache | None, data: BundleData) -> FileRange | None:
    """(path, offset, file size) of the file a bundle's bytes come from (the version its index was
    read from); None for inflated entries."""
    if data.where is not None:
        return data.where
    if cache is None or isinstance(data.buf, (bytes, bytearray, memoryview)):
        return None
    return cache.bundle_file(data.ref)


def _mask_u8(mask: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(mask, dtype=np.uint8).reshape(128, 128)


def _make(ref: BundleRef, source, length: int, offsets, sizes, mask, version: int, label: str) -> BundlePlan:
    aux, runs, toff, tsize, size, tiles, tile_bytes, bundlx = _plan.make_plan(
        length, offsets, sizes, _mask_u8(mask), version, ref.row0, ref.col0, label, RUN)
    return BundlePlan(ref, version, source, aux, runs, toff, tsize, size, tiles, tile_bytes, bundlx)


def plan_bundle(data: BundleData, mask: np.ndarray, version: int, label: str = "bundle",
                cache: Cache | None = None) -> BundlePlan:
    """Plan the output bundle holding the masked tiles of `data`, written as compact V1 or V2.

    A bundle read from a file is planned to be read from that file (see `BundlePlan.chunks`), with
    or without `cache`; `source` then holds no bytes.
    """
    where = source_file(cache, data)
    source = b"" if where is not None else data.buf
    plan = _make(data.ref, source, data.length, data.offsets, data.sizes, mask, version, label)
    if where is not None:
        plan.file, plan.file_offset, plan.file_size = where
        plan.file_id = where.file_id
    return plan


def plan_tiles(ref: BundleRef, idx: np.ndarray, tiles: list, mask: np.ndarray, version: int,
               label: str = "bundle") -> BundlePlan:
    """Plan the output bundle of the masked tiles among `tiles` (bytes-likes at ascending block indices
    `idx`, held apart: a block source's tiles as read), with no body laid out: the writer gathers each
    tile's size prefix and bytes (`BundlePlan.gathered`), so the tile bytes are copied once, into the output."""
    idx = np.asarray(idx, dtype=np.int64)
    n = idx.size
    if n != len(tiles) or (n and (idx[0] < 0 or idx[-1] >= 128 * 128 or np.any(np.diff(idx) <= 0))):
        raise ValueError(f"{label}: block indices must be ascending, unique and inside the block")
    lens = np.fromiter(map(len, tiles), dtype=np.int64, count=n)
    if n and (lens.min() <= 0 or lens.max() > 0xFFFFFFFF):
        raise ValueError(f"{label}: a tile of {int(lens.min()) if lens.min() <= 0 else int(lens.max())} bytes")
    # the offsets a V2 body of these tiles would have (each after its 4-byte prefix), row-major
    at = np.cumsum(lens + 4) - lens
    offsets = np.zeros(128 * 128, dtype=np.uint64)
    sizes = np.zeros(128 * 128, dtype=np.uint32)
    offsets[idx] = at.astype(np.uint64)
    sizes[idx] = lens
    length = int(at[-1] + lens[-1]) if n else 0
    plan = _make(ref, b"", length, offsets, sizes, mask, version, label)
    held_at = np.searchsorted(at, plan.tile_offsets.astype(np.int64))
    if held_at.size and (held_at.max() >= n or not np.array_equal(at[held_at], plan.tile_offsets.astype(np.int64))):
        raise ValueError(f"{label}: the plan names tiles that are not held")      # the planner's contract broken
    plan.held, plan.held_at = list(tiles), held_at
    return plan


def _groups(prefixes: memoryview, sizes: np.ndarray, tiles: list):
    """Lists of (size prefix, tile) buffers of about GATHER bytes (at most _GATHER_TILES tiles) in writing order."""
    n = len(tiles)
    ends = np.cumsum(sizes.astype(np.int64) + 4)
    cuts = np.unique(np.concatenate((np.searchsorted(ends, np.arange(GATHER, int(ends[-1]), GATHER)),
                                     np.arange(_GATHER_TILES, n, _GATHER_TILES), [n])))
    lo = 0
    for hi in cuts.tolist():
        if hi <= lo:
            continue
        group: list = [None] * (2 * (hi - lo))
        group[0::2] = [prefixes[4 * k:4 * k + 4] for k in range(lo, hi)]
        group[1::2] = tiles[lo:hi]
        yield group
        lo = hi


def plan_from_tiles(ref: BundleRef, tiles: list[bytes], mask: np.ndarray, version: int,
                    label: str = "bundle") -> BundlePlan:
    """Plan an output bundle from new tile bytes (row-major order of the set cells of `mask`)."""
    m = _mask_u8(mask)
    cells = np.flatnonzero(m)
    if len(cells) != len(tiles):
        raise ValueError(f"{label}: {len(tiles)} tiles for {len(cells)} selected cells")
    buf, offs, lens = _plan.pack_tiles(list(tiles))
    offsets = np.zeros(16384, dtype=np.uint64)
    sizes = np.zeros(16384, dtype=np.uint32)
    offsets[cells] = offs
    sizes[cells] = lens
    return _make(ref, buf, len(buf), offsets, sizes, m, version, label)


def output_sizes(sizes: np.ndarray, mask: np.ndarray, version: int) -> tuple[int, int, int, int]:
    """(tiles, tile bytes, .bundle bytes, .bundlx bytes) of the output bundle, from the index alone."""
    return _plan.bundle_sizes(np.ascontiguousarray(sizes, dtype=np.uint32), _mask_u8(mask), version)


def write_plan(plan: BundlePlan, write: Callable[[memoryview], object]) -> None:
    """Stream a plan's .bundle bytes through `write`."""
    for chunk in plan.chunks():
        write(chunk)

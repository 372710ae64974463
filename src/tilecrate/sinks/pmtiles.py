"""PMTiles v3 output, written in one pass with flat memory.

Bundles are taken in Hilbert order (a 128x128 bundle, or a whole level below zoom 7, is one
contiguous run of TileIDs), and each bundle's tiles sorted by TileID, so tile data is written
straight into the archive in its final, clustered order, after room for the root directory
(`data_offset`). Identical tiles are stored once (`tilecrate._dedup.Dedup`: (length, CRC-32) ->
offset in a compiled table, the bytes compared when a key recurs); consecutive TileIDs sharing a
blob become one run. Only numpy arrays of entries (24 bytes a tile) and the table (16 bytes a
distinct tile, up to 32 while it is half full) grow, plus a bounded cache of recurring tiles;
tile bytes are never held past their bundle. At the end the gzipped metadata and leaf
directories (when the root would pass 16 KiB) follow the data, and the header and root directory
are written at the start.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable

import numpy as np
from isal import igzip

from tilecrate._dedup import Dedup
from tilecrate._files import preallocate
from tilecrate._pmtiles import tile_ids as _tile_ids, varints

from tilecrate.cache import Cache
from tilecrate.package.kcopy import write_all
from tilecrate.plan import ExportPlan
from tilecrate.results import CancelFlag, check_cancel
from tilecrate.tiling import PACKET
from tilecrate.sinks.common import (SourceMeta, Tally, bundle_tiles, inside_grid, iter_bundles, tile_kind,
                                    web_mercator_zooms, wgs84_bounds)

HEADER_SIZE = 127
ROOT_LIMIT = 16384 - HEADER_SIZE
LEAF_SIZE = 4096                     # entries per leaf to start with (as the pmtiles package's writer)
GZIP = 2
NONE = 1
TILE_TYPES = {"png": 2, "jpg": 3, "webp": 4}
HOT_BYTES = 8 << 20                  # bytes of recurring tiles kept to confirm duplicates without a read


def tile_ids(z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PMTiles TileIDs of tiles (z, x, y): (4^z - 1) / 3 plus the Hilbert index (a C loop: tilecrate._pmtiles)."""
    if z > 31:
        raise ValueError("PMTiles zooms stop at 31")
    return _tile_ids(z, x, y)


def _varints(values: np.ndarray) -> bytes:
    """LEB128 varints of unsigned integers (a C loop: tilecrate._pmtiles)."""
    return varints(values)


def serialize_directory(ids: np.ndarray, runs: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> bytes:
    """One directory, uncompressed: count, delta TileIDs, run lengths, lengths, offsets (0 = contiguous)."""
    n = len(ids)
    ids = np.asarray(ids, dtype=np.uint64)
    offsets = np.asarray(offsets, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.uint64)
    deltas = np.diff(ids, prepend=np.uint64(0)) if n else ids
    enc = offsets + np.uint64(1)
    if n > 1:
        contiguous = offsets[1:] == offsets[:-1] + lengths[:-1]
        enc[1:][contiguous] = 0
    return b"".join((_varints(np.array([n], dtype=np.uint64)), _varints(deltas), _varints(runs),
                     _varints(lengths), _varints(enc)))


def _gz(data: bytes) -> bytes:
    # isal's level 2: a tenth of zlib level 6's time on a 22 000-entry directory, 7 % larger
    return igzip.compress(data, 2, mtime=0)


def build_directories(ids: np.ndarray, runs: np.ndarray, lengths: np.ndarray,
                      offsets: np.ndarray) -> tuple[bytes, bytes]:
    """(gzipped root, gzipped leaves): the root alone if it fits in 16 KiB with the header, else one level of leaves."""
    root = _gz(serialize_directory(ids, runs, lengths, offsets))
    if len(root) <= ROOT_LIMIT:
        return root, b""
    leaf_size = LEAF_SIZE
    while True:
        leaves: list[bytes] = []
        r_ids, r_offs, r_lens = [], [], []
        pos = 0
        for i in range(0, len(ids), leaf_size):
            j = min(len(ids), i + leaf_size)
            leaf = _gz(serialize_directory(ids[i:j], runs[i:j], lengths[i:j], offsets[i:j]))
            r_ids.append(int(ids[i]))
            r_offs.append(pos)
            r_lens.append(len(leaf))
            leaves.append(leaf)
            pos += len(leaf)
        root = _gz(serialize_directory(np.array(r_ids, dtype=np.uint64), np.zeros(len(r_ids), dtype=np.uint64),
                                       np.array(r_lens, dtype=np.uint64), np.array(r_offs, dtype=np.uint64)))
        if len(root) <= ROOT_LIMIT:
            return root, b"".join(leaves)
        leaf_size *= 2


def _e7(v: float) -> int:
    return int(round(v * 10_000_000))


def header(*, root: tuple[int, int], meta: tuple[int, int], leaves: tuple[int, int], data: tuple[int, int],
           addressed: int, entries: int, contents: int, tile_type: int, zooms: tuple[int, int],
           bounds: tuple[float, float, float, float], center: tuple[int, float, float]) -> bytes:
    """The 127-byte PMTiles v3 header."""
    out = struct.pack("<7sB8Q3QBBBBBB4iBii", b"PMTiles", 3, root[0], root[1], meta[0], meta[1], leaves[0],
                      leaves[1], data[0], data[1], addressed, entries, contents, 1, GZIP, NONE, tile_type,
                      zooms[0], zooms[1], _e7(bounds[0]), _e7(bounds[1]), _e7(bounds[2]), _e7(bounds[3]),
                      center[0], _e7(center[1]), _e7(center[2]))
    assert len(out) == HEADER_SIZE
    return out


def metadata_json(meta: SourceMeta, fmt: str) -> dict:
    """The PMTiles JSON metadata: name, description, attribution, type, format."""
    out = {"name": meta.name, "format": fmt, "type": "baselayer"}
    if meta.description:
        out["description"] = meta.description
    if meta.attribution:
        out["attribution"] = meta.attribution
    return out


def merge_runs(ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ids, run lengths, lengths, offsets) of directory entries: consecutive TileIDs on one blob become a run."""
    n = len(ids)
    if n == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty, empty, empty
    start = np.ones(n, dtype=bool)
    start[1:] = (ids[1:] != ids[:-1] + 1) | (offsets[1:] != offsets[:-1])
    first = np.flatnonzero(start)
    runs = np.diff(np.append(first, n)).astype(np.uint64)
    return ids[first], runs, lengths[first], offsets[first]


def _bundle_order(plan: ExportPlan, zooms: dict[int, int]) -> list:
    """The plan's bundles sorted by TileID (each is one contiguous TileID range at its zoom)."""
    keyed = []
    for bsel in iter_bundles(plan):
        z = zooms[bsel.ref.level]
        r, c = bsel.ref.row0, bsel.ref.col0
        n = 1 << z
        first = tile_ids(z, np.array([min(c, n - 1)]), np.array([min(r, n - 1)]))[0]
        # a bundle spans TileIDs of one aligned block: any of its tiles orders it among the others
        keyed.append((int(first) if z >= 7 else int(((1 << (2 * z)) - 1) // 3), bsel))
    keyed.sort(key=lambda t: t[0])
    return [b for _, b in keyed]



def data_offset(entries: int) -> int:
    """Where the tile data starts in an archive of at most `entries` directory entries: after the
    header and room for the largest root directory they can make (never past 16 KiB, where the root
    must end; with leaves it fits in ROOT_LIMIT)."""
    raw = 10 + 35 * entries       # the count, then per entry at most 10 (TileID delta) + 10 (run) + 5 + 10 bytes
    gz = raw + (raw + 7) // 8 + (raw + 63) // 64 + 5 + 18       # zlib's deflateBound and the gzip wrapper
    return min(HEADER_SIZE + ROOT_LIMIT, HEADER_SIZE + gz)


def addressable(plan: ExportPlan, zooms: dict[int, int]) -> int:
    """Selected tiles inside the Web Mercator grid of their zoom (the entries the archive can hold)."""
    total = 0
    for bsel in iter_bundles(plan):
        n = 1 << zooms[bsel.ref.level]
        r, c = bsel.ref.row0, bsel.ref.col0
        if r + PACKET <= n and c + PACKET <= n:
            total += bsel.tiles
        else:
            m = bsel.mask.reshape(PACKET, PACKET)[:max(0, n - r), :max(0, n - c)]
            total += int(np.count_nonzero(m))
    return total


def write_pmtiles(plan: ExportPlan, cache: Cache, tmp: str, meta: SourceMeta, *,
                  progress: Callable[[int, int, int | None], None] | None = None,
                  cancel: CancelFlag | None = None) -> tuple[int, dict[int, dict], list[str]]:
    """Write the plan's tiles as a clustered, deduplicated PMTiles v3 archive to `tmp`.

    The tile data goes straight to its place in `tmp`, after room for the root directory (see
    `data_offset`); the metadata and leaf directories follow it, and the header and root are
    written last (the spec lets every section but the header move; the root stays in the first
    16 KiB), so no byte is written twice."""
    fmt = tile_kind(cache, plan.policy is not None)
    zooms = web_mercator_zooms(cache.scheme, [lv.level for lv in plan.selection.levels])
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []     # per bundle: TileIDs, offsets, lengths
    warnings: list[str] = []
    tally = Tally()
    data_len = 0
    data_off = data_offset(addressable(plan, zooms))
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            # disk blocks for the most the data can take (the selected tiles, none deduplicated), given at once:
            # the writes then skip ext4's delayed allocation; cut to the archive's size at the end. Only a
            # hint: on a disk with less room than that, the archive is written without it
            preallocate(fd, data_off + plan.selection.tile_bytes)
        except OSError:
            pass
        os.lseek(fd, data_off, os.SEEK_SET)
        dedup = Dedup(fd, HOT_BYTES, data_off)
        for bsel in _bundle_order(plan, zooms):
            rows, cols, tiles, found = bundle_tiles(cache, plan, bsel, cancel)
            warnings.extend(found)
            z = zooms[bsel.ref.level]
            rows, cols, tiles = inside_grid(rows, cols, tiles, 1 << z, cache.bundle_label(bsel.ref), warnings)
            ids = tile_ids(z, cols, rows)
            order = np.argsort(ids, kind="stable")
            chunk, offs, data_len = dedup.place(tiles, order, data_len)
            write_all(fd, chunk)
            lengths = np.fromiter(map(len, tiles), dtype=np.uint64, count=len(tiles))
            parts.append((ids[order].astype(np.uint64), offs.astype(np.uint64), lengths[order]))
            tally.add(bsel.ref.level, tiles)
            check_cancel(cancel)
            if progress is not None:
                progress(tally.tiles, data_len, bsel.ref.level)
        contents = dedup.contents
        del dedup
        if parts:
            ids, runs, lengths, offsets = merge_runs(*(np.concatenate(a) for a in zip(*parts)))
        else:
            ids, runs, lengths, offsets = merge_runs(*(np.zeros(0, np.uint64),) * 3)
        del parts
        root, leaves = build_directories(ids, runs, lengths, offsets)
        if HEADER_SIZE + len(root) > data_off:       # data_offset bounds every root: a broken bound is a bug
            raise RuntimeError(f"PMTiles root directory of {len(root)} bytes overruns the {data_off - HEADER_SIZE} "
                               f"bytes kept for it ({len(ids)} entries)")
        metadata = _gz(json.dumps(metadata_json(meta, fmt), ensure_ascii=False).encode())
        exported = sorted(zooms[lv.level] for lv in plan.selection.levels if lv.tiles > 0) or [0]
        w, s, e, n = wgs84_bounds(plan)
        meta_off = data_off + data_len
        leaf_off = meta_off + len(metadata)
        head = header(root=(HEADER_SIZE, len(root)), meta=(meta_off, len(metadata)),
                      leaves=(leaf_off if leaves else 0, len(leaves)), data=(data_off, data_len),
                      addressed=tally.tiles, entries=len(ids), contents=contents,
                      tile_type=TILE_TYPES[fmt], zooms=(exported[0], exported[-1]), bounds=(w, s, e, n),
                      center=(exported[0], (w + e) / 2, (s + n) / 2))
        os.lseek(fd, meta_off, os.SEEK_SET)
        write_all(fd, [metadata, leaves])
        os.ftruncate(fd, leaf_off + len(leaves))        # the archive ends here, whatever was reserved
        # the room between the root and the data is never written: zeros
        _pwrite_all(fd, head + root, 0)
    finally:
        os.close(fd)
    return tally.tiles, tally.levels, warnings


def _pwrite_all(fd: int, data: bytes, at: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n

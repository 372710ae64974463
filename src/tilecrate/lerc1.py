"""A LERC1 (`CntZImage`) encoder for float32 elevation tiles, vectorized with numpy (FORMATS.md §19.3).

LERC1 is what ArcGIS elevation services serve and the only LERC the JS `ElevationLayer` decodes;
Esri's `lerc` package decodes it but will not write it, hence this encoder. The image is cut into
square micro-blocks (plus the partial last block row and column the format implies when the size is
not a multiple of the block size). Each block is written as constant 0, a constant offset, or its
block minimum plus values quantized to steps of 2·maxZError and bit-stuffed most significant bit
first into little-endian 32-bit words (only the bytes the last word needs are stored). Every
decoded value is within maxZError of the source (plus float32 rounding of the sum).

Only all-valid images are supported (no-data masks are not needed by the synthetic sample and are
refused clearly). Blocks are grouped by (pixel count, bits per value) so the bit packing runs as a
few 2-D numpy operations per tile, not one Python loop per pixel.
"""
from __future__ import annotations

import struct

import numpy as np

MAGIC = b"CntZImage "
VERSION = 11
IMAGE_TYPE_CNT_Z = 8
MAX_SIZE = 20000                  # the C++ decoder's limit per side
BLOCK_SIZES = (8, 16, 32)         # candidate micro-block sides; the smallest output wins
MAX_BITS = 30                     # the C++ bit unstuffer refuses >= 32; above this a block would be raw

_RAW, _STUFFED, _ZERO, _CONST = 0, 1, 2, 3


class LercEncodeError(ValueError):
    """The array cannot be written as LERC1 (wrong shape, non-finite values, bad maxZError)."""


def _header(rows: int, cols: int, max_z_error: float) -> bytes:
    # the mask part: no blocks, no bytes, constant 1.0 = every pixel valid
    return (MAGIC + struct.pack("<iiIId", VERSION, IMAGE_TYPE_CNT_Z, rows, cols, max_z_error)
            + struct.pack("<IIIf", 0, 0, 0, 1.0))


def _tiles(z: np.ndarray, side: int) -> tuple[int, int, list[tuple[np.ndarray, np.ndarray]]]:
    """numBlocksY, numBlocksX and the blocks as groups of equal shape: (block numbers, (n, pixels) values).

    Blocks are numbered in the decoder's order: row-major over the grid, with the partial last
    row and column (height % numBlocksY, width % numBlocksX) the format adds.
    """
    rows, cols = z.shape
    nby, nbx = max(rows // side, 1), max(cols // side, 1)
    bh, bw = rows // nby, cols // nbx
    rh, rw = rows - nby * bh, cols - nbx * bw
    gx = nbx + (1 if rw else 0)
    out = []
    for ys, h, r0, ny in ((range(nby), bh, 0, nby), (range(nby, nby + 1), rh, nby * bh, 1)):
        if h == 0:
            continue
        for xs, w, c0, nx in ((range(nbx), bw, 0, nbx), (range(nbx, nbx + 1), rw, nbx * bw, 1)):
            if w == 0:
                continue
            area = z[r0:r0 + ny * h, c0:c0 + nx * w]
            vals = area.reshape(ny, h, nx, w).transpose(0, 2, 1, 3).reshape(ny * nx, h * w)
            ids = (np.asarray(ys)[:, None] * gx + np.asarray(xs)[None, :]).ravel()
            out.append((ids, vals))
    return nby, nbx, out


def _stuff(values: np.ndarray, bits: int) -> np.ndarray:
    """Bit-stuff rows of uint32 values (G, n) at `bits` each: (G, stored bytes) uint8, LERC1 word order."""
    g, n = values.shape
    as_bits = np.unpackbits(values.astype(">u4").view(np.uint8).reshape(g, n, 4), axis=2)
    stream = as_bits[:, :, 32 - bits:].reshape(g, n * bits)
    nbytes = (n * bits + 7) // 8
    words = (nbytes + 3) // 4
    padded = np.zeros((g, words * 32), dtype=np.uint8)
    padded[:, :n * bits] = stream
    # MSB-first bytes of each 32-bit word, stored little-endian
    packed = np.packbits(padded, axis=1).reshape(g, words, 4)[:, :, ::-1].reshape(g, words * 4)
    # the last word keeps only its used bytes: after the swap they are its high-address ones
    tail = 4 * words - nbytes
    if tail:
        packed = np.concatenate([packed[:, :4 * (words - 1)], packed[:, 4 * (words - 1) + tail:]], axis=1)
    return packed


def _count_field(n: int) -> tuple[int, bytes]:
    """(type bits, bytes) of a pixel count: 2 = uint8, 1 = uint16, 0 = uint32."""
    if n < 256:
        return 2, struct.pack("<B", n)
    if n < 65536:
        return 1, struct.pack("<H", n)
    return 0, struct.pack("<I", n)


def _z_part(z: np.ndarray, max_z_error: float, side: int) -> bytes | None:
    """The z part (block headers and data) with `side`-pixel blocks; None if a block needs raw floats."""
    nby, nbx, groups = _tiles(z, side)
    step = 2.0 * max_z_error
    parts: dict[int, bytes] = {}
    for ids, vals in groups:
        lo = vals.min(axis=1)
        span = (vals.max(axis=1).astype(np.float64) - lo) / step
        if (span >= 2.0**MAX_BITS - 1).any():
            return None
        q = np.floor((vals - lo[:, None].astype(np.float64)) / step + 0.5).astype(np.int64)
        top = q.max(axis=1)
        bits = np.zeros(len(ids), dtype=np.int64)
        nz = top > 0
        bits[nz] = np.floor(np.log2(top[nz])).astype(np.int64) + 1
        count_type, count = _count_field(vals.shape[1])
        for b in np.unique(bits).tolist():
            sel = np.flatnonzero(bits == b)
            if b == 0:
                # every value within maxZError of the minimum (or all equal): one constant
                for i in sel.tolist():
                    v = float(lo[i])
                    parts[int(ids[i])] = b"\x02" if v == 0.0 else struct.pack("<Bf", _CONST, v)
                continue
            stuffed = _stuff(q[sel].astype(np.uint32), b)
            tag = bytes([b | (count_type << 6)]) + count
            for i, row in zip(sel.tolist(), stuffed):
                parts[int(ids[i])] = struct.pack("<Bf", _STUFFED, float(lo[i])) + tag + row.tobytes()
    body = b"".join(parts[k] for k in range(len(parts)))
    return struct.pack("<IIIf", nby, nbx, len(body), float(z.max())) + body


def encode(z: np.ndarray, max_z_error: float = 0.1) -> bytes:
    """A LERC1 blob of a 2-D all-valid array (as float32), each value within `max_z_error` when decoded."""
    z = np.asarray(z)
    if z.ndim != 2 or not (1 <= z.shape[0] <= MAX_SIZE and 1 <= z.shape[1] <= MAX_SIZE):
        raise LercEncodeError(f"LERC1 needs a 2-D array of 1-{MAX_SIZE} rows and columns, not shape {z.shape}")
    if not (max_z_error > 0 and np.isfinite(max_z_error)):
        raise LercEncodeError(f"maxZError must be a positive number, not {max_z_error}")
    z = np.ascontiguousarray(z, dtype=np.float32)
    if not np.isfinite(z).all():
        raise LercEncodeError("LERC1 encoding of no-data (NaN or infinite) values is not supported; "
                              "the encoder writes all-valid images only")
    rows, cols = z.shape
    best: bytes | None = None
    for side in BLOCK_SIZES:
        part = _z_part(z, float(max_z_error), side)
        if part is not None and (best is None or len(part) < len(best)):
            best = part
    if best is None:
        # a range too wide for 30-bit quantization: raw float32 as one block, the only raw layout
        # the JS decoder reads (it assumes a single block for encoding 0)
        raw = z.astype("<f4").tobytes()
        best = struct.pack("<IIIf", 1, 1, 1 + len(raw), float(z.max())) + bytes([_RAW]) + raw
    return _header(rows, cols, float(max_z_error)) + best

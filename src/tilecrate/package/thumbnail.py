"""The package thumbnail: a 200 x 133 picture of the exported data, as a PNG of fixed byte size.

The PNG's pixel data is stored without compression (deflate "stored" blocks), so its size depends
only on its dimensions: the package size can then be predicted exactly without decoding a tile.
At about 80 KB it is small next to any package.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from tilecrate.cache import Cache
from tilecrate.package.metadata import PackageInfo
from tilecrate.tiling import PACKET

WIDTH, HEIGHT = 200, 133          # the size the tile package spec recommends
MAX_TILES_SIDE = 3                # decode at most 3 x 3 tiles
_BACKGROUND = (255, 255, 255)
_STORED_BLOCK = 65535


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _stored_zlib(raw: bytes) -> bytes:
    out = bytearray(b"\x78\x01")
    n = len(raw)
    for start in range(0, max(n, 1), _STORED_BLOCK):
        block = raw[start:start + _STORED_BLOCK]
        final = 1 if start + _STORED_BLOCK >= n else 0
        out += struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF) + block
    out += struct.pack(">I", zlib.adler32(raw) & 0xFFFFFFFF)
    return bytes(out)


def png_rgb_stored(pixels: np.ndarray) -> bytes:
    """An RGB PNG of `pixels` (H x W x 3 uint8) with uncompressed image data."""
    h, w, _ = pixels.shape
    rows = np.concatenate([np.zeros((h, 1), dtype=np.uint8), pixels.reshape(h, w * 3)], axis=1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", _stored_zlib(rows.tobytes()))
            + _chunk(b"IEND", b""))


def thumbnail_size() -> int:
    """Bytes of every thumbnail this module writes."""
    raw = HEIGHT * (1 + 3 * WIDTH)
    blocks = max(1, -(-raw // _STORED_BLOCK))
    return 8 + (12 + 13) + (12 + 2 + raw + 5 * blocks + 4) + 12


def _pick_level(selection) -> tuple[int, tuple[int, int, int, int]] | None:
    """The finest level whose selected tiles span at most 3 x 3, else the coarsest; and its tile bbox."""
    choice = None
    for lv in selection.levels:
        if lv.tiles <= 0:
            continue
        bbox = lv.tile_range()
        if bbox is None:
            continue
        rmin, rmax, cmin, cmax = bbox
        fits = rmax - rmin < MAX_TILES_SIDE and cmax - cmin < MAX_TILES_SIDE
        if choice is None or fits:
            choice = (lv.level, bbox)
        if not fits:
            break
    return choice


def render_thumbnail(cache: Cache, selection, info: PackageInfo) -> bytes:
    """The thumbnail PNG: the selected tiles of a coarse level, cropped to the data, fitted on white."""
    from PIL import Image

    canvas = Image.new("RGB", (WIDTH, HEIGHT), _BACKGROUND)
    pick = _pick_level(selection)
    if pick is not None:
        level, (rmin, rmax, cmin, cmax) = pick
        # keep the centre when the coarsest level is still too wide
        if rmax - rmin >= MAX_TILES_SIDE:
            rmin = (rmin + rmax) // 2 - 1
            rmax = rmin + MAX_TILES_SIDE - 1
        if cmax - cmin >= MAX_TILES_SIDE:
            cmin = (cmin + cmax) // 2 - 1
            cmax = cmin + MAX_TILES_SIDE - 1
        tw, th = cache.scheme.tile_cols, cache.scheme.tile_rows
        full = ((cmax - cmin + 1) * tw, (rmax - rmin + 1) * th)
        box = _crop_box(cache, info, level, rmin, cmin, full)
        r = _reduction(tw, th, (box[2] - box[0], box[3] - box[1]) if box else full)
        mosaic = Image.new("RGB", (full[0] // r, full[1] // r), _BACKGROUND)
        wanted = _selected_cells(selection, level, rmin, rmax, cmin, cmax)
        for row in range(rmin, rmax + 1):
            for col in range(cmin, cmax + 1):
                if (row, col) not in wanted:
                    continue
                data = cache.tile(level, row, col)
                if not data:
                    continue
                tile = _decode(data, tw, th, r)
                if tile is None:  # a corrupt tile (Usa.tpkx has two) leaves a white square
                    continue
                mosaic.paste(tile, ((col - cmin) * tw // r, (row - rmin) * th // r), tile)
        if box is not None:
            left, top, right, bottom = box
            mosaic = mosaic.crop((left // r, top // r, max(left // r + 1, -(-right // r)),
                                  max(top // r + 1, -(-bottom // r))))
        scale = min(WIDTH / mosaic.width, HEIGHT / mosaic.height)
        size = (max(1, round(mosaic.width * scale)), max(1, round(mosaic.height * scale)))
        mosaic = mosaic.resize(size, Image.LANCZOS)
        canvas.paste(mosaic, ((WIDTH - size[0]) // 2, (HEIGHT - size[1]) // 2))
    return png_rgb_stored(np.asarray(canvas, dtype=np.uint8))


def _open(data: bytes):
    """The image of a tile's bytes, opened by the one PIL plugin its signature names."""
    from PIL import Image

    # Image.open first imports the BMP, GIF (and subprocess), PPM, JPEG and PNG plugins, all plugins
    # when none of them accepts: a small export process would pay for readers it never uses
    fp = io.BytesIO(data)
    if data[:3] == b"\xff\xd8\xff":
        from PIL import JpegImagePlugin

        return JpegImagePlugin.JpegImageFile(fp)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import PngImagePlugin

        return PngImagePlugin.PngImageFile(fp)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        from PIL import WebPImagePlugin

        return WebPImagePlugin.WebPImageFile(fp)
    return Image.open(fp)


def _reduction(tw: int, th: int, shown: tuple[int, int]) -> int:
    """1, 2, 4 or 8: how much smaller than full size the tiles can be decoded, keeping 2x the thumbnail's pixels."""
    scale = min(WIDTH / max(1, shown[0]), HEIGHT / max(1, shown[1]))
    for r in (8, 4, 2):
        if tw % r == 0 and th % r == 0 and scale * r <= 0.5:
            return r
    return 1


def _decode(data: bytes, tw: int, th: int, r: int = 1):
    """The tile as RGBA at 1/r of its size, or None when it is corrupt or far larger than a tile (a hostile tile
    costs nothing)."""
    from PIL import Image

    try:
        tile = _open(data)
        if tile.width > 2 * tw or tile.height > 2 * th:
            return None
        want = (max(1, tile.width // r), max(1, tile.height // r))
        if r > 1 and tile.format == "JPEG":
            tile.draft(tile.mode, want)     # libjpeg's DCT scaling: decodes 1/r of the pixels
        tile.load()
        tile = tile.convert("RGBA")
        if tile.size != want:
            tile = tile.resize(want, Image.BOX)
        return tile
    except Exception:
        return None


def _selected_cells(selection, level: int, rmin: int, rmax: int, cmin: int, cmax: int) -> set[tuple[int, int]]:
    """The selected (row, col) of `level` inside the drawn window (a whole level's cells can be millions)."""
    out = set()
    for lv in selection.levels:
        if lv.level != level:
            continue
        for b in lv.bundles:
            r0, c0 = b.ref.row0, b.ref.col0
            if r0 > rmax or c0 > cmax or r0 + PACKET <= rmin or c0 + PACKET <= cmin:
                continue
            window = np.asarray(b.mask).reshape(PACKET, PACKET)[max(0, rmin - r0):rmax - r0 + 1,
                                                                 max(0, cmin - c0):cmax - c0 + 1]
            rows, cols = np.nonzero(window)
            out.update(zip((rows + max(r0, rmin)).tolist(), (cols + max(c0, cmin)).tolist()))
    return out


def _crop_box(cache: Cache, info: PackageInfo, level: int, rmin: int, cmin: int,
              size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    e = info.extent
    if e is None or not cache.scheme.has_level(level):
        return None
    res = cache.scheme.lod(level).resolution
    x0, _, _, y1 = cache.scheme.tile_bounds(level, rmin, cmin)
    left = int(max(0, min(size[0], (e.xmin - x0) / res)))
    right = int(max(0, min(size[0], round((e.xmax - x0) / res))))
    top = int(max(0, min(size[1], (y1 - e.ymax) / res)))
    bottom = int(max(0, min(size[1], round((y1 - e.ymin) / res))))
    if right - left < 2 or bottom - top < 2:
        return None
    return left, top, right, bottom

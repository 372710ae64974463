"""sources.blocks.tile_pixel_size reads PNG/JPEG headers itself: it agrees with PIL on the images PIL writes."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tilecrate.sources.blocks import _header_size, tile_pixel_size


def _image(fmt: str, w: int, h: int, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}),
                                    ("JPEG", {"icc_profile": b"x" * 3000, "exif": b"Exif\x00\x00" + b"y" * 500})])
@pytest.mark.parametrize("w,h", [(256, 256), (512, 512), (300, 200), (128, 128)])
def test_header_size_agrees_with_pil(fmt, kw, w, h):
    data = _image(fmt, w, h, **kw)
    assert _header_size(data) == Image.open(io.BytesIO(data)).size == (w, h)
    assert tile_pixel_size(data) == (w if w == h else 256)


def test_other_and_broken_tiles():
    gif = _image("GIF", 512, 512)                   # not PNG or JPEG: PIL reads it
    assert _header_size(gif) is None and tile_pixel_size(gif) == 512
    jpeg = _image("JPEG", 512, 512)
    assert _header_size(jpeg[:20]) is None          # cut before its SOF: PIL decides (here: cannot, 256)
    assert tile_pixel_size(jpeg[:20]) == 256
    assert _header_size(b"\xff\xd8\xff\xe0\x00") is None and tile_pixel_size(b"") == 256

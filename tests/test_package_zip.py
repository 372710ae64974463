"""The stored-zip stream: entries, CRCs, ZIP64 (forced cheaply with a lower limit), non-seekable output."""
from __future__ import annotations

import io
import os
import struct
import zipfile

import pytest

from tilecrate.package.zipstream import ZipWriter


class WriteOnly(io.RawIOBase):
    """A non-seekable sink (like a pipe or a socket) that also writes in short pieces."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        piece = bytes(memoryview(b)[:4096])     # partial writes, as a raw stream may do
        self.data += piece
        return len(piece)


def _write(out, limit, payloads):
    z = ZipWriter(out, zip64_limit=limit)
    z.add_dir("tile")
    for name, data in payloads:
        z.add_bytes(name, data)
    return z.close()


PAYLOADS = [("root.json", b'{"a": 1}' * 100), ("tile/L00/R0000C0000.bundle", os.urandom(300_000)),
            ("tile/图层/x.bin", b"\x00" * 10), ("empty", b"")]


@pytest.mark.parametrize("limit", [0xFFFFFFFF, 1000, 1])
def test_zip_reads_back_stored_with_crc(tmp_path, limit):
    path = tmp_path / "a.zip"
    with open(path, "wb") as f:
        size = _write(f, limit, PAYLOADS)
    assert size == path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["tile/"] + [n for n, _ in PAYLOADS]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        for name, data in PAYLOADS:
            assert zf.read(name) == data
        assert infos[3].flag_bits & 0x800          # UTF-8 name flag
        assert not infos[1].flag_bits & 0x800
    # the dry run predicts the same size
    dry = ZipWriter(None, zip64_limit=limit, dry_run=True)
    dry.add_dir("tile")
    for name, data in PAYLOADS:
        dry.add_size(name, len(data))
    assert dry.close() == size


def test_zip64_records_are_really_written(tmp_path):
    path = tmp_path / "z64.zip"
    with open(path, "wb") as f:
        _write(f, 1000, PAYLOADS)
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw          # ZIP64 end record and locator
    # the bundle's local header carries 0xFFFFFFFF sizes and a ZIP64 extra with the real ones
    at = raw.index(b"PK\x03\x04" + struct.pack("<H", 45))
    sig, ver, flags, method, t, d, crc, csize, usize, nlen, xlen = struct.unpack_from("<4sHHHHHLLLHH", raw, at)
    assert (csize, usize) == (0xFFFFFFFF, 0xFFFFFFFF)
    hid, hlen, u, c = struct.unpack_from("<HHQQ", raw, at + 30 + nlen)
    assert (hid, hlen, u, c) == (1, 16, 300_000, 300_000)
    eocd = raw[-22:]
    assert struct.unpack("<4sHHHHLLH", eocd)[5:7] == (0xFFFFFFFF, 0xFFFFFFFF)


def _png(w=40, h=30) -> tuple[bytes, "np.ndarray"]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    px = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px, "RGB").save(buf, "PNG")
    return buf.getvalue(), px


@pytest.mark.parametrize("limit", [0xFFFFFFFF, 1])
def test_gdal_vsizip_reads_entries(tmp_path, limit):
    import rasterio  # an independent reader: missing means a broken install, never a skip
    png, px = _png()
    path = tmp_path / "img.zip"
    with open(path, "wb") as f:
        _write(f, limit, PAYLOADS[:2] + [("dir/img.png", png)])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # a PNG has no georeferencing
        with rasterio.open(f"/vsizip/{path}/dir/img.png") as ds:
            assert (ds.read().transpose(1, 2, 0) == px).all()


def test_non_seekable_stream_gets_identical_bytes(tmp_path):
    path = tmp_path / "file.zip"
    with open(path, "wb") as f:
        _write(f, 1000, PAYLOADS)
    sink = WriteOnly()
    _write(sink, 1000, PAYLOADS)
    # the stream has no seek/tell: the writer counted positions itself
    assert bytes(sink.data) == path.read_bytes()


def test_bad_entries_are_refused():
    z = ZipWriter(io.BytesIO())
    z.add_bytes("a", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        z.add_bytes("a", b"2")
    with pytest.raises(ValueError):
        z.add_bytes("/abs", b"2")
    with pytest.raises(ValueError, match="announced"):
        z.add_stream("b", 10, 0, [b"123"])
    with pytest.raises(ValueError):
        z.add_size("c", 3)                  # only in dry runs


def test_crc_computed_while_writing_is_patched_into_the_header(tmp_path):
    data = os.urandom(200_000)
    path = tmp_path / "p.zip"
    with open(path, "wb") as f:
        f.write(b"prefix")                  # the zip need not start at offset 0 of the file
        z = ZipWriter(f)
        assert z.can_patch
        z.add_stream("a.bin", len(data), None, (memoryview(data)[i:i + 70_000] for i in range(0, len(data), 70_000)))
        z.add_stream("small", 3, None, (b"abc",))       # still in the write buffer when patched
        z.close()
    raw = path.read_bytes()[6:]
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert zf.testzip() is None
        assert zf.read("a.bin") == data and zf.read("small") == b"abc"
    import zlib

    at = raw.index(b"PK\x03\x04")
    assert struct.unpack_from("<L", raw, at + 14)[0] == zlib.crc32(data)   # the local header, not only the CD
    with pytest.raises(ValueError, match="non-seekable"):
        ZipWriter(WriteOnly()).add_stream("x", 1, None, (b"x",))


@pytest.mark.parametrize("limit", [0xFFFFFFFF, 5000])
def test_entries_written_together_equal_entries_written_one_by_one(tmp_path, limit):
    """add_wholes (one writev per ~1 MiB on a file, more buffers than IOV_MAX, a buffer of over
    1 MiB, memoryview slices) writes the bytes add_whole writes entry by entry, on files and streams."""
    from isal import isal_zlib

    span = memoryview(os.urandom(2_900_000))
    cuts = list(range(0, 2_900_001, 2_636))                  # 1 100 entries: more buffers than IOV_MAX
    items = [(f"p12/resources/fonts/{i:04d}.pbf", span[a:b], isal_zlib.crc32(span[a:b]))
             for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    big = os.urandom(1_200_000)                              # one buffer over the 1 MiB gather size
    items.append(("p12/resources/big.bin", big, isal_zlib.crc32(big)))

    def one_by_one(out):
        z = ZipWriter(out, zip64_limit=limit)
        z.add_bytes("esriinfo/item.pkinfo", b"<pkinfo/>")
        for name, data, crc in items:
            z.add_whole(name, data, crc)
        return z.close()

    def together(out):
        z = ZipWriter(out, zip64_limit=limit)
        z.add_bytes("esriinfo/item.pkinfo", b"<pkinfo/>")
        z.add_wholes(items)
        return z.close()

    a, b = tmp_path / "a.zip", tmp_path / "b.zip"
    with open(a, "wb") as f:
        size = one_by_one(f)
    with open(b, "wb") as f:
        assert together(f) == size
    sink = WriteOnly()
    together(sink)
    assert a.read_bytes() == b.read_bytes() == bytes(sink.data)
    assert size == b.stat().st_size
    dry = ZipWriter(None, zip64_limit=limit, dry_run=True)
    dry.add_bytes("esriinfo/item.pkinfo", b"<pkinfo/>")
    dry.add_wholes(items)
    assert dry.close() == size
    with zipfile.ZipFile(b) as zf:
        assert zf.testzip() is None
        assert [zf.read(n) for n, _, _ in items] == [bytes(d) for _, d, _ in items]

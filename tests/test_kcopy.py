"""Kernel copies (package.kcopy): every method and its real fallbacks, shrinking sources, the
read-ahead scanner's CRC and prefix fixes, and file-range zip entries (`add_parts`, `add_file`)."""
from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
import zlib

import numpy as np
import pytest

from tilecrate.errors import BundleError
from tilecrate.package import kcopy
from tilecrate.package.kcopy import CopyRange, KernelCopier, RunScanner, SourceChanged, write_parts
from tilecrate.package.zipstream import ZipWriter

DATA = os.urandom(3_000_000 + 17)


@pytest.fixture()
def src(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    yield path, fd
    os.close(fd)


def _copy_ranges(copier: KernelCopier, fd: int, ranges) -> bytes:
    want = b""
    for off, n in ranges:
        copier.copy(fd, off, n, "src")
        want += DATA[off:off + n]
    return want


RANGES = [(0, 1), (5, 4096), (4099, 1_500_000), (1_500_000, 1_500_017), (7, 0)]


@pytest.mark.parametrize("method", kcopy.METHODS)
def test_each_method_copies_at_the_outputs_position(tmp_path, src, method):
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b"head")                      # copies land at the fd's position, not at 0
        copier = KernelCopier(fd, method)
        want = _copy_ranges(copier, src[1], RANGES)
        os.write(fd, b"tail")
    finally:
        os.close(fd)
    assert out.read_bytes() == b"head" + want + b"tail"
    assert copier.copied[method] == len(want)          # no silent fallback on a regular file


def test_append_only_output_falls_back_from_copy_file_range(tmp_path, src):
    # copy_file_range refuses O_APPEND outputs (EBADF): the copy must still happen, by another method
    out = tmp_path / "append.bin"
    out.write_bytes(b"x")
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)
    try:
        copier = KernelCopier(fd)
        want = _copy_ranges(copier, src[1], RANGES)
    finally:
        os.close(fd)
    assert out.read_bytes() == b"x" + want
    assert copier.copied["copy_file_range"] == 0 and copier.method != "copy_file_range"
    assert sum(copier.copied.values()) == len(want)


def test_pipe_output_falls_back_to_sendfile(src):
    r, w = os.pipe()
    got = bytearray()

    def drain():
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    t = threading.Thread(target=drain)
    t.start()
    try:
        copier = KernelCopier(w)
        want = _copy_ranges(copier, src[1], RANGES)
    finally:
        os.close(w)
        t.join(10)
        os.close(r)
    assert bytes(got) == want
    assert copier.copied["copy_file_range"] == 0 and copier.copied["sendfile"] == len(want)


@pytest.mark.parametrize("method", kcopy.METHODS)
def test_a_source_that_ends_early_is_an_error(tmp_path, method):
    path = tmp_path / "short.bin"
    path.write_bytes(DATA[:10_000])
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / "o.bin", os.O_WRONLY | os.O_CREAT)
    try:
        copier = KernelCopier(out, method)
        with pytest.raises(SourceChanged, match="short.bin: the file changed while it was being exported"):
            copier.copy(fd, 9_000, 2_000, str(path))
        os.truncate(path, 100)                    # shrunk after opening: still refused, never short
        with pytest.raises(SourceChanged):
            copier.copy(fd, 0, 5_000, str(path))
    finally:
        os.close(fd)
        os.close(out)


def test_bad_arguments_are_refused(src):
    with pytest.raises(ValueError, match="unknown copy method"):
        KernelCopier(1, "splice-by-magic")
    with pytest.raises(ValueError, match="bad range"):
        KernelCopier(1).copy(src[1], -1, 5, "x")
    with pytest.raises(ValueError, match="outside"):
        CopyRange(src[1], 0, 10, "x", np.array([7]), np.array([1], np.uint32)).check()


def test_open_source_refuses_a_changed_size(src):
    with pytest.raises(BundleError, match="changed"):
        kcopy.open_source(str(src[0]), len(DATA) - 1, "bundle")
    os.close(kcopy.open_source(str(src[0]), len(DATA), "bundle"))


def _prefixed(tiles: list[bytes], garbage: set[int]) -> tuple[bytes, np.ndarray, np.ndarray]:
    body = b""
    rel, sizes = [], []
    for i, t in enumerate(tiles):
        rel.append(len(body))
        sizes.append(len(t))
        body += (b"\xee\xee\xee\xee" if i in garbage else struct.pack("<I", len(t))) + t
    return body, np.array(rel, np.int64), np.array(sizes, np.uint32)


def test_scanner_checks_and_fixes_prefixes(tmp_path):
    tiles = [os.urandom(n) for n in (10, 0, 70_000, 3)]
    good, rel, sizes = _prefixed(tiles, set())
    bad, _, _ = _prefixed(tiles, {1, 3})
    path = tmp_path / "runs.bin"
    path.write_bytes(good + bad)
    fd = os.open(path, os.O_RDONLY)
    scanner = RunScanner()
    try:
        ok = scanner.submit(CopyRange(fd, 0, len(good), "runs", rel, sizes)).result()
        assert not ok.fixed and ok.data is None and ok.crc == zlib.crc32(good)
        fixed = scanner.submit(CopyRange(fd, len(good), len(bad), "runs", rel, sizes)).result()
        assert fixed.fixed and bytes(fixed.data) == good and fixed.crc == zlib.crc32(good)
        fixed.release()
        for base in (0, 1000):         # kept bytes get every prefix set (the compiled path when rel[0] == 0)
            kept = scanner.scan(CopyRange(fd, len(good), len(bad), "runs", rel + base, sizes, base), keep=True)
            assert bytes(kept.data) == good and kept.crc == zlib.crc32(good)
            kept.release()
        with pytest.raises(SourceChanged):
            scanner.submit(CopyRange(fd, len(good + bad) - 5, 10, "runs")).result()
    finally:
        scanner.close()
        os.close(fd)


@pytest.mark.parametrize("method", kcopy.WRITE_MODES[:-1])
def test_write_parts_mixes_memory_and_ranges_with_one_crc(tmp_path, method):
    tiles = [os.urandom(n) for n in (100, 5000, 1)]
    good, rel, sizes = _prefixed(tiles, set())
    bad, _, _ = _prefixed(tiles, {0, 2})
    path = tmp_path / "s.bin"
    path.write_bytes(b"?" * 33 + good + bad + DATA[:200_000])
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / "o.bin", os.O_WRONLY | os.O_CREAT)
    scanner = RunScanner()
    try:
        copier = KernelCopier(out, method) if method in kcopy.METHODS else None
        parts = [b"header", CopyRange(fd, 33, len(good), "s", rel, sizes), bytearray(b"mid"),
                 CopyRange(fd, 33 + len(good), len(bad), "s", rel, sizes),
                 CopyRange(fd, 33 + 2 * len(good), 200_000, "s")]
        crc, n = write_parts(parts, lambda b: os.write(out, b), copier, scanner, True)
    finally:
        scanner.close()
        os.close(fd)
        os.close(out)
    want = b"header" + good + b"mid" + good + DATA[:200_000]
    assert (tmp_path / "o.bin").read_bytes() == want
    assert n == len(want) and crc == zlib.crc32(want)


def _zip_parts(tmp_path, fd, good, rel, sizes):
    return [b"aux-bytes", CopyRange(fd, 0, len(good), "s", rel, sizes), CopyRange(fd, 0, 1000, "s")]


@pytest.mark.parametrize("limit", [0xFFFFFFFF, 1])
@pytest.mark.parametrize("method", ["copy_file_range", "buffered"])
def test_zip_entries_from_file_ranges(tmp_path, limit, method):
    tiles = [os.urandom(n) for n in (3000, 20, 9)]
    good, rel, sizes = _prefixed(tiles, set())
    bad, _, _ = _prefixed(tiles, {1})
    src = tmp_path / "s.bin"
    src.write_bytes(bad)                        # prefixes fixed on the way into the zip
    staged = tmp_path / "staged.bundle"
    staged.write_bytes(DATA[:123_457])
    want = b"aux-bytes" + good + good[:1000]
    fd = os.open(src, os.O_RDONLY)
    path = tmp_path / "r.zip"
    try:
        with open(path, "wb") as f:
            f.write(b"pre")                      # the zip need not start at offset 0
            z = ZipWriter(f, zip64_limit=limit, copy_method=method)
            z.add_bytes("first", b"1")
            parts = [b"aux-bytes", CopyRange(fd, 0, len(bad), "s", rel, sizes), CopyRange(fd, 0, 1000, "s")]
            z.add_parts("computed.bundle", len(want), parts)
            z.add_parts("given.bundle", len(want), parts, crc=zlib.crc32(want))
            z.add_file("staged.bundle", str(staged), 123_457, zlib.crc32(DATA[:123_457]))
            z.add_bytes("last", b"2")
            size = z.close()
        dry = ZipWriter(None, zip64_limit=limit, dry_run=True)
        dry.add_bytes("first", b"1")
        dry.add_parts("computed.bundle", len(want), [b"x" * len(want)], 0)
        dry.add_size("given.bundle", len(want))
        dry.add_file("staged.bundle", str(staged), 123_457, 0)
        dry.add_bytes("last", b"2")
        assert dry.close() == size
    finally:
        os.close(fd)
    raw = path.read_bytes()[3:]
    assert len(raw) == size
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert zf.testzip() is None
        assert zf.read("computed.bundle") == want and zf.read("given.bundle") == want
        assert zf.read("staged.bundle") == DATA[:123_457]
        assert [i.filename for i in zf.infolist()] == ["first", "computed.bundle", "given.bundle",
                                                       "staged.bundle", "last"]
    at = raw.index(b"PK\x03\x04" + struct.pack("<H", 45 if limit == 1 else 20), 10)
    assert struct.unpack_from("<L", raw, at + 14)[0] == zlib.crc32(want)   # patched into the local header


def test_zip_file_entries_refuse_changes_and_wrong_crcs(tmp_path):
    staged = tmp_path / "staged.bundle"
    staged.write_bytes(DATA[:5000])
    tiles = [b"abc"]
    good, rel, sizes = _prefixed(tiles, set())
    src = tmp_path / "s.bin"
    src.write_bytes(good)
    with open(tmp_path / "a.zip", "wb") as f:
        z = ZipWriter(f)
        with pytest.raises(BundleError, match="staged.bundle: the file changed"):
            z.add_file("a", str(staged), 4999, zlib.crc32(DATA[:4999]))
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(ValueError, match="CRC-32 is not the one planned"):
                z.add_parts("b", len(good), [CopyRange(fd, 0, len(good), "s", rel, sizes)], crc=12345)
            with pytest.raises(ValueError, match="announced"):
                z.add_parts("c", 99, [CopyRange(fd, 0, len(good), "s")])
        finally:
            os.close(fd)
        z.close()


def test_non_seekable_outputs_take_file_ranges_with_a_given_crc(tmp_path):
    good, rel, sizes = _prefixed([b"tile-bytes"], set())
    src = tmp_path / "s.bin"
    src.write_bytes(good)
    fd = os.open(src, os.O_RDONLY)

    class Sink(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += bytes(b)
            return len(b)

    try:
        sink = Sink()
        z = ZipWriter(sink)                     # no fileno: ranges are read and written from memory
        assert z.copier is None
        with pytest.raises(ValueError, match="non-seekable"):
            z.add_parts("x", len(good), [CopyRange(fd, 0, len(good), "s")])
        z.add_parts("y", len(good), [CopyRange(fd, 0, len(good), "s", rel, sizes)], crc=zlib.crc32(good))
        z.close()
    finally:
        os.close(fd)
    with zipfile.ZipFile(io.BytesIO(bytes(sink.data))) as zf:
        assert zf.read("y") == good


def test_a_fifo_named_like_a_bundle_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "R0000C0000.bundle"
    os.mkfifo(fifo)
    with pytest.raises(BundleError, match="not a regular file"):
        kcopy.open_source(str(fifo), 0, str(fifo))

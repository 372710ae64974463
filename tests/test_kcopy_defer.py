"""write_parts with `patch` (seekable outputs): long runs are copied in the kernel while the helper reads them for
their CRC; runs whose source prefixes were wrong are rewritten fixed. Bytes and CRC as the serial path's."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest

from tilecrate.package import kcopy
from tilecrate.package.kcopy import CopyRange, KernelCopier, RunScanner, write_parts


def _run(tiles: list[bytes], spoil: bool) -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    """(source bytes, wanted bytes, prefix offsets, sizes) of one run of prefixed tiles."""
    good, bad, rel, sizes = b"", b"", [], []
    for t in tiles:
        rel.append(len(good))
        sizes.append(len(t))
        good += struct.pack("<I", len(t)) + t
        bad += (b"\xde\xad\xbe\xef" if spoil else struct.pack("<I", len(t))) + t
    return bad, good, np.array(rel, dtype=np.uint64), np.array(sizes, dtype=np.uint32)


@pytest.mark.parametrize("defer_ahead", [0, 1, 4])
def test_deferred_runs_give_the_serial_bytes_and_crc(tmp_path, monkeypatch, defer_ahead):
    monkeypatch.setattr(kcopy, "DEFER_AHEAD", defer_ahead)
    rng = np.random.default_rng(5)
    src, want, parts_spec = b"", b"", []
    for k in range(12):                 # more runs than DEFER_AHEAD, every third one spoiled
        tiles = [rng.bytes(int(n)) for n in rng.integers(1, 40_000, 5)]
        bad, good, rel, sizes = _run(tiles, k % 3 == 1)
        parts_spec.append((len(src), len(bad), rel, sizes))
        src += bad
        want += b"<%d>" % k + good
    path = tmp_path / "s.bin"
    path.write_bytes(src)
    fd = os.open(path, os.O_RDONLY)
    outp = tmp_path / "o.bin"
    out = os.open(outp, os.O_RDWR | os.O_CREAT)
    scanner = RunScanner()
    patched = []

    def patch(at: int, data) -> None:
        patched.append(at)
        os.pwrite(out, bytes(data), at)

    try:
        parts = []
        for k, (off, n, rel, sizes) in enumerate(parts_spec):
            parts += [b"<%d>" % k, CopyRange(fd, off, n, "s", rel, sizes, 0)]
        crc, n = write_parts(parts, lambda b: os.write(out, b), KernelCopier(out), scanner, True,
                             kernel_min=0, patch=patch)
    finally:
        scanner.close()
        os.close(fd)
        os.close(out)
    assert outp.read_bytes() == want and n == len(want) and crc == zlib.crc32(want)
    assert len(patched) == 4            # the spoiled runs, each rewritten once
    assert all(p.scanned_crc is not None for p in parts if isinstance(p, CopyRange))
    assert [p.fixed for p in parts if isinstance(p, CopyRange)] == [k % 3 == 1 for k in range(12)]


def test_a_failed_read_of_a_deferred_run_is_an_error_and_leaves_no_scan_running(tmp_path):
    bad, good, rel, sizes = _run([b"x" * 5000, b"y" * 7000], False)
    path = tmp_path / "s.bin"
    path.write_bytes(good)
    fd = os.open(path, os.O_RDONLY)
    out = os.open(tmp_path / "o.bin", os.O_RDWR | os.O_CREAT)
    scanner = RunScanner()
    try:
        parts = [CopyRange(fd, 0, len(good), "s", rel, sizes), CopyRange(fd, 0, len(good) + 100, "s")]
        with pytest.raises(kcopy.SourceChanged):
            write_parts(parts, lambda b: os.write(out, b), KernelCopier(out), scanner, True,
                        patch=lambda at, d: None)
    finally:
        scanner.close()
        os.close(fd)
        os.close(out)

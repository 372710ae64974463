"""Tiles answered on the event loop (issue 11): `Cache.tile_cached` gives a tile's bytes only from a
held descriptor, an index read for that file version and the page cache (preadv RWF_NOWAIT), with
an fstat afterwards; anything else (bytes on the disk only, a bundle changed, truncated or not
opened yet, a file system without RWF_NOWAIT) is WOULD_BLOCK, and `tile()` on a read thread answers.
It never answers bytes `tile()` would not."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tilecrate import open_cache
from tilecrate.sample import SampleSpec, make_sample
from tilecrate.server.service import WOULD_BLOCK, Service
from tilecrate.sources import compact
from tilecrate.sources.model import BundleRef


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nowait") / "c"
    make_sample(root, SampleSpec(levels=(0, 1, 2)))
    return root


@pytest.fixture
def cache(base, tmp_path):
    import shutil

    shutil.copytree(base, tmp_path / "c")
    c = open_cache(str(tmp_path / "c"))
    try:
        yield c
    finally:
        c.close()


def _bundle(cache, level: int) -> str:
    return str(Path(cache.path) / "_alllayers" / f"L{level:02d}" / "R0000C0000.bundle")


def _present(cache, level: int) -> list[tuple[int, int]]:
    _, sizes = cache.index(BundleRef(level, 0, 0))
    return [(int(i) // 128, int(i) % 128) for i in range(len(sizes)) if sizes[i]]


def test_cached_tiles_are_the_bytes_tile_reads(cache):
    cells = _present(cache, 2)
    assert len(cells) >= 4
    row, col = cells[0]
    assert cache.tile_cached(2, row, col) is WOULD_BLOCK  # not opened by the tile route yet
    assert cache.tile(2, row, col)
    for row, col in cells:
        assert cache.tile_cached(2, row, col) == cache.tile(2, row, col)
    absent = next((r, c) for r in range(128) for c in range(128) if (r, c) not in set(cells))
    assert cache.tile_cached(2, *absent) is None and cache.tile(2, *absent) is None
    assert cache.tile_cached(2, -1, 0) is None
    assert cache.tile_cached(9, 0, 0) is WOULD_BLOCK  # no such level: tile() says (None)
    svc = Service.__new__(Service)
    svc.cache = cache
    data, ctype = svc.tile_nowait(2, *cells[0])
    assert data == cache.tile(2, *cells[0]) and ctype == "image/jpeg"


def test_bytes_not_in_the_page_cache_go_to_the_thread(cache, monkeypatch):
    # the path's look falls due 50 ms after the last: on a loaded machine that came between the steps below
    # and answered WOULD_BLOCK before any read (not what this test is about; tested on its own elsewhere)
    monkeypatch.setattr(compact, "PATH_CHECK_SECONDS", 600.0)
    row, col = _present(cache, 1)[0]
    want = cache.tile(1, row, col)
    fd = os.open(_bundle(cache, 1), os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages only can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    # a file system that keeps the pages (tmpfs) still answers them, and only them
    assert cache.tile_cached(1, row, col) in (WOULD_BLOCK, want)
    calls = []

    def would_block(*args):
        calls.append(args)
        raise BlockingIOError(errno.EAGAIN, "would block")

    real = compact.os.preadv
    monkeypatch.setattr(compact.os, "preadv", would_block)
    assert cache.tile_cached(1, row, col) is WOULD_BLOCK and calls
    assert cache._nowait  # EAGAIN is the disk, not the file system: tried again next time
    monkeypatch.setattr(compact.os, "preadv", real)
    assert cache.tile(1, row, col) == want
    assert cache.tile_cached(1, row, col) == want


def test_a_file_system_without_nowait_reads_is_not_asked_again(cache, monkeypatch):
    row, col = _present(cache, 1)[0]
    want = cache.tile(1, row, col)

    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(compact.os, "preadv", unsupported)
    assert cache.tile_cached(1, row, col) is WOULD_BLOCK and not cache._nowait
    monkeypatch.undo()
    assert cache.tile_cached(1, row, col) is WOULD_BLOCK  # the thread's way from now on
    assert cache.tile(1, row, col) == want


def test_a_bundle_changed_or_truncated_in_place_is_never_answered_from_the_loop(cache):
    cells = _present(cache, 2)
    row, col = cells[0]
    old = cache.tile(2, row, col)
    offsets, sizes = cache.index(BundleRef(2, 0, 0))
    i = row * 128 + col
    off, size = int(offsets[i]), int(sizes[i])
    path = _bundle(cache, 2)
    new = bytes(b ^ 0x5A for b in old)
    st = os.stat(path)
    with open(path, "r+b") as f:  # same size, other bytes, a later mtime
        f.seek(off)
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert cache.tile_cached(2, row, col) is WOULD_BLOCK
    assert cache.tile(2, row, col) == new  # the thread's read of the new version
    assert cache.tile_cached(2, row, col) == new
    # truncated before the tile's end: never old bytes from the loop; tile() reports it
    row2, col2 = cells[-1]
    before = cache.tile(2, row2, col2)
    assert cache.tile_cached(2, row2, col2) == before
    end = int(offsets[row2 * 128 + col2])
    os.truncate(path, end)
    assert cache.tile_cached(2, row2, col2) is WOULD_BLOCK
    with pytest.raises(Exception) as e:
        cache.tile(2, row2, col2)
    assert "R0000C0000.bundle" in str(e.value)

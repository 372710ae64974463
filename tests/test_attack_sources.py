"""Attacks on the PMTiles and folder sources (hand-made hostile files, read in process): numbers
chosen to wrap uint64 arithmetic, run lengths that make tile counts explode, gzip bombs in
directories, and tile folders holding FIFOs, devices and symlink loops. Each must end as a one-line
CacheError at bounded time and memory, never a bare numpy/OS error and never a blocked read."""
from __future__ import annotations

import gzip
import io
import os
import resource
import struct
import subprocess
import sys
import time

import pytest
from PIL import Image

from test_sources_open import _directory, _pm_file, _varint
from tilecrate.errors import CacheError
from tilecrate.sources import open_cache
from tilecrate.sources import pmtiles as pm

TILE = b"t" * 100


def _write_pm(path, entries, leaf: bytes | None = None) -> None:
    root = _directory(entries)
    if leaf is None:
        path.write_bytes(_pm_file(root, 0, 0, 127 + len(root), len(TILE), TILE))
    else:
        path.write_bytes(_pm_file(root, 127 + len(root), len(leaf), 127 + len(root) + len(leaf), len(TILE),
                                  leaf + TILE))


@pytest.mark.parametrize("entries, message", [
    # offset + length wrapped uint64 to 10: passed the section check, then os.pread raised OverflowError
    ([(0, 1, 20, 2 ** 64 - 10)], "past the end of the tile data"),
    # a leaf at offset 2**64 - 10 (wrapped the same way, at open)
    ([(0, 0, 20, 2 ** 64 - 10)], "leaf directory points past the leaf section"),
    # run lengths summing to 2**64 wrapped to 0 tiles, then np.repeat got negative counts (ValueError)
    ([(0, 2 ** 63, 20, 0), (2 ** 63, 2 ** 63, 20, 0)], "more than 20000000 tiles"),
    ([(0, 2 ** 64 - 1, 20, 0), (5, 1, 20, 0)], "more than 20000000 tiles"),
    # tile ids + run length past 2**64 wrap to zoom 0
    ([(2 ** 64 - 1, 2, 20, 0)], "past zoom 30"),
    # one run of the limit plus one
    ([(0, pm.MAX_TILES + 1, 20, 0)], "more than 20000000 tiles"),
])
def test_wrapping_numbers_are_cache_errors(tmp_path, entries, message):
    p = tmp_path / "w.pmtiles"
    _write_pm(p, entries, leaf=b"\x00" * 100 if entries[0][1] == 0 else None)
    with pytest.raises(CacheError, match=message):
        open_cache(p)


def test_the_cli_reports_a_wrapped_offset_in_one_line(tmp_path):
    p = tmp_path / "w.pmtiles"
    _write_pm(p, [(0, 1, 20, 2 ** 64 - 10)])
    r = subprocess.run([sys.executable, "-m", "tilecrate.cli", "inspect", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "past the end of the tile data" in lines[0], r.stderr


def test_a_varint_past_64_bits_and_a_truncated_one(tmp_path):
    with pytest.raises(CacheError, match="longer than 64 bits"):
        pm.decode_varints(b"\xff" * 10 + b"\x01", "t")
    p = tmp_path / "v.pmtiles"
    root = gzip.compress(_varint(1) + _varint(0) + b"\x80\x80", mtime=0)
    p.write_bytes(_pm_file(root, 0, 0, 127 + len(root), len(TILE), TILE))
    with pytest.raises(CacheError, match="says 1 entries but holds 1 numbers"):   # counted before decoding
        open_cache(p)
    with pytest.raises(CacheError, match="ends inside a number"):
        pm.decode_varints(b"\x01\x80\x80", "t")


def test_a_gzip_bomb_directory_stops_at_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(pm, "MAX_DIRECTORY", 1 << 20)
    # 8 MiB of one repeated entry compresses to some 8 kB; the inflater must stop at the limit
    body = _varint(1) + b"\x00" * (8 << 20)
    root = gzip.compress(body, mtime=0, compresslevel=9)
    assert len(root) < 64 << 10
    p = tmp_path / "bomb.pmtiles"
    p.write_bytes(_pm_file(root, 0, 0, 127 + len(root), len(TILE), TILE))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CacheError, match="inflates past 1 MiB"):
        open_cache(p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 8 << 10   # KiB: not the 8 MiB body


def test_a_small_archive_whose_directory_inflates_far_is_refused_before_decoding(tmp_path):
    """Before: a 32 KB archive whose root inflates to 32 MiB of one-byte numbers (announcing 1 entry)
    was decoded whole first, with an int64 and a uint64 array per byte: 5 s and 1.8 GB of memory (at
    the 256 MiB directory limit some 14 GB). Measured in a fresh process, so its peak is its own."""
    body = _varint(1) + b"\x00" * (32 << 20)
    root = gzip.compress(body, compresslevel=9, mtime=0)
    p = tmp_path / "far.pmtiles"
    p.write_bytes(_pm_file(root, 0, 0, 127 + len(root), len(TILE), TILE))
    assert p.stat().st_size < 64 << 10
    code = ("import resource, sys\nfrom tilecrate.sources import open_cache\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "try:\n    open_cache(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) >> 10)\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60)
    out = r.stdout.splitlines()
    assert out[0].startswith("CacheError") and "says 1 entries but holds 33554432 numbers" in out[0], r.stdout + r.stderr
    assert int(out[1]) < 200, f"{out[1]} MiB for a {p.stat().st_size}-byte archive"


def test_many_leaves_aliasing_one_leaf_are_bounded(tmp_path, monkeypatch):
    """Leaf entries naming the same bytes with different lengths (gzip ignores the trailing byte) are
    not one directory loop each; the directory budget and the tile limit must still stop them."""
    monkeypatch.setattr(pm, "MAX_TILES", 50_000)
    leaf = _directory([(i, 1, len(TILE), 0) for i in range(10_000)])
    pad = leaf + b"\x00" * 64
    root = _directory([(i, 0, len(leaf) + i, 0) for i in range(64)])
    p = tmp_path / "alias.pmtiles"
    p.write_bytes(_pm_file(root, 127 + len(root), len(pad), 127 + len(root) + len(pad), len(TILE), pad + TILE))
    t = time.monotonic()
    with pytest.raises(CacheError, match="more than 50000 tiles|addressed twice"):
        open_cache(p)
    assert time.monotonic() - t < 5


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_tile_folder_with_fifos_devices_and_symlink_loops(tmp_path):
    """Never blocks on a FIFO (the read would wait for a writer for ever), never reads /dev/zero, and a
    self-referencing symlink or an x folder linking back to its level is a one-line error or skipped."""
    root = tmp_path / "xyz"
    png = _png()
    for z in range(3):
        for x in range(1 << z):
            (root / str(z) / str(x)).mkdir(parents=True)
            for y in range(1 << z):
                (root / str(z) / str(x) / f"{y}.png").write_bytes(png)
    os.remove(root / "2/1/1.png")
    os.mkfifo(root / "2/1/1.png")
    os.remove(root / "2/0/3.png")
    os.symlink("/dev/zero", root / "2/0/3.png")
    os.remove(root / "1/0/1.png")
    os.symlink(root / "1/0/1.png", root / "1/0/1.png")
    os.symlink(root / "2", root / "2/9")
    t = time.monotonic()
    with open_cache(root) as c:
        assert c.levels == [0, 1, 2]
        assert c.tile(2, 0, 0) == png
        with pytest.raises(CacheError, match="2/1/1.png: not a regular file"):
            c.tile(2, 1, 1)
        with pytest.raises(CacheError, match="2/0/3.png: not a regular file"):
            c.tile(2, 3, 0)
        with pytest.raises(CacheError, match="1/0/1.png: cannot open"):
            c.tile(1, 1, 0)
        assert c.tile(2, 0, 9) is None            # the looping x folder holds no tile names
        assert any("2/9/" in w and "skipped" in w for w in c.warnings)
    assert time.monotonic() - t < 10


DEEP = b"[" * 200_000 + b"]" * 200_000


def test_deeply_nested_metadata_is_ignored_not_a_bare_recursion_error(tmp_path):
    """Before: json.loads raised RecursionError, which the readers did not expect: the archive or
    folder could not be opened and the error named nothing."""
    mo = 127 + len(root := _directory([(0, 1, len(TILE), 0)]))
    head = b"PMTiles\x03" + struct.pack("<8Q", 127, len(root), mo, len(DEEP), 0, 0, mo + len(DEEP), len(TILE))
    head += struct.pack("<3Q", 1, 1, 1) + bytes([1, 1, 1, 2, 0, 1]) + struct.pack("<4i", 0, 0, 10, 10)
    head += bytes([0]) + struct.pack("<2i", 0, 0)
    p = tmp_path / "deep.pmtiles"
    p.write_bytes(head + root + DEEP + TILE)
    with open_cache(p) as c:
        assert c.source_metadata == {} and c.tile(0, 0, 0) == TILE
    folder = tmp_path / "xyz"
    (folder / "0" / "0").mkdir(parents=True)
    (folder / "0" / "0" / "0.png").write_bytes(_png())
    (folder / "metadata.json").write_bytes(DEEP)
    (folder / "iteminfo.json").write_bytes(b'{"title": ' + DEEP + b"}")
    with open_cache(folder) as c:
        assert c.source_metadata == {} and c.tile(0, 0, 0) == _png()
        assert any("metadata.json: not read" in w for w in c.warnings), c.warnings


def test_xyz_tiles_outside_their_level_are_skipped(tmp_path):
    """Before: {z}/{x}/{y} names past 2**z (x up to ten digits) were listed as tiles: the estimate
    counted them, and a .tpkx export failed with a bare ValueError (a bundle position past 2**32)."""
    from tilecrate.estimate import estimate
    from tilecrate.export import export
    from tilecrate.request import ExportRequest

    root = tmp_path / "xyz"
    png = _png()
    for z, x, y in [(0, 0, 0), (1, 1, 1), (1, 9999999999, 0), (1, 0, 2), (1, 2, 1), (3, 7, 7)]:
        (root / str(z) / str(x)).mkdir(parents=True, exist_ok=True)
        (root / str(z) / str(x) / f"{y}.png").write_bytes(png)
    with open_cache(root) as c:
        assert sorted(w.split(": ")[1] for w in c.warnings) == ["outside the level's grid; skipped"] * 3
        assert estimate(c, ExportRequest(levels="0-3")).total_tiles == 3
        result = export(c, ExportRequest(levels="0-3"), str(tmp_path / "o.tpkx"))
    assert result.tiles == 3
    with open_cache(tmp_path / "o.tpkx") as back:
        assert sorted((lv, r, col) for lv, r, col, _ in back.iter_tiles()) == [(0, 0, 0), (1, 1, 1), (3, 7, 7)]


def test_a_served_vector_package_with_a_deeply_nested_style(tmp_path, real_dir):
    """The style of an unpacked .vtpk nested a few thousand levels deep: an Esri 400 naming the
    package's style (before: "a parameter is nested too deeply", blaming the client), tiles and the
    service still served, no traceback."""
    import zipfile

    from conftest import real_path
    from test_server_support import Server, free_port, write_config

    with zipfile.ZipFile(real_path("natural-earth.vtpk")) as zf:
        zf.extractall(tmp_path / "x")
    src = tmp_path / "x" / "p12"
    (src / "resources" / "styles" / "root.json").write_bytes(DEEP)
    data = tmp_path / "data"
    srv = Server(write_config(tmp_path / "t.toml", data, {"V": {"source": str(src)}}), data, free_port()).start()
    try:
        base = "/arcgis/rest/services/V/VectorTileServer"
        for path in ("/resources/styles/root.json", "/resources/styles"):
            err = srv.get(base + path, {"f": "json"}).json()["error"]
            assert err["code"] == 400 and "style is nested too deeply" in err["details"][0], err
        assert srv.get(base, {"f": "json"}).json()["type"] == "indexedVector"
        assert srv.get(base + "/tile/0/0/0.pbf").status == 200
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()

"""The compiled bundle parser: valid input parses, every bad input raises BundleError, nothing reads out of bounds."""
from __future__ import annotations

import io
import os
import random
import shutil
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import tilecrate
from tilecrate import _bundle
from tilecrate.errors import BundleError, CacheError
from tilecrate.sample import SampleSpec, _v1_bundle, _v2_bundle
from test_fixtures import reference_tiles


def _v2(tiles):
    return _v2_bundle(tiles)


def test_v2_roundtrip_and_layout():
    tiles = {0: b"a" * 10, 129: b"bb", 16383: b"c" * 300}
    data = _v2(tiles)
    offsets, sizes = _bundle.parse_v2(data, "t")
    assert offsets.dtype == np.uint64 and sizes.dtype == np.uint32 and len(sizes) == 16384
    assert np.count_nonzero(sizes) == 3
    for i, t in tiles.items():
        assert data[offsets[i]:offsets[i] + sizes[i]] == t
    assert _bundle.parse_v2(_v2({}), "t")[1].sum() == 0
    assert len(_v2({})) == _bundle.V2_DATA_START


def test_v1_roundtrip_is_row_major():
    tiles = {0: b"x" * 5, 1: b"row0col1", 128: b"row1col0", 16383: b"last"}
    bundle, bundlx = _v1_bundle(tiles, 0, 0)
    offsets, sizes = _bundle.parse_v1(bundlx, bundle, "t")
    for i, t in tiles.items():
        assert bundle[offsets[i]:offsets[i] + sizes[i]] == t
    # without the 16-byte footer (GeoTools' hand-made files)
    offsets2, sizes2 = _bundle.parse_v1(bundlx[:-16], bundle, "t")
    assert (offsets2 == offsets).all() and (sizes2 == sizes).all()


@pytest.mark.parametrize("cut", [0, 1, 63, 64, 131135])
def test_v2_truncated_header_or_index(cut):
    data = _v2({5: b"hello"})
    with pytest.raises(BundleError, match="truncated"):
        _bundle.parse_v2(data[:cut] if cut else b"", "L03/R0000C0000.bundle")


def test_v2_truncated_tile_names_file_and_tile():
    data = _v2({130: b"x" * 1000})
    with pytest.raises(BundleError) as e:
        _bundle.parse_v2(data[:-10], "L03/R0000C0000.bundle")
    msg = str(e.value)
    assert "L03/R0000C0000.bundle" in msg and "row 1, column 2" in msg and "past the end" in msg


@pytest.mark.parametrize("field,offset,value,word", [
    ("version", 0, 2, "version"), ("offset bytes", 12, 4, "offset byte count"),
    ("user header", 32, 41, "user header offset"), ("index size", 60, 8, "index size"),
])
def test_v2_bad_header_fields(field, offset, value, word):
    data = bytearray(_v2({0: b"x"}))
    struct.pack_into("<I", data, offset, value)
    with pytest.raises(BundleError, match=word):
        _bundle.parse_v2(bytes(data), "b")


def test_v2_size_and_offset_at_the_limits():
    data = bytearray(_v2({0: b"x"}))
    for rec in ((1 << 40) - 1 | (1 << 40), (len(data) - 1) | (2 << 40), (1 << 64) - 1):
        struct.pack_into("<Q", data, 64, rec)
        with pytest.raises(BundleError, match="past the end"):
            _bundle.parse_v2(bytes(data), "b")
    struct.pack_into("<Q", data, 64, (len(data) - 1) | (1 << 40))   # last byte: fine
    assert _bundle.parse_v2(bytes(data), "b")[1][0] == 1


def test_v1_errors():
    bundle, bundlx = _v1_bundle({0: b"tile" * 10}, 0, 0)
    with pytest.raises(BundleError, match=".bundlx is 100 bytes"):
        _bundle.parse_v1(bundlx[:100], bundle, "b")
    with pytest.raises(BundleError, match="truncated"):
        _bundle.parse_v1(bundlx, bundle[:59], "b")
    with pytest.raises(BundleError, match="size 40 at offset 65596, past the end"):
        _bundle.parse_v1(bundlx, bundle[:-1], "b")
    bad = bytearray(bundlx)
    bad[16:21] = (len(bundle) - 2).to_bytes(5, "little")            # prefix would straddle the end
    with pytest.raises(BundleError, match="points at offset"):
        _bundle.parse_v1(bytes(bad), bundle, "b")
    bad[16:21] = (2**40 - 1).to_bytes(5, "little")
    with pytest.raises(BundleError, match="points at offset"):
        _bundle.parse_v1(bytes(bad), bundle, "b")
    hdr = bytearray(bundlx)
    struct.pack_into("<I", hdr, 12, 4)
    with pytest.raises(BundleError, match="bundlx header"):
        _bundle.parse_v1(bytes(hdr), bundle, "b")


def _check_parse_v2(data: bytes) -> None:
    try:
        offsets, sizes = _bundle.parse_v2(data, "fuzz")
    except BundleError:
        return
    ends = offsets.astype(np.uint64) + sizes.astype(np.uint64)
    assert (ends[sizes > 0] <= len(data)).all()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_v2_random_bytes(data):
    _check_parse_v2(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 16383), st.integers(0, 2**64 - 1)), max_size=40),
       st.integers(0, 400000))
def test_fuzz_v2_corrupt_index(records, length):
    data = bytearray(_v2({7: b"q" * 100, 8000: b"r" * 50}))
    for i, rec in records:
        struct.pack_into("<Q", data, 64 + 8 * i, rec)
    data = bytes(data[:length]) if length < len(data) else bytes(data) + bytes(length - len(data))
    _check_parse_v2(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 16383), st.integers(0, 2**40 - 1)), max_size=40),
       st.lists(st.tuples(st.integers(0, 70000), st.integers(0, 2**32 - 1)), max_size=10),
       st.integers(0, 70000))
def test_fuzz_v1_corrupt(index_edits, size_edits, cut):
    bundle, bundlx = _v1_bundle({0: b"a" * 300, 200: b"b" * 20}, 0, 0)
    bundle, bundlx = bytearray(bundle), bytearray(bundlx)
    for i, off in index_edits:
        bundlx[16 + 5 * i:21 + 5 * i] = off.to_bytes(5, "little")
    for pos, val in size_edits:
        if pos + 4 <= len(bundle):
            struct.pack_into("<I", bundle, pos, val)
    bundle = bytes(bundle[:cut]) if cut < len(bundle) else bytes(bundle)
    try:
        offsets, sizes = _bundle.parse_v1(bytes(bundlx), bundle, "fuzz")
    except BundleError:
        return
    assert ((offsets + sizes)[sizes > 0] <= len(bundle)).all()


def test_random_truncations_of_real_bundles(real_dir):
    rng = random.Random(1)
    for p in list(real_dir.rglob("*.bundle"))[:8]:
        data = p.read_bytes()
        bx = p.with_suffix(".bundlx")
        for _ in range(30):
            cut = rng.randrange(0, len(data))
            try:
                if bx.exists():
                    _bundle.parse_v1(bx.read_bytes(), data[:cut], p.name)
                else:
                    _bundle.parse_v2(data[:cut], p.name)
            except BundleError as e:
                assert p.name in str(e)


# --- through open_cache ------------------------------------------------------------------


def test_sample_caches_match_reference(sample_v2, sample_v1, sample_png, sample_mixed):
    for path, fmt in ((sample_v2, "JPEG"), (sample_v1, "JPEG"), (sample_png, "PNG"), (sample_mixed, "MIXED")):
        ref = reference_tiles(path)
        with tilecrate.open_cache(path) as c:
            got = {(lv, r, col): t for lv, r, col, t in c.iter_tiles()}
            assert got == ref and c.tile_format == fmt
        assert len(set(ref.values())) == len(ref)            # every tile's bytes are unique
        kinds = {Image.open(io.BytesIO(t)).format for t in ref.values()}
        assert kinds == {"JPEG": {"JPEG"}, "PNG": {"PNG"}, "MIXED": {"JPEG", "PNG"}}[fmt]


def test_sample_jpeg_sizes_are_photo_like(sample_v2):
    with tilecrate.open_cache(sample_v2) as c:
        sizes = [len(t) for lv, _, _, t in c.iter_tiles(5)]
    assert 10_000 <= np.median(sizes) <= 40_000


def test_truncated_bundle_in_folder(tmp_path, sample_v2):
    cache_dir = tmp_path / "c"
    shutil.copytree(sample_v2, cache_dir)
    victim = cache_dir / "_alllayers" / "L05" / "R0000C0000.bundle"
    victim.write_bytes(victim.read_bytes()[:200_000])
    with tilecrate.open_cache(cache_dir) as c:
        assert c.tile(0, 0, 0) is not None                  # other bundles still read
        with pytest.raises(BundleError, match="R0000C0000.bundle.*past the end"):
            c.tile(5, 10, 16)
    victim.write_bytes(b"")
    with tilecrate.open_cache(cache_dir) as c:
        with pytest.raises(BundleError, match="empty"):
            c.index(tilecrate.BundleRef(5, 0, 0))


def test_v1_without_bundlx(tmp_path, sample_v1):
    cache_dir = tmp_path / "c"
    shutil.copytree(sample_v1, cache_dir)
    for p in cache_dir.rglob("*.bundlx"):
        p.unlink()
    with pytest.raises(CacheError, match="no .bundlx"):
        tilecrate.open_cache(cache_dir)


def test_open_errors(tmp_path, sample_v2):
    with pytest.raises(CacheError, match="no such file"):
        tilecrate.open_cache(tmp_path / "missing")
    (tmp_path / "x.tpkx").write_bytes(b"hello world")
    with pytest.raises(CacheError, match="not a zip"):
        tilecrate.open_cache(tmp_path / "x.tpkx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a cache folder"):
        tilecrate.open_cache(tmp_path / "empty")
    with zipfile.ZipFile(tmp_path / "nometa.tpk", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CacheError, match="no root.json or conf.xml"):
        tilecrate.open_cache(tmp_path / "nometa.tpk")
    broken = tmp_path / "broken"
    shutil.copytree(sample_v2, broken)
    (broken / "conf.xml").write_text("<CacheInfo><oops")
    with pytest.raises(CacheError, match="not valid XML"):
        tilecrate.open_cache(broken)
    conf = (sample_v2 / "conf.xml").read_text()
    (broken / "conf.xml").write_text(conf.replace("esriMapCacheStorageModeCompactV2", "esriMapCacheStorageModeExploded"))
    with pytest.raises(CacheError, match="exploded storage but _alllayers holds no exploded tiles.*compact .bundle"):
        tilecrate.open_cache(broken)
    (broken / "conf.xml").write_text(conf.replace("<PacketSize>128", "<PacketSize>64"))
    with pytest.raises(CacheError, match="packet size 64"):
        tilecrate.open_cache(broken)


def test_truncated_package(tmp_path, real_dir):
    from conftest import real_path
    data = real_path("Usa.tpkx").read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 1000):
        p = tmp_path / f"cut{cut}.tpkx"
        p.write_bytes(data[:cut])
        try:
            with tilecrate.open_cache(p) as c:
                for ref in c.bundles():
                    try:
                        c.index(ref)
                    except BundleError:
                        pass
        except CacheError:
            pass


def test_deflated_and_stored_entries_agree(tmp_path, sample_v2):
    """A package with deflated bundles (as real files have) reads the same tiles as the folder."""
    pkg = tmp_path / "deflated.tpk"
    with zipfile.ZipFile(pkg, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sample_v2.rglob("*"):
            if p.is_file():
                z.write(p, "v101/Layers/" + p.relative_to(sample_v2).as_posix())
    with tilecrate.open_cache(sample_v2) as a, tilecrate.open_cache(pkg) as b:
        assert list(a.iter_tiles()) == list(b.iter_tiles())
        assert b.kind == "tpk"


def test_inflated_bundles_kept_within_a_byte_budget(tmp_path, sample_v2, monkeypatch):
    """Inflated bundles are kept up to a byte budget per package (eight 256 MiB giants were 2 GiB), the
    newest always; tiles read the same whether their bundle was kept or inflated again."""
    from tilecrate import sourcefiles

    pkg = tmp_path / "deflated.tpk"
    with zipfile.ZipFile(pkg, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sample_v2.rglob("*"):
            if p.is_file():
                z.write(p, "v101/Layers/" + p.relative_to(sample_v2).as_posix())
    sizes = sorted(p.stat().st_size for p in sample_v2.rglob("*.bundle"))
    budget = sizes[-1] + sizes[-2] - 1                  # never room for the two largest bundles together
    monkeypatch.setattr(sourcefiles, "_INFLATED_BYTES", budget)
    with tilecrate.open_cache(sample_v2) as a, tilecrate.open_cache(pkg) as b:
        expected = list(a.iter_tiles())
        for _ in range(2):
            assert list(b.iter_tiles()) == expected
            store = b._store
            assert isinstance(store, sourcefiles.ZipStore)
            kept = sum(len(d) for d in store._inflated.values())
            assert kept == store._inflated_bytes
            assert 0 < kept <= budget or len(store._inflated) == 1
            assert len(store._inflated) <= sourcefiles._INFLATED_CACHE


def test_threads_read_concurrently(sample_v2):
    from concurrent.futures import ThreadPoolExecutor
    with tilecrate.open_cache(sample_v2) as c:
        expected = {(lv, r, col): t for lv, r, col, t in c.iter_tiles()}
        keys = list(expected) * 4
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda k: c.tile(*k), keys))
    assert got == [expected[k] for k in keys]


def test_bundle_file_ranges(tmp_path, sample_v2, real_dir):
    from conftest import real_path
    for path in (sample_v2, real_path("Usa.tpkx"), real_path("states_filled.tpk")):
        with tilecrate.open_cache(path) as c:
            for ref in c.bundles():
                file, offset, file_size = c.bundle_file(ref)
                assert os.path.getsize(file) == file_size
                with open(file, "rb") as f, c.open_bundle(ref) as data:
                    f.seek(offset)
                    assert f.read(data.buf.nbytes) == bytes(data.buf)
    with tilecrate.open_cache(real_path("sample_v2.tpkx")) as c:       # deflated entries: memory only
        assert all(c.bundle_file(ref) is None for ref in c.bundles())


def test_bundle_truncated_while_open(tmp_path, sample_v2):
    """A bundle rewritten under a running server: an error for that tile, never SIGBUS."""
    cache_dir = tmp_path / "c"
    shutil.copytree(sample_v2, cache_dir)
    victim = cache_dir / "_alllayers" / "L05" / "R0000C0000.bundle"
    with tilecrate.open_cache(cache_dir) as c:
        ref = tilecrate.BundleRef(5, 0, 0)
        offsets, sizes = c.index(ref)
        last = int(np.argmax(offsets * (sizes > 0)))
        row, col = last // 128, last % 128
        assert c.tile(5, row, col) is not None
        os.truncate(victim, int(offsets[last]) + 10)
        # the truncated file is read again: its index now points past its end
        with pytest.raises(BundleError, match="R0000C0000.bundle.*past the end"):
            c.tile(5, row, col)


def test_parse_v2_index_from_the_head_alone():
    data = _v2({3: b"abc", 9000: b"z" * 70})
    head = data[:_bundle.V2_DATA_START]
    offsets, sizes = _bundle.parse_v2_index(head, len(data), "b")
    assert data[offsets[9000]:offsets[9000] + sizes[9000]] == b"z" * 70
    with pytest.raises(BundleError, match="past the end"):
        _bundle.parse_v2_index(head, len(data) - 1, "b")
    with pytest.raises(BundleError, match="only 100 bytes of the header and index"):
        _bundle.parse_v2_index(head[:100], len(data), "b")
    with pytest.raises(BundleError, match="read from a file of"):
        _bundle.parse_v2_index(data, 10, "b")


def test_tile_range_and_derived_extent(real_dir):
    from conftest import real_path
    with tilecrate.open_cache(real_path("googlemaps.tpkx")) as c:
        assert c.tile_range(0) == (0, 1, 0, 0)          # rows outside the nominal 2^0 grid
        assert c.tile_range(23) is None
    with tilecrate.open_cache(real_path("tiler-sample")) as c:
        cells = [(r, col) for _, r, col, _ in c.iter_tiles(2)]
        rows, cols = [r for r, _ in cells], [col for _, col in cells]
        assert c.tile_range(2) == (min(rows), max(rows), min(cols), max(cols))
        c.full_extent = None
        x0, _, _, y1 = c.scheme.tile_bounds(2, min(rows), min(cols))
        _, y0, x1, _ = c.scheme.tile_bounds(2, max(rows), max(cols))
        e = c.data_extent()
        assert (e.xmin, e.ymin, e.xmax, e.ymax) == (x0, y0, x1, y1)


# --- compiled entry points refuse every bad argument (issue 9 item 8) --------------------


def test_parse_v1_fd_agrees_with_parse_v1_on_real_and_generated_bundles(real_dir, tmp_path):
    pairs = [(p, p.with_suffix(".bundlx")) for p in real_dir.rglob("*.bundle") if p.with_suffix(".bundlx").exists()]
    bundle, bundlx = _v1_bundle({0: b"a" * 300, 200: b"b" * 20, 16383: b"z" * 5000}, 0, 0)
    (tmp_path / "g.bundle").write_bytes(bundle)
    (tmp_path / "g.bundlx").write_bytes(bundlx)
    pairs.append((tmp_path / "g.bundle", tmp_path / "g.bundlx"))
    assert len(pairs) >= 3
    for p, bx in pairs:
        data, index = p.read_bytes(), bx.read_bytes()
        fd = os.open(p, os.O_RDONLY)
        try:
            a = _bundle.parse_v1_fd(index, fd, 0, len(data), p.name)
        finally:
            os.close(fd)
        b = _bundle.parse_v1(index, data, p.name)
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


def test_parse_v1_fd_refuses_bad_arguments_and_short_files(tmp_path):
    bundle, bundlx = _v1_bundle({0: b"a" * 300, 9000: b"b" * 20}, 0, 0)
    p = tmp_path / "b.bundle"
    p.write_bytes(bundle)
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="open file descriptor"):
            _bundle.parse_v1_fd(bundlx, -1, 0, len(bundle))
        for base, length in ((2**63, 10), (0, 2**63)):
            with pytest.raises(ValueError, match="out of range"):
                _bundle.parse_v1_fd(bundlx, fd, base, length)
        with pytest.raises(BundleError, match=".bundlx is 10 bytes"):
            _bundle.parse_v1_fd(bundlx[:10], fd, 0, len(bundle))
        with pytest.raises(BundleError, match="truncated"):
            _bundle.parse_v1_fd(bundlx, fd, 0, 59)
        with pytest.raises(BundleError, match="past the end"):        # the index points past `length`
            _bundle.parse_v1_fd(bundlx, fd, 0, len(bundle) - 10)
        # the file is shorter than the caller measured (truncated between fstat and read)
        far = bytearray(bundlx)
        far[16 + 5 * 5:21 + 5 * 5] = (len(bundle) + 10).to_bytes(5, "little")
        with pytest.raises(BundleError, match="changed while being read"):
            _bundle.parse_v1_fd(bytes(far), fd, 0, len(bundle) + 1000)
        with pytest.raises(BundleError, match="ends before its header"):
            _bundle.parse_v1_fd(bundlx, fd, len(bundle), len(bundle))
        bad = bytearray(bundlx)
        struct.pack_into("<I", bad, 12, 4)
        with pytest.raises(BundleError, match="bundlx header"):
            _bundle.parse_v1_fd(bytes(bad), fd, 0, len(bundle))
    finally:
        os.close(fd)
    with pytest.raises(OSError):                                      # a closed descriptor
        _bundle.parse_v1_fd(bundlx, fd, 0, len(bundle))


def test_pread_checked_refuses_bad_arguments(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    fd = os.open(p, os.O_RDONLY)
    st = os.fstat(fd)
    fid = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    try:
        assert _bundle.pread_checked(fd, 2, 3, fid) == (b"234", True)
        assert _bundle.pread_checked(fd, 8, 5, fid) == (None, True)            # the file ends first
        assert _bundle.pread_checked(fd, 0, 1, fid[:2] + (11,) + fid[3:]) == (b"0", False)
        assert _bundle.pread_checked(fd, 0, 1, fid[:4] + (fid[4] - 1,)) == (b"0", False)   # ctime moved
        with pytest.raises(ValueError):
            _bundle.pread_checked(-1, 0, 1, fid)
        for off, n in ((0, -1), (0, 1 << 24), (2**63, 1)):
            with pytest.raises(ValueError, match="out of range"):
                _bundle.pread_checked(fd, off, n, fid)
        with pytest.raises(ValueError, match="fid"):
            _bundle.pread_checked(fd, 0, 1, fid[:3])
        with pytest.raises(ValueError, match="fid"):
            _bundle.pread_checked(fd, 0, 1, fid[:4])
    finally:
        os.close(fd)


def test_header_checks_take_any_buffer():
    for n in (0, 1, 63, 64, 131135):
        assert "truncated" in _bundle.v2_header_problem(bytes(n))
        with pytest.raises(BundleError):
            _bundle.parse_v2(bytes(n), "b")
        with pytest.raises(BundleError):
            _bundle.parse_v2_index(bytes(n), 10**6, "b")
    bundle, bundlx = _v1_bundle({0: b"x"}, 0, 0)
    assert ".bundlx is 0 bytes" in _bundle.v1_header_problem(b"", bundle)
    assert "truncated" in _bundle.v1_header_problem(bundlx, b"")
    with pytest.raises(BundleError):
        _bundle.parse_v1(bundlx, b"", "b")

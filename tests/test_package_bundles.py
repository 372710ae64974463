"""Output bundles: headers, indexes and tile bytes, checked by an independent struct-level reader."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from tilecrate import _plan
from tilecrate.cache import BundleRef, open_cache
from tilecrate.errors import BundleError
from tilecrate.package import bundles
from tilecrate.package.bundles import output_sizes, plan_bundle, plan_from_tiles

N = 16384


def read_v2(data: bytes) -> dict:
    """Independent V2 reader (FORMATS.md §6.3): header fields and {cell: tile bytes}."""
    hdr = struct.unpack_from("<4I3Q6I", data, 0)
    tiles, empties = {}, set()
    for i in range(N):
        rec = struct.unpack_from("<Q", data, 64 + 8 * i)[0]
        off, size = rec & ((1 << 40) - 1), rec >> 40
        if size == 0:
            empties.add(rec)
            continue
        assert struct.unpack_from("<I", data, off - 4)[0] == size, "size prefix before the tile"
        tiles[i] = data[off:off + size]
    return {"header": hdr, "tiles": tiles, "empty_records": empties}


def read_v1(bundle: bytes, bundlx: bytes) -> dict:
    """Independent V1 reader (FORMATS.md §6.1-6.2); cells returned row-major."""
    hdr = struct.unpack_from("<4I3Q5I", bundle, 0)
    assert len(bundlx) == 81952
    assert struct.unpack_from("<4I", bundlx, 0) == (3, 16, N, 5)
    assert struct.unpack_from("<4I", bundlx, 16 + 5 * N) == (0, 16, 16, 0)
    tiles, bad_empty = {}, []
    for j in range(N):
        off = int.from_bytes(bundlx[16 + 5 * j:21 + 5 * j], "little")
        size = struct.unpack_from("<I", bundle, off)[0]
        col, row = divmod(j, 128)
        if size == 0:
            if off != 60 + 4 * j:
                bad_empty.append(j)
            continue
        tiles[row * 128 + col] = bundle[off + 4:off + 4 + size]
    return {"header": hdr, "tiles": tiles, "bad_empty": bad_empty}


def _source_tiles(data, mask) -> dict:
    m = np.asarray(mask).ravel()
    return {int(i): bytes(data.buf[int(data.offsets[i]):int(data.offsets[i]) + int(data.sizes[i])])
            for i in np.flatnonzero(m & (data.sizes > 0))}


@pytest.fixture(scope="module")
def v2_cache(sample_v2):
    with open_cache(sample_v2) as c:
        yield c


def _masks(sizes: np.ndarray) -> list[np.ndarray]:
    present = (sizes > 0).reshape(128, 128).astype(np.uint8)
    rng = np.random.default_rng(3)
    checker = present.copy()
    checker[::2, :] = 0
    rand = present & (rng.random((128, 128)) < 0.5).astype(np.uint8)
    return [present, checker, rand, np.zeros((128, 128), np.uint8)]


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("source", ["sample_v2", "sample_v1"])
def test_plans_write_what_readers_read(request, source, version):
    path = request.getfixturevalue(source)
    with open_cache(path) as cache:
        for ref in cache.bundles():
            with cache.open_bundle(ref) as data:
                for mask in _masks(data.sizes):
                    plan = plan_bundle(data, mask, version)
                    out = plan.to_bytes()
                    from_file = plan_bundle(data, mask, version, cache=cache)
                    assert from_file.file is not None and from_file.to_bytes() == out
                    del from_file
                    expected = _source_tiles(data, mask)
                    assert len(out) == plan.size
                    assert plan.tiles == len(expected)
                    assert output_sizes(data.sizes, mask, version)[2] == (plan.size if expected else 0)
                    if version == 2:
                        got = read_v2(out)
                        h = got["header"]
                        assert h == (3, N, max(map(len, expected.values()), default=0), 5, 0, len(out), 40,
                                     131092, 3, 16, N, 5, 131072)
                        assert got["empty_records"] <= {4}
                        assert plan.bundlx is None
                    else:
                        got = read_v1(out, plan.bundlx)
                        h = got["header"]
                        assert h[:4] == (3, N, max(map(len, expected.values()), default=0), 5)
                        assert h[4:] == (4 * len(expected), len(out), 40, 16, ref.row0, ref.row0 + 127,
                                         ref.col0, ref.col0 + 127)
                        assert got["bad_empty"] == []
                        assert out[60:65596] == bytes(65536)
                    assert got["tiles"] == expected
                    del plan


def test_contiguous_tiles_are_copied_as_one_run(v2_cache):
    ref = v2_cache.bundles(5)[0]
    with v2_cache.open_bundle(ref) as data:
        plan = plan_bundle(data, (data.sizes > 0).reshape(128, 128), 2, cache=v2_cache)
        # the generated sample stores tiles back to back: one read covers them all
        assert len(plan.runs) == 1
        off, length, first, count = plan.runs[0].tolist()
        assert (first, count) == (0, plan.tiles)
        assert length == int(data.sizes.sum()) + 4 * (plan.tiles - 1)
        assert plan.file == str(v2_cache.bundle_key(ref)[0].split("::", 1)[1]) and plan.file_offset == 0
        from_file = plan.to_bytes()
        assert plan.source == b"" and plan.file_id == data.where.file_id   # nothing of the bundle in memory
        whole = bytes(data.buf)                    # the same bytes copied from memory
        in_memory = bundles._make(ref, whole, len(whole), data.offsets, data.sizes,
                                  (data.sizes > 0).reshape(128, 128), 2, "x")
        assert in_memory.to_bytes() == from_file
        del plan


def test_runs_are_capped(v2_cache, monkeypatch):
    monkeypatch.setattr(bundles, "RUN", 50_000)
    ref = v2_cache.bundles(5)[0]
    with v2_cache.open_bundle(ref) as data:
        mask = (data.sizes > 0).reshape(128, 128)
        plan = plan_bundle(data, mask, 2, cache=v2_cache)
        assert len(plan.runs) > 1
        assert all(l + 4 <= 50_000 or c == 1 for _, l, _, c in plan.runs.tolist())
        assert read_v2(plan.to_bytes())["tiles"] == _source_tiles(data, mask)
        del plan


def _handmade_v2(tiles: dict[int, bytes], prefix: bool) -> bytes:
    """A V2 bundle whose tiles may lack the size prefix (the spec calls it legacy)."""
    body = bytearray()
    index = [0] * N
    pos = 64 + 8 * N
    for i, t in tiles.items():
        body += (struct.pack("<I", len(t)) if prefix else b"\xee\xee\xee\xee") + t
        index[i] = (pos + 4) | (len(t) << 40)
        pos += 4 + len(t)
    total = 64 + 8 * N + len(body)
    hdr = struct.pack("<4I3Q6I", 3, N, 0, 5, 0, total, 40, 131092, 3, 16, N, 5, 131072)
    return hdr + struct.pack(f"<{N}Q", *index) + bytes(body)


def test_missing_or_wrong_prefixes_are_regenerated():
    from tilecrate import _bundle

    tiles = {0: b"A" * 10, 1: b"B" * 7, 130: b"C" * 300, 16383: b"D"}
    src = _handmade_v2(tiles, prefix=False)
    offsets, sizes = _bundle.parse_v2(src)
    mask = np.ones((128, 128), np.uint8)
    for version in (2, 1):
        plan = bundles._make(BundleRef(0, 0, 0), src, len(src), offsets, sizes, mask, version, "x")
        out = plan.to_bytes()
        assert len(out) == plan.size and plan.tiles == 4 and plan.tile_bytes == 318
        assert len(plan.runs) == 1          # back to back with 4 garbage bytes between: still one read
        got = read_v2(out)["tiles"] if version == 2 else read_v1(out, plan.bundlx)["tiles"]
        assert got == tiles


def test_out_of_bounds_index_is_refused():
    src = bytes(200000)
    offsets = np.zeros(N, np.uint64)
    sizes = np.zeros(N, np.uint32)
    offsets[5], sizes[5] = 199990, 20
    mask = np.ones((128, 128), np.uint8)
    with pytest.raises(BundleError, match="row 0, column 5"):
        _plan.make_plan(len(src), offsets, sizes, mask, 2, 0, 0, "x.bundle")
    offsets[5], sizes[5] = 2**63, 20
    with pytest.raises(BundleError):
        _plan.make_plan(len(src), offsets, sizes, mask, 2, 0, 0)
    with pytest.raises(ValueError):
        _plan.make_plan(len(src), offsets[:10], sizes, mask, 2, 0, 0)
    with pytest.raises(ValueError):
        _plan.make_plan(len(src), offsets, sizes, mask, 3, 0, 0)
    with pytest.raises(ValueError):        # a run that does not fit the buffer
        _plan.fill_prefixes(bytearray(8), np.array([0, 100], np.uint64), np.array([5, 5], np.uint32), 0, 2)


def test_fill_prefixes_checks_every_tile_of_the_run():
    """Offsets that go back, or past the end, in the middle of a run must not write outside `buf`
    (only the run's last tile used to be checked). `buf` is a window into a larger buffer, so a
    stray write lands where the test can see it instead of corrupting the heap."""
    big = bytearray(4096)
    window = memoryview(big)[2048:2068]
    for offs in ([100, 50, 110], [0, 1000, 10], [0, 2**63, 10]):
        with pytest.raises(ValueError, match="outside|backwards"):
            _plan.fill_prefixes(window, np.array(offs, np.uint64), np.array([1, 1, 1], np.uint32), 0, 3)
        assert big == bytearray(4096)
    with pytest.raises(ValueError, match="outside"):           # the tile's bytes must fit too
        _plan.fill_prefixes(window, np.array([0, 8, 10], np.uint64), np.array([1, 30, 1], np.uint32), 0, 3)
    _plan.fill_prefixes(window, np.array([0, 9, 14], np.uint64), np.array([5, 1, 2], np.uint32), 0, 3)
    assert big[2048:2068] == b"\x05\0\0\0" + bytes(5) + b"\x01\0\0\0" + bytes(1) + b"\x02\0\0\0" + bytes(2)
    assert big[:2048] == bytes(2048) and big[2068:] == bytes(2028)


def test_fill_prefixes_refuses_small_windows_and_backward_offsets():
    """Issue 9 item 8: a window under 4 bytes, or offsets going backwards, used to write outside `buf`."""
    big = bytearray(64)
    for n in (0, 1, 2, 3):
        window = memoryview(big)[32:32 + n]
        with pytest.raises(ValueError, match="cannot hold a size prefix"):
            _plan.fill_prefixes(window, np.array([7], np.uint64), np.array([0], np.uint32), 0, 1)
        assert big == bytearray(64)
    window = memoryview(big)[32:48]
    # the last tile's offset is below the first: `last` wraps to a small number that passed the check
    with pytest.raises(ValueError, match="backwards"):
        _plan.fill_prefixes(window, np.array([100, 90], np.uint64), np.array([0, 8], np.uint32), 0, 2)
    with pytest.raises(ValueError, match="backwards"):
        _plan.fill_prefixes(window, np.array([4, 0, 8], np.uint64), np.array([0, 0, 0], np.uint32), 0, 3)
    assert big == bytearray(64)


def test_plan_entry_points_refuse_bad_arguments():
    offsets, sizes = np.zeros(N, np.uint64), np.zeros(N, np.uint32)
    mask = np.ones((128, 128), np.uint8)
    for row0, col0 in ((-128, 0), (0, -128), (5, 0), (0, 7), (2**32, 0), (0x7fffffff, 0x7fffffff)):
        with pytest.raises(ValueError, match="multiple of 128"):
            _plan.make_plan(1000, offsets, sizes, mask, 2, row0, col0)
    with pytest.raises(ValueError, match="max_run"):
        _plan.make_plan(1000, offsets, sizes, mask, 2, 0, 0, "x", 0)
    with pytest.raises(ValueError, match="out of range"):
        _plan.make_plan(2**63, offsets, sizes, mask, 2, 0, 0)
    with pytest.raises(ValueError, match="128 x 128"):
        _plan.make_plan(1000, offsets, sizes, np.ones((64, 256), np.uint8), 2, 0, 0)
    for version in (0, 3, -1):
        with pytest.raises(ValueError, match="version"):
            _plan.bundle_sizes(sizes, mask, version)
    with pytest.raises(ValueError, match="16384"):
        _plan.bundle_sizes(sizes[:100], mask, 2)
    with pytest.raises(TypeError):
        _plan.pack_tiles([b"ok", None])
    with pytest.raises(TypeError):
        _plan.pack_tiles([b"ok", "text"])
    with pytest.raises(ValueError):                   # tile sizes and offsets of different lengths
        _plan.fill_prefixes(bytearray(64), np.zeros(3, np.uint64), np.zeros(2, np.uint32), 0, 2)


def test_fill_prefixes_refuses_runs_past_the_plan():
    offs, sizes = np.zeros(3, np.uint64), np.zeros(3, np.uint32)
    for first, count in ((2, 2), (-1, 1), (0, -1), (4, 0), (2**40, 2**63 - 2**40 + 5), (2**62, 2**62)):
        with pytest.raises(ValueError, match="outside the plan"):      # first + count wraps: not a pass
            _plan.fill_prefixes(bytearray(64), offs, sizes, first, count)
    _plan.fill_prefixes(bytearray(64), offs, sizes, 3, 0)


def test_plan_from_new_tile_bytes():
    mask = np.zeros((128, 128), np.uint8)
    mask[3, 4] = mask[3, 5] = mask[100, 0] = 1
    new = [b"x" * 5, b"", b"z" * 70000]    # an empty re-encoded tile counts as absent
    ref = BundleRef(7, 128, 256)
    plan = plan_from_tiles(ref, new, mask, 2)
    got = read_v2(plan.to_bytes())["tiles"]
    assert got == {3 * 128 + 4: b"x" * 5, 100 * 128: b"z" * 70000}
    plan1 = plan_from_tiles(ref, new, mask, 1)
    v1 = read_v1(plan1.to_bytes(), plan1.bundlx)
    assert v1["tiles"] == got and v1["header"][8:] == (128, 255, 256, 383)
    with pytest.raises(ValueError):
        plan_from_tiles(ref, new[:2], mask, 2)


def test_crc_matches_zlib(v2_cache):
    import zlib

    ref = v2_cache.bundles(4)[0]
    with v2_cache.open_bundle(ref) as data:
        for version in (1, 2):
            plan = plan_bundle(data, (data.sizes > 0).reshape(128, 128), version)
            plan.compute_crc()
            assert plan.crc == zlib.crc32(plan.to_bytes())
            if version == 1:
                assert plan.bundlx_crc == zlib.crc32(plan.bundlx)
            del plan


from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def _indexes(draw):
    length = draw(st.integers(0, 4000))
    src = draw(st.binary(min_size=length, max_size=length))
    cells = draw(st.lists(st.integers(0, N - 1), max_size=30, unique=True))
    offsets = np.zeros(N, np.uint64)
    sizes = np.zeros(N, np.uint32)
    for c in cells:
        offsets[c] = draw(st.integers(0, 4200))        # sometimes past the end, sometimes overlapping
        sizes[c] = draw(st.integers(1, 300))
    mask = np.zeros(N, np.uint8)
    for c in draw(st.lists(st.sampled_from(cells), unique=True)) if cells else []:
        mask[c] = 1
    return src, offsets, sizes, mask.reshape(128, 128), draw(st.sampled_from([1, 2]))


@settings(max_examples=150, deadline=None)
@given(_indexes())
def test_plans_of_arbitrary_indexes(case):
    """Any index: either a clear BundleError, or an output whose tiles are exactly the selected source ranges."""
    src, offsets, sizes, mask, version = case
    chosen = [i for i in np.flatnonzero(mask.ravel()) if sizes[i]]
    in_bounds = all(int(offsets[i]) + int(sizes[i]) <= len(src) for i in chosen)
    if not in_bounds:
        with pytest.raises(BundleError):
            _plan.make_plan(len(src), offsets, sizes, mask, version, 0, 0)
        return
    plan = bundles._make(BundleRef(0, 0, 0), src, len(src), offsets, sizes, mask, version, "x")
    out = plan.to_bytes()
    assert len(out) == plan.size and plan.tiles == len(chosen)
    got = read_v2(out)["tiles"] if version == 2 else read_v1(out, plan.bundlx)["tiles"]
    assert got == {int(i): src[int(offsets[i]):int(offsets[i]) + int(sizes[i])] for i in chosen}


def test_source_changed_under_the_export_is_an_error(sample_v2, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(sample_v2, copy)
    with open_cache(copy) as cache:
        ref = cache.bundles(5)[0]
        with cache.open_bundle(ref) as data:
            plan = plan_bundle(data, (data.sizes > 0).reshape(128, 128), 2, cache=cache)
        with open(plan.file, "ab") as f:          # another process rewrites the bundle meanwhile
            f.write(b"more")
        with pytest.raises(BundleError, match="changed"):
            plan.to_bytes()

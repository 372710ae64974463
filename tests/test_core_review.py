"""A review of the compiled core (issue 9 item 8): every public entry point of every .pyx fuzzed with
random arguments, and one test per finding.

Findings (each fails on the code before its fix):
  * `_jpeg.recode(threads=N)` with N in the thousands and as many tiles: libgomp cannot start the
    threads and ends the process ("Thread creation failed", no exception); refused above MAX_THREADS.
  * `_mask.window_mask` accepted a span end of INT64_MIN (its range check took abs(), which wraps to
    INT64_MIN) and the column arithmetic then wrapped: an empty span selected a whole bundle row.

The fuzz tests check more than "no crash": results are checked against independent computations
(plans parsed back by `_bundle`, pread results against the file's bytes, spans against counts,
re-encoded tiles decoded by PIL), and writes into a window of a larger buffer leave the rest alone.
Crash-prone cases run in a subprocess so a regression fails the test instead of killing pytest.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tilecrate import _bundle, _jpeg, _mask, _plan
from tilecrate.errors import BundleError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
INT64_MIN = -(2**63)
N = 16384


def _run_py(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (a crash there fails the test, not the run)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# --- findings ------------------------------------------------------------------------------------

def test_recode_refuses_thread_counts_libgomp_cannot_start():
    """Before the fix: rc 1 and 'libgomp: Thread creation failed' on stderr, no Python error."""
    r = _run_py("""
        import resource, numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))   # thread stacks run out early
        from tilecrate import _jpeg
        n = 20000
        try:
            _jpeg.recode(b"", np.zeros(n, np.uint64), np.zeros(n, np.uint32), 75, threads=n)
        except ValueError as e:
            print("refused:", e)
        else:
            print("accepted")
    """)
    assert r.returncode == 0, r.stderr[-500:]
    assert "refused:" in r.stdout and "threads must be 0" in r.stdout
    # the bound itself is an argument check like the others, and the largest count is accepted
    with pytest.raises(ValueError, match="threads"):
        _jpeg.recode(b"", np.zeros(1, np.uint64), np.zeros(1, np.uint32), 75, threads=_jpeg.MAX_THREADS + 1)
    new, status, _ = _jpeg.recode(b"x", np.zeros(1, np.uint64), np.ones(1, np.uint32), 75,
                                  threads=_jpeg.MAX_THREADS)
    assert new == [None] and status.tolist() == [_jpeg.NOT_JPEG]


@pytest.mark.parametrize("span, col0", [((0, INT64_MIN), 1), ((INT64_MIN, 5), 3), ((INT64_MIN, INT64_MIN), 0),
                                        ((-(2**62), 2**62), -(2**62) + 1), ((-(2**62) + 1, 2**62 - 1), -(2**62))])
def test_window_mask_refuses_columns_whose_difference_wraps(span, col0):
    """Before the fix the first case returned a full row (128 tiles) for an empty span, and
    span (-2**62, 2**62) at col0 = -2**62 (both at the old inclusive limit) no tile for a full row:
    2**62 - (-2**62) wrapped to -2**63. Now columns and col0 lie strictly inside +-2**62."""
    row_ptr = np.zeros(129, np.int64)
    row_ptr[1:] = 1
    with pytest.raises(ValueError, match="out of range"):
        _mask.window_mask(row_ptr, np.array([span], np.int64), col0)
    # just inside the limits the arithmetic holds: a span from the window's first column to far right
    big = 2**62 - 1
    mask, n = _mask.window_mask(row_ptr, np.array([[-big, big]], np.int64), -big)
    assert n == 128 and mask[0].all() and not mask[1:].any()


# --- _plan ---------------------------------------------------------------------------------------

def _parse_back(version: int, aux: bytes, body: bytes, bundlx: bytes | None):
    data = bytes(aux) + body
    if version == 2:
        return _bundle.parse_v2(data, "plan")
    return _bundle.parse_v1(bundlx, data, "plan")


@st.composite
def _plan_args(draw):
    length = draw(st.integers(0, 6000))
    inside = draw(st.integers(0, 3)) > 0     # mostly tiles inside the source, so plans get made
    cells = draw(st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, 7000), st.integers(0, 400)),
                          max_size=30))
    offsets = np.zeros(N, np.uint64)
    sizes = np.zeros(N, np.uint32)
    for i, off, size in cells:
        if inside:
            off = off % (length + 1)
            size = min(size, length - off)
        offsets[i], sizes[i] = off, size
    if draw(st.integers(0, 4)) == 0:  # now and then an offset or size near the top of its type
        i = draw(st.integers(0, N - 1))
        offsets[i] = draw(st.sampled_from([2**64 - 1, 2**63, 2**40, length]))
        sizes[i] = draw(st.sampled_from([2**32 - 1, 2**24, 1]))
    mask = np.zeros((128, 128), np.uint8)
    for i in draw(st.lists(st.integers(0, N - 1), max_size=60)) + [c[0] for c in cells if draw(st.booleans())]:
        mask.flat[i] = 1
    version = draw(st.sampled_from([1, 2] * 6 + [0, 3]))
    row0 = draw(st.sampled_from([0, 128, 2**32 - 128] * 4 + [2**32, -128, 5]))
    col0 = draw(st.sampled_from([0, 256, 2**32 - 128] * 4 + [7, -256]))
    max_run = draw(st.sampled_from([1, 5, 64, 300, 8 << 20] * 2 + [0]))
    return length, offsets, sizes, mask, version, row0, col0, max_run


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_plan_args(), st.binary(min_size=6000, max_size=6000))
def test_fuzz_make_plan_round_trips_through_the_parsers(args, source):
    length, offsets, sizes, mask, version, row0, col0, max_run = args
    src = source[:length]
    try:
        aux, runs, toff, tsize, total, n, tile_bytes, bundlx = _plan.make_plan(
            length, offsets, sizes, mask, version, row0, col0, "fuzz", max_run)
    except (ValueError, BundleError, OverflowError):
        # refused: an argument was out of range or a tile lies outside the source
        bad = (version not in (1, 2) or max_run == 0 or not (0 <= row0 <= 2**32 - 128) or row0 % 128
               or not (0 <= col0 <= 2**32 - 128) or col0 % 128)
        sel = (mask.reshape(-1) != 0) & (sizes != 0)
        outside = sel & ((offsets > length) | (sizes.astype(np.uint64) > length - np.minimum(offsets, length))
                         | (sizes > (1 << 24) - 1))
        assert bad or outside.any()
        return
    sel = np.flatnonzero((mask.reshape(-1) != 0) & (sizes != 0))
    assert n == len(sel) and tile_bytes == int(sizes[sel].sum())
    assert _plan.bundle_sizes(sizes, mask, version)[:3] == (n, tile_bytes, total if n else 0)
    # every run lies inside the source; the writer's path (fill_prefixes into a run buffer)
    body = bytearray()
    for off, rlen, first, count in runs.tolist():
        assert 0 <= off and off + rlen <= length and count >= 1
        assert rlen <= max(max_run, int(tsize[first:first + count].max()))
        buf = bytearray(4 + rlen)
        buf[4:] = src[off:off + rlen]
        _plan.fill_prefixes(buf, toff, tsize, first, count)
        body += buf
    assert len(aux) + len(body) == total
    got_off, got_size = _parse_back(version, aux, bytes(body), bundlx)
    want = np.zeros(N, np.uint32)
    want[sel] = sizes[sel]
    assert (got_size == want).all()
    data = bytes(aux) + bytes(body)
    for i in sel.tolist():
        o, s = int(got_off[i]), int(got_size[i])
        assert data[o:o + s] == src[int(offsets[i]):int(offsets[i]) + s]


@FUZZ
@given(st.integers(0, 64), st.lists(st.integers(0, 2**64 - 1), max_size=6),
       st.lists(st.integers(0, 2**32 - 1), max_size=6), st.integers(-3, 8), st.integers(-3, 8),
       st.sampled_from([None, 2, 10, 100]))
def test_fuzz_fill_prefixes_never_writes_outside_its_buffer(cap, offs, sizes, first, count, small):
    if small is not None:             # mostly plausible values, so the write path runs too
        offs = sorted(o % (small + 8) for o in offs)
        sizes = [s % small for s in sizes]
    big = bytearray(b"\xAA" * (cap + 256))
    window = memoryview(big)[128:128 + cap]
    o = np.array(offs, np.uint64)
    s = np.array(sizes[:len(offs)] + [0] * max(0, len(offs) - len(sizes)), np.uint32)
    try:
        _plan.fill_prefixes(window, o, s, first, count)
    except (ValueError, OverflowError):
        pass
    assert big[:128] == b"\xAA" * 128 and big[128 + cap:] == b"\xAA" * 128


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=40), st.integers(), st.none()), max_size=12))
def test_fuzz_pack_tiles(tiles):
    try:
        buf, offs, lens = _plan.pack_tiles(tiles)
    except TypeError:
        assert any(not isinstance(t, (bytes, bytearray)) for t in tiles)
        return
    for t, o, n in zip(tiles, offs.tolist(), lens.tolist()):
        assert bytes(buf[o:o + n]) == t and int.from_bytes(buf[o - 4:o], "little") == len(t)
    assert len(buf) == sum(4 + len(t) for t in tiles)


# --- _bundle -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v1_file(tmp_path_factory):
    from tilecrate.sample import _v1_bundle
    tiles = {i: bytes([i % 251]) * (1 + (i * 37) % 300) for i in range(0, N, 97)}
    bundle, bundlx = _v1_bundle(tiles, 0, 0)
    p = tmp_path_factory.mktemp("v1") / "package.bin"
    p.write_bytes(b"\xEE" * 16 + bundle)      # the bundle 16 bytes in, as a stored zip entry would be
    return p, bundle, bundlx


@FUZZ
@given(st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, 2**40 - 1)), max_size=8),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.booleans())
def test_fuzz_parse_v1_fd_agrees_with_the_file(v1_file, edits, base, length, plausible):
    path, bundle, bundlx = v1_file
    bx = bytearray(bundlx)
    for i, off in edits:
        bx[16 + 5 * i:21 + 5 * i] = (off % (len(bundle) + 64) if plausible else off).to_bytes(5, "little")
    if plausible:
        base, length = 16, len(bundle) + length % 3 - 1
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            offsets, sizes = _bundle.parse_v1_fd(bytes(bx), fd, base, length, "fuzz")
        except (BundleError, ValueError, OverflowError):
            return
    finally:
        os.close(fd)
    # every tile it returns lies inside `length` and inside the file, its prefix holds its size, and
    # when `length` is the bytes there, parse_v1 over those bytes gives the same index
    whole = path.read_bytes()
    view = whole[base:base + length]
    for j in np.flatnonzero(sizes).tolist():
        o, s = int(offsets[j]), int(sizes[j])
        assert o + s <= length and base + o + s <= len(whole)
        assert int.from_bytes(whole[base + o - 4:base + o], "little") == s
    if len(view) == length:
        ref = _bundle.parse_v1(bytes(bx), view, "fuzz")
        assert (ref[0] == offsets).all() and (ref[1] == sizes).all()


@FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(-2, (1 << 24) + 2), st.booleans(), st.booleans())
def test_fuzz_pread_checked_matches_the_file(tmp_path_factory, offset, n, near, same):
    p = tmp_path_factory.getbasetemp() / "pread.bin"
    if not p.exists():
        p.write_bytes(bytes(range(256)) * 8)
    data = p.read_bytes()
    if near:
        offset, n = offset % (len(data) + 10), n % 3000
    fd = os.open(p, os.O_RDONLY)
    try:
        st_ = os.fstat(fd)
        fid = (st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns + (0 if same else 1), st_.st_ctime_ns)
        try:
            got, current = _bundle.pread_checked(fd, offset, n, fid)
        except (ValueError, OverflowError):
            assert n < 0 or n > (1 << 24) - 1 or offset > 2**62
            return
    finally:
        os.close(fd)
    assert current == same
    if n == 0 or offset + n <= len(data):
        assert got == data[offset:offset + n]
    else:
        assert got is None


# --- _mask ---------------------------------------------------------------------------------------

_coord = st.one_of(st.integers(-300, 300).map(float), st.floats(-300, 300, allow_nan=False),
                   st.sampled_from([2.0**50, -(2.0**50), 2.0**51, float("nan"), float("inf")]))


@FUZZ
@given(st.lists(st.tuples(_coord, _coord, _coord, _coord), max_size=25),
       st.one_of(st.none(), st.lists(st.integers(-2**63, 2**63 - 1), max_size=25)),
       st.integers(-400, 400), st.integers(0, 300), st.integers(-400, 400), st.integers(0, 300))
def test_fuzz_rasterizer_spans_agree_with_count(edges, groups, r0, nrows, c0, ncols):
    arr = np.array(edges, np.float64).reshape(-1, 4)
    try:
        ras = _mask.Rasterizer(arr, None if groups is None else np.array(groups, np.int64))
    except (ValueError, OverflowError):
        return
    row_ptr, spans = ras.spans(r0, nrows)
    assert row_ptr[0] == 0 and row_ptr[-1] == len(spans) and (np.diff(row_ptr) >= 0).all()
    total = 0
    for i in range(nrows):
        row = spans[row_ptr[i]:row_ptr[i + 1]]
        assert (row[:, 0] <= row[:, 1]).all() and (row[1:, 0] > row[:-1, 1] + 1).all()
        lo, hi = np.maximum(row[:, 0], c0), np.minimum(row[:, 1], c0 + ncols - 1)
        total += int(np.maximum(hi - lo + 1, 0).sum())
    assert ras.count(r0, r0 + nrows - 1, c0, c0 + ncols - 1) == total


@FUZZ
@given(st.lists(st.integers(-5, 12), min_size=0, max_size=140),
       st.lists(st.tuples(st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1)), max_size=10),
       st.lists(st.tuples(st.integers(-200, 200), st.integers(-200, 200)), max_size=10),
       st.integers(-2**63, 2**63 - 1), st.booleans())
def test_fuzz_window_mask_is_the_clipped_spans(row_ptr, wild, tame, col0, plausible):
    spans = tame if plausible else wild + tame
    if plausible:
        col0 = col0 % 200 - 100
        row_ptr = np.minimum(np.maximum(np.sort(np.array(row_ptr + [0] * 129, np.int64)[:129]), 0), len(spans))
        row_ptr[0] = 0
    try:
        mask, n = _mask.window_mask(np.array(row_ptr, np.int64), np.array(spans, np.int64).reshape(-1, 2), col0)
    except ValueError:
        return
    rp = np.array(row_ptr, np.int64)
    want = np.zeros((128, 128), np.uint8)
    for i in range(128):
        for s, e in spans[rp[i]:rp[i + 1]]:
            lo, hi = max(s - col0, 0), min(e - col0, 127)      # Python ints: no wrap
            if hi >= lo:
                want[i, lo:hi + 1] = 1
    assert (mask == want).all()
    assert n == sum(max(0, min(e - col0, 127) - max(s - col0, 0) + 1)
                    for i in range(128) for s, e in spans[rp[i]:rp[i + 1]])


@FUZZ
@given(st.binary(min_size=0, max_size=64), st.lists(st.integers(-1, 2**33), max_size=4),
       st.sampled_from([(128, 128), (128, 127), (16384,), (64, 256)]), st.sampled_from([np.uint8, np.int8, bool]))
def test_fuzz_apply_presence(maskbits, size_edits, shape, dtype):
    mask = np.resize(np.frombuffer(maskbits or b"\x01", np.uint8) & 1, shape).astype(dtype)
    sizes = np.arange(N, dtype=np.int64) % 5
    for k, v in enumerate(size_edits):
        sizes[k * 1000] = v
    try:
        tiles, nbytes = _mask.apply_presence(mask, sizes)
    except ValueError:
        assert shape != (128, 128) or dtype is not np.uint8 or sizes.min() < 0 or sizes.max() > 2**32 - 1
        return
    flat = mask.reshape(-1)
    assert ((flat != 0) <= (sizes != 0)).all()
    assert tiles == int((flat != 0).sum()) and nbytes == int(sizes[flat != 0].sum())


# --- _jpeg ---------------------------------------------------------------------------------------

def _jpeg_tile(w=64, h=48, seed=1) -> bytes:
    rng = np.random.default_rng(seed)
    pix = (rng.random((h, w, 3)) * 64 + np.linspace(0, 180, w)[None, :, None]).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pix).save(out, "JPEG", quality=90)
    return out.getvalue()


_TILES = [_jpeg_tile(), _jpeg_tile(33, 17, 2)]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 4000)), max_size=5),
       st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
       st.integers(-1, 101), st.sampled_from(["dct", "pixel", "DCT"]), st.integers(-1, 3),
       st.integers(-1, 70), st.integers(-1, 70), st.sampled_from([0, 1, 2, 3]), st.floats(-0.1, 0.6))
def test_fuzz_recode_arguments_and_bytes(ranges, flips, quality, method, threads, max_w, max_h, optimize,
                                         deadzone):
    buf = bytearray(b"".join(_TILES))
    for at, v in flips:                # corrupt some bytes (headers included)
        if at < len(buf):
            buf[at] = v
    cut = len(_TILES[0])
    ranges = [(0, cut), (cut, len(_TILES[1]))] + ranges
    offs = np.array([o for o, _ in ranges], np.uint64)
    lens = np.array([n for _, n in ranges], np.uint32)
    try:
        new, status, msgs = _jpeg.recode(bytes(buf), offs, lens, quality, method, threads, deadzone,
                                         True, optimize, max_w, max_h)
    except ValueError:
        outside = any(o + n > len(buf) for o, n in ranges)
        assert (outside or not 1 <= quality <= 100 or method not in ("dct", "pixel") or not 0 <= threads
                or not 0 <= max_w or not 0 <= max_h or optimize not in (0, 1, 2) or not 0 <= deadzone <= 0.5)
        return
    assert len(new) == len(ranges) and len(status) == len(ranges)
    for i, (o, n) in enumerate(ranges):
        st_ = int(status[i])
        assert st_ in (_jpeg.OK, _jpeg.NOT_JPEG, _jpeg.FAILED), st_
        assert (new[i] is not None) == (st_ == _jpeg.OK)
        assert (i in msgs) == (st_ == _jpeg.FAILED)
        if st_ == _jpeg.OK:            # an independent decoder reads it, within the size bound
            img = Image.open(io.BytesIO(new[i]))
            img.load()
            assert (max_w == 0 or img.size[0] <= max_w) and (max_h == 0 or img.size[1] <= max_h)


@FUZZ
@given(st.lists(st.integers(0, 2**40), min_size=257, max_size=257), st.integers(0, 256), st.integers(1, 40))
def test_fuzz_optimal_tables_equal_libjpegs(counts, keep, scale):
    f = np.array([c % (1 << scale) if k <= keep else 0 for k, c in enumerate(counts)], np.int64)
    try:
        ours, lib = _jpeg._optimal_tables(f)
    except ValueError:
        assert f.sum() >= 10**9 or (f[:256] != 0).sum() < 1
        return
    assert ours == lib


def test_optimal_tables_hook_refuses_counts_whose_total_wraps():
    """Before the fix numpy's int64 sum of four 2**62 counts wrapped to 0, the 1e9 bound passed and
    the C total overflowed: our tables and libjpeg's then differed (a hook that answers wrongly)."""
    f = np.zeros(257, np.int64)
    f[:4] = 2**62
    f[4] = 5
    with pytest.raises(ValueError, match="total under 1e9"):
        _jpeg._optimal_tables(f)
    f[:4] = 2**27                      # under the bound: accepted, and ours equal libjpeg's
    ours, lib = _jpeg._optimal_tables(f)
    assert ours == lib


def test_recode_from_several_python_threads_at_once_gives_the_same_bytes():
    """Each call has its own codecs and output slots; nothing is shared between concurrent batches
    (the zigzag table is filled once at import). Corrupt tiles mixed in exercise the longjmp path
    on every thread at the same time."""
    import threading

    good = [_jpeg_tile(64, 64, s) for s in range(6)]
    bad = [t[: len(t) // 2] for t in good[:3]]          # truncated: libjpeg warns, the tile fails
    tiles = good + bad
    buf = b"".join(tiles)
    lens = np.array([len(t) for t in tiles], np.uint32)
    offs = np.zeros(len(tiles), np.uint64)
    offs[1:] = np.cumsum(lens[:-1])
    want = _jpeg.recode(buf, offs, lens, 60, "dct", 1)
    assert all(s == _jpeg.OK for s in want[1][:6]) and all(s == _jpeg.FAILED for s in want[1][6:])
    results, errors = [], []

    def work(method):
        try:
            for _ in range(5):
                results.append((method, _jpeg.recode(buf, offs, lens, 60, method, 2)))
        except BaseException as e:          # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in ("dct", "pixel", "dct", "pixel")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 20
    pixel = _jpeg.recode(buf, offs, lens, 60, "pixel", 1)
    for method, (new, status, msgs) in results:
        ref = want if method == "dct" else pixel
        assert new == ref[0] and status.tolist() == ref[1].tolist() and msgs.keys() == ref[2].keys()

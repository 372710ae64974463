"""The compiled re-encoder (tilecrate._jpeg): both methods on real sample tiles, exact Huffman statistics,
never refining a quantization step, per-tile errors on corrupt input, threads, bounds checks."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from tilecrate import _jpeg
from tilecrate.cache import open_cache


def decode(data: bytes) -> np.ndarray:
    """Pixels as PIL decodes them (an independent decoder build from our libjpeg calls)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def batch(tiles):
    sizes = np.array([len(t) for t in tiles], np.uint32)
    offsets = np.zeros(len(tiles), np.uint64)
    offsets[1:] = np.cumsum(sizes[:-1])
    return b"".join(tiles), offsets, sizes


def recode(tiles, quality, method, **kw):
    return _jpeg.recode(*batch(tiles), quality, method, **kw)


def quant_tables(data: bytes) -> dict[int, list[int]]:
    """DQT tables by id (zigzag order), parsed straight from the bytes."""
    out, i = {}, 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            break
        if marker == 0xDB:
            seg, j = data[i + 4:i + 2 + length], 0
            while j < len(seg):
                prec, tid = seg[j] >> 4, seg[j] & 15
                n = 2 if prec else 1
                out[tid] = [int.from_bytes(seg[j + 1 + k * n:j + 1 + (k + 1) * n], "big") for k in range(64)]
                j += 1 + 64 * n
        i += 2 + length
    return out


@pytest.fixture(scope="module")
def tiles(sample_v2) -> list[bytes]:
    with open_cache(str(sample_v2)) as cache:
        return [t for lv, r, c, t in cache.iter_tiles() if lv >= 3][:48]


def odd_jpegs() -> list[bytes]:
    """JPEGs whose sizes are not whole MCUs, in every sampling and colour space PIL writes."""
    rng = np.random.default_rng(5)
    out = []
    for (w, h), mode, sub in [((250, 130), "RGB", 2), ((77, 33), "RGB", 1), ((256, 256), "RGB", 0),
                              ((31, 257), "L", 0), ((40, 24), "CMYK", 0), ((512, 8), "RGB", 2)]:
        base = np.linspace(0, 255, w * h).reshape(h, w)
        noise = rng.normal(0, 20, (h, w, 4))
        px = np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)
        img = Image.fromarray(px[..., :1].squeeze(-1) if mode == "L" else px[..., :4 if mode == "CMYK" else 3], mode)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, **({} if mode in ("L", "CMYK") else {"subsampling": sub}))
        out.append(buf.getvalue())
    buf = io.BytesIO()                        # progressive source: written back as baseline
    grad = np.clip(np.add.outer(np.arange(100), np.arange(120))[..., None] + rng.normal(0, 15, (100, 120, 3)), 0, 255)
    Image.fromarray(grad.astype(np.uint8), "RGB").save(buf, "JPEG", quality=85, progressive=True)
    out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("method", ["dct", "pixel"])
def test_reencoded_tiles_decode_same_size_and_shrink_with_quality(tiles, method):
    totals = {}
    for q in (60, 40, 20):
        new, status, errors = recode(tiles, q, method)
        assert errors == {} and (status == _jpeg.OK).all()
        for old, data in zip(tiles, new):
            assert data[:3] == b"\xff\xd8\xff" and len(data) < len(old)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                assert im.size == Image.open(io.BytesIO(old)).size and im.format == "JPEG"
        totals[q] = sum(map(len, new))
    assert totals[20] < totals[40] < totals[60] < sum(map(len, tiles))


# mean PSNR (dB) against the source pixels, per quality, for the q75 sample; both methods
PSNR_BAND = {60: (36.5, 42.5), 40: (32.0, 38.0), 20: (29.0, 35.0)}


@pytest.mark.parametrize("method", ["dct", "pixel"])
@pytest.mark.parametrize("quality", sorted(PSNR_BAND))
def test_psnr_stays_in_band(tiles, method, quality):
    new, status, _ = recode(tiles, quality, method)
    values = [psnr(decode(a), decode(b)) for a, b in zip(tiles, new)]
    lo, hi = PSNR_BAND[quality]
    assert lo <= np.mean(values) <= hi, np.mean(values)
    assert min(values) >= lo - 8


@pytest.mark.parametrize("quality", [65, 50, 30])
def test_dct_is_no_larger_than_pixel_at_the_same_psnr(tiles, quality):
    dct, _, _ = recode(tiles, quality, "dct", allow_larger=True)
    pix, _, _ = recode(tiles, quality, "pixel", allow_larger=True)
    assert sum(map(len, dct)) <= 1.005 * sum(map(len, pix))
    p_dct = np.mean([psnr(decode(a), decode(b)) for a, b in zip(tiles, dct)])
    p_pix = np.mean([psnr(decode(a), decode(b)) for a, b in zip(tiles, pix)])
    assert p_dct >= p_pix - 0.2


def test_halves_round_toward_zero_by_default(tiles):
    """q50 doubles every q75 step: round-half-up would keep every +-1 coefficient, the default drops them."""
    half_up, _, _ = recode(tiles, 50, "dct", deadzone=0.5, allow_larger=True)
    default, _, _ = recode(tiles, 50, "dct", allow_larger=True)
    assert sum(map(len, default)) < 0.95 * sum(map(len, half_up))
    stronger, _, _ = recode(tiles, 60, "dct", deadzone=0.3, allow_larger=True)
    nearest, _, _ = recode(tiles, 60, "dct", allow_larger=True)
    assert sum(map(len, stronger)) < sum(map(len, nearest))


def test_dct_never_refines_a_step_and_is_lossless_at_source_quality(tiles):
    src_tables = quant_tables(tiles[0])
    for q in (95, 75):       # the sample is q75: every requested step is <= the source's
        new, status, _ = recode(tiles[:8], q, "dct", allow_larger=True)
        assert (status == _jpeg.OK).all()
        for old, data in zip(tiles[:8], new):
            assert quant_tables(data) == src_tables
            assert np.array_equal(decode(old), decode(data))     # coefficients untouched
    new, _, _ = recode(tiles[:8], 30, "dct")
    for data in new:
        for tid, steps in quant_tables(data).items():
            assert all(s >= t for s, t in zip(steps, src_tables[tid]))
            assert steps != src_tables[tid]


@pytest.mark.parametrize("method", ["dct", "pixel"])
def test_fused_huffman_statistics_match_libjpeg_optimize_pass(tiles, method):
    """optimize=2 builds the tables from our own symbol counts; libjpeg's pass (1) must give the same bytes."""
    sources = tiles[:12] + odd_jpegs()
    for q in (70, 35):
        ours, s2, _ = recode(sources, q, method, allow_larger=True, optimize=2)
        theirs, s1, _ = recode(sources, q, method, allow_larger=True, optimize=1)
        plain, s0, _ = recode(sources, q, method, allow_larger=True, optimize=0)
        assert (s2 == _jpeg.OK).all() and (s1 == _jpeg.OK).all() and (s0 == _jpeg.OK).all()
        assert ours == theirs
        assert sum(map(len, ours)) < sum(map(len, plain))
        for a, b in zip(ours, plain):
            assert np.array_equal(decode(a), decode(b))


def test_odd_sizes_and_colour_spaces(tmp_path):
    for method in ("dct", "pixel"):
        sources = odd_jpegs()
        new, status, errors = recode(sources, 40, method, allow_larger=True)
        assert errors == {} and (status == _jpeg.OK).all()
        for old, data in zip(sources, new):
            a, b = Image.open(io.BytesIO(old)), Image.open(io.BytesIO(data))
            assert a.size == b.size and a.mode == b.mode
            if a.mode != "CMYK":
                assert psnr(decode(old), decode(data)) > 20     # noise images: hard to compress


def test_icc_profile_is_kept_and_comments_dropped(tiles):
    icc = b"\0" * 128 + b"acsp" + bytes(range(256)) * 2
    buf = io.BytesIO()
    Image.open(io.BytesIO(tiles[0])).save(buf, "JPEG", quality=80, icc_profile=icc)
    src = buf.getvalue()
    for method in ("dct", "pixel"):
        (data,), _, _ = recode([src], 40, method)
        assert Image.open(io.BytesIO(data)).info.get("icc_profile") == icc
    assert b"\xff\xfe" in tiles[0][:200]               # the sample's tile-naming COM segment
    (data,), _, _ = recode([tiles[0]], 40, "dct")
    assert b"\xff\xfe" not in data[:data.index(b"\xff\xda")]


def corrupt_variants(good: bytes) -> list[bytes]:
    sos = good.index(b"\xff\xda")
    garbage = bytearray(good)
    for i in range(sos + 20, len(good) - 2, 7):
        garbage[i] = 0xFF if i % 3 else garbage[i] ^ 0x5A
    bad_sof = bytearray(good)
    sof = good.index(b"\xff\xc0")
    bad_sof[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2     # 60000 x 60000: refused, not allocated
    return [
        good[:len(good) // 2],                # truncated in the entropy data
        good[:sos + 4],                       # truncated inside SOS
        good[:40],                            # truncated in the headers
        b"\xff\xd8\xff",                      # SOI only
        bytes(garbage),                       # markers and flipped bits in the scan
        bytes(bad_sof),
        b"\xff\xd8\xff\xdb\x00\x43\x00" + b"\x00" * 64 + good[sos:],   # zero quantization steps, no SOF
    ]


@pytest.mark.parametrize("method", ["dct", "pixel"])
def test_corrupt_jpegs_fail_per_tile_with_a_message(tiles, method):
    bad = corrupt_variants(tiles[0])
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, "PNG")
    png = buf.getvalue()
    batch_tiles = [tiles[1]] + bad + [png, b"", tiles[2]]
    new, status, errors = recode(batch_tiles, 40, method)
    assert status[0] == _jpeg.OK and status[-1] == _jpeg.OK          # neighbours unaffected
    assert new[0] is not None and new[-1] is not None
    assert status[len(bad) + 1] == _jpeg.NOT_JPEG and status[len(bad) + 2] == _jpeg.NOT_JPEG
    for i in range(1, len(bad) + 1):
        assert status[i] == _jpeg.FAILED, i
        assert new[i] is None and errors[i], i
    assert set(errors) == set(range(1, len(bad) + 1))
    assert "60000" in errors[bad.index(corrupt_variants(tiles[0])[5]) + 1]


def test_fuzzed_tiles_never_crash(tiles):
    rng = random.Random(11)
    good = tiles[3]
    fuzzed = []
    for _ in range(150):
        b = bytearray(good)
        for _ in range(rng.randint(1, 12)):
            b[rng.randrange(2, len(b))] = rng.randrange(256)
        if rng.random() < 0.3:
            b = b[:rng.randrange(3, len(b))]
        fuzzed.append(bytes(b))
    for method in ("dct", "pixel"):
        new, status, errors = recode(fuzzed, 30, method, threads=2)
        assert set(np.unique(status)) <= {_jpeg.OK, _jpeg.FAILED, _jpeg.NOT_SMALLER}
        for data, st in zip(new, status):
            if st == _jpeg.OK:
                Image.open(io.BytesIO(data)).load()
        assert all(errors[i] for i in np.flatnonzero(status == _jpeg.FAILED))


def test_threads_give_identical_bytes(tiles):
    for method in ("dct", "pixel"):
        one, _, _ = recode(tiles, 45, method, threads=1)
        two, _, _ = recode(tiles, 45, method, threads=2)
        many, _, _ = recode(tiles, 45, method, threads=5)
        assert one == two == many


def test_not_smaller_keeps_original(tiles):
    """A pixel re-encode above the source quality grows the tile: the original is kept unless asked."""
    new, status, _ = recode(tiles[:6], 98, "pixel")
    assert (status == _jpeg.NOT_SMALLER).all() and new == [None] * 6
    new, status, _ = recode(tiles[:6], 98, "pixel", allow_larger=True)
    assert (status == _jpeg.OK).all()


def test_arguments_are_validated(tiles):
    buf, offs, sizes = batch(tiles[:3])
    with pytest.raises(ValueError, match="outside"):
        _jpeg.recode(buf, offs + np.uint64(5), sizes, 50, "dct")
    with pytest.raises(ValueError, match="outside"):
        _jpeg.recode(buf, np.array([2**63], np.uint64), np.array([10], np.uint32), 50, "dct")
    with pytest.raises(ValueError, match="method"):
        _jpeg.recode(buf, offs, sizes, 50, "wavelet")
    with pytest.raises(ValueError, match="quality"):
        _jpeg.recode(buf, offs, sizes, 0, "dct")
    with pytest.raises(ValueError, match="length"):
        _jpeg.recode(buf, offs, sizes[:2], 50, "dct")
    new, status, errors = _jpeg.recode(b"", np.zeros(0, np.uint64), np.zeros(0, np.uint32), 50, "dct")
    assert new == [] and len(status) == 0 and errors == {}


ERROR_AFTER_OUTPUT = r"""
import io, sys
import numpy as np
from PIL import Image
from tilecrate import _jpeg
rng = np.random.default_rng(1)
buf = io.BytesIO()
Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(
    buf, "JPEG", quality=90, icc_profile=b"\0" * 20000)
bad = buf.getvalue()
bad = bad[:len(bad) // 2]                     # truncated in the entropy data
for method in ("pixel", "dct"):
    for optimize in (0, 1, 2):
        for _ in range(3):
            new, status, errors = _jpeg.recode(bad, np.zeros(1, np.uint64), np.array([len(bad)], np.uint32),
                                               50, method, 1, optimize=optimize)
            assert status[0] == _jpeg.FAILED and new == [None] and errors[0], (method, optimize, errors)
print("ok")
"""


def test_error_after_the_encoder_has_grown_its_buffer_is_clean():
    """A tile that fails once the encoder has written more than its first 4 KiB (here a 20 kB ICC
    profile, then truncated scan data) must not double-free the output buffer: libjpeg's
    jpeg_mem_dest frees the caller's pointer when it grows and reports the new one only at the end.
    Run in a child process: heap corruption would abort the test run."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", ERROR_AFTER_OUTPUT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


# --- integer requantization, optimal tables, argument checks, size bounds, cancel ---------------

@pytest.mark.parametrize("roff", [128, 127, 102, 85, 0])      # DC, the default, deadzones 0.4 and 0.33, truncation
def test_reciprocal_requantization_equals_the_exact_rule(roff):
    """The multiply-and-shift requantizer gives floor((256*a*s + roff*t) / (256*t)) for every source
    step s and target step t of 8-bit tables and every magnitude a baseline data can carry; the
    previous double-precision formula agrees too (so output bytes are unchanged)."""
    recip, doubles, cases = _jpeg._requant_selftest(roff, 255, 255, 2047)
    assert cases == sum(256 - s for s in range(1, 256)) * 2048
    assert recip == 0 and doubles == 0


def test_reciprocal_requantization_at_the_extremes():
    """Magnitudes up to 32768 (hostile data: the largest |JCOEF|) and 16-bit source steps (t = s)."""
    for args in [(127, 16, 255, 32768), (128, 65535, 1, 130), (0, 1, 65535, 3)]:
        recip, doubles, cases = _jpeg._requant_selftest(*args)
        assert cases > 0 and recip == 0, args


@pytest.mark.parametrize("roff", [128, 127, 85, 0])
def test_simd_requantization_equals_the_exact_rule(roff):
    """The 16-bit-lane requantizer (eight coefficients an instruction) gives the exact rule for both signs
    of every magnitude it accepts, for every pair of 8-bit steps; what it does not accept is counted."""
    wrong, in_lanes, left = _jpeg._requant_selftest16(roff, 255, 255, 2047)
    pairs = sum(256 - s for s in range(1, 256))
    assert wrong == 0
    assert in_lanes + left == pairs * (2048 + 2048)
    assert in_lanes > 4 * 10**7 and left > 0          # s = 255 accepts |a| <= 128 only


def test_simd_requantization_at_the_extremes():
    """|a| up to 32768 (kept as it is when the step does not change), 16-bit steps (never in lanes)."""
    wrong, in_lanes, left = _jpeg._requant_selftest16(127, 16, 255, 32768)
    assert wrong == 0 and in_lanes > 0 and left > 0
    wrong, in_lanes, left = _jpeg._requant_selftest16(128, 65535, 1, 130)      # t = s: kept, any s
    assert wrong == 0 and left == 0 and in_lanes == 65535 * (131 + 131)
    wrong, in_lanes, left = _jpeg._requant_selftest16(0, 1, 65535, 3)          # t > 255: scalar rule
    assert wrong == 0 and in_lanes == 255 * 8 and left == (65535 - 255) * 8
    with pytest.raises(ValueError):
        _jpeg._requant_selftest16(256, 1, 1, 1)
    with pytest.raises(ValueError):
        _jpeg._requant_selftest16(0, 1, 1, 32769)


def with_steps(data: bytes, step: int) -> bytes:
    """data with every 8-bit DQT entry replaced by step (the coefficients stay as coded)."""
    out, i = bytearray(data), 2
    while i + 4 <= len(out) and out[i] == 0xFF and out[i + 1] != 0xDA:
        length = int.from_bytes(out[i + 2:i + 4], "big")
        if out[i + 1] == 0xDB:
            j = i + 4
            while j < i + 2 + length:
                assert out[j] >> 4 == 0
                out[j + 1:j + 65] = bytes([step]) * 64
                j += 65
        i += 2 + length
    return bytes(out)


def test_blocks_too_large_for_the_lanes_take_the_scalar_rule():
    """Coefficients coded at step 1 relabelled step 200: flat blocks fit the 16-bit lanes, noisy ones
    (|a| * 200 > 32767) do not. The fused walk (optimize=2: lanes, scalar fallback per block) must write
    the bytes the scalar-only path writes (optimize=1: libjpeg's own statistics pass)."""
    rng = np.random.default_rng(3)
    px = np.full((64, 128, 3), 128, np.uint8)
    px[:, 64:] = rng.choice([0, 255], (64, 64, 1)).astype(np.uint8)        # grey: |a| up to ~1000 in Y
    buf = io.BytesIO()
    Image.fromarray(px, "RGB").save(buf, "JPEG", quality=100, subsampling=0)
    src = with_steps(buf.getvalue(), 200)
    for q in (1, 10):
        fused, s2, m2 = recode([src], q, "dct", allow_larger=True, optimize=2)
        scalar, s1, m1 = recode([src], q, "dct", allow_larger=True, optimize=1)
        assert s2[0] == _jpeg.OK and s1[0] == _jpeg.OK, (m2, m1)
        assert fused[0] == scalar[0]
        assert decode(fused[0]).shape == (64, 128, 3)


@pytest.mark.parametrize("level", [1, 2])
def test_each_simd_level_writes_the_scalar_paths_bytes(tiles, level):
    """The DCT path in SSE2 lanes (1) and in AVX2 lanes (2, where the CPU has it: else SSE2 again) writes
    exactly what the scalar rule with libjpeg's statistics pass writes (optimize=1)."""
    before = _jpeg._simd_level()
    try:
        got = _jpeg._simd_level(level)
        assert got == level or (level == 2 and got == 1)
        rng = np.random.default_rng(3)
        px = np.full((64, 128, 3), 128, np.uint8)
        px[:, 64:] = rng.choice([0, 255], (64, 64, 1)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px, "RGB").save(buf, "JPEG", quality=100, subsampling=0)
        sources = tiles[:12] + odd_jpegs() + [with_steps(buf.getvalue(), 200)]
        for q in (60, 35, 1):
            fused, s2, _ = recode(sources, q, "dct", allow_larger=True, optimize=2)
            scalar, s1, _ = recode(sources, q, "dct", allow_larger=True, optimize=1)
            assert (s2 == _jpeg.OK).all() and (s1 == _jpeg.OK).all()
            assert fused == scalar
    finally:
        _jpeg._simd_level(before)
    with pytest.raises(ValueError):
        _jpeg._simd_level(3)


def fibonacci_counts() -> np.ndarray:
    """Counts whose Huffman code is deeper than 16 bits: exercises the length-limiting step."""
    f = np.zeros(257, np.int64)
    a, b = 1, 1
    for i in range(0, 40):
        f[i * 3] = a
        a, b = b, a + b
    return f


def test_optimal_tables_equal_libjpegs():
    rng = np.random.default_rng(17)
    cases = [fibonacci_counts()]
    one = np.zeros(257, np.int64)
    one[7] = 5
    cases.append(one)
    for _ in range(300):
        f = np.zeros(257, np.int64)
        n = int(rng.integers(1, 257))
        idx = rng.choice(256, n, replace=False)
        kind = rng.integers(0, 3)
        if kind == 0:
            f[idx] = rng.integers(1, 4, n)                   # many ties
        elif kind == 1:
            f[idx] = rng.geometric(0.05, n)
        else:
            f[idx] = (rng.pareto(0.7, n) * 10).astype(np.int64) + 1
        cases.append(f)
    for f in cases:
        ours, lib = _jpeg._optimal_tables(f)
        assert ours == lib, f.tolist()
    bits, _ = _jpeg._optimal_tables(fibonacci_counts())[0]
    assert sum(bits) == np.count_nonzero(fibonacci_counts()) and bits[0] == 0


def test_optimal_tables_refuse_bad_counts():
    with pytest.raises(ValueError, match="ours refused"):       # no symbol: libjpeg's search would underrun
        _jpeg._optimal_tables(np.zeros(257, np.int64))
    for bad in [np.zeros(256, np.int64), np.full(257, -1), np.zeros((257, 1), np.int64), np.zeros(257),
                np.full(257, 10**8, np.int64)]:
        with pytest.raises(ValueError):
            _jpeg._optimal_tables(bad)


def test_requant_selftest_refuses_bad_arguments():
    for args in [(256, 1, 1, 1), (-1, 1, 1, 1), (0, 0, 1, 1), (0, 1, 65536, 1), (0, 1, 1, 32769), (0, 1, 1, -1)]:
        with pytest.raises(ValueError):
            _jpeg._requant_selftest(*args)


def test_every_argument_is_checked(tiles):
    buf, offs, sizes = batch(tiles[:3])
    bad_calls = [
        dict(threads=-1),
        dict(max_width=-1), dict(max_height=_jpeg.MAX_SIDE + 1),
        dict(optimize=3), dict(deadzone=float("nan")), dict(deadzone=0.6),
    ]
    for kw in bad_calls:
        with pytest.raises(ValueError):
            _jpeg.recode(buf, offs, sizes, 50, "dct", **kw)
    with pytest.raises(TypeError, match="cancel"):
        _jpeg.recode(buf, offs, sizes, 50, "dct", cancel=3)
    with pytest.raises(ValueError, match="negative"):
        _jpeg.recode(buf, offs.astype(np.int64) - 1, sizes, 50, "dct")
    with pytest.raises(ValueError, match="fit"):                  # would wrap to a small size as uint32
        _jpeg.recode(buf, offs, sizes.astype(np.uint64) + np.uint64(2**32), 50, "dct")
    with pytest.raises(ValueError, match="integers"):
        _jpeg.recode(buf, offs.astype(np.float64) + 0.5, sizes, 50, "dct")
    with pytest.raises(ValueError, match="one-dimensional"):
        _jpeg.recode(buf, offs.reshape(3, 1), sizes, 50, "dct")
    with pytest.raises((ValueError, TypeError)):
        _jpeg.recode(np.zeros((4, 4), np.uint8), offs, sizes, 50, "dct")
    with pytest.raises((ValueError, TypeError)):
        _jpeg.recode(np.zeros(64, np.uint16), offs, sizes, 50, "dct")


def jpeg_of(w: int, h: int, mode: str = "RGB", seed: int = 3, **kw) -> bytes:
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).convert(mode).save(buf, "JPEG", quality=85, **kw)
    return buf.getvalue()


def with_sof(data: bytes, width: int, height: int, precision: int | None = None) -> bytes:
    """The same JPEG with its frame header declaring another size (and sample precision)."""
    b = bytearray(data)
    i = 2
    while b[i] == 0xFF and b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(b[i + 2:i + 4], "big")
    if precision is not None:
        b[i + 4] = precision
    b[i + 5:i + 7] = height.to_bytes(2, "big")
    b[i + 7:i + 9] = width.to_bytes(2, "big")
    return bytes(b)


@pytest.mark.parametrize("method", ["dct", "pixel"])
def test_images_larger_than_the_tile_size_are_refused_per_tile(tiles, method):
    big = jpeg_of(512, 256)
    tall = jpeg_of(64, 300)
    batch_tiles = [tiles[0], big, tall, tiles[1]]
    new, status, errors = recode(batch_tiles, 40, method, max_width=256, max_height=256)
    assert list(status) == [_jpeg.OK, _jpeg.FAILED, _jpeg.FAILED, _jpeg.OK]
    assert new[1] is None and new[2] is None
    assert "512x256" in errors[1] and "256x256 limit" in errors[1]
    assert "64x300" in errors[2]
    new, status, errors = recode(batch_tiles, 40, method, max_width=512, max_height=300)   # fits now
    assert (status == _jpeg.OK).all() and errors == {}
    new, status, errors = recode(batch_tiles, 40, method)                                 # only the core's bound
    assert (status == _jpeg.OK).all()


HOSTILE = r"""
import io, sys
import numpy as np
from PIL import Image
sys.path.insert(0, sys.argv[1])
from test_jpeg import jpeg_of, with_sof
from tilecrate import _jpeg
good = jpeg_of(256, 256)
prog = jpeg_of(256, 256, progressive=True)
cases = {
    "truncated": good[:len(good) // 3],
    "huge declared size": with_sof(good, 8192, 8192),
    "over the core's bound": with_sof(good, 65000, 65000),
    "progressive, huge declared size": with_sof(prog, 8192, 8192),
    "progressive, truncated": prog[:len(prog) // 2],
    "cmyk, huge declared size": with_sof(jpeg_of(64, 64, "CMYK"), 16000, 16000),
    "12-bit": with_sof(good, 256, 256, precision=12),
    "zero width": with_sof(good, 0, 256),
}
names = list(cases)
tiles = [cases[k] for k in names]
sizes = np.array([len(t) for t in tiles], np.uint32)
offs = np.zeros(len(tiles), np.uint64)
offs[1:] = np.cumsum(sizes[:-1])
for method in ("dct", "pixel"):
    new, status, errors = _jpeg.recode(b"".join(tiles), offs, sizes, 40, method, 2, max_width=256, max_height=256)
    for i, name in enumerate(names):
        assert status[i] == _jpeg.FAILED and new[i] is None and errors[i], (method, name, status[i])
        print(method, name, "->", errors[i])
print("ok")
"""


def test_hostile_jpegs_keep_their_bytes_and_never_crash():
    """Truncated, huge declared sizes (baseline, progressive, CMYK), 12-bit, zero width: each FAILED
    with a message, in a child process so that a crash fails this test instead of the run."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", HOSTILE, here], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), (run.returncode, run.stderr[-2000:])
    out = run.stdout
    assert "8192x8192 is larger than the 256x256 limit" in out
    assert "precision" in out.lower()


def many(tiles, n):
    """n tiles that all point at the same few bytes: a long batch from little data."""
    buf, offs, sizes = batch(tiles[:8])
    pick = np.arange(n) % len(offs)
    return buf, offs[pick], sizes[pick]


def test_cancel_set_before_the_batch_codes_nothing(tiles):
    import threading

    ev = threading.Event()
    ev.set()
    buf, offs, sizes = many(tiles, 500)
    new, status, errors = _jpeg.recode(buf, offs, sizes, 40, "dct", cancel=ev)
    assert (status == _jpeg.CANCELLED).all() and new == [None] * 500 and errors == {}
    new, status, _ = _jpeg.recode(buf, offs, sizes, 40, "dct", cancel=lambda: True)
    assert (status == _jpeg.CANCELLED).all()


def test_cancel_during_a_batch_stops_between_tiles(tiles):
    """A batch of ~20 000 tiles is cancelled 0.3 s in: it returns long before it would have finished,
    tiles coded so far are complete, the others are CANCELLED."""
    import threading
    import time

    buf, offs, sizes = many(tiles, 20000)
    ev = threading.Event()
    timer = threading.Timer(0.3, ev.set)
    timer.start()
    try:
        t0 = time.monotonic()
        new, status, errors = _jpeg.recode(buf, offs, sizes, 40, "dct", threads=2, cancel=ev)
        after_set = time.monotonic() - t0 - 0.3
    finally:
        timer.cancel()
    done = status == _jpeg.OK
    assert 0 < done.sum() < len(status) and errors == {}
    assert set(np.unique(status)) == {_jpeg.OK, _jpeg.CANCELLED}
    assert (status[np.argmax(status == _jpeg.CANCELLED):] == _jpeg.CANCELLED).all()   # a tail, never a gap
    assert after_set < 2.0, after_set
    for i in np.flatnonzero(done)[:20]:
        Image.open(io.BytesIO(new[i])).load()
    # without cancel the same call codes every tile: the flag, not an error, stopped it
    new, status, _ = _jpeg.recode(buf, offs[:200], sizes[:200], 40, "dct", cancel=threading.Event())
    assert (status == _jpeg.OK).all()

"""The optimizeTilesForSize policy (FORMATS.md §9) and recompress_bundle on real bundles."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tilecrate import _jpeg
from tilecrate.cache import BundleData, BundleRef, open_cache
from tilecrate.errors import RequestError
from tilecrate.recompress import RecompressPolicy, policy_for, recompress_bundle, reencode_tiles
from tilecrate.request import ExportRequest
from tilecrate.tiling import PACKET

from conftest import real_path


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def psnr(a: bytes, b: bytes) -> float:
    mse = float(((decode(a) - decode(b)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def full_mask(data: BundleData) -> np.ndarray:
    return (data.sizes > 0).reshape(PACKET, PACKET).astype(np.uint8)


def selected(data: BundleData, mask: np.ndarray) -> list[bytes]:
    """Source bytes of the selected tiles, row-major, via BundleData.tile (an independent path)."""
    out = []
    for i in np.flatnonzero(mask.ravel()):
        r, c = divmod(int(i), PACKET)
        out.append(data.tile(data.ref.row0 + r, data.ref.col0 + c))
    return out


def test_policy_for_follows_the_request(sample_v2, sample_png, sample_mixed):
    with open_cache(str(sample_v2)) as cache:
        assert cache.compression_quality == 75
        assert policy_for(cache, ExportRequest(levels="0-2")) is None
        p = policy_for(cache, ExportRequest(levels="0-2", optimize_tiles_for_size=True, compression_quality=40))
        assert p.active and p.quality_used == 40 and p.resolved_method == "dct"
        for q in (75, 90):     # at or above the source: copy unchanged, metadata keeps the source quality
            p = policy_for(cache, ExportRequest(levels="0-2", optimize_tiles_for_size=True, compression_quality=q))
            assert not p.active and p.quality_used == 75
        p = policy_for(cache, ExportRequest(levels="0-2", optimize_tiles_for_size=True))
        assert not p.active and p.quality_used == 75
        p = policy_for(cache, ExportRequest.from_params({"levels": "0-2", "optimizeTilesForSize": "TRUE",
                                                         "compressionQuality": "55"}))
        assert p.active and p.quality == 55
    with open_cache(str(sample_png)) as cache:
        p = policy_for(cache, ExportRequest(levels="0-2", optimize_tiles_for_size=True, compression_quality=40))
        assert not p.active and p.quality_used == cache.compression_quality
    with open_cache(str(sample_mixed)) as cache:
        p = policy_for(cache, ExportRequest(levels="0-2", optimize_tiles_for_size=True, compression_quality=40))
        assert p.active
    with pytest.raises(RequestError, match="method"):
        RecompressPolicy(quality=50, source_quality=75, method="wavelet")
    assert RecompressPolicy(quality=50, source_quality=0).active          # unknown source quality: try
    assert RecompressPolicy(quality=50, source_quality=0).quality_used == 50


@pytest.mark.parametrize("method", ["dct", "pixel"])
def test_recompress_bundle_order_and_content(sample_v2, method):
    policy = RecompressPolicy(quality=40, source_quality=75, method=method)
    with open_cache(str(sample_v2)) as cache:
        ref = cache.bundles(5)[0]
        with cache.open_bundle(ref) as data:
            mask = full_mask(data)
            mask[::3, :] = 0                       # a partial selection
            src = selected(data, mask)
            tiles, warnings = recompress_bundle(policy, data, mask)
    assert warnings == [] and len(tiles) == int(mask.sum()) == len(src) > 4
    for i, (old, new) in enumerate(zip(src, tiles)):
        assert new != old and len(new) < len(old)
        own = psnr(old, new)
        assert own > 27
        # a tile in the wrong slot would match a neighbour better than its own source
        if i + 1 < len(src):
            assert own > psnr(src[i + 1], new) + 3
    assert tiles == reencode_tiles(src, 40, method=method).tiles


def test_inactive_policy_copies_verbatim(sample_v2):
    policy = RecompressPolicy(quality=80, source_quality=75)
    with open_cache(str(sample_v2)) as cache:
        with cache.open_bundle(cache.bundles(4)[0]) as data:
            mask = full_mask(data)
            tiles, warnings = recompress_bundle(policy, data, mask)
            assert tiles == selected(data, mask) and warnings == []
            empty, _ = recompress_bundle(RecompressPolicy(quality=40, source_quality=75), data,
                                         np.zeros((PACKET, PACKET), np.uint8))
            assert empty == []
            with pytest.raises(ValueError, match="128x128"):
                recompress_bundle(policy, data, np.ones((64, 64), np.uint8))


def test_mixed_cache_reencodes_jpeg_interiors_and_keeps_png_edges(sample_mixed):
    policy = RecompressPolicy(quality=40, source_quality=75, tile_format="MIXED")
    jpeg = png = 0
    with open_cache(str(sample_mixed)) as cache:
        for ref in cache.bundles(4):
            with cache.open_bundle(ref) as data:
                mask = full_mask(data)
                src = selected(data, mask)
                tiles, warnings = recompress_bundle(policy, data, mask)
                assert warnings == []
                for old, new in zip(src, tiles):
                    if old[:3] == b"\xff\xd8\xff":
                        assert new[:3] == b"\xff\xd8\xff" and len(new) < len(old)
                        jpeg += 1
                    else:
                        assert old[:4] == b"\x89PNG" and new == old
                        png += 1
    assert jpeg > 0 and png > 0


def test_corrupt_jpeg_in_a_bundle_is_kept_with_a_warning(sample_v2):
    with open_cache(str(sample_v2)) as cache:
        tiles = [t for *_, t in cache.iter_tiles(4)][:3]
    bad = tiles[1][: len(tiles[1]) // 3]
    parts = [tiles[0], bad, tiles[2]]
    buf = bytearray(b"\0" * 64)
    offsets = np.zeros(PACKET * PACKET, np.uint64)
    sizes = np.zeros(PACKET * PACKET, np.uint32)
    slots = [5, 130, 16383]                          # (0,5), (1,2), (127,127)
    for slot, part in zip(slots, parts):
        offsets[slot], sizes[slot] = len(buf), len(part)
        buf += part
    ref = BundleRef(7, 256, 384)
    data = BundleData(ref, memoryview(bytes(buf)), offsets, sizes)
    mask = (sizes > 0).reshape(PACKET, PACKET).astype(np.uint8)
    out, warnings = recompress_bundle(RecompressPolicy(quality=30, source_quality=75), data, mask)
    assert out[1] == bad and out[0] != tiles[0] and out[2] != tiles[2]
    assert len(warnings) == 1
    assert "level 7 row 257 col 386" in warnings[0] and "copied unchanged" in warnings[0]


def test_usa_corrupt_png_tiles_come_through_verbatim():
    """Usa.tpkx (Esri's sample) has corrupt PNG tiles at L0 and L1: never touched, even when forced."""
    policy = RecompressPolicy(quality=30, source_quality=0, tile_format="MIXED")
    with open_cache(str(real_path("Usa.tpkx"))) as cache:
        for level in (0, 1, 2):
            for ref in cache.bundles(level):
                with cache.open_bundle(ref) as data:
                    mask = full_mask(data)
                    src = selected(data, mask)
                    tiles, warnings = recompress_bundle(policy, data, mask)
                    assert tiles == src and warnings == []
        assert cache.tile(0, 0, 0)[:4] == b"\r\n\x1a\n"       # the known corruption, still there


def test_real_jpeg_caches_reencode(tmp_path):
    """Caches written by ArcGIS (GWC's V1 and V2 fixtures): every JPEG tile re-encodes smaller."""
    for key in ("gwc-compactcache", "gwc-compactcacheV2", "raster-tiles-compactcache"):
        with open_cache(str(real_path(key))) as cache:
            tiles = [t for *_, t in cache.iter_tiles()]
        result = reencode_tiles(tiles, 30)
        jpeg = [t[:3] == b"\xff\xd8\xff" for t in tiles]
        assert sum(jpeg) > 0, key
        for old, new, st, is_jpeg in zip(tiles, result.tiles, result.status, jpeg):
            if not is_jpeg:
                assert st == _jpeg.NOT_JPEG and new == old
            elif st == _jpeg.OK:
                assert len(new) < len(old) and decode(new).shape == decode(old).shape
        assert (result.status == _jpeg.OK).sum() >= 0.8 * sum(jpeg), key


def test_recompress_bundle_reads_tiles_from_the_file_with_the_same_result(sample_v2, tmp_path):
    policy = RecompressPolicy(quality=40, source_quality=75)
    with open_cache(str(sample_v2)) as cache:
        ref = cache.bundles(5)[0]
        with cache.open_bundle(ref) as data:
            mask = full_mask(data)
            mask[::3, :] = 0
            assert recompress_bundle(policy, data, mask, cache) == recompress_bundle(policy, data, mask)


TRUNCATED_UNDER_REENCODING = r"""
import os, sys
import numpy as np
from tilecrate.cache import open_cache
from tilecrate.errors import BundleError
from tilecrate.recompress import RecompressPolicy, recompress_bundle

with open_cache(sys.argv[1]) as cache:
    ref = cache.bundles(5)[0]
    with cache.open_bundle(ref) as data:
        mask = (data.sizes > 0).reshape(128, 128).astype(np.uint8)
        os.truncate(cache.bundle_file(ref)[0], 131136 + 100)   # re-seeded under a running export
        try:
            recompress_bundle(RecompressPolicy(quality=40, source_quality=75), data, mask, cache)
        except BundleError as e:
            print("BundleError", "changed" in str(e))
"""


def test_bundle_truncated_while_reencoded_is_an_error_not_sigbus(sample_v2, tmp_path):
    """The re-encoder used to read tiles straight from the bundle's mapping: a file truncated
    meanwhile killed the process with SIGBUS. In a child process, so that crash fails only this test."""
    import shutil
    import subprocess
    import sys

    copy = tmp_path / "c"
    shutil.copytree(sample_v2, copy)
    run = subprocess.run([sys.executable, "-c", TRUNCATED_UNDER_REENCODING, str(copy)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["BundleError", "True"], (run.returncode, run.stderr[-2000:])


def big_jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(4)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bundle_of(parts: list[bytes], slots: list[int], ref: BundleRef) -> BundleData:
    buf = bytearray(b"\0" * 64)
    offsets = np.zeros(PACKET * PACKET, np.uint64)
    sizes = np.zeros(PACKET * PACKET, np.uint32)
    for slot, part in zip(slots, parts):
        offsets[slot], sizes[slot] = len(buf), len(part)
        buf += part
    return BundleData(ref, memoryview(bytes(buf)), offsets, sizes)


def test_policy_carries_the_cache_tile_size(sample_v2):
    with open_cache(str(sample_v2)) as cache:
        p = policy_for(cache, ExportRequest(levels="0-2", optimize_tiles_for_size=True, compression_quality=40))
        assert p.tile_size == (cache.scheme.tile_cols, cache.scheme.tile_rows) == (256, 256)
    with pytest.raises(ValueError, match="tile size"):
        RecompressPolicy(quality=50, source_quality=75, tile_size=(-1, 256))


@pytest.mark.parametrize("method", ["dct", "pixel"])
def test_jpeg_larger_than_the_tile_size_is_kept_with_a_warning(sample_v2, method):
    """A 1024x512 JPEG in a 256-pixel cache is not decoded at all (its cost would be the attacker's
    choice): original bytes, one warning naming the tile and the size; its neighbours re-encode."""
    with open_cache(str(sample_v2)) as cache:
        tiles = [t for *_, t in cache.iter_tiles(4)][:2]
    big = big_jpeg(1024, 512)
    data = bundle_of([tiles[0], big, tiles[1]], [3, 200, 900], BundleRef(6, 128, 0))
    mask = (data.sizes > 0).reshape(PACKET, PACKET).astype(np.uint8)
    policy = RecompressPolicy(quality=30, source_quality=75, method=method, tile_size=(256, 256))
    out, warnings = recompress_bundle(policy, data, mask)
    assert out[1] == big and out[0] != tiles[0] and out[2] != tiles[1]
    assert len(warnings) == 1
    assert "level 6 row 129 col 72" in warnings[0] and "1024x512" in warnings[0]
    assert "copied unchanged" in warnings[0]
    # the same bundle with room for it: re-encoded like the others
    roomy = RecompressPolicy(quality=30, source_quality=75, method=method, tile_size=(1024, 1024))
    out, warnings = recompress_bundle(roomy, data, mask)
    assert warnings == [] and out[1] != big and len(out[1]) < len(big)
    # reencode_tiles takes the same bound
    res = reencode_tiles([tiles[0], big], 30, method=method, tile_size=(256, 256))
    assert res.tiles[1] == big and res.status[1] == _jpeg.FAILED and "1024x512" in res.errors[1]


def test_cancel_stops_recompress_bundle_and_reencode_tiles(sample_v2):
    import threading

    from tilecrate.errors import Cancelled

    with open_cache(str(sample_v2)) as cache:
        tiles = [t for *_, t in cache.iter_tiles(4)][:4]
    data = bundle_of(tiles, [1, 2, 3, 4], BundleRef(6, 0, 0))
    mask = (data.sizes > 0).reshape(PACKET, PACKET).astype(np.uint8)
    policy = RecompressPolicy(quality=30, source_quality=75, tile_size=(256, 256))
    ev = threading.Event()
    out, warnings = recompress_bundle(policy, data, mask, cancel=ev)         # not set: a normal result
    assert len(out) == 4 and warnings == []
    ev.set()
    with pytest.raises(Cancelled):
        recompress_bundle(policy, data, mask, cancel=ev)
    with pytest.raises(Cancelled):
        reencode_tiles(tiles, 30, cancel=lambda: True)
    with pytest.raises(TypeError, match="cancel"):
        reencode_tiles(tiles, 30, cancel="yes")


def test_overlapping_index_cells_are_refused_before_allocating(sample_v2, tmp_path):
    """Every cell of a bundle's index naming the same large tile (cheap to write into a cache, an index
    is 128 KiB) made the re-encoder allocate cells × tile size: refused as a BundleError instead."""
    import os
    import shutil
    import struct

    from tilecrate.errors import BundleError

    copy = tmp_path / "c"
    shutil.copytree(sample_v2, copy)
    with open_cache(str(copy)) as cache:
        ref = cache.bundles(5)[0]
        path = cache.bundle_file(ref)[0]
        offsets, sizes = cache.index(ref)
    big = int(np.argmax(sizes))
    entry = struct.pack("<Q", int(offsets[big]) | (int(sizes[big]) << 40))
    with open(path, "r+b") as f:
        f.seek(64)
        f.write(entry * (PACKET * PACKET))
    assert int(sizes[big]) * PACKET * PACKET > os.path.getsize(path)
    with open_cache(str(copy)) as cache:
        with cache.open_bundle(ref) as data:
            mask = np.ones((PACKET, PACKET), np.uint8)
            with pytest.raises(BundleError, match="overlapping"):
                recompress_bundle(RecompressPolicy(quality=40, source_quality=75), data, mask, cache)

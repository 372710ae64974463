"""LERC1 encoder and the LERC elevation sample, checked with Esri's own decoder (the `lerc` package)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile

import lerc  # test dependency (pyproject [test]); a missing decoder must fail, not skip
import numpy as np
import pytest

from tilecrate import lerc1
from tilecrate.cache import open_cache
from tilecrate.export import export
from tilecrate.request import ExportRequest
from tilecrate.sample import LERC_MAX_Z_ERROR, LERC_SAMPLES, SampleSpec, elevation, make_sample, tiles_of_level

LEVELS = (0, 1, 2, 3)


def _decode(blob: bytes) -> np.ndarray:
    result, arr, mask = lerc.decode(blob)
    assert result == 0, f"lerc.decode failed with {result}"
    assert mask is None or np.asarray(mask).all()
    return np.asarray(arr, dtype=np.float64)


def _within(decoded: np.ndarray, z: np.ndarray, max_z_error: float) -> float:
    """Largest error, which must stay within maxZError (plus float32 rounding of offset + n·step)."""
    err = float(np.abs(decoded - z.astype(np.float64)).max())
    assert err <= max_z_error + float(np.abs(z).max()) * 2.4e-7, err
    return err


def _walk_blocks(blob: bytes) -> list[int]:
    """The block encodings of a LERC1 blob, read from FORMATS.md §19.3; checks the blob is fully used."""
    assert blob[:10] == b"CntZImage "
    version, itype, rows, cols, _ = struct.unpack_from("<iiIId", blob, 10)
    assert (version, itype) == (11, 8)
    nby, nbx, nbytes, maxv = struct.unpack_from("<IIIf", blob, 34)
    assert (nby, nbx, nbytes, maxv) == (0, 0, 0, 1.0)           # constant mask: all valid
    nby, nbx, nbytes, _ = struct.unpack_from("<IIIf", blob, 50)
    pos, end = 66, 66 + nbytes
    assert end == len(blob)
    count = (nby + (rows % nby > 0)) * (nbx + (cols % nbx > 0))
    encodings = []
    for _ in range(count):
        flag = blob[pos]
        enc, otype = flag & 63, flag >> 6
        encodings.append(enc)
        pos += 1
        if enc == 0:
            pos += rows * cols * 4
        elif enc in (1, 3):
            pos += {0: 4, 1: 2, 2: 1}[otype]
            if enc == 1:
                bits, ctype = blob[pos] & 63, blob[pos] >> 6
                width = {0: 4, 1: 2, 2: 1}[ctype]
                n = int.from_bytes(blob[pos + 1:pos + 1 + width], "little")
                assert 0 < bits < 32
                pos += 1 + width + (n * bits + 7) // 8
    assert pos == end
    return encodings


@pytest.mark.parametrize("shape", [(257, 257), (1, 1), (5, 3), (8, 8), (17, 33), (100, 7), (64, 64)])
@pytest.mark.parametrize("max_z_error", [0.1, 0.5, 1e-3])
def test_encoder_round_trips_through_lerc_decode(shape, max_z_error):
    rng = np.random.default_rng(abs(hash((shape, max_z_error))) % 2**32)
    cases = {
        "noise": rng.normal(0, 500, shape),
        "ramp": np.add.outer(np.arange(shape[0]) * 3.7, np.arange(shape[1]) * -1.3) - 1000,
        "constant": np.full(shape, 12.5),
        "zero": np.zeros(shape),
        "steps": np.round(rng.uniform(-50, 50, shape)),
    }
    for name, z in cases.items():
        z = z.astype(np.float32)
        blob = lerc1.encode(z, max_z_error)
        decoded = _decode(blob)
        assert decoded.shape == shape, name
        _within(decoded, z, max_z_error)
        info = lerc.getLercBlobInfo(blob)
        assert info[0] == 0 and info[1] == 0          # codec version 0 = LERC1
        assert (info[4], info[5]) == (shape[1], shape[0])
        encodings = _walk_blocks(blob)
        assert 0 not in encodings or len(encodings) == 1    # raw only as a single block (JS decoder)


def test_encoder_compresses_smooth_terrain_and_uses_bit_stuffing():
    z = elevation(4, 5, 8)
    blob = lerc1.encode(z, 0.1)
    assert len(blob) < z.nbytes * 0.6
    encodings = _walk_blocks(blob)
    assert encodings.count(1) > len(encodings) // 2
    _within(_decode(blob), z, 0.1)
    # a coarser error makes a smaller blob
    assert len(lerc1.encode(z, 1.0)) < len(blob)


def test_encoder_constant_tiles_are_tiny():
    blob = lerc1.encode(np.full((257, 257), 42.0, np.float32), 0.1)
    assert len(blob) < 66 + 33 * 33 * 5 + 1
    assert np.all(_decode(blob) == 42.0)
    assert set(_walk_blocks(lerc1.encode(np.zeros((257, 257), np.float32), 0.1))) == {2}


def test_encoder_falls_back_to_one_raw_block_for_huge_ranges():
    z = np.random.default_rng(3).uniform(-3e38, 3e38, (33, 20)).astype(np.float32)
    blob = lerc1.encode(z, 0.1)
    assert _walk_blocks(blob) == [0]
    assert np.array_equal(_decode(blob), z.astype(np.float64))


@pytest.mark.parametrize("bad,err", [
    (np.zeros((3, 3, 3), np.float32), 0.1),
    (np.zeros((0, 4), np.float32), 0.1),
    (np.zeros((20001, 1), np.float32), 0.1),
    (np.array([[1.0, np.nan]], np.float32), 0.1),
    (np.array([[1.0, np.inf]], np.float32), 0.1),
    (np.zeros((4, 4), np.float32), 0.0),
    (np.zeros((4, 4), np.float32), float("nan")),
])
def test_encoder_refuses_what_it_cannot_write(bad, err):
    with pytest.raises(lerc1.LercEncodeError):
        lerc1.encode(bad, err)


# --------------------------------------------------------------------------------------------
# the sample elevation cache


@pytest.fixture(scope="module")
def lerc_sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("lerc") / "elevation"
    make_sample(out, SampleSpec(levels=LEVELS, tile_format="LERC"))
    return out


def test_sample_tiles_decode_to_the_terrain(lerc_sample):
    with open_cache(lerc_sample) as cache:
        assert cache.tile_format == "LERC"
        assert cache.scheme.tile_rows == cache.scheme.tile_cols == 256
        expected = SampleSpec(levels=LEVELS, tile_format="LERC")
        seen = 0
        for level, row, col, blob in cache.iter_tiles():
            assert blob.startswith(b"CntZImage ")
            decoded = _decode(blob)
            assert decoded.shape == (LERC_SAMPLES, LERC_SAMPLES)
            _within(decoded, elevation(level, row, col), LERC_MAX_Z_ERROR)
            seen += 1
        want = sum((r1 - r0 + 1) * (c1 - c0 + 1)
                   for r0, r1, c0, c1 in (tiles_of_level(expected, lv) for lv in LEVELS))
        assert seen == want


def test_sample_neighbours_share_their_edge_samples(lerc_sample):
    with open_cache(lerc_sample) as cache:
        a, b = _decode(cache.tile(3, 2, 3)), _decode(cache.tile(3, 2, 4))
        below = _decode(cache.tile(3, 3, 3))
    # the source samples on a shared edge are identical; decoded ones differ by at most 2·maxZError
    assert np.array_equal(elevation(3, 2, 3)[:, -1], elevation(3, 2, 4)[:, 0])
    assert np.array_equal(elevation(3, 2, 3)[-1, :], elevation(3, 3, 3)[0, :])
    assert np.abs(a[:, -1] - b[:, 0]).max() <= 2 * LERC_MAX_Z_ERROR + 1e-3
    assert np.abs(a[-1, :] - below[0, :]).max() <= 2 * LERC_MAX_Z_ERROR + 1e-3
    # real relief, sea and land
    assert a.min() < 0 < a.max() or b.min() < 0 < b.max() or (a.max() - a.min()) > 100


def test_sample_conf_xml_says_lerc(lerc_sample):
    text = (lerc_sample / "conf.xml").read_text()
    assert "<CacheTileFormat>LERC</CacheTileFormat>" in text
    assert "<LERCError>0.1</LERCError>" in text and "<BandCount>1</BandCount>" in text
    assert "<CompressionQuality>0</CompressionQuality>" in text


def test_sample_is_deterministic(lerc_sample, tmp_path):
    again = make_sample(tmp_path / "again", SampleSpec(levels=(2,), tile_format="LERC"))
    bundle = "_alllayers/L02/R0000C0000.bundle"
    assert (tmp_path / "again" / bundle).read_bytes() == (lerc_sample / bundle).read_bytes()
    assert again


def test_export_to_tpkx_passes_lerc_tiles_through(lerc_sample, tmp_path):
    """optimizeTilesForSize applies to JPEG tiles only: LERC tiles come out byte for byte."""
    out = tmp_path / "elevation.tpkx"
    req = ExportRequest(levels="0-3", optimize_tiles_for_size=True, compression_quality=40)
    result = export(str(lerc_sample), req, str(out))
    assert result.warnings == []
    with zipfile.ZipFile(out) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        root = json.loads(zf.read("root.json"))
    assert root["tileImageInfo"]["format"] == "LERC"
    with open_cache(lerc_sample) as src, open_cache(out) as dst:
        assert dst.tile_format == "LERC"
        src_tiles = {(lv, r, c): t for lv, r, c, t in src.iter_tiles()}
        dst_tiles = {(lv, r, c): t for lv, r, c, t in dst.iter_tiles()}
    assert src_tiles == dst_tiles
    assert result.tiles == len(src_tiles)
    # and what a client of the package gets back: the terrain, within maxZError
    for (level, row, col), blob in dst_tiles.items():
        _within(_decode(blob), elevation(level, row, col), LERC_MAX_Z_ERROR)


def test_cli_sample_lerc(tmp_path):
    out = tmp_path / "elev"
    proc = subprocess.run([sys.executable, "-m", "tilecrate.cli", "sample", str(out), "--format", "lerc",
                           "--levels", "0-1", "--json", "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["format"] == "LERC" and report["tiles"] == 5
    with open_cache(out) as cache:
        for level, row, col, blob in cache.iter_tiles():
            _within(_decode(blob), elevation(level, row, col), LERC_MAX_Z_ERROR)

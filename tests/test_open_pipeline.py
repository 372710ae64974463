"""The open sources' export path: tiles planned as read, gathered into the package; levels scanned ahead.

MBTiles -> .tpkx/.tpk: a block's tiles are planned as read (`plan_tiles`: no bundle body laid out)
and written with gathered writes (`ZipWriter.add_gathered`), so each tile byte is copied once, into
the output; the request's level scans run on a helper thread while planning scans from the coarsest
(`BlockCache.prefetch_levels`). Each must write the bytes the body path wrote and fail clearly when
the source changes under it.
"""
from __future__ import annotations

import sqlite3
import time
import zipfile

import numpy as np
import pytest

import tilecrate
from tilecrate.cache import open_cache
from tilecrate.errors import BundleError, TilecrateError
from tilecrate.package.bundles import plan_bundle, plan_tiles
from tilecrate.package.zipstream import ZipWriter
from tilecrate.request import ExportRequest
from tilecrate.sources import sqlite as sqlite_mod
from tilecrate.sources.blocks import BlockCache, v2_layout
from tilecrate.sources.model import BundleData
from tilecrate.tiling import PACKET


@pytest.fixture(scope="module")
def mbtiles(sample_v2, tmp_path_factory):
    """The JPEG sample (levels 0-5) as an MBTiles written by tilecrate's sink."""
    out = tmp_path_factory.mktemp("pipe") / "src.mbtiles"
    tilecrate.export(str(sample_v2), ExportRequest("0-5"), str(out))
    return out


def _largest(cache):
    refs = cache.bundles()
    return max(refs, key=lambda r: int(cache.index(r)[1].astype(np.int64).sum()))


@pytest.mark.parametrize("version", [1, 2])
def test_plan_tiles_writes_the_bytes_of_a_laid_out_body(mbtiles, version):
    with open_cache(str(mbtiles)) as cache:
        ref = _largest(cache)
        idx, tiles = cache.open_tiles(ref)
        assert len(tiles) > 8
        mask = np.zeros(PACKET * PACKET, dtype=bool)
        mask[idx[::2]] = True                           # every other tile: runs broken, as a polygon would
        buf, offsets, sizes = v2_layout(idx, tiles, "t")
        want = plan_bundle(BundleData(ref, buf, offsets, sizes, None, None), mask, version, "t")
        got = plan_tiles(ref, idx, tiles, mask, version, "t")
        assert got.size == want.size and got.tiles == want.tiles and got.bundlx == want.bundlx
        assert got.to_bytes() == want.to_bytes()
        assert b"".join(b"".join(bytes(p) for p in g) for g in got.gathered()) == want.to_bytes()
        got.compute_crc()
        want.compute_crc()
        assert got.crc == want.crc
        got.release()
        assert got.held is None
        with pytest.raises(ValueError, match="ascending"):
            plan_tiles(ref, idx[::-1], tiles[::-1], mask, version, "t")


def _bundles(path):
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None                               # every entry's CRC-32 right
        return {n: z.read(n) for n in z.namelist() if n.endswith((".bundle", ".bundlx", ".json", ".xml"))
                and "iteminfo" not in n}


@pytest.mark.parametrize("ext", ["tpkx", "tpk"])
def test_package_from_mbtiles_is_the_body_paths_bytes(mbtiles, tmp_path, monkeypatch, ext):
    gathered, body, pages = tmp_path / f"gathered.{ext}", tmp_path / f"body.{ext}", tmp_path / f"pages.{ext}"
    calls = []
    real = ZipWriter.add_gathered
    monkeypatch.setattr(ZipWriter, "add_gathered", lambda self, *a: calls.append(a[0]) or real(self, *a))
    tilecrate.export(str(mbtiles), ExportRequest("0-5"), str(pages))     # bodies laid out from the table's pages
    assert not calls
    monkeypatch.setattr(sqlite_mod, "PAGE_READS", False)
    tilecrate.export(str(mbtiles), ExportRequest("0-5"), str(gathered))
    assert len(calls) > 3
    monkeypatch.delattr(BlockCache, "open_tiles")      # the earlier path: a V2 body laid out per block
    tilecrate.export(str(mbtiles), ExportRequest("0-5"), str(body))
    assert _bundles(gathered) == _bundles(body) == _bundles(pages)
    with open_cache(str(gathered)) as got, sqlite3.connect(mbtiles) as db:       # read back tile for tile
        for z, x, y, t in db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles"):
            assert got.tile(z, (1 << z) - 1 - y, x) == bytes(t)


def test_package_export_fails_when_a_block_loses_tiles(mbtiles, tmp_path):
    src = tmp_path / "c.mbtiles"
    src.write_bytes(mbtiles.read_bytes())
    out = tmp_path / "o.tpkx"
    done = []

    def progress(p):
        if not done:          # after planning, before any block is read: another process deletes tiles
            done.append(1)
            with sqlite3.connect(src) as db:
                db.execute("DELETE FROM tiles WHERE zoom_level = 5 AND tile_column % 2 = 0")

    with pytest.raises(TilecrateError, match="changed") as err:
        tilecrate.export(str(src), ExportRequest("0-5"), str(out), progress=progress)
    assert isinstance(err.value, BundleError) and "\n" not in str(err.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["c.mbtiles"]


@pytest.mark.parametrize("pages", [True, False])
def test_prefetched_scans_match_and_no_level_is_scanned_twice(mbtiles, monkeypatch, pages):
    monkeypatch.setattr(sqlite_mod, "spare_core", lambda: True)
    monkeypatch.setattr(sqlite_mod, "PAGE_READS", pages)
    with open_cache(str(mbtiles)) as plain:
        want = {r: plain.index(r)[1].tolist() for r in plain.bundles()}
    scanned: list[int] = []
    name = "_locate_level" if pages else "_scan_cols"     # the table's pages walked, or the index scanned by SQL
    real = getattr(sqlite_mod.SqliteBackend, name)

    def counting(self, level, *args):
        scanned.append(level)
        time.sleep(0.01)                  # both threads busy at once
        return real(self, level, *args)

    monkeypatch.setattr(sqlite_mod.SqliteBackend, name, counting)
    with open_cache(str(mbtiles)) as cache:
        cache.prefetch_levels(list(range(0, 6)))
        got = {r: cache.index(r)[1].tolist() for r in cache.bundles()}
    assert got == want
    assert sorted(scanned) == sorted(set(scanned)) == list(range(0, 6))


def test_gathered_entry_survives_short_writes(mbtiles, tmp_path, monkeypatch):
    import os

    with open_cache(str(mbtiles)) as cache:
        ref = _largest(cache)
        idx, tiles = cache.open_tiles(ref)
        mask = np.zeros(PACKET * PACKET, dtype=bool)
        mask[idx] = True
        plan = plan_tiles(ref, idx, tiles, mask, 2, "t")
        real = os.writev

        def short(fd, bufs):          # a pipe or a signal: at most 777 bytes a call
            taken, out = 0, []
            for b in bufs:
                b = memoryview(b).cast("B")[:777 - taken]
                out.append(b)
                taken += b.nbytes
                if taken >= 777:
                    break
            return real(fd, out)

        monkeypatch.setattr(os, "writev", short)
        path = tmp_path / "s.zip"
        with open(path, "wb") as f:
            w = ZipWriter(f)
            w.add_gathered("a.bundle", plan.size, None, plan.gathered())
            w.close()
        monkeypatch.setattr(os, "writev", real)
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None and z.read("a.bundle") == plan.to_bytes()


def test_held_tiles_to_an_output_that_cannot_seek(mbtiles):
    import io

    from tilecrate.package.zipstream import ZipSink

    with open_cache(str(mbtiles)) as cache:
        ref = _largest(cache)
        idx, tiles = cache.open_tiles(ref)
        mask = np.zeros(PACKET * PACKET, dtype=bool)
        mask[idx[1:]] = True
        plan = plan_tiles(ref, idx, tiles, mask, 1, "t")          # V1: a .bundlx entry as well
        out = io.BytesIO()
        sink = ZipSink(ZipWriter(out))
        assert sink.needs_crc                                     # the CRC must be known before the bytes
        sink.add_bundle("L05/R0000C0000.bundle", plan)
        sink.close()
        with zipfile.ZipFile(io.BytesIO(out.getvalue())) as z:
            assert z.testzip() is None
            assert z.read("L05/R0000C0000.bundle") == plan.to_bytes()
            assert z.read("L05/R0000C0000.bundlx") == plan.bundlx

"""Open-format sources (tilecrate.sources): ratios from one run.

- indexing a PMTiles archive (every tile's level, row, column, offset and length: what selection and
  estimates need) with tilecrate's numpy directory walk vs the `pmtiles` package's own pieces
  (deserialize_directory for the root and every leaf, tileid_to_zxy per tile), target >= 5x;
- the tile sizes of every block of an MBTiles level (`Cache.level_summary`) vs a plain Python scan of
  `SELECT zoom_level, tile_column, tile_row, length(tile_data)` into a dict (the floor any SQLite
  reader pays), target >= 0.5x;
- every block's tiles of the same MBTiles read as exports read them (`open_bundle`: one query a block, laid
  out as a bundle body) vs a plain Python `SELECT tile_column, tile_row, tile_data` of the level into a
  list, target >= 0.5x.

Run: `.venv/bin/python -m pytest benchmarks/bench_sources.py --benchmark-enable -p no:cacheprovider`
Generated data: 262 144 tiles at zoom 9 (one shared 70-byte blob per run of 7, so runs and leaves occur).
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from conftest import report

Z = 9
ROUNDS = 3


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    from pmtiles.tile import Compression, TileType, zxy_to_tileid
    from pmtiles.writer import Writer

    out = tmp_path_factory.mktemp("pm") / "z9.pmtiles"
    n = 1 << Z
    ids = sorted(zxy_to_tileid(Z, x, y) for x in range(n) for y in range(n))
    with open(out, "wb") as f:
        w = Writer(f)
        for t in ids:
            w.write_tile(t, b"\x89PNG\r\n\x1a\n" + (t // 7).to_bytes(8, "little") * 8)
        w.finalize({"tile_type": TileType.PNG, "tile_compression": Compression.NONE, "min_zoom": Z, "max_zoom": Z,
                    "min_lon_e7": -1800000000, "min_lat_e7": -850000000, "max_lon_e7": 1800000000,
                    "max_lat_e7": 850000000, "center_zoom": 0, "center_lon_e7": 0, "center_lat_e7": 0}, {})
    return out


def _package_walk(path: Path) -> int:
    from pmtiles.tile import deserialize_directory, deserialize_header, tileid_to_zxy

    with open(path, "rb") as f:
        data = f.read()
    h = deserialize_header(data[:127])
    count = 0
    stack = [(h["root_offset"], h["root_length"])]
    while stack:
        off, n = stack.pop()
        for e in deserialize_directory(data[off:off + n]):
            if e.run_length == 0:
                stack.append((h["leaf_directory_offset"] + e.offset, e.length))
                continue
            for k in range(e.run_length):
                tileid_to_zxy(e.tile_id + k)
                count += 1
    return count


def _best(fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def test_pmtiles_index_vs_package(benchmark, archive, request):
    from tilecrate.sources.pmtiles import PMTilesBackend

    def ours():
        b = PMTilesBackend(str(archive))
        try:
            return sum(len(v) for v in b._blocks.values()), int(b._tid.size)
        finally:
            b.close()

    t_pkg, n_pkg = _best(lambda: _package_walk(archive))
    t_ours, (blocks, n_ours) = _best(ours)
    assert n_pkg == n_ours == 1 << (2 * Z) and blocks == 16
    benchmark.pedantic(ours, rounds=1, iterations=1)
    report(request, "PMTiles index (262 144 tiles)", ours_s=t_ours, pmtiles_package_s=t_pkg,
           ratio=t_pkg / t_ours, target=5.0)


@pytest.fixture(scope="module")
def mbtiles(archive, tmp_path_factory) -> Path:
    from pmtiles.convert import pmtiles_to_mbtiles

    mb = tmp_path_factory.mktemp("mb") / "z9.mbtiles"
    pmtiles_to_mbtiles(str(archive), str(mb))
    return mb


def test_mbtiles_level_summary_vs_plain_scan(benchmark, mbtiles, request):
    from tilecrate.cache import open_cache

    mb = mbtiles

    def plain():
        with sqlite3.connect(f"file:{mb}?mode=ro", uri=True) as db:
            return len({(z, c, r): n for z, c, r, n in db.execute(
                "SELECT zoom_level, tile_column, tile_row, length(tile_data) FROM tiles")})

    def ours():
        with open_cache(mb) as c:
            return c.level_summary()[Z]["tiles"]

    t_plain, n_plain = _best(plain)
    t_ours, n_ours = _best(ours)
    assert n_plain == n_ours == 1 << (2 * Z)
    benchmark.pedantic(ours, rounds=1, iterations=1)
    report(request, "MBTiles level summary (262 144 tiles)", ours_s=t_ours, plain_scan_s=t_plain,
           ratio=t_plain / t_ours, target=0.5, load=os.getloadavg()[0])


def test_mbtiles_block_reads_vs_plain_select(benchmark, mbtiles, request):
    from tilecrate.cache import open_cache

    def plain():
        with sqlite3.connect(f"file:{mbtiles}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT tile_column, tile_row, tile_data FROM tiles WHERE zoom_level = ?", (Z,)).fetchall()
            return len(rows), sum(len(r[2]) for r in rows)

    def ours():
        n = size = 0
        with open_cache(mbtiles) as c:
            c._store._scans[Z] = (c._store.identity(), None)     # blocks listed from the index, no size scan
            for ref in c.bundles(Z):
                with c.open_bundle(ref) as data:
                    n += int((data.sizes > 0).sum())
                    size += int(data.sizes.sum())
        return n, size

    t_plain, got_plain = _best(plain)
    t_ours, got_ours = _best(ours)
    assert got_plain == got_ours and got_ours[0] == 1 << (2 * Z)
    benchmark.pedantic(ours, rounds=1, iterations=1)
    report(request, "MBTiles block reads (262 144 tiles)", ours_s=t_ours, plain_select_s=t_plain,
           ratio=t_plain / t_ours, target=0.5, load=os.getloadavg()[0])
    assert t_plain / t_ours >= 0.5, f"MBTiles block reads only {t_plain / t_ours:.2f}x a plain SELECT"

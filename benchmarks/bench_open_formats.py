"""Open-format outputs (tilecrate.sinks): ratios from one run against the field's tools.

- compact cache (.tpk) -> MBTiles vs tpkutils' TPK.to_mbtiles (what `tpk export mbtiles` runs), target >= 3x;
- compact cache folder -> MBTiles vs MapProxy's `mapproxy-util export --type mbtile` (.venv-mapproxy),
  target >= 100x (also printed without MapProxy's start-up, a dry run of the same command);
- MBTiles -> PMTiles vs the `pmtiles` package's converter (pmtiles.convert.mbtiles_to_pmtiles), target >= 5x;
- MBTiles -> .tpkx vs `cp` of the package's bytes, target >= 0.5x;
  the MBTiles comparisons also print SQLite's own floor (`_sqlite_floor`: the rows handed over through
  Python's sqlite3 on a connection set up as tilecrate's, mmap off; `_c_floor`: the same statements through
  SQLite's C API as tilecrate read them before its page reader, rows into arrays, single thread;
  `_pages_floor`: tilecrate's page reader alone, one thread: each level's rowids by an index-only query, the
  table's b-tree walked to their cells, their bytes copied from the pages) and the ratios an exporter taking
  no time beyond them would reach; and the same export through SQL instead of the page reader
  (`sources.sqlite.PAGE_READS` off, alternating with it), `pages_vs_sql`;
- peak RSS (VmHWM) of an export process for a small and a 12x larger output (flat: a few MiB apart).

Run: `.venv/bin/pytest benchmarks/bench_open_formats.py --benchmark-enable -p no:cacheprovider`
(`--large-sample PATH` uses that cache's levels 0-8 instead of a generated levels 0-7 sample).
Every contender runs in this process on files read once before (page cache warm); best of the rounds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tilecrate
from conftest import report
from tilecrate.request import ExportRequest


@pytest.fixture(scope="module")
def source(request, tmp_path_factory) -> tuple[Path, str]:
    """(cache folder, levels): the large sample's levels 0-8 when given, else a generated levels 0-7 sample."""
    path = request.config.getoption("--large-sample")
    if path:
        return Path(path), "0-8"
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("bench") / "jpeg"
    make_sample(out, SampleSpec(levels=tuple(range(0, 8))))
    return out, "0-7"


@pytest.fixture(scope="module")
def tpk(source, tmp_path_factory) -> Path:
    """The source as a .tpk (compact V1), the input tpkutils reads."""
    folder, levels = source
    out = tmp_path_factory.mktemp("tpk") / "src.tpk"
    tilecrate.export(str(folder), ExportRequest(levels), str(out))
    return out


@pytest.fixture(scope="module")
def mbtiles(source, tmp_path_factory) -> Path:
    """The source as MBTiles, written by tilecrate's own sink (the input of the MBTiles comparisons)."""
    folder, levels = source
    out = tmp_path_factory.mktemp("mbt") / "src.mbtiles"
    tilecrate.export(str(folder), ExportRequest(levels), str(out))
    return out


def _warm(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def _drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ours(benchmark, src: Path, levels: str, out: Path):
    """(result, best seconds) of three timed tilecrate exports of `levels` of `src` to `out`."""
    times = []

    def run():
        _drop(out)
        t0 = time.perf_counter()
        result = tilecrate.export(str(src), ExportRequest(levels), str(out))
        times.append(time.perf_counter() - t0)
        return result

    return benchmark.pedantic(run, rounds=3, iterations=1), min(times)


def _pages_vs_sql(src: Path, levels: str, out: Path, rounds: int = 5) -> tuple[float, float]:
    """(best seconds with the page reader, best seconds through SQL) of exports alternating between the two
    (`sources.sqlite.PAGE_READS`), so both see the same machine."""
    from tilecrate.sources import sqlite as sqlite_source

    best = {True: float("inf"), False: float("inf")}
    try:
        for _ in range(rounds):
            for pages in (True, False):
                sqlite_source.PAGE_READS = pages
                _drop(out)
                t0 = time.perf_counter()
                tilecrate.export(str(src), ExportRequest(levels), str(out))
                best[pages] = min(best[pages], time.perf_counter() - t0)
    finally:
        sqlite_source.PAGE_READS = True
    return best[True], best[False]


def _sqlite_floor(path: Path, top: int, sizes: bool = True) -> None:
    """What SQLite alone takes to hand over an MBTiles' tiles through a connection set up as tilecrate's
    (read-only, mmap off, 2 MB page cache): each level's (column, row, length) scan, which planning needs,
    then each level's tile_data; no Python work per tile beyond the rows' objects. No exporter reading
    through SQLite that way can take less, so `base / floor` bounds the ratio any of them can reach."""
    from tilecrate.sources.sqlite import connect

    c = connect(str(path), str(path))
    try:
        for z in range(top + 1):
            if sizes:
                c.execute("SELECT tile_column, tile_row, length(tile_data) FROM tiles WHERE zoom_level = ?",
                          (z,)).fetchall()
            c.execute("SELECT tile_data FROM tiles WHERE zoom_level = ?", (z,)).fetchall()
    finally:
        c.close()


def _c_floor(path: Path, top: int) -> None:
    """`_sqlite_floor` through SQLite's C API (tilecrate._sqlite.Reader, one thread): what reading the rows
    costs SQLite itself, without a Python object per row."""
    from tilecrate._sqlite import Reader

    r = Reader(str(path))
    try:
        for z in range(top + 1):
            sizes = r.ints3("SELECT tile_column, tile_row, length(tile_data) FROM tiles WHERE zoom_level = ?", (z,))
            r.blobs("SELECT tile_column, tile_data FROM tiles WHERE zoom_level = ?", (z,), int(sizes[:, 2].sum()))
    finally:
        r.close()


def _pages_floor(path: Path, top: int) -> None:
    """tilecrate's page reader alone (tilecrate._sqlite.Reader, one thread), as `_c_floor` reads through SQLite:
    each level's rowids from an index-only query and their cells from the table's b-tree in one read
    transaction, then their bytes copied from the pages in another."""
    import sqlite3

    import numpy as np

    from tilecrate._sqlite import Reader

    with sqlite3.connect(path) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tiles'").fetchone()[0]
    r = Reader(str(path))
    try:
        found = []
        header = r.pages_begin()
        try:
            for z in range(top + 1):
                rows = r.ints3("SELECT rowid, tile_column, tile_row FROM tiles WHERE zoom_level = ?", (z,))
                rows = rows[np.argsort(rows[:, 0])]
                found.append(r.locate(rows[:, 0], root, (0, 1, 2, 3), True))
        finally:
            r.pages_end()
        for values, cells in found:
            assert r.pages_begin() == header
            try:
                r.read_cells(cells, values[:, 3], header)
            finally:
                r.pages_end()
    finally:
        r.close()


def test_tpk_to_mbtiles_vs_tpkutils(benchmark, request, source, tpk, tmp_path):
    from tpkutils import TPK

    _, levels = source
    _warm(tpk)
    ours_out, theirs_out = tmp_path / "ours.mbtiles", tmp_path / "theirs.mbtiles"
    result, ours = _ours(benchmark, tpk, levels, ours_out)

    def theirs():
        _drop(theirs_out)
        t = TPK(str(tpk))
        try:
            t.to_mbtiles(str(theirs_out))
        finally:
            t.close()

    base = _best(theirs, 2)
    report(request, ".tpk -> MBTiles vs tpkutils", tiles=result.tiles, MB=round(result.size / 1e6, 1),
           ours_s=round(ours, 3), tpkutils_s=round(base, 3), ratio=base / ours)
    assert base / ours >= 3, f"MBTiles export only {base / ours:.2f}x tpkutils"


MAPPROXY_UTIL = Path(os.environ.get("MAPPROXY_UTIL", Path(__file__).resolve().parents[1] / ".venv-mapproxy"
                                     / "bin" / "mapproxy-util"))


def _mapproxy_conf(folder: Path, workdir: Path) -> tuple[Path, tuple]:
    """A MapProxy configuration serving the compact V2 cache `folder` as cache `esri` on an nw Web
    Mercator grid (MapProxy's compact reader needs nw), and the cache's data bbox (EPSG:3857)."""
    from tilecrate.cache import open_cache

    with open_cache(str(folder)) as cache:
        ext = cache.data_extent()
        version = cache.version
    alllayers = next(folder.rglob("_alllayers"))
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mapproxy.yaml"
    conf.write_text(
        "services:\n  demo:\n"
        "grids:\n  webmercator:\n    base: GLOBAL_WEBMERCATOR\n    origin: nw\n"
        "caches:\n  esri:\n    grids: [webmercator]\n    sources: []\n"
        f"    cache:\n      type: compact\n      version: {version}\n      directory: {alllayers}\n"
        "layers:\n  - name: esri\n    title: esri\n    sources: [esri]\n")
    return conf, (ext.xmin, ext.ymin, ext.xmax, ext.ymax)


def test_compact_to_mbtiles_vs_mapproxy(benchmark, request, source, tmp_path):
    """Compact cache folder -> MBTiles: tilecrate vs `mapproxy-util export --type mbtile` with two
    processes (-c 2, the cores CI has) and the cache's data bbox as coverage (so MapProxy visits
    only the tiles there, not the world's)."""
    if not MAPPROXY_UTIL.is_file():
        pytest.fail(f"{MAPPROXY_UTIL} not found (scripts/install.sh creates .venv-mapproxy)")
    folder, levels = source
    lo, hi = (int(v) for v in levels.split("-"))
    _warm(folder)
    conf, bbox = _mapproxy_conf(folder, tmp_path / "mp")
    ours_out, theirs_out = tmp_path / "ours.mbtiles", tmp_path / "theirs.mbtiles"
    result, ours = _ours(benchmark, folder, levels, ours_out)

    def command(dest: Path, *extra: str) -> list[str]:
        return [str(MAPPROXY_UTIL), "export", "-q", "-q", "-c", "2", "-f", str(conf), "--grid", "webmercator",
                "--source", "esri", "--levels", ",".join(str(z) for z in range(lo, hi + 1)),
                "--coverage", ",".join(map(repr, bbox)), "--srs", "EPSG:3857",
                "--dest", str(dest), "--type", "mbtile", *extra]

    def theirs():
        _drop(theirs_out)
        subprocess.run(command(theirs_out), cwd=conf.parent, check=True, capture_output=True, timeout=3600)

    def startup():
        subprocess.run(command(tmp_path / "dry.mbtiles", "-n"), cwd=conf.parent, check=True, capture_output=True, timeout=600)

    base = _best(theirs, 1)
    idle = _best(startup, 1)
    import sqlite3

    with sqlite3.connect(theirs_out) as db:
        their_tiles = db.execute("SELECT count(*) FROM tiles").fetchone()[0]
    assert their_tiles == result.tiles, f"MapProxy wrote {their_tiles} tiles, tilecrate {result.tiles}"
    report(request, "compact -> MBTiles vs mapproxy-util export", tiles=result.tiles,
           MB=round(result.size / 1e6, 1), ours_s=round(ours, 3), mapproxy_s=round(base, 3),
           mapproxy_startup_s=round(idle, 3), ratio=base / ours, ratio_without_startup=(base - idle) / ours)
    assert base / ours >= 100, f"MBTiles export only {base / ours:.1f}x MapProxy"


def test_mbtiles_to_pmtiles_vs_converter(benchmark, request, source, mbtiles, tmp_path):
    from pmtiles.convert import mbtiles_to_pmtiles

    _, levels = source
    top = int(levels.split("-")[1])
    _warm(mbtiles)
    ours_out, theirs_out = tmp_path / "ours.pmtiles", tmp_path / "theirs.pmtiles"
    result, ours = _ours(benchmark, mbtiles, levels, ours_out)

    def theirs():
        _drop(theirs_out)
        mbtiles_to_pmtiles(str(mbtiles), str(theirs_out), top)

    base = _best(theirs, 2)
    floor = _best(lambda: _sqlite_floor(mbtiles, top), 3)
    c_floor = _best(lambda: _c_floor(mbtiles, top), 3)
    p_floor = _best(lambda: _pages_floor(mbtiles, top), 3)
    pages, sql = _pages_vs_sql(mbtiles, levels, ours_out)
    report(request, "MBTiles -> PMTiles vs pmtiles.convert", tiles=result.tiles, MB=round(result.size / 1e6, 1),
           ours_s=round(ours, 3), pmtiles_s=round(base, 3), ratio=base / ours,
           size_vs_theirs=result.size / theirs_out.stat().st_size, sqlite_floor_s=round(floor, 4),
           ratio_at_sqlite_floor=base / floor, c_floor_s=round(c_floor, 4), ratio_at_c_floor=base / c_floor,
           pages_floor_s=round(p_floor, 4), ratio_at_pages_floor=base / p_floor, alternating_pages_s=round(pages, 4),
           alternating_sql_s=round(sql, 4), pages_vs_sql=sql / pages)
    assert base / ours >= 5, f"PMTiles export only {base / ours:.2f}x the pmtiles converter"


@pytest.fixture(scope="module")
def small_tiles_mbtiles(tmp_path_factory) -> Path:
    """An MBTiles of ~21 800 small PNG tiles (zooms 0-10 above a 128x128 block at zoom 10), written with
    sqlite3 as third-party tools write them: 512 distinct tiles of 0.3-1 KB, so identical tiles recur."""
    import io
    import sqlite3

    from PIL import Image

    blobs = []
    for i in range(512):
        img = Image.new("P", (256, 256), i % 200)
        img.putpalette([(c * 37 + i) % 256 for c in range(768)])
        for k in range(i % 23 + 1):
            img.paste((i + k) % 256, (k * 11, (k * 7 + i) % 240, k * 11 + 9, (k * 7 + i) % 240 + 9))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        blobs.append(buf.getvalue())
    out = tmp_path_factory.mktemp("small") / "small.mbtiles"
    db = sqlite3.connect(out)
    db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
    db.execute("CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)")
    db.executemany("INSERT INTO metadata VALUES (?, ?)", [("name", "small"), ("format", "png"),
                                                          ("minzoom", "0"), ("maxzoom", "10")])
    rows = []
    for z in range(11):
        shift = 10 - z
        lo, hi = 512 >> shift, max((640 >> shift), (512 >> shift) + 1)
        for x in range(lo, hi):
            for y in range(lo, hi):
                rows.append((z, x, (1 << z) - 1 - y, blobs[(x * 7919 + y * 104729 + z) % 512]))
    db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
    db.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
    db.commit()
    db.close()
    return out


def test_small_tiles_mbtiles_to_pmtiles_vs_converter(benchmark, request, small_tiles_mbtiles, tmp_path):
    """Many small tiles: the per-tile cost, where the pmtiles converter runs one query per tile."""
    from pmtiles.convert import mbtiles_to_pmtiles

    src = small_tiles_mbtiles
    _warm(src)
    ours_out, theirs_out = tmp_path / "ours.pmtiles", tmp_path / "theirs.pmtiles"
    result, ours = _ours(benchmark, src, "0-10", ours_out)

    def theirs():
        _drop(theirs_out)
        mbtiles_to_pmtiles(str(src), str(theirs_out), 10)

    base = _best(theirs, 2)
    floor = _best(lambda: _sqlite_floor(src, 10), 3)
    c_floor = _best(lambda: _c_floor(src, 10), 3)
    p_floor = _best(lambda: _pages_floor(src, 10), 3)
    pages, sql = _pages_vs_sql(src, "0-10", ours_out)
    report(request, "small tiles MBTiles -> PMTiles vs pmtiles.convert", tiles=result.tiles,
           MB=round(result.size / 1e6, 2), ours_s=round(ours, 3), pmtiles_s=round(base, 3), ratio=base / ours,
           size_vs_theirs=result.size / theirs_out.stat().st_size, sqlite_floor_s=round(floor, 4),
           ratio_at_sqlite_floor=base / floor, c_floor_s=round(c_floor, 4), ratio_at_c_floor=base / c_floor,
           pages_floor_s=round(p_floor, 4), ratio_at_pages_floor=base / p_floor, alternating_pages_s=round(pages, 4),
           alternating_sql_s=round(sql, 4), pages_vs_sql=sql / pages)
    assert base / ours >= 5, f"PMTiles export only {base / ours:.2f}x the pmtiles converter"


def test_mbtiles_to_tpkx_vs_cp(benchmark, request, source, mbtiles, tmp_path):
    _, levels = source
    _warm(mbtiles)
    out = tmp_path / "ours.tpkx"
    result, ours = _ours(benchmark, mbtiles, levels, out)
    copy = tmp_path / "copy.tpkx"

    def cp():
        _drop(copy)
        subprocess.run(["cp", str(out), str(copy)], check=True)

    base = _best(cp, 3)
    top = int(levels.split("-")[1])
    floor = _best(lambda: _sqlite_floor(mbtiles, top), 3)
    read = _best(lambda: _sqlite_floor(mbtiles, top, sizes=False), 3)
    c_floor = _best(lambda: _c_floor(mbtiles, top), 3)
    p_floor = _best(lambda: _pages_floor(mbtiles, top), 3)
    pages, sql = _pages_vs_sql(mbtiles, levels, out)
    report(request, "MBTiles -> .tpkx vs cp", tiles=result.tiles, MB=round(result.size / 1e6, 1),
           ours_s=round(ours, 3), cp_s=round(base, 3), ratio=base / ours, sqlite_floor_s=round(floor, 4),
           sqlite_tile_data_s=round(read, 4), ratio_at_sqlite_floor=base / floor, c_floor_s=round(c_floor, 4),
           ratio_at_c_floor=base / c_floor, pages_floor_s=round(p_floor, 4), ratio_at_pages_floor=base / p_floor,
           alternating_pages_s=round(pages, 4), alternating_sql_s=round(sql, 4), pages_vs_sql=sql / pages)
    assert base / ours >= 0.5, f"MBTiles -> .tpkx only {base / ours:.2f}x cp"


# VmHWM, not getrusage: Linux carries ru_maxrss over execve, so a child forked from this pytest process
# reported the parent's size (the same 182-226 MiB for every kind and size: a figure that could not fail)
_RSS = """
import json, sys
import tilecrate
from tilecrate.request import ExportRequest
r = tilecrate.export(sys.argv[1], ExportRequest(sys.argv[2]), sys.argv[3])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps([r.size, hwm]))
"""


def test_peak_rss_flat(request, source, tmp_path):
    """Peak RSS of export processes writing a small and a large output of each open format."""
    folder, levels = source
    top = int(levels.split("-")[1])
    figures = {}
    for ext in ("mbtiles", "gpkg", "pmtiles"):
        rows = []
        for lv in (f"0-{top - 2}", levels):
            out = tmp_path / f"rss_{lv}.{ext}"
            done = subprocess.run([sys.executable, "-c", _RSS, str(folder), lv, str(out)], capture_output=True,
                                  text=True, timeout=600, check=True)
            rows.append(json.loads(done.stdout))
            out.unlink()
        (small, rss_small), (large, rss_large) = rows
        figures[ext] = (large / small, (rss_large - rss_small) / 1024)
        report(request, f"peak RSS {ext}", small_MB=round(small / 1e6, 1), large_MB=round(large / 1e6, 1),
               rss_small_MiB=round(rss_small / 1024, 1), rss_large_MiB=round(rss_large / 1024, 1))
    for ext, (grow, extra_mib) in figures.items():
        assert grow > 8 and extra_mib < 32, f"{ext}: peak RSS grew {extra_mib:.1f} MiB for a {grow:.0f}x output"

"""Exporting: tiles/s and MB/s next to `cp` of the same bytes and to MapProxy's `mapproxy-util export`
of the same cache, levels and bbox (ratios from one run); peak RSS for two package sizes; a real
package over 4 GiB (ZIP64).

Run: `.venv/bin/pytest benchmarks/bench_export.py --benchmark-enable --large-sample data/large`
(MapProxy comes from `scripts/mapproxy_env.sh`, in its own venv; without it that baseline is skipped.)
Without --large-sample, the cp comparison runs on a small generated sample and the rest is skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import tilecrate
from tilecrate.cache import open_cache
from tilecrate.request import ExportRequest
from tilecrate.selection import select
from conftest import report

ROOT = Path(__file__).resolve().parents[1]
MAPPROXY_UTIL = ROOT / ".venv-mapproxy" / "bin" / "mapproxy-util"
BBOX = (-10.0, 30.0, 40.0, 60.0)          # lon/lat: Western Europe and the Mediterranean
LEVELS = "0-10"


@pytest.fixture(scope="module")
def source(request, tmp_path_factory) -> tuple[Path, str]:
    """(cache folder, levels): the large sample when given, else a small generated one."""
    path = request.config.getoption("--large-sample")
    if path:
        return Path(path), LEVELS
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("bench") / "small"
    make_sample(out, SampleSpec(levels=tuple(range(0, 7))))
    return out, "0-6"


def _drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _warm(folder: Path) -> None:
    """Read every bundle once so every contender starts from the page cache."""
    for p in folder.rglob("*.bundle*"):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def test_export_vs_cp(benchmark, request, source, tmp_path):
    """MB/s of a .tpkx export against `cp` of a file of the same bytes (target: at least 60 %)."""
    folder, levels = source
    req = ExportRequest(levels=levels, extent=",".join(map(str, BBOX)), aoi_sr=4326)
    _warm(folder)
    with open_cache(folder) as cache:
        sel = select(cache, req)
    out = tmp_path / "bench.tpkx"

    times = []

    def run():
        _drop(out)
        t0 = time.perf_counter()
        result = tilecrate.export(str(folder), req, str(out), selection=sel)
        times.append(time.perf_counter() - t0)
        return result

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    seconds = min(times)
    # cp of the same number of bytes: the package itself, copied with the system's cp
    copy = tmp_path / "copy.tpkx"
    cp_times = []
    for _ in range(3):
        _drop(copy)
        t0 = time.perf_counter()
        subprocess.run(["cp", str(out), str(copy)], check=True)
        cp_times.append(time.perf_counter() - t0)
    cp_seconds = min(cp_times)
    mb = result.size / 1e6
    report(request, "export .tpkx vs cp", tiles=result.tiles, MB=round(mb, 1),
           tiles_per_s=result.tiles / seconds, MB_per_s=mb / seconds, cp_MB_per_s=mb / cp_seconds,
           ratio_to_cp=cp_seconds / seconds)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    if request.config.getoption("--large-sample"):     # fixed costs dominate a small sample's few MB
        assert cp_seconds / seconds >= 0.6, "export slower than 60 % of cp"


def _mapproxy_config(folder: Path, where: Path) -> Path:
    with open_cache(folder) as cache:
        fmt = "image/jpeg" if cache.tile_format.upper() == "JPEG" else "image/png"
    conf = where / "mapproxy.yaml"
    conf.write_text(
        "services:\n  demo:\n"
        "layers:\n  - name: src\n    title: src\n    sources: [src_cache]\n"
        "caches:\n  src_cache:\n    grids: [webmerc_nw]\n    sources: []\n"
        f"    format: {fmt}\n    cache:\n      type: compact\n      version: 2\n"
        f"      directory: {folder.resolve() / '_alllayers'}\n"
        "grids:\n  webmerc_nw:\n    base: GLOBAL_WEBMERCATOR\n    origin: nw\n")
    return conf


def test_export_vs_mapproxy(benchmark, request, source, tmp_path):
    """tiles/s against `mapproxy-util export` of the same cache, levels and bbox (target: at least 100x)."""
    if not MAPPROXY_UTIL.exists():
        pytest.skip("MapProxy is not installed: run scripts/mapproxy_env.sh")
    folder, levels = source
    lo, hi = levels.split("-")
    req = ExportRequest(levels=levels, extent=",".join(map(str, BBOX)), aoi_sr=4326,
                        tile_package=False, storage_format="CompactV2")
    _warm(folder)
    out = tmp_path / "ours"

    times = []

    def run():
        _drop(out)
        t0 = time.perf_counter()
        result = tilecrate.export(str(folder), req, str(out), threads=2)
        times.append(time.perf_counter() - t0)
        return result

    result = benchmark.pedantic(run, rounds=3, iterations=1)
    ours = min(times)
    conf = _mapproxy_config(folder, tmp_path)
    dest = tmp_path / "mapproxy"
    t0 = time.perf_counter()
    subprocess.run([str(MAPPROXY_UTIL), "export", "-f", str(conf), "--source", "src_cache", "--grid", "webmerc_nw",
                    "--dest", str(dest), "--type", "compact-v2", "--levels", f"{lo}..{hi}",
                    "--coverage", ",".join(map(str, BBOX)), "--srs", "EPSG:4326", "-c", "2", "-q", "-q"],
                   check=True, cwd=tmp_path, stdout=subprocess.DEVNULL)
    theirs = time.perf_counter() - t0
    with open_cache(dest if (dest / "conf.xml").exists() else _wrap_mapproxy(dest, folder)) as mp:
        mp_tiles = sum(v["tiles"] for v in mp.level_summary().values())
    report(request, "export vs mapproxy-util export", tiles=result.tiles, mapproxy_tiles=mp_tiles,
           tiles_per_s=result.tiles / ours, mapproxy_tiles_per_s=mp_tiles / theirs,
           ratio=(result.tiles / ours) / (mp_tiles / theirs))
    # tiles whose edge only touches the bbox: tilecrate takes them (closed squares), MapProxy does not
    assert abs(mp_tiles - result.tiles) <= 0.02 * result.tiles, "both exports must take the same tiles"
    if request.config.getoption("--large-sample"):
        assert (result.tiles / ours) / (mp_tiles / theirs) >= 100


def _wrap_mapproxy(dest: Path, folder: Path) -> Path:
    """MapProxy writes bare Lnn folders: give them the source's conf.xml so open_cache can count them."""
    wrapped = dest.parent / "mapproxy_cache"
    wrapped.mkdir()
    shutil.copy(folder / "conf.xml", wrapped / "conf.xml")
    (wrapped / "_alllayers").symlink_to(dest)
    return wrapped


# VmHWM, not getrusage: Linux carries ru_maxrss over execve, so a child forked from a big pytest
# process would report the parent's peak
_RSS_SCRIPT = """
import json, sys, tilecrate
req = tilecrate.ExportRequest(levels=sys.argv[3], extent=sys.argv[4] or None, aoi_sr=4326)
r = tilecrate.export(sys.argv[1], req, sys.argv[2], threads=2)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"size": r.size, "tiles": r.tiles, "maxrss_kb": hwm}))
"""


def test_peak_rss_is_flat(request, large_sample, tmp_path):
    """Peak RSS of a whole export process for a small and a large package (target: flat)."""
    runs = []
    for levels, extent in (("0-8", ",".join(map(str, BBOX))), ("0-10", "")):
        out = tmp_path / f"rss_{levels}.tpkx"
        done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(large_sample), str(out), levels, extent],
                              check=True, capture_output=True, text=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        out.unlink()
    small, big = runs
    report(request, "peak RSS", small_MB=small["size"] / 1e6, small_rss_MB=small["maxrss_kb"] / 1e3,
           big_MB=big["size"] / 1e6, big_rss_MB=big["maxrss_kb"] / 1e3,
           size_ratio=big["size"] / small["size"], rss_ratio=big["maxrss_kb"] / small["maxrss_kb"])
    # a package 70 times larger may not need noticeably more memory than a small one
    assert big["maxrss_kb"] < 1.5 * small["maxrss_kb"]


def test_package_over_4_gib(request, large_sample, tmp_path):
    """A real ZIP64 package: the large sample's finest bundles hard-linked as four levels, exported (> 4 GiB)."""
    with open_cache(large_sample) as cache:
        top = cache.levels[-1]
        top_bytes = sum(cache.bundle_file_size(r) for r in cache.bundles(top))
        copies = -(-(4 * 2**30 + 2**28) // top_bytes)              # enough levels to pass 4 GiB
        if not all(cache.scheme.has_level(top + k) for k in range(copies)):
            pytest.skip("the sample's scheme has too few levels for the >4 GiB package")
    src = tmp_path / "big_src"
    src.mkdir()
    shutil.copy(large_sample / "conf.xml", src / "conf.xml")
    for k in range(copies):
        level_dir = src / "_alllayers" / f"L{top + k:02d}"
        level_dir.mkdir(parents=True)
        for bundle in (large_sample / "_alllayers" / f"L{top:02d}").iterdir():
            os.link(bundle, level_dir / bundle.name)                # no copy: same bytes, more levels
    out = tmp_path / "big.tpkx"
    req = ExportRequest(levels=f"{top}-{top + copies - 1}")
    est = tilecrate.estimate(str(src), req)
    t0 = time.perf_counter()
    result = tilecrate.export(str(src), req, str(out))
    seconds = time.perf_counter() - t0
    size = out.stat().st_size
    report(request, "package over 4 GiB", GiB=size / 2**30, seconds=seconds, MB_per_s=size / 1e6 / seconds,
           estimate_exact=int(est.total_size == size))
    assert size > 2**32 and result.size == size == est.total_size
    with open(out, "rb") as f:
        f.seek(-22, os.SEEK_END)
        tail = f.read()
        f.seek(-(22 + 20), os.SEEK_END)
        assert f.read(4) == b"PK\x06\x07"                           # ZIP64 end locator
    with zipfile.ZipFile(out) as zf:
        last = max(zf.infolist(), key=lambda i: i.header_offset)
        assert last.header_offset > 2**32
    with open_cache(out) as back:
        ref = back.bundles(top + copies - 1)[-1]
        with back.open_bundle(ref) as data, open_cache(large_sample) as orig:
            with orig.open_bundle(orig.bundles(top)[-1]) as want:
                assert (data.sizes == want.sizes).all()
                i = int(data.sizes.nonzero()[0][-1])
                assert bytes(data.buf[int(data.offsets[i]):int(data.offsets[i]) + int(data.sizes[i])]) == \
                    bytes(want.buf[int(want.offsets[i]):int(want.offsets[i]) + int(want.sizes[i])])
    assert tail[:4] == b"PK\x05\x06"
    rasterio = pytest.importorskip("rasterio")
    from rasterio.windows import Window

    with rasterio.open(str(out)) as ds:                             # GDAL through /vsizip/ and ZIP64
        assert ds.driver == "ESRIC"
        w = ds.read(1, window=Window(ds.width // 2, ds.height // 2, 256, 256))
        assert w.shape == (256, 256)

""".vtpk export of the natural-earth fixture's levels (all 111 tiles, resources, rebuilt tilemap) next to
`cp` of a file of the same bytes, in the same run (target: at least 0.5x cp).

Run: `.venv/bin/pytest benchmarks/bench_vtpk.py --benchmark-enable`. The fixture is 3 MB, so the
figure is dominated by fixed per-package costs (274 zip entries, metadata, the tilemap), not by
bytes per second; it is the package ArcGIS-written .vtpk clients actually download.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import tilecrate
from tilecrate.cache import open_cache
from tilecrate.request import ExportRequest
from tilecrate.sample import _v2_bundle
from tilecrate.selection import select
from conftest import report

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("TILECRATE_FIXTURES", ROOT.parent / "shared" / "fixtures" / "real"))
VTPK = REAL / "maplibre-tilepackage-protocol" / "example" / "natural-earth.vtpk"
ROUNDS = 30


def _unlink(path: Path) -> None:
    if path.exists():
        path.unlink()


def test_vtpk_export_vs_cp(benchmark, request, tmp_path):
    """Seconds of export() of levels 0-5 (from the opened package) against `cp` of the result.

    The two are interleaved round by round so both see the same machine load; the best round of
    each is compared.
    """
    req = ExportRequest(levels="0-5")
    with open(VTPK, "rb") as f:      # both contenders start from the page cache
        f.read()
    out = tmp_path / "bench.vtpk"
    copy = tmp_path / "copy.vtpk"
    times, cp_times = [], []
    with open_cache(str(VTPK)) as cache:
        sel = select(cache, req)

        def setup():
            _unlink(out)

        def run():
            t0 = time.perf_counter()
            result = tilecrate.export(cache, req, str(out), selection=sel)
            times.append(time.perf_counter() - t0)
            _unlink(copy)
            t0 = time.perf_counter()
            subprocess.run(["cp", str(out), str(copy)], check=True)
            cp_times.append(time.perf_counter() - t0)
            return result

        result = benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    seconds, cp_seconds = min(times), min(cp_times)
    mb = result.size / 1e6
    report(request, "export .vtpk vs cp", tiles=result.tiles, MB=round(mb, 2), ms=seconds * 1e3,
           cp_ms=cp_seconds * 1e3, MB_per_s=mb / seconds, cp_MB_per_s=mb / cp_seconds,
           ratio_to_cp=cp_seconds / seconds)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    assert result.tiles == 111
    if not benchmark.disabled:       # one untimed round (--benchmark-disable) says nothing about speed
        assert cp_seconds / seconds >= 0.5, "a .vtpk export slower than half of cp"


def _big_vtpk(path: Path) -> None:
    """The fixture plus a full level 6 (64 x 64 tiles cycled from its own), zipped STORED by zipfile."""
    with zipfile.ZipFile(VTPK) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        tiles = []
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "p12/root.json":
                root = json.loads(data)
                root["maxLOD"] = 6
                data = json.dumps(root).encode()
            if info.filename.startswith("p12/tile/"):
                body = data
                for i in range(128 * 128):
                    entry = int.from_bytes(body[64 + 8 * i:72 + 8 * i], "little")
                    off, size = entry & ((1 << 40) - 1), entry >> 40
                    if size:
                        tiles.append(body[off:off + size])
            dst.writestr(info.filename, data)
        level6 = {r * 128 + c: tiles[(r * 64 + c) % len(tiles)] for r in range(64) for c in range(64)}
        dst.writestr("p12/tile/L06/R0000C0000.bundle", _v2_bundle(level6))


def test_big_vtpk_export_vs_cp(benchmark, request, tmp_path):
    """MB/s of a ~50 MB .vtpk export (levels 0-6) against `cp` of the result, interleaved."""
    big = tmp_path / "big.vtpk"
    _big_vtpk(big)
    req = ExportRequest(levels="0-6")
    out, copy = tmp_path / "out.vtpk", tmp_path / "copy.vtpk"
    times, cp_times = [], []
    with open_cache(str(big)) as cache:
        sel = select(cache, req)

        def run():
            _unlink(out)
            t0 = time.perf_counter()
            result = tilecrate.export(cache, req, str(out), selection=sel)
            times.append(time.perf_counter() - t0)
            _unlink(copy)
            t0 = time.perf_counter()
            subprocess.run(["cp", str(out), str(copy)], check=True)
            cp_times.append(time.perf_counter() - t0)
            return result

        result = benchmark.pedantic(run, rounds=8, iterations=1)
    seconds, cp_seconds = min(times), min(cp_times)
    mb = result.size / 1e6
    report(request, "export big .vtpk vs cp", tiles=result.tiles, MB=round(mb, 1), MB_per_s=mb / seconds,
           cp_MB_per_s=mb / cp_seconds, ratio_to_cp=cp_seconds / seconds)
    assert result.tiles == 111 + 4096
    if not benchmark.disabled:
        assert cp_seconds / seconds >= 0.5, "a .vtpk export slower than half of cp"

"""VectorTileServer and ImageServer hot routes over loopback vs a trivial aiohttp handler answering the
same bytes on the same paths (bench_server.py's method: one process each, same run, rounds alternated,
median ratio; requests/s and server CPU per request).

Routes: a gzip'd MVT tile, the style (rewritten per request), a glyph range, the tilemap index and
the service root of the natural-earth.vtpk fixture; a LERC1 tile and the root of the LERC sample.

Run: `.venv/bin/pytest benchmarks/bench_server_kinds.py --benchmark-enable`
"""
from __future__ import annotations

import statistics
import sys
import urllib.request
from pathlib import Path

import pytest

from bench_server import _BASELINE, _free_port, _start, _stop, load_cpu
from conftest import report
from tilecrate.sample import SampleSpec, make_sample

ROUNDS = 3
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real" / "maplibre-tilepackage-protocol" \
    / "example" / "natural-earth.vtpk"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert FIXTURE.is_file(), f"{FIXTURE} is missing"
    root = tmp_path_factory.mktemp("benchkinds")
    elev = make_sample(root / "elevation", SampleSpec(levels=(0, 1, 2, 3), tile_format="LERC"))
    (root / "tilecrate.toml").write_text(
        f'[server]\ndata_dir = "{root / "data"}"\n[services.NE]\nsource = "{FIXTURE}"\n'
        f'[services.Elev]\nsource = "{elev}"\n')
    port = _free_port()
    proc = _start([sys.executable, "-m", "tilecrate.cli", "serve", str(root / "tilecrate.toml"), "--port", str(port),
                   "--quiet"], f"http://127.0.0.1:{port}/arcgis/rest/info?f=json", root)
    yield f"http://127.0.0.1:{port}", proc.pid
    _stop(proc)


def test_vector_and_image_routes_vs_trivial_handler(benchmark, server, request, tmp_path):
    """Each route's requests/s and CPU per request, ours vs a handler that only returns the bytes."""
    ours, pid = server
    vts, ims = "/arcgis/rest/services/NE/VectorTileServer", "/arcgis/rest/services/Elev/ImageServer"
    routes = {
        "vector tile": (f"{vts}/tile/2/1/1.pbf", ""),
        "style": (f"{vts}/resources/styles/root.json", "?f=json"),
        "glyphs": (f"{vts}/resources/fonts/Tahoma%20Regular/0-255.pbf", ""),
        "tilemap index": (f"{vts}/tilemap", ""),
        "vector root": (vts, "?f=json"),
        "LERC tile": (f"{ims}/tile/3/2/4", ""),
        "image root": (ims, "?f=json"),
    }
    files = tmp_path / "baseline"
    files.mkdir()
    for name, (path, query) in routes.items():
        with urllib.request.urlopen(ours + path + query, timeout=30) as r:
            body, ctype = r.read(), r.headers.get_content_type()
            assert r.status == 200 and b'"error"' not in body[:20], (name, body[:200])
        stem = urllib.request.url2pathname(path).strip("/").replace("/", "~")
        (files / (stem + "." + ctype.replace("/", "_"))).write_bytes(body)
    bport = _free_port()
    base = _start([sys.executable, "-c", _BASELINE, str(bport), str(files)],
                  f"http://127.0.0.1:{bport}{vts}", tmp_path)
    try:
        benchmark.pedantic(_measure, (request, ours, pid, bport, base.pid, routes), rounds=1, iterations=1)
    finally:
        _stop(base)


def _measure(request, ours: str, pid: int, bport: int, base_pid: int, routes: dict) -> None:
    for name, (path, query) in routes.items():
        pairs = []
        for _ in range(ROUNDS):
            a = load_cpu(ours + path + query, pid)
            b = load_cpu(f"http://127.0.0.1:{bport}{path}{query}", base_pid)
            pairs.append((a, b))
        med = statistics.median
        report(request, name, ours_req_per_s=med(a[0] for a, _ in pairs), trivial_req_per_s=med(b[0] for _, b in pairs),
               ours_vs_trivial=med(a[0] / b[0] for a, b in pairs),
               ours_cpu_us_per_req=med(a[1] for a, _ in pairs), trivial_cpu_us_per_req=med(b[1] for _, b in pairs),
               cpu_efficiency_vs_trivial=med(b[1] / a[1] for a, b in pairs))

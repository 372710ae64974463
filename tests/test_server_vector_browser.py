"""The browser check: headless Chromium loads a page built on the ArcGIS Maps SDK for JavaScript
(npm `@arcgis/core`, bundled locally by scripts/install-browser.sh: no CDN, the SDK's assets served
from 127.0.0.1) showing a VectorTileLayer from our VectorTileServer and an ElevationLayer from our
ImageServer in a SceneView. No console error, no failed request, nothing asked of another host;
the screenshot is kept in the test's folder (and checked for drawn pixels).

Nothing here skips: without Chromium or the bundle the test fails and says how to install them.
"""
from __future__ import annotations

import functools
import http.server
import io
import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import real_path
from test_server_support import free_port, write_config
from test_server_vector import TypedServer
from tilecrate.sample import SampleSpec, elevation, lonlat_to_mercator, make_sample, tiles_of_level

sys.path.insert(0, str(Path(__file__).parent / "browser"))
from cdp import run_page  # noqa: E402

DIST = Path(__file__).parent / "browser" / "dist"
LEVELS = (0, 1, 2, 3)


class _Static(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json", ".css": "text/css"}

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def page_server():
    assert (DIST / "index.html").is_file() and (DIST / "assets" / "esri").is_dir(), \
        "the browser page is not built: run scripts/install-browser.sh"
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Static, directory=str(DIST)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_dir):
    root = tmp_path_factory.mktemp("browser")
    elev = make_sample(root / "elevation", SampleSpec(levels=LEVELS, tile_format="LERC"))
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {"NE": {"source": real_path("natural-earth.vtpk")},
                                                       "Terrain": {"source": elev}})
    srv = TypedServer(cfg, data, free_port(), kinds={"NE": "VectorTileServer", "Terrain": "ImageServer"}).start()
    yield srv
    srv.stop()


def test_arcgis_js_shows_our_vector_tiles_and_elevation(server, page_server, tmp_path):
    from urllib.parse import urlencode

    x, y = lonlat_to_mercator(12.0, 44.0)
    r0, _, c0, _ = tiles_of_level(SampleSpec(levels=LEVELS), 3)
    query = {"vector": server.svc("NE"), "elevation": server.svc("Terrain"), "tile": f"3,{r0 + 1},{c0 + 1}",
             "x": x, "y": y - 1.2e6, "z": 1.6e6, "tilt": 35, "portal": server.base + "/arcgis"}
    allowed = {page_server.split("//")[1], server.base.split("//")[1]}
    run = run_page(f"{page_server}/index.html?{urlencode(query)}", allowed, timeout=100, size=(800, 600))
    shot = tmp_path / "arcgis-js.png"
    shot.write_bytes(run.screenshot)
    report = (f"result={run.result}\nconsole={run.console_errors[:10]}\nexceptions={run.exceptions[:5]}\n"
              f"failed={run.failed_requests[:10]}\nforeign={run.foreign_requests[:10]}\nscreenshot={shot} seconds={run.seconds}")
    assert run.result is not None and run.result.get("ok"), report
    assert not run.console_errors and not run.exceptions, report
    assert not run.failed_requests and not run.foreign_requests, report
    # the layers loaded from us, and the SDK's own LERC1 decoder read our tile: 257 x 257 heights
    assert run.result["vector"]["tileFormat"] == "pbf" and run.result["vector"]["styleLayers"] > 0, report
    el = run.result["elevation"]
    assert (el["width"], el["height"]) == (257, 257), report
    z = elevation(3, r0 + 1, c0 + 1)
    assert math.isclose(el["first"], float(z[0, 0]), abs_tol=0.2) and el["min"] <= el["max"], report
    assert math.isfinite(run.result["centerHeight"]), report
    ground = run.result["groundHeight"]
    assert ground is not None and math.isfinite(ground) and ground != 0, report
    assert abs(ground - run.result["centerHeight"]) < 1500, report   # coarser tiles drawn than queried
    # it asked for our tiles, tilemap and style, and drew something
    asked = "\n".join(run.requests)
    for part in ("/VectorTileServer/tile/", "/VectorTileServer/resources/styles", "/ImageServer/tile/",
                 "/ImageServer/tilemap/"):
        assert part in asked, report
    img = np.asarray(Image.open(io.BytesIO(run.screenshot)).convert("RGB"))
    assert img.shape[:2] == (600, 800)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50, report        # more than a blank canvas

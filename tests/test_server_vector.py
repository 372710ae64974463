"""VectorTileServer end to end: a real `tilecrate serve` process driven as the ArcGIS API for Python's
VectorTileLayer and the JS loader drive it (FORMATS.md §11.2, §18); exported .vtpk packages read back
tile for tile by the independent reader of tests/test_vtpk.py."""
from __future__ import annotations

import gzip
import json
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field

import pytest

from conftest import real_path
from test_server_support import Server, free_port, write_config
from test_vtpk import read_vtpk, tile_box, walk_tilemap

SVC = "/arcgis/rest/services/{}/VectorTileServer"
ENDED = ("esriJobSucceeded", "esriJobFailed", "esriJobCancelled", "esriJobTimedOut")


@dataclass
class TypedServer(Server):
    """A server whose services are reached under their own type (VectorTileServer, ImageServer)."""

    kinds: dict = field(default_factory=dict)

    def svc(self, name: str) -> str:
        """The service URL under its type."""
        return f"{self.base}/arcgis/rest/services/{name}/{self.kinds.get(name, 'MapServer')}"


def python_export_tiles(srv: Server, name: str, levels: str | None = None, export_extent=None, polygon=None,
                        dest=None, timeout: float = 30.0):
    """`VectorTileLayer.export_tiles` of arcgis 2.4.4 (FORMATS.md §18.7), request by request."""
    svc = srv.svc(name)
    props = srv.get(svc, {"f": "json"}).json()
    assert props["exportTilesAllowed"] is True                 # checked before any request
    params = {"f": "json", "exportBy": "levelId", "storageFormatType": "Compact", "tilePackage": "False",
              "optimizeTilesForSize": "False",
              "exportExtent": json.dumps(export_extent or props["fullExtent"])}
    if levels is not None:
        params["levels"] = levels
    if polygon is not None:
        params["polygon"] = json.dumps(polygon)
    sub = srv.get(f"{svc}/exportTiles", params)
    assert sub.status == 200, sub.body[:300]
    job_id = sub.json()["jobId"]
    deadline = time.monotonic() + timeout
    while True:
        job = srv.post(f"{svc}/jobs/{job_id}", {"f": "json"}).json()
        status = job.get("status") or job["jobStatus"]
        if status in ENDED:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    if status != "esriJobSucceeded":
        return job, None
    value = srv.get(f"{svc}/jobs/{job_id}/{job['results']['out_service_url']['paramUrl']}", {"f": "json"}).json()["value"]
    listing = srv.get(value, {"f": "json"}).json()
    paths = []
    for f in listing["files"]:
        got = srv.get(f["url"])
        assert got.status == 200 and len(got.body) == f["size"]
        p = dest / f["name"]
        p.write_bytes(got.body)
        paths.append(p)
    return job, paths


@pytest.fixture(scope="module")
def fixture_vtpk(real_dir):
    return real_path("natural-earth.vtpk")


@pytest.fixture(scope="module")
def source(fixture_vtpk):
    return read_vtpk(fixture_vtpk)


@pytest.fixture(scope="module")
def folder_source(fixture_vtpk, tmp_path_factory):
    """The fixture extracted, as ArcGIS Pro leaves an unpacked package: p12/ is the source."""
    out = tmp_path_factory.mktemp("vtpkdir")
    with zipfile.ZipFile(fixture_vtpk) as zf:
        zf.extractall(out)
    return out / "p12"


@pytest.fixture(scope="module")
def server(tmp_path_factory, fixture_vtpk, folder_source):
    root = tmp_path_factory.mktemp("vectorserver")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {
        "NE": {"source": fixture_vtpk},
        "Folder": {"source": folder_source, "type": "VectorTileServer"},
        "Small": {"source": fixture_vtpk, "maxExportTilesCount": 5},
        "Closed": {"source": fixture_vtpk, "exportTilesAllowed": False},
    })
    srv = TypedServer(cfg, data, free_port(), kinds={n: "VectorTileServer" for n in ("NE", "Folder", "Small", "Closed")})
    srv.start()
    yield srv
    srv.stop()


def test_directory_lists_the_type(server):
    services = server.get("/arcgis/rest/services", {"f": "json"}).json()["services"]
    assert {s["name"]: s["type"] for s in services} == dict.fromkeys(("Closed", "Folder", "NE", "Small"), "VectorTileServer")


@pytest.mark.parametrize("name", ["NE", "Folder"])
def test_root_json_has_what_clients_read(server, source, name):
    r = server.get(SVC.format(name))                       # JSON also without f
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    info = r.json()
    assert info["tiles"] == ["tile/{z}/{y}/{x}.pbf"] and info["defaultStyles"] == "resources/styles"
    assert set(info["capabilities"].split(",")) >= {"TilesOnly", "Tilemap"}
    assert info["exportTilesAllowed"] is True and info["maxExportTilesCount"] == 100000
    assert info["currentVersion"] >= 10.7 and info["tileMap"] == "tilemap"
    assert info["tileInfo"] == source["root"]["tileInfo"]
    assert info["fullExtent"] == source["root"]["fullExtent"] and "initialExtent" in info
    assert info["fullExtent"]["spatialReference"]["wkid"] == 102100
    assert (info["minLOD"], info["maxLOD"]) == (0, 5)
    closed = server.get(SVC.format("Closed"), {"f": "json"}).json()
    assert closed["exportTilesAllowed"] is False


@pytest.mark.parametrize("name", ["NE", "Folder"])
def test_tiles_served_as_stored(server, source, name):
    for (z, r, c), data in list(source["tiles"].items())[::7]:
        got = server.get(f"{SVC.format(name)}/tile/{z}/{r}/{c}.pbf")
        assert got.status == 200, (z, r, c)
        assert got.body == data                            # urllib does not inflate: the stored bytes
        assert got.headers["Content-Encoding"] == "gzip"
        assert got.headers["Content-Type"] == "application/x-protobuf"
        assert gzip.decompress(got.body)                   # a real gzip stream
    assert (3, 0, 0) not in source["tiles"]
    missing = server.get(f"{SVC.format(name)}/tile/3/0/0.pbf")
    assert missing.status == 404 and missing.json()["error"]["code"] == 404
    assert server.get(f"{SVC.format(name)}/tile/2/x/1.pbf").status == 400   # a real status: tiles are bytes
    assert server.get(f"{SVC.format(name)}/tile/99999999999999/0/0.pbf").status == 400


def test_a_vector_service_is_not_a_mapserver(server):
    r = server.get("/arcgis/rest/services/NE/MapServer", {"f": "json"}).json()
    assert r["error"]["code"] == 404
    assert server.get("/arcgis/rest/services/NE/MapServer/tile/0/0/0").status == 404
    assert server.get("/arcgis/rest/services/NE/ImageServer", {"f": "json"}).json()["error"]["code"] == 404


def test_style_resolves_to_this_server(server, source):
    base = server.base + SVC.format("NE")
    for path in ("/resources/styles", "/resources/styles/root.json"):
        style = server.get(SVC.format("NE") + path, {"f": "json"}).json()
        original = json.loads(source["files"]["p12/resources/styles/root.json"])
        assert style["layers"] == original["layers"]
        assert style["sprite"] == base + "/resources/sprites/sprite"
        assert style["glyphs"] == base + "/resources/fonts/{fontstack}/{range}.pbf"
        assert style["sources"]["esri"]["url"] == base
    # every URL the style names answers with the package's bytes
    for suffix in (".json", ".png", "@2x.json", "@2x.png"):
        got = server.get(style["sprite"] + suffix)
        assert got.status == 200 and got.body == source["files"][f"p12/resources/sprites/sprite{suffix}"]
    glyphs = style["glyphs"].replace("{fontstack}", urllib.parse.quote("Tahoma Regular")).replace("{range}", "256-511")
    got = server.get(glyphs)
    assert got.status == 200 and got.body == source["files"]["p12/resources/fonts/Tahoma Regular/256-511.pbf"]
    assert got.headers["Content-Type"] == "application/x-protobuf"
    # a MapLibre-style font stack: the first font the package has
    stack = urllib.parse.quote("Nope Bold,Tahoma Regular")
    assert server.get(f"{SVC.format('NE')}/resources/fonts/{stack}/0-255.pbf").body == \
        source["files"]["p12/resources/fonts/Tahoma Regular/0-255.pbf"]
    assert server.get(f"{SVC.format('NE')}/resources/fonts/Nope/0-255.pbf").status == 404
    assert server.get(f"{SVC.format('NE')}/resources/fonts/Tahoma%20Regular/x.pbf").status == 400
    assert server.get(f"{SVC.format('NE')}/resources/sprites/..%2Froot.json").status == 404
    info = server.get(SVC.format("NE") + "/resources/info").json()
    assert info == json.loads(source["files"]["p12/resources/info/root.json"])


@pytest.mark.parametrize("name", ["NE", "Folder"])
def test_tilemap_index_and_windows(server, source, name):
    r = server.get(SVC.format(name) + "/tilemap")          # fetched without f
    assert r.status == 200
    assert walk_tilemap(r.json()["index"]) == set(source["tiles"])
    window = server.get(SVC.format(name) + "/tilemap/2/0/0/4/4", {"f": "json"}).json()
    want = [int((2, rr, cc) in source["tiles"]) for rr in range(4) for cc in range(4)]
    assert window["data"] == want


def test_python_export_tiles_all_levels(server, source, tmp_path):
    """levels omitted (the Python API drops None) and exportExtent = fullExtent: every tile."""
    job, paths = python_export_tiles(server, "NE", dest=tmp_path)
    assert job["jobStatus"] == "esriJobSucceeded", job
    assert [p.suffix for p in paths] == [".vtpk"]
    pkg = read_vtpk(paths[0])
    assert pkg["tiles"] == source["tiles"]
    assert walk_tilemap(pkg["tilemap"]["index"]) == set(pkg["tiles"])
    for name, data in source["files"].items():
        if name.startswith("p12/resources/"):
            assert pkg["files"][name] == data, name


def test_python_export_tiles_levels_extent_polygon(server, source, tmp_path):
    ext = {"xmin": -2e6, "ymin": 3e6, "xmax": 4e6, "ymax": 9e6, "spatialReference": {"wkid": 102100}}
    poly = {"rings": [[[-2e6, 3e6], [4e6, 3e6], [-2e6, 9e6], [-2e6, 3e6]]], "spatialReference": {"wkid": 102100}}
    job, paths = python_export_tiles(server, "Folder", levels="2-4", export_extent=ext, polygon=poly, dest=tmp_path)
    assert job["jobStatus"] == "esriJobSucceeded", job
    pkg = read_vtpk(paths[0])
    assert pkg["tiles"] and {z for z, _, _ in pkg["tiles"]} <= {2, 3, 4}
    from shapely.geometry import Polygon

    area = Polygon(poly["rings"][0])
    want = {k for k in source["tiles"] if k[0] in (2, 3, 4) and tile_box(*k).intersects(area)}
    assert set(pkg["tiles"]) == want
    for key, data in pkg["tiles"].items():
        assert data == source["tiles"][key]
    indexed = walk_tilemap(pkg["tilemap"]["index"])
    assert set(pkg["tiles"]) <= indexed and all(z < 2 for z, _, _ in indexed - set(pkg["tiles"]))
    assert (pkg["root"]["minLOD"], pkg["root"]["maxLOD"]) == (2, 4)


def test_estimate_equals_the_package(server, tmp_path):
    svc = server.svc("NE")
    sub = server.get(f"{svc}/estimateExportTilesSize", {"f": "json", "levels": "0-3", "exportBy": "levelId"}).json()
    job = server.poll("NE", "estimateExportTilesSize", sub["jobId"])
    est = server.result("NE", "estimateExportTilesSize", job)
    _, paths = python_export_tiles(server, "NE", levels="0-3", dest=tmp_path)
    assert est["totalSize"] == paths[0].stat().st_size
    assert est["totalTilesToExport"] == len(read_vtpk(paths[0])["tiles"])


def test_limits_and_refusals(server, tmp_path):
    job, paths = python_export_tiles(server, "Small", levels="0-3", dest=tmp_path)
    assert job["jobStatus"] == "esriJobFailed" and paths is None
    assert any("exceeds" in m["description"] for m in job["messages"])
    r = server.get(SVC.format("Closed") + "/exportTiles", {"f": "json", "levels": "0"}).json()
    assert r["error"]["code"] == 400 and "exportTilesAllowed=false" in r["error"]["details"][0]
    assert "VectorTileServer" in r["error"]["details"][0]


def test_cancel_and_job_urls(server):
    svc = server.svc("NE")
    sub = server.get(f"{svc}/exportTiles", {"f": "json", "levels": "0-5"}).json()
    for url in (f"{svc}/jobs/{sub['jobId']}", f"{svc}/exportTiles/jobs/{sub['jobId']}"):
        assert server.get(url, {"f": "json"}).json()["jobId"] == sub["jobId"]
    server.post(f"{svc}/jobs/{sub['jobId']}/cancel", {"f": "json"})
    job = server.poll("NE", "exportTiles", sub["jobId"])
    assert job["jobStatus"] in ("esriJobCancelled", "esriJobSucceeded")
    # another service's job is not reachable here
    other = server.get(f"{server.svc('Folder')}/jobs/{sub['jobId']}", {"f": "json"}).json()
    assert other["error"]["code"] == 400


def test_service_type_from_config(tmp_path, fixture_vtpk):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "t.toml", data, {"NE": {"source": fixture_vtpk, "type": "MapServer"}})
    srv = TypedServer(cfg, data, free_port())
    with pytest.raises(RuntimeError, match="cannot be served as a MapServer"):
        srv.start(timeout=20)
    cfg = write_config(tmp_path / "t.toml", data, {"NE": {"source": fixture_vtpk, "type": "TileServer"}})
    with pytest.raises(RuntimeError, match="type must be one of"):
        TypedServer(cfg, data, free_port()).start(timeout=20)


def test_html_pages_name_the_type(server):
    page = server.get("/arcgis/rest/services", {"f": "html"}).body.decode()
    assert "/services/NE/VectorTileServer?f=html" in page and "/MapServer" not in page
    r = server.get(SVC.format("NE"), {"f": "html"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")


def test_package_truncated_while_served(tmp_path, fixture_vtpk):
    """A .vtpk cut short under a running server: resources and tiles answer 4xx, never 5xx or a crash."""
    import shutil

    copy = tmp_path / "ne.vtpk"
    shutil.copyfile(fixture_vtpk, copy)
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "t.toml", data, {"NE": {"source": copy}})
    srv = TypedServer(cfg, data, free_port(), kinds={"NE": "VectorTileServer"}).start()
    try:
        svc = SVC.format("NE")
        assert srv.get(svc + "/resources/sprites/sprite.png").status == 200
        with open(copy, "r+b") as f:
            f.truncate(copy.stat().st_size // 3)
        answers = [srv.get(svc + path) for path in (
            "/resources/styles/root.json", "/resources/sprites/sprite@2x.png", "/resources/info",
            "/resources/fonts/Tahoma%20Regular/65280-65535.pbf", "/tile/5/10/17.pbf", "/tile/0/0/0.pbf", "")]
        assert all(200 <= a.status < 500 for a in answers), [a.status for a in answers]
        assert any(a.status >= 400 or b'"error"' in a.body for a in answers)
        log = srv.log.read_text()
        assert "Traceback" not in log and "unexpected error" not in log, log[-2000:]
    finally:
        srv.stop()


def test_package_replaced_while_served(tmp_path, fixture_vtpk):
    """A new version renamed over the served .vtpk: within a second or so, tilemap, resources and tiles
    are the new version's."""
    import os
    import shutil

    from tilecrate.export import export
    from tilecrate.request import ExportRequest

    served = tmp_path / "ne.vtpk"
    shutil.copyfile(fixture_vtpk, served)
    smaller = tmp_path / "small.vtpk"
    export(str(fixture_vtpk), ExportRequest(levels="0-1"), str(smaller))
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "t.toml", data, {"NE": {"source": served}})
    srv = TypedServer(cfg, data, free_port(), kinds={"NE": "VectorTileServer"}).start()
    try:
        svc = SVC.format("NE")
        assert len(walk_tilemap(srv.get(svc + "/tilemap").json()["index"])) == 111
        assert srv.get(svc + "/tile/2/1/1.pbf").status == 200
        os.replace(smaller, served)
        want = set(read_vtpk(served)["tiles"])
        deadline = time.monotonic() + 10
        while True:
            srv.get(svc + "/resources/info")
            got = walk_tilemap(srv.get(svc + "/tilemap").json()["index"])
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == want
        assert srv.get(svc + "/tile/2/1/1.pbf").status == 404           # level 2 is not in the new version
        assert srv.get(svc + "/resources/sprites/sprite.png").status == 200
        log = srv.log.read_text()
        assert "Traceback" not in log and "unexpected error" not in log, log[-2000:]
    finally:
        srv.stop()

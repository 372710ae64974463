"""The served service JSON states the package's own extents (issue 12): a real `tilecrate serve` of
every real fixture, whose MapServer (and ImageServer, VectorTileServer) `fullExtent` / `initialExtent`
equal what the package states, read here with zipfile/json/ElementTree: a .tpk's mapserver.json
`contents.fullExtent` (not conf.cdi, which ArcGIS writes as the initial extent), a .tpkx's / .vtpk's
root.json; caches that state none serve conf.cdi's envelope, and without conf.cdi the tiles' bounds,
and without tiles the tiling scheme's extent."""
from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from conftest import REAL_SOURCES, real_path
from test_server_support import Server, free_port, write_config
from tilecrate.cache import open_cache
from tilecrate.server.service import scheme_extent, served_extents

BOX = ("xmin", "ymin", "xmax", "ymax")
KINDS = {"natural-earth.vtpk": "VectorTileServer"}
AS_IMAGE = ("states_filled.tpk", "googlemaps.tpkx")   # also served as ImageServers


def _box(obj: dict) -> tuple[float, ...]:
    return tuple(float(obj[k]) for k in BOX)


def _name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


def _stated(key: str) -> tuple[tuple, tuple]:
    """(full, initial) boxes the fixture states, read independently of tilecrate."""
    path = real_path(key)
    if path.is_dir():
        if (path / "root.json").is_file():
            doc = json.loads((path / "root.json").read_text(encoding="utf-8-sig"))
            return _box(doc["fullExtent"]), _box(doc["initialExtent"])
        cdi = ET.parse(path / "conf.cdi").getroot()
        box = tuple(float(cdi.findtext(t)) for t in ("XMin", "YMin", "XMax", "YMax"))
        return box, box
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if "servicedescriptions/mapserver/mapserver.json" in names:
            c = json.loads(z.read("servicedescriptions/mapserver/mapserver.json"))["contents"]
            return _box(c["fullExtent"]), _box(c["initialExtent"])
        roots = [n for n in names if n.endswith("root.json") and "/resources/" not in n and "tilemap" not in n]
        if roots:
            doc = json.loads(z.read(min(roots, key=lambda n: n.count("/"))))
            return _box(doc["fullExtent"]), _box(doc["initialExtent"])
        cdi = ET.fromstring(z.read(next(n for n in names if n.lower().endswith("conf.cdi"))))
        box = tuple(float(cdi.findtext(t)) for t in ("XMin", "YMin", "XMax", "YMax"))
        return box, box


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_dir):
    root = tmp_path_factory.mktemp("extents")
    data = root / "data"
    services = {_name(k): {"source": real_path(k)} for k in REAL_SOURCES}
    services.update({_name(k) + "_img": {"source": real_path(k), "type": "ImageServer"} for k in AS_IMAGE})
    srv = Server(write_config(root / "tilecrate.toml", data, services), data, free_port())
    srv.start()
    yield srv
    srv.stop()


def _root(srv: Server, name: str, kind: str = "MapServer") -> dict:
    info = srv.get(f"/arcgis/rest/services/{name}/{kind}", {"f": "json"}).json()
    assert "error" not in info, info
    return info


@pytest.mark.parametrize("key", list(REAL_SOURCES))
def test_served_extents_are_the_stated_ones(server, key):
    full, initial = _stated(key)
    info = _root(server, _name(key), KINDS.get(key, "MapServer"))
    assert _box(info["fullExtent"]) == full
    assert _box(info["initialExtent"]) == initial
    if key not in KINDS:
        assert _box(server.get(f"/arcgis/rest/services/{_name(key)}/MapServer/0", {"f": "json"}).json()["extent"]) == full


def test_a_tpk_serves_mapserver_json_not_conf_cdi(server):
    # the case that changed: ArcGIS's conf.cdi of states_filled.tpk is the initial extent
    with zipfile.ZipFile(real_path("states_filled.tpk")) as z:
        cdi = ET.fromstring(z.read("v101/Layers/conf.cdi"))
    cdi_box = tuple(float(cdi.findtext(t)) for t in ("XMin", "YMin", "XMax", "YMax"))
    info = _root(server, _name("states_filled.tpk"))
    assert _box(info["fullExtent"]) != cdi_box and _box(info["initialExtent"]) == cdi_box
    assert info["fullExtent"]["spatialReference"]["latestWkid"] == 3857


@pytest.mark.parametrize("key", AS_IMAGE)
def test_image_server_states_them_too(server, key):
    full, initial = _stated(key)
    info = _root(server, _name(key) + "_img", "ImageServer")
    assert _box(info["extent"]) == _box(info["fullExtent"]) == full
    assert _box(info["initialExtent"]) == initial


def test_fallbacks_conf_cdi_then_tiles_then_scheme(real_dir, tmp_path):
    src = real_path("raster-tiles-compactcache")
    folder = tmp_path / "cache"
    shutil.copytree(src, folder)
    with open_cache(folder) as c:
        cdi = c.full_extent
        assert served_extents(c) == (cdi, cdi)
    (folder / "conf.cdi").unlink()
    with open_cache(folder) as c:
        full, initial = served_extents(c)
        assert full == initial == c.data_extent()       # the bounds of the tiles present
        assert full.xmin == c.scheme.origin_x
    shutil.rmtree(folder / "_alllayers")
    (folder / "_alllayers").mkdir()
    with open_cache(folder) as c:
        full, initial = served_extents(c)
        assert full == initial == scheme_extent(c.scheme)
        assert (full.xmin, full.ymax, full.xmax, full.ymin) == (c.scheme.origin_x, c.scheme.origin_y,
                                                                -c.scheme.origin_x, -c.scheme.origin_y)


def test_only_an_initial_extent_stated_is_the_full_one_too(real_dir, tmp_path):
    src = real_path("states_filled.tpk")
    out = tmp_path / "initial_only.tpk"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "servicedescriptions/mapserver/mapserver.json":
                doc = json.loads(data)
                del doc["contents"]["fullExtent"]
                data = json.dumps(doc).encode()
            zout.writestr(info, data)
    _, initial = _stated("states_filled.tpk")
    with open_cache(out) as c:
        full, init = served_extents(c)
    assert _box(full.to_json()) == _box(init.to_json()) == initial

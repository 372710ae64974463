"""ImageServer end to end on the LERC sample elevation cache: a real `tilecrate serve` process driven as
the ArcGIS API for Python's imagery TileManager and the JS ElevationLayer / Cesium read it (FORMATS.md
§1.6, §11.2, §19); every LERC tile of an exported package decodes with Esri's `lerc` to the terrain."""
from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import lerc  # test dependency (pyproject [test]): a missing decoder fails the module, never skips
import numpy as np
import pytest

from test_server_support import free_port, read_v2_bundle, write_config
from test_server_vector import ENDED, TypedServer
from tilecrate.cache import open_cache
from tilecrate.sample import LERC_MAX_Z_ERROR, LERC_SAMPLES, SampleSpec, elevation, make_sample, tiles_of_level
from tilecrate.server.image import lerc1_range
from tilecrate.tiling import web_mercator_scheme

LEVELS = (0, 1, 2, 3)
SVC = "/arcgis/rest/services/{}/ImageServer"


def _decode(blob: bytes) -> np.ndarray:
    result, arr, mask = lerc.decode(blob)
    assert result == 0, f"lerc.decode failed with {result}"
    assert mask is None or np.asarray(mask).all()
    return np.asarray(arr, dtype=np.float64)


def _close_to_terrain(blob: bytes, level: int, row: int, col: int) -> None:
    z = elevation(level, row, col).astype(np.float64)
    decoded = _decode(blob)
    assert decoded.shape == (LERC_SAMPLES, LERC_SAMPLES)
    assert float(np.abs(decoded - z).max()) <= LERC_MAX_Z_ERROR + float(np.abs(z).max()) * 2.4e-7


def _tpkx_tiles(path: Path) -> tuple[dict, dict]:
    """(root.json, {(level, row, col): bytes}) of a .tpkx, read with zipfile and the §6.3 reader."""
    tiles = {}
    with zipfile.ZipFile(path) as zf:
        root = json.loads(zf.read("root.json"))
        for info in zf.infolist():
            parts = info.filename.split("/")
            if info.filename.endswith(".bundle"):
                level = int(parts[-2][1:])
                name = parts[-1][:-len(".bundle")]
                row0, col0 = int(name[1:5], 16), int(name[6:10], 16)
                for i, data in read_v2_bundle(zf.read(info)).items():
                    tiles[(level, row0 + i // 128, col0 + i % 128)] = data
    return root, tiles


@pytest.fixture(scope="module")
def elev(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lercsrv") / "elevation"
    make_sample(out, SampleSpec(levels=LEVELS, tile_format="LERC"))
    return out


@pytest.fixture(scope="module")
def source_tiles(elev) -> dict:
    with open_cache(elev) as c:
        return {(lv, r, c_): bytes(t) for lv, r, c_, t in c.iter_tiles()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, elev, sample_v2):
    root = tmp_path_factory.mktemp("imageserver")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {
        "Elev": {"source": elev},
        "Imagery": {"source": sample_v2, "type": "ImageServer"},
        "Map": {"source": sample_v2},
    })
    srv = TypedServer(cfg, data, free_port(), kinds={"Elev": "ImageServer", "Imagery": "ImageServer"})
    srv.start()
    yield srv
    srv.stop()


def test_directory_and_types(server):
    services = server.get("/arcgis/rest/services", {"f": "json"}).json()["services"]
    assert {s["name"]: s["type"] for s in services} == {"Elev": "ImageServer", "Imagery": "ImageServer",
                                                        "Map": "MapServer"}
    assert server.get("/arcgis/rest/services/Elev/MapServer", {"f": "json"}).json()["error"]["code"] == 404
    assert server.get("/arcgis/rest/services/Map/ImageServer", {"f": "json"}).json()["error"]["code"] == 404


def test_root_json_for_elevation_clients(server, source_tiles):
    # Python POSTs the root; Cesium GETs `<svc>/?f=pjson`; JS GETs f=json
    posted = server.post(SVC.format("Elev"), {"f": "json"}).json()
    info = server.get(SVC.format("Elev") + "/", {"f": "pjson"}).json()
    assert posted == info
    ti = info["tileInfo"]
    assert ti["format"] == "LERC" and ti["rows"] == ti["cols"] == 256 and ti["lods"][0]["level"] == 0
    assert ti["spatialReference"]["latestWkid"] == 3857 and info["spatialReference"]["latestWkid"] == 3857
    assert info["singleFusedMapCache"] is True and info["bandCount"] == 1 and info["pixelType"] == "F32"
    assert set(info["capabilities"].split(",")) >= {"Image", "Tilemap"}
    assert info["exportTilesAllowed"] is True and info["currentVersion"] >= 10.3
    assert (info["minLOD"], info["maxLOD"]) == (0, 3)
    scheme = web_mercator_scheme()
    assert info["pixelSizeX"] == info["pixelSizeY"] == pytest.approx(scheme.lods[3].resolution)
    ext = info["extent"]
    assert ext["xmin"] < ext["xmax"] and ext["ymin"] < ext["ymax"] and info["fullExtent"] == ext
    # the height range of the coarsest level, as Cesium reads it: the decoded samples' range
    z = np.concatenate([_decode(b).ravel() for (lv, _, _), b in source_tiles.items() if lv == 0])
    assert info["minValues"][0] == pytest.approx(z.min(), abs=LERC_MAX_Z_ERROR + 1e-3)
    assert info["maxValues"][0] == pytest.approx(z.max(), abs=LERC_MAX_Z_ERROR + 1e-3)
    imagery = server.get(SVC.format("Imagery"), {"f": "json"}).json()
    assert imagery["tileInfo"]["format"] == "JPEG" and imagery["bandCount"] == 3 and imagery["pixelType"] == "U8"


def test_lerc1_range_against_the_decoder(source_tiles):
    for blob in list(source_tiles.values())[:6]:
        lo, hi = lerc1_range(blob)
        z = _decode(blob)
        assert lo == pytest.approx(z.min(), abs=LERC_MAX_Z_ERROR) and hi == pytest.approx(z.max(), abs=LERC_MAX_Z_ERROR)
    assert lerc1_range(b"CntZImage " + b"\0" * 10) is None
    blob = next(iter(source_tiles.values()))
    for cut in (50, 66, 80, len(blob) // 2, len(blob) - 1):   # truncated: None, never an exception
        assert lerc1_range(blob[:cut]) is None
    # a block count that claims more data than the blob holds
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 58, len(blob) * 4)   # the z part's numBytes
    assert lerc1_range(bytes(bad)) is None


def test_tiles_pass_through_and_decode(server, source_tiles):
    for (lv, r, c), blob in source_tiles.items():
        got = server.get(f"{SVC.format('Elev')}/tile/{lv}/{r}/{c}", {"blankTile": "false"})
        assert got.status == 200 and got.body == blob
        assert got.body[:10] == b"CntZImage "
    lv, r, c = 3, *tiles_of_level(SampleSpec(levels=LEVELS), 3)[::2]
    _close_to_terrain(server.get(f"{SVC.format('Elev')}/tile/{lv}/{r}/{c}").body, lv, r, c)
    assert server.get(f"{SVC.format('Elev')}/tile/3/0/0").status == 404
    assert server.get(f"{SVC.format('Elev')}/tile/9/0/0").status == 404
    window = server.get(f"{SVC.format('Elev')}/tilemap/2/0/0/4/4", {"f": "json"}).json()
    assert window["data"] == [int((2, rr, cc) in source_tiles) for rr in range(4) for cc in range(4)]


def _imagery_submit(server, name: str, op: str, params: dict) -> dict:
    """TileManager.export / estimate_size: POST the parameters, poll `<op>/jobs/<id>` until it ends."""
    svc = server.svc(name)
    sub = server.post(f"{svc}/{op}", {"f": "json", **params}).json()
    assert sub["jobStatus"] == "esriJobSubmitted", sub               # read from the submit reply
    deadline = time.monotonic() + 60
    while True:
        job = server.post(f"{svc}/{op}/jobs/{sub['jobId']}", {"f": "json"}).json()
        if job["jobStatus"] in ENDED:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _resolutions(levels) -> str:
    lods = web_mercator_scheme().lods
    return ",".join(repr(lods[lv].resolution) for lv in levels)


def test_export_by_resolution_to_tpkx_decodes_to_the_terrain(server, source_tiles, tmp_path):
    params = {"exportBy": "Resolution", "levels": _resolutions((1, 2, 3)), "tilePackage": "true",
              "storageFormatType": "esriMapCacheStorageModeCompactV2", "optimizeTilesForSize": "false"}
    est = _imagery_submit(server, "Elev", "estimateExportTilesSize", params)
    assert est["jobStatus"] == "esriJobSucceeded", est
    estimate = server.result("Elev", "estimateExportTilesSize", est)
    job = _imagery_submit(server, "Elev", "exportTiles", params)
    assert job["jobStatus"] == "esriJobSucceeded", job
    _, files = server.download_all(server.result("Elev", "exportTiles", job), tmp_path)
    assert [f.suffix for f in files] == [".tpkx"]
    assert estimate["totalSize"] == files[0].stat().st_size
    root, tiles = _tpkx_tiles(files[0])
    assert root["tileImageInfo"]["format"] == "LERC"
    want = {k: v for k, v in source_tiles.items() if k[0] in (1, 2, 3)}
    assert tiles == want                                           # byte for byte
    assert estimate["totalTilesToExport"] == len(want)
    for (lv, r, c), blob in tiles.items():
        _close_to_terrain(blob, lv, r, c)


def test_optimize_for_size_leaves_lerc_alone(server, source_tiles, tmp_path):
    job = _imagery_submit(server, "Elev", "exportTiles", {
        "exportBy": "LevelID", "levels": "2", "tilePackage": "true", "storageFormatType": "CompactV2",
        "optimizeTilesForSize": "true", "compressionQuality": "30"})
    assert job["jobStatus"] == "esriJobSucceeded", job
    _, files = server.download_all(server.result("Elev", "exportTiles", job), tmp_path)
    assert _tpkx_tiles(files[0])[1] == {k: v for k, v in source_tiles.items() if k[0] == 2}


def test_tile_package_false_gives_the_cache_folder(server, source_tiles, tmp_path):
    job = _imagery_submit(server, "Elev", "exportTiles", {"exportBy": "Resolution", "levels": _resolutions((2, 3)),
                                                          "tilePackage": "false"})
    assert job["jobStatus"] == "esriJobSucceeded", job
    folder = server.result("Elev", "exportTiles", job)
    listing = server.get(folder).json()
    assert listing["folders"] and not [f for f in listing["files"] if f["name"].endswith((".tpk", ".tpkx"))]
    out = next(p for p in (server.data_dir / "arcgisoutput").rglob(job["jobId"]) if p.is_dir())
    conf = next(out.rglob("conf.xml")).read_text()
    assert "LERC" in conf
    tiles = {}
    for bundle in out.rglob("*.bundle"):
        level = int(bundle.parent.name[1:])
        row0, col0 = int(bundle.stem[1:5], 16), int(bundle.stem[6:10], 16)
        for i, data in read_v2_bundle(bundle.read_bytes()).items():
            tiles[(level, row0 + i // 128, col0 + i % 128)] = data
    assert tiles == {k: v for k, v in source_tiles.items() if k[0] in (2, 3)}


def test_bad_resolution_is_an_esri_error(server):
    r = server.post(f"{server.svc('Elev')}/exportTiles", {"f": "json", "exportBy": "Resolution", "levels": "abc"}).json()
    assert r["error"]["code"] == 400


def test_lerc1_range_refuses_lying_block_counts(source_tiles):
    """Block counts in the billions (a replaced or corrupt file) are refused before any work."""
    blob = bytearray(next(iter(source_tiles.values())))
    struct.pack_into("<II", blob, 18, 0xFFFFFFFF, 0xFFFFFFFF)        # rows, cols
    struct.pack_into("<II", blob, 50, 0xFFFFFFF0, 0xFFFFFFF0)        # z part numBlocksY, numBlocksX
    assert lerc1_range(bytes(blob)) is None

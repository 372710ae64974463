"""End-to-end: a real `tilecrate serve` process driven over HTTP the way the ArcGIS API for Python does."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from tilecrate.cache import open_cache
from tilecrate.tiling import parse_bundle_name, parse_level_dir
from test_server_support import Server, free_port, read_v2_bundle, write_config

EXPORT, ESTIMATE = "exportTiles", "estimateExportTilesSize"


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_v2, sample_v1):
    root = tmp_path_factory.mktemp("server")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {
        "World": {"source": sample_v2},
        "WorldV1": {"source": sample_v1},
        "Limited": {"source": sample_v2, "maxExportTilesCount": 10},
        "NoExport": {"source": sample_v2, "export_tiles_allowed": False},
    })
    srv = Server(cfg, data, free_port()).start()
    yield srv
    srv.stop()


def source_tiles(path, levels) -> dict[tuple[int, int, int], bytes]:
    with open_cache(str(path)) as cache:
        return {(lv, r, c): t for lv, r, c, t in cache.iter_tiles() if lv in levels}


# ------------------------------------------------------------------------------------------
# service resources


def test_directory_and_service_json(server, sample_v2):
    d = server.get("/arcgis/rest/services", {"f": "json"}).json()
    assert {s["name"] for s in d["services"]} == {"World", "WorldV1", "Limited", "NoExport"}
    assert all(s["type"] == "MapServer" for s in d["services"])
    info = server.get(server.svc("World"), {"f": "pjson"}).json()
    assert info["currentVersion"] >= 10.9
    assert info["singleFusedMapCache"] is True
    assert info["exportTilesAllowed"] is True and info["maxExportTilesCount"] == 100000
    assert "tilemap" in info["capabilities"].lower()
    assert info["storageInfo"] == {"storageFormat": "esriMapCacheStorageModeCompactV2", "packetSize": 128}
    ti = info["tileInfo"]
    assert (ti["rows"], ti["cols"], ti["dpi"], ti["format"]) == (256, 256, 96, "JPEG")
    assert ti["spatialReference"]["wkid"] == 102100
    assert [lod["level"] for lod in ti["lods"]][:6] == list(range(6))
    assert info["fullExtent"]["xmin"] < info["fullExtent"]["xmax"]
    assert info["layers"][0]["id"] == 0
    assert server.get(server.svc("World") + "/0", {"f": "json"}).json()["type"] == "Raster Layer"
    assert server.get(server.svc("World") + "/layers", {"f": "json"}).json()["layers"][0]["id"] == 0
    assert server.get(server.svc("Limited"), {"f": "json"}).json()["maxExportTilesCount"] == 10
    assert server.get(server.svc("NoExport"), {"f": "json"}).json()["exportTilesAllowed"] is False
    v1 = server.get(server.svc("WorldV1"), {"f": "json"}).json()
    assert v1["storageInfo"]["storageFormat"] == "esriMapCacheStorageModeCompact"


def test_tiles_tilemap_and_cors(server, sample_v2):
    tiles = source_tiles(sample_v2, {3})
    (lv, row, col), data = sorted(tiles.items())[0]
    r = server.get(f"{server.svc('World')}/tile/{lv}/{row}/{col}")
    assert r.status == 200 and r.body == data and r.headers["Content-Type"] == "image/jpeg"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    missing = server.get(f"{server.svc('World')}/tile/3/0/0")
    assert (3, 0, 0) not in tiles and missing.status == 404
    assert missing.json()["error"]["code"] == 404
    assert server.get(f"{server.svc('World')}/tile/99/0/0").status == 404
    assert server.get(f"{server.svc('World')}/tile/x/0/0").status == 400
    # tilemap: a window over level 3 agrees with the tiles present, row-major
    rows = [r for (_, r, _) in tiles]
    cols = [c for (_, _, c) in tiles]
    top, left = min(rows) - 1, min(cols) - 1
    w, h = max(cols) - left + 2, max(rows) - top + 2
    tm = server.get(f"{server.svc('World')}/tilemap/3/{top}/{left}/{w}/{h}", {"f": "json"}).json()
    assert tm["location"] == {"left": left, "top": top, "width": w, "height": h}
    want = [int((3, top + i // w, left + i % w) in tiles) for i in range(w * h)]
    assert tm["data"] == want
    pre = urllib_options(server.svc("World") + "/tile/0/0/0", server)
    assert pre[0] == 204 and "X-Esri-Authorization" in pre[1]["Access-Control-Allow-Headers"]


def urllib_options(url: str, server: Server):
    import urllib.request
    req = urllib.request.Request(url, method="OPTIONS", headers={"Origin": "http://example.org",
                                                                 "Access-Control-Request-Method": "GET"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, dict(resp.headers.items())


# ------------------------------------------------------------------------------------------
# the ArcGIS API for Python's export flow


def run_export(server: Server, service: str, params: dict, tmp_path: Path) -> tuple[dict, dict, list[Path]]:
    sub = server.submit(service, EXPORT, params)
    assert re.fullmatch(r"j[0-9a-f]{32}_et", sub["jobId"]) and sub["jobStatus"] == "esriJobSubmitted"
    job = server.poll(service, EXPORT, sub["jobId"])
    assert job["jobStatus"] == "esriJobSucceeded", job
    value = server.result(service, EXPORT, job)
    assert value.endswith(f"/arcgis/rest/directories/arcgisoutput/{service}_MapServer/{sub['jobId']}")
    listing, files = server.download_all(value, tmp_path)
    return job, listing, files


def test_export_tpkx_like_the_python_api(server, sample_v2, tmp_path):
    params = {"tilePackage": "True", "exportBy": "LevelID", "levels": "1-3", "storageFormat": "tpkx",
              "optimizeTilesForSize": "False", "compressionQuality": ""}
    job, listing, files = run_export(server, "World", params, tmp_path)
    msgs = [m["description"] for m in job["messages"]]
    assert msgs[0].startswith("Start Time: ")
    assert re.match(r"Succeeded at .* \(Elapsed Time: [0-9.]+ seconds\)", msgs[-1])
    assert any(m.startswith("Exporting level 2") for m in msgs)
    assert [f["name"] for f in listing["files"]] == ["World.tpkx"] and listing["folders"] == []
    # read the package independently: stored zip, V2 bundles parsed from FORMATS.md §6.3
    want = source_tiles(sample_v2, {1, 2, 3})
    got = {}
    with zipfile.ZipFile(files[0]) as zf:
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if info.filename.endswith(".bundle"):
                parts = info.filename.split("/")
                lv, (r0, c0) = parse_level_dir(parts[-2]), parse_bundle_name(parts[-1])
                for i, data in read_v2_bundle(zf.read(info)).items():
                    got[(lv, r0 + i // 128, c0 + i % 128)] = data
    assert got == want


def test_python_api_default_recompression(server, sample_v2, tmp_path):
    """export_tiles() sends optimizeTilesForSize=True&compressionQuality=75 unless told otherwise."""
    def tiles_of(path):
        assert path.name.endswith(".tpk")     # no storageFormat sent: ArcGIS's default, Compact
        with open_cache(path) as pkg:
            return {(lv, r, c): t for lv, r, c, t in pkg.iter_tiles()}

    want = source_tiles(sample_v2, {4, 5})
    base = {"tilePackage": "True", "exportBy": "LevelID", "levels": "4-5", "optimizeTilesForSize": "True"}
    (tmp_path / "q75").mkdir()
    job, _, files = run_export(server, "World", {**base, "compressionQuality": "75"}, tmp_path / "q75")
    assert tiles_of(files[0]) == want           # the cache is at quality 75: nothing to gain, copied
    (tmp_path / "q40").mkdir()
    job, _, files = run_export(server, "World", {**base, "compressionQuality": "40"}, tmp_path / "q40")
    got = tiles_of(files[0])
    assert got.keys() == want.keys()
    assert all(t[:3] == b"\xff\xd8\xff" for t in got.values())
    assert sum(map(len, got.values())) < 0.8 * sum(map(len, want.values()))
    assert any("compression quality 40" in m["description"] for m in job["messages"])


def test_long_area_of_interest_in_a_get_query(server, sample_v2):
    """The Python API sends areaOfInterest in the query string: a detailed polygon makes it long."""
    import json
    import math

    ring = [[10 + 8 * math.cos(2 * math.pi * k / 3000), 45 + 6 * math.sin(2 * math.pi * k / 3000)]
            for k in range(3000)]
    ring.append(ring[0])
    aoi = json.dumps({"features": [{"geometry": {"rings": [ring], "spatialReference": {"wkid": 4326}}}]})
    assert len(aoi) > 60000
    params = {"tilePackage": "true", "levels": "0-5", "exportExtent": "DEFAULT", "areaOfInterest": aoi}
    sub = server.submit("World", ESTIMATE, params)
    job = server.poll("World", ESTIMATE, sub["jobId"])
    assert job["jobStatus"] == "esriJobSucceeded", job
    part = server.result("World", ESTIMATE, job)["totalTilesToExport"]
    assert 0 < part < 123
    inp = server.get(f"{server.svc('World')}/estimateExportTilesSize/jobs/{sub['jobId']}/inputs/area_of_interest",
                     {"f": "json"}).json()
    assert inp["dataType"] == "GPFeatureRecordSetLayer" and inp["value"]["features"][0]["geometry"]["rings"] == [ring]


def test_export_tpk_read_by_tpkutils(server, sample_v1, tmp_path):
    from tpkutils import TPK

    params = {"f": "json", "tilePackage": "true", "levels": "0,2", "storageFormatType": "esriMapCacheStorageModeCompact"}
    _, listing, files = run_export(server, "WorldV1", params, tmp_path)
    assert files[0].name == "WorldV1.tpk"
    tpk = TPK(str(files[0]))
    got = {(t.z, t.y, t.x): bytes(t.data) for t in tpk.read_tiles()}
    tpk.close()
    assert got == source_tiles(sample_v1, {0, 2})


def test_export_cache_folder(server, sample_v2, tmp_path):
    sub = server.submit("World", EXPORT, {"tilePackage": "false", "levels": "4"})
    job = server.poll("World", EXPORT, sub["jobId"])
    assert job["jobStatus"] == "esriJobSucceeded", job
    value = server.result("World", EXPORT, job)
    listing = server.get(value).json()     # no f: JSON all the same
    assert listing["files"] == [] and listing["folders"] == ["World"]
    inner = server.get(f"{value}/World").json()
    names = {f["name"] for f in inner["files"]}
    assert {"conf.xml", "conf.cdi"} <= names
    # the served folder is a cache: download its bundles by walking the listing, then open it
    dest = tmp_path / "World"

    def fetch(url: str, into: Path) -> None:
        into.mkdir(parents=True, exist_ok=True)
        lst = server.get(url).json()
        for f in lst["files"]:
            (into / f["name"]).write_bytes(server.get(f["url"]).body)
        for sub_name in lst["folders"]:
            fetch(f"{url}/{sub_name}", into / sub_name)
    fetch(f"{value}/World", dest)
    with open_cache(str(dest)) as cache:
        got = {(lv, r, c): t for lv, r, c, t in cache.iter_tiles()}
    assert got == source_tiles(sample_v2, {4})


def test_estimate_matches_export(server, tmp_path):
    params = {"tilePackage": "true", "exportBy": "levelId", "levels": "0-4", "storageFormat": "tpkx",
              "exportExtent": "DEFAULT"}
    sub = server.submit("World", ESTIMATE, params)
    assert sub["jobStatus"] == "esriJobSubmitted"
    job = server.poll("World", ESTIMATE, sub["jobId"])
    assert job["jobStatus"] == "esriJobSucceeded", job
    est = server.result("World", ESTIMATE, job)
    assert set(est) == {"totalSize", "totalTilesToExport"}
    assert all(isinstance(v, int) for v in est.values())
    # the generic job URL works for the estimate job too
    assert server.post(f"{server.svc('World')}/jobs/{sub['jobId']}", {"f": "json"}).json()["jobStatus"] == "esriJobSucceeded"
    _, listing, files = run_export(server, "World", params, tmp_path)
    assert est["totalSize"] == files[0].stat().st_size
    with zipfile.ZipFile(files[0]) as zf:
        n = sum(len(read_v2_bundle(zf.read(i))) for i in zf.infolist() if i.filename.endswith(".bundle"))
    assert est["totalTilesToExport"] == n


def test_job_inputs_and_url_forms(server):
    sub = server.submit("World", EXPORT, {"tilePackage": "true", "levels": "0", "exportExtent": "DEFAULT"})
    job_id = sub["jobId"]
    server.poll("World", EXPORT, job_id)
    for path in (f"jobs/{job_id}", f"exportTiles/jobs/{job_id}", f"exportTiles/jobs/{job_id}/"):
        r = server.get(f"{server.svc('World')}/{path}", {"f": "pjson"})
        assert r.json()["jobId"] == job_id
    inp = server.get(f"{server.svc('World')}/exportTiles/jobs/{job_id}/inputs/levels", {"f": "json"}).json()
    assert inp == {"paramName": "levels", "dataType": "GPString", "value": "0"}
    res = server.post(f"{server.svc('World')}/jobs/{job_id}/results/out_service_url", {"f": "json"}).json()
    assert res["paramName"] == "out_service_url" and res["dataType"] == "GPString"
    # cancelling a finished job is refused
    err = server.get(f"{server.svc('World')}/exportTiles/jobs/{job_id}/cancel", {"f": "json"}).json()
    assert err["error"]["code"] == 400


@pytest.mark.parametrize("extra", ['"note":NaN', '"note":1e400', '"note":-Infinity'])
def test_job_input_that_is_not_strict_json_is_answered_as_text(server, extra):
    # Python's json reads NaN and 1e400 (as inf); they cannot be answered as JSON, so the text is
    aoi = ('{"rings":[[[-1000000,-1000000],[1000000,-1000000],[1000000,1000000],[-1000000,-1000000]]],'
           '"spatialReference":{"wkid":102100},' + extra + '}')
    sub = server.submit("World", ESTIMATE, {"levels": "0", "areaOfInterest": aoi})
    r = server.get(f"{server.svc('World')}/{ESTIMATE}/jobs/{sub['jobId']}/inputs/area_of_interest", {"f": "json"})
    assert r.status == 200 and r.json() == {"paramName": "area_of_interest", "dataType": "GPFeatureRecordSetLayer",
                                            "value": aoi}
    assert "unexpected error answering" not in server.log.read_text()


def test_download_supports_range(server, tmp_path):
    _, listing, files = run_export(server, "World", {"tilePackage": "true", "levels": "0-1"}, tmp_path)
    url = listing["files"][0]["url"]
    r = server.get(url, headers={"Range": "bytes=10-99"})
    assert r.status == 206 and r.body == files[0].read_bytes()[10:100]
    assert r.headers["Content-Range"].startswith("bytes 10-99/")
    assert "attachment" in server.get(url).headers["Content-Disposition"]
    assert server.get(url + "x").status == 404
    assert server.get("/arcgis/rest/directories/arcgisoutput/..%2F..%2Fetc/passwd").status == 404


# ------------------------------------------------------------------------------------------
# refusals and failures


def test_tile_limit_fails_the_job_with_error_001564(server):
    sub = server.submit("Limited", EXPORT, {"tilePackage": "true", "levels": "0-5"})
    job = server.poll("Limited", EXPORT, sub["jobId"])
    assert job["jobStatus"] == "esriJobFailed"
    errors = [m["description"] for m in job["messages"] if m["type"] == "esriJobMessageTypeError"]
    assert errors == ["ERROR 001564: Requested tile count(123) exceeds the maximum allowed number of "
                      "tiles(10) to be exported for service Limited:MapServer."]
    assert "results" not in job
    assert server.get(f"{server.svc('Limited')}/exportTiles/jobs/{sub['jobId']}/results/out_service_url",
                      {"f": "json"}).json()["error"]["code"] == 400
    # the estimate succeeds over the limit: the client compares it with maxExportTilesCount
    est = server.submit("Limited", ESTIMATE, {"tilePackage": "true", "levels": "0-5"})
    ej = server.poll("Limited", ESTIMATE, est["jobId"])
    assert ej["jobStatus"] == "esriJobSucceeded"
    assert server.result("Limited", ESTIMATE, ej)["totalTilesToExport"] == 123


def test_export_not_allowed(server):
    for op in (EXPORT, ESTIMATE):
        r = server.get(f"{server.svc('NoExport')}/{op}", {"f": "json", "levels": "0", "tilePackage": "true"})
        assert r.status == 200
        err = r.json()["error"]
        assert err["code"] == 400 and "exportTilesAllowed" in " ".join(err["details"])


@pytest.mark.parametrize("path,params,code", [
    ("/arcgis/rest/services/Nope/MapServer", {"f": "json"}, 404),
    ("/arcgis/rest/services/World/MapServer/exportTiles", {"f": "json"}, 400),                 # no levels
    ("/arcgis/rest/services/World/MapServer/exportTiles", {"f": "json", "levels": "a-b"}, 400),
    ("/arcgis/rest/services/World/MapServer/exportTiles", {"f": "json", "levels": "1", "tilePackage": "maybe"}, 400),
    ("/arcgis/rest/services/World/MapServer/exportTiles", {"f": "json", "levels": "1", "storageFormat": "zip"}, 400),
    ("/arcgis/rest/services/World/MapServer/exportTiles", {"f": "xml", "levels": "1"}, 400),
    ("/arcgis/rest/services/World/MapServer/jobs/j00000000000000000000000000000000_et", {"f": "json"}, 400),
    ("/arcgis/rest/services/World/MapServer/jobs/../../x", {"f": "json"}, 404),
    ("/arcgis/rest/services/World/MapServer/7", {"f": "json"}, 400),
])
def test_bad_requests_get_esri_error_json(server, path, params, code):
    r = server.get(path, params)
    assert 200 <= r.status < 500
    err = r.json()["error"]
    assert err["code"] == code and isinstance(err["message"], str) and isinstance(err["details"], list)


@pytest.mark.parametrize("path", ["tile/%C2%B2/0/0", "tile/0/%D9%A1/0", "tilemap/0/0/0/%C2%B9/1", "%E2%91%A0"])
def test_non_ascii_digits_in_paths_are_refused(server, path):
    # str.isdigit() holds for '²', '①' and Arabic-Indic digits: none of them is a level, row or column
    r = server.get(f"{server.svc('World')}/{path}", {"f": "json"})
    assert r.status in (200, 400, 404) and r.json()["error"]["code"] in (400, 404), (r.status, r.body[:200])
    assert "unexpected error answering" not in server.log.read_text()


@pytest.mark.parametrize("params,words", [
    ({"levels": "0", "exportExtent": "1,2"}, "exportExtent"),
    ({"levels": "0", "areaOfInterest": "garbage"}, "area of interest"),
    ({"levels": "40"}, "level 40"),
    ({"levels": "0", "exportExtent": '{"xmin": 1e8, "ymin": 1e8, "xmax": 2e8, "ymax": 2e8}'}, "outside the cache"),
])
def test_request_that_would_fail_is_refused_at_submit(server, params, words):
    # the whole request is checked at submit: the Esri error comes at once, and no job is stored
    jobs_dir = server.data_dir / "jobs.lmdb"
    r = server.get(f"{server.svc('World')}/{EXPORT}", {"f": "json", "tilePackage": "true", **params})
    assert r.status == 200
    err = r.json()["error"]
    assert err["code"] == 400 and words in err["details"][0], err
    assert "jobId" not in r.json() and jobs_dir.is_dir()
    assert "unexpected error answering" not in server.log.read_text()


# ------------------------------------------------------------------------------------------
# Services Directory pages


def test_html_pages_and_form_flow(server):
    page = server.get(server.svc("World"), {"f": "html"})
    text = page.body.decode()
    assert page.headers["Content-Type"].startswith("text/html")
    assert "Levels of detail" in text and "/tile/" in text and 'action="' in text and "exportTiles" in text
    # the form submits with f=html and lands on the job page, which links the download when done
    r = server.get(server.svc("World") + "/exportTiles", {"f": "html", "levels": "0-1", "tilePackage": "true",
                                                         "storageFormatType": "esriMapCacheStorageModeCompactV2"})
    assert r.status == 200 and "exportTiles job" in r.body.decode()
    job_id = re.search(r"j[0-9a-f]{32}_et", r.body.decode()).group(0)
    server.poll("World", EXPORT, job_id)
    done = server.get(f"{server.svc('World')}/exportTiles/jobs/{job_id}", {"f": "html"}).body.decode()
    assert "esriJobSucceeded" in done and "World.tpkx" in done and 'http-equiv="refresh"' not in done
    assert server.get("/arcgis/rest/services", {"f": "html"}).body.decode().count("MapServer?f=html") == 4


def test_tilepackagekreator_and_setup_map_area_styles(server, sample_v2):
    """TPKK: GET ?f=pjson everywhere, folder `<value>/?f=pjson`; SMA: POST form with `polygon`."""
    svc = server.svc("World")
    ring = [[-10, 30], [30, 30], [30, 55], [-10, 55], [-10, 30]]
    aoi = '{"geometryType":"esriGeometryPolygon","features":[{"geometry":{"rings":[%s],"spatialReference":{"wkid":4326}}}]}' % ring
    est = server.get(f"{svc}/estimateExportTilesSize", {"f": "pjson", "tilePackage": "true", "exportBy": "LevelID",
                                                        "levels": "0-4", "exportExtent": "DEFAULT", "areaOfInterest": aoi}).json()
    job = server.poll("World", ESTIMATE, est["jobId"])
    assert job["jobStatus"] == "esriJobSucceeded", job
    value = server.get(f"{svc}/estimateExportTilesSize/jobs/{est['jobId']}/results/out_service_url",
                       {"f": "pjson"}).json()["value"]
    # SMA posts the form, with the plain polygon under `polygon`
    poly = '{"rings":[%s],"spatialReference":{"wkid":4326}}' % ring
    sub = server.post(f"{svc}/exportTiles", {"f": "json", "exportBy": "LevelID", "levels": "0-4",
                                             "tilePackage": "true", "polygon": poly}).json()
    job = server.poll("World", EXPORT, sub["jobId"])
    assert job["jobStatus"] == "esriJobSucceeded", job
    folder = server.get(f"{svc}/exportTiles/jobs/{sub['jobId']}/results/out_service_url", {"f": "pjson"}).json()["value"]
    listing = server.get(folder + "/", {"f": "pjson"}).json()
    first = next(f for f in listing["files"] if ".tpk" in f["name"])
    body = server.get(first["url"], {"token": ""}).body
    assert len(body) == first["size"] == value["totalSize"]
    assert 0 < value["totalTilesToExport"] < 123


def test_head_never_submits_or_cancels(server):
    import urllib.error
    import urllib.request

    for path in ("/exportTiles?levels=0&f=json", "/estimateExportTilesSize?levels=0&f=json"):
        req = urllib.request.Request(server.url(server.svc("World") + path), method="HEAD")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 405
    req = urllib.request.Request(server.url(server.svc("World") + "?f=json"), method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200

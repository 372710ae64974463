"""The Administrator Directory on a real server with two front-end processes (issue 14): each of the
four properties edited over HTTP as the Directory and the ArcGIS API for Python post them, seen by
the next request to either process, kept across a restart (over a changed TOML), invalid edits
refused with the Admin error JSON and nothing changed; admin resources need an administrator."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from test_auth_support import admin_get, admin_post, secured_config, sign_in
from test_server_support import Server, free_port

SVC = "services/S.MapServer"
CC = "services/System/CachingControllers.GPServer"


def _rest(srv: Server, token: str) -> dict:
    r = srv.get(srv.svc("S"), {"f": "json", "token": token})
    assert r.status == 200
    return r.json()


def _export_props(srv: Server, token: str) -> dict:
    return admin_get(srv, SVC, token).json()["properties"]


def _edit_service(srv: Server, token: str, **props) -> dict:
    """As `Service.edit`: GET the definition, change properties, POST it back whole as `service`."""
    d = admin_get(srv, SVC, token).json()
    d["properties"].update(props)
    return admin_post(srv, f"{SVC}/edit", token, service=json.dumps(d))


def _edit_caching(srv: Server, token: str, value) -> dict:
    d = admin_get(srv, CC, token).json()
    d["properties"]["maximumOutstandingJobs"] = value
    return admin_post(srv, f"{CC}/edit", token, service=json.dumps(d))


def _all_see(srv: Server, token: str, check, n: int = 24) -> None:
    # new connections each time, 8 at once: both processes accept some of them
    with ThreadPoolExecutor(8) as pool:
        for answer in pool.map(lambda _: _rest(srv, token), range(n)):
            assert check(answer), answer


def test_directory_edits_apply_to_both_processes_persist_and_refuse_bad_values(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = tmp_path / "tilecrate.toml"
    services = {"S": {"source": sample_v2}, "T": {"source": sample_v2, "maxExportTilesCount": 777}}
    secured_config(cfg, data, services)
    srv = Server(cfg, data, free_port(), extra_args=["--processes", "2"])
    try:
        srv.start()
        admin = sign_in(srv, "admin", "/arcgis/admin/generateToken", client="referer", referer="http")
        srv_headers = {"Referer": "http"}  # the Python API binds "http" and sends it on every call
        tok = sign_in(srv, "admin")  # an admin token from the REST token service works here too
        root = admin_get(srv, "", tok).json()
        assert "services" in root["resources"] and "system" in root["resources"]
        listing = admin_get(srv, "services", tok).json()
        assert "System" in listing["folders"]
        assert {(s["serviceName"], s["type"]) for s in listing["services"]} == {("S", "MapServer"), ("T", "MapServer")}
        assert admin_get(srv, "services/System", tok).json()["services"][0]["serviceName"] == "CachingControllers"
        r = srv.get(f"/arcgis/admin/{SVC}", {"f": "json"}, headers={"X-Esri-Authorization": f"Bearer {admin}",
                                                                    **srv_headers})
        assert r.json()["properties"] == {**r.json()["properties"], "exportTilesAllowed": "true",
                                          "maxExportTilesCount": "100000"}

        # 1. exportTilesAllowed
        assert _edit_service(srv, tok, exportTilesAllowed="false") == {"status": "success"}
        _all_see(srv, tok, lambda j: j["exportTilesAllowed"] is False)
        refused = srv.get(f"{srv.svc('S')}/exportTiles", {"f": "json", "levels": "0", "token": tok}).json()
        assert "not allowed" in refused["error"]["message"]
        assert _edit_service(srv, tok, exportTilesAllowed=True) == {"status": "success"}  # a JSON boolean too
        _all_see(srv, tok, lambda j: j["exportTilesAllowed"] is True)

        # 2. maxExportTilesCount: the next job is held to it
        assert _edit_service(srv, tok, maxExportTilesCount="1") == {"status": "success"}
        _all_see(srv, tok, lambda j: j["maxExportTilesCount"] == 1)
        sub = srv.get(f"{srv.svc('S')}/exportTiles", {"f": "json", "levels": "0-2", "tilePackage": "true",
                                                       "token": tok}).json()
        assert "jobId" in sub, sub
        srv.token = tok
        job = srv.poll("S", "exportTiles", sub["jobId"])
        srv.token = None
        assert job["jobStatus"] == "esriJobFailed"
        assert any("exceeds the maximum allowed number of tiles(1)" in m["description"] for m in job["messages"])
        assert _edit_service(srv, tok, maxExportTilesCount=50000) == {"status": "success"}

        # 3. maximumOutstandingJobs: 0 refuses every job, -1 is unlimited
        assert _edit_caching(srv, tok, "0") == {"status": "success"}
        assert admin_get(srv, CC, tok).json()["properties"]["maximumOutstandingJobs"] == "0"
        for _ in range(6):
            r = srv.get(f"{srv.svc('S')}/estimateExportTilesSize", {"f": "json", "levels": "0", "token": tok})
            assert r.status == 503 and "maximumOutstandingJobs is 0" in r.json()["error"]["details"][0], r.body
        assert _edit_caching(srv, tok, -1) == {"status": "success"}
        for _ in range(4):
            r = srv.get(f"{srv.svc('S')}/estimateExportTilesSize", {"f": "json", "levels": "0", "token": tok})
            assert r.status == 200 and "jobId" in r.json(), r.json()
        assert _edit_caching(srv, tok, 500) == {"status": "success"}

        # 4. exportTilesUsingLocalTempFolder: false is accepted; true needs a cluster, refused here
        ok = admin_post(srv, "system/properties/update", tok,
                        properties=json.dumps({"exportTilesUsingLocalTempFolder": False}))
        assert ok == {"status": "success"}
        assert admin_get(srv, "system/properties", tok).json() == {"exportTilesUsingLocalTempFolder": False}

        before = (_export_props(srv, tok), admin_get(srv, CC, tok).json(), admin_get(srv, "system/properties", tok).json())
        d = admin_get(srv, SVC, tok).json()
        bad_service = [
            {**d, "properties": {**d["properties"], "maxExportTilesCount": "lots"}},
            {**d, "properties": {**d["properties"], "maxExportTilesCount": -5}},
            {**d, "properties": {**d["properties"], "maxExportTilesCount": 1.5}},
            {**d, "properties": {**d["properties"], "exportTilesAllowed": "maybe"}},
            {**d, "properties": {**d["properties"], "exportTilesAllowed": 1}},
            {**d, "serviceName": "Other"},
            {**d, "type": "ImageServer"},
            {**d, "properties": "exportTilesAllowed=true"},
        ]
        for bad in bad_service:
            answer = admin_post(srv, f"{SVC}/edit", tok, service=json.dumps(bad))
            assert answer["status"] == "error" and answer["code"] == 400 and answer["messages"], (bad, answer)
        for text in ("", "not json", "[1,2]", '{"properties":' * 5000, "NaN"):
            answer = admin_post(srv, f"{SVC}/edit", tok, service=text)
            assert answer["status"] == "error", answer
        for value in (-2, "1e3", "ten", True, 1 << 40):
            answer = _edit_caching(srv, tok, value)
            assert answer["status"] == "error" and answer["code"] == 400, (value, answer)
        for props in ({"exportTilesUsingLocalTempFolder": True}, {"exportTilesUsingLocalTempFolder": "yes"},
                      {"WebContextURL": "http://x"}, [True]):
            answer = admin_post(srv, "system/properties/update", tok, properties=json.dumps(props))
            assert answer["status"] == "error" and answer["code"] == 400, (props, answer)
        answer = admin_post(srv, f"{SVC}/edit", tok, service=json.dumps(d), runAsync="true")
        assert answer["status"] == "error"
        assert srv.get(f"/arcgis/admin/{SVC}/edit", {"f": "json", "token": tok,
                                                      "service": json.dumps(d)}).json()["status"] == "error"
        assert admin_post(srv, "services/Nope.MapServer/edit", tok, service="{}")["code"] == 404
        after = (_export_props(srv, tok), admin_get(srv, CC, tok).json(), admin_get(srv, "system/properties", tok).json())
        assert after == before

        # who may: nobody without a token, a user's token is not an administrator's, a bad token is 498
        assert admin_get(srv, SVC, None).json()["code"] == 499
        alice = sign_in(srv, "alice")
        assert admin_get(srv, SVC, alice).json()["code"] == 403
        assert admin_post(srv, f"{SVC}/edit", alice, service=json.dumps(d))["code"] == 403
        assert admin_get(srv, SVC, tok[:-2] + ("AA" if not tok.endswith("AA") else "BB")).json()["code"] == 498
        r = srv.post("/arcgis/admin/generateToken", {"username": "alice", "password": "alice-pass", "f": "json"})
        assert r.json()["code"] == 403 and r.json()["status"] == "error"  # the Admin error shape
        assert _export_props(srv, tok)["maxExportTilesCount"] == "50000"
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()

    # a restart keeps every edit, even over a TOML that now says otherwise; T was never edited: TOML wins
    services["S"]["maxExportTilesCount"] = 1234
    services["T"]["maxExportTilesCount"] = 888
    secured_config(cfg, data, services, maximum_outstanding_jobs=3)
    srv = Server(cfg, data, free_port())
    try:
        srv.start()
        tok = sign_in(srv, "admin")
        assert _export_props(srv, tok)["maxExportTilesCount"] == "50000"
        assert _rest(srv, tok)["maxExportTilesCount"] == 50000
        assert admin_get(srv, CC, tok).json()["properties"]["maximumOutstandingJobs"] == "500"
        assert admin_get(srv, "system/properties", tok).json() == {"exportTilesUsingLocalTempFolder": False}
        t = srv.get(f"{srv.base}/arcgis/rest/services/T/MapServer", {"f": "json", "token": tok}).json()
        assert t["maxExportTilesCount"] == 888
    finally:
        srv.stop()


def test_directory_html_forms_post_edits(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = secured_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}})
    srv = Server(cfg, data, free_port())
    try:
        srv.start()
        tok = sign_in(srv, "admin")
        page = srv.get(f"/arcgis/admin/{SVC}", {"token": tok})  # no f: the Directory's HTML page
        text = page.body.decode()
        assert page.headers["Content-Type"].startswith("text/html")
        assert 'name="service"' in text and f"/arcgis/admin/{SVC}/edit" in text and "exportTilesAllowed" in text
        d = admin_get(srv, SVC, tok).json()
        d["properties"]["exportTilesAllowed"] = "false"
        r = srv.post(f"/arcgis/admin/{SVC}/edit", {"service": json.dumps(d), "token": tok, "f": "html"})
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")  # redirected to the page
        assert admin_get(srv, SVC, tok).json()["properties"]["exportTilesAllowed"] == "false"
        for path in ("", "services", "services/System", CC, "system", "system/properties"):
            r = srv.get(f"/arcgis/admin/{path}", {"f": "html", "token": tok})
            assert r.status == 200 and b"<form" in r.body or b"<ul>" in r.body, path
        assert b"<form" in srv.get("/arcgis/admin/generateToken", {"f": "html"}).body
        assert b"<form" in srv.get("/arcgis/tokens/", {}).body
    finally:
        srv.stop()


def test_local_temp_folder_property_reaches_the_cluster_runner(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = secured_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}},
                         extra='\n[cluster]\nscheduler = "local"\nworkers = 1\n')
    srv = Server(cfg, data, free_port())
    try:
        srv.start(timeout=60)
        tok = sign_in(srv, "admin")
        ok = admin_post(srv, "system/properties/update", tok,
                        properties=json.dumps({"exportTilesUsingLocalTempFolder": True}))
        assert ok == {"status": "success"}
        assert admin_get(srv, "system/properties", tok).json() == {"exportTilesUsingLocalTempFolder": True}
        srv.token = tok
        sub = srv.submit("S", "exportTiles", {"levels": "0-1", "tilePackage": "true"})
        job = srv.poll("S", "exportTiles", sub["jobId"], timeout=60)
        assert job["jobStatus"] == "esriJobSucceeded", job
        assert any("local temp folder" in m["description"] for m in job["messages"]), job["messages"]
    finally:
        srv.stop()


def test_vector_tile_service_edits_through_its_admin_url(tmp_path, sample_v2):
    from conftest import real_path

    data = tmp_path / "data"
    cfg = secured_config(tmp_path / "tilecrate.toml", data,
                         {"S": {"source": sample_v2}, "NE": {"source": real_path("natural-earth.vtpk")}})
    srv = Server(cfg, data, free_port())
    try:
        srv.start()
        tok = sign_in(srv, "admin")
        names = {(s["serviceName"], s["type"]) for s in admin_get(srv, "services", tok).json()["services"]}
        assert ("NE", "VectorTileServer") in names
        # the ArcGIS API for Python's mapping: …/rest/services/NE/VectorTileServer → …/admin/services/NE.VectorTileServer
        d = admin_get(srv, "services/NE.VectorTileServer", tok).json()
        assert d["type"] == "VectorTileServer" and d["properties"]["exportTilesAllowed"] == "true"
        assert admin_get(srv, "services/NE.MapServer", tok).json()["code"] == 404
        d["properties"]["exportTilesAllowed"] = False
        assert admin_post(srv, "services/NE.VectorTileServer/edit", tok, service=json.dumps(d)) == {"status": "success"}
        rest = f"{srv.base}/arcgis/rest/services/NE/VectorTileServer"
        assert srv.get(rest, {"f": "json", "token": tok}).json()["exportTilesAllowed"] is False
        refused = srv.get(f"{rest}/exportTiles", {"f": "json", "levels": "0", "token": tok}).json()
        assert refused["error"]["code"] == 400 and "not allowed" in json.dumps(refused).lower()
        assert srv.get(srv.svc("S"), {"f": "json", "token": tok}).json()["exportTilesAllowed"] is True
    finally:
        srv.stop()

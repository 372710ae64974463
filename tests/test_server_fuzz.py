"""Hostile parameters to every operation of a real server: only 2xx/4xx answers, JSON where JSON is due."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server_support import Server, free_port, write_config

HOSTILE = ["", " ", "0", "0-2", "1,3", "DEFAULT", "default", "null", "None", "[]", "{}", "[[[]]]", "-1", "0-99999999999",
           "99999999999999999999", "1e308", "-1e308", "NaN", "inf", "0--1", "5-0", "0-23", "1,,2", "../../etc/passwd",
           "..%2F..%2F", "\x00", "%00", "true", "FALSE", "True", "tpkx", "tpk", "CompactV2", "Scale", "resolution",
           '{"xmin":1e400,"ymin":0,"xmax":1,"ymax":1}', '{"xmin":"a"}', '{"rings":[[[0,0],[1,1]]]}',
           '{"rings":[[[0,0],[1e308,0],[1e308,1e308],[0,0]]],"spatialReference":{"wkid":4326}}',
           '{"features":[{"geometry":{"rings":"x"}}]}', '{"type":"Polygon","coordinates":[[[0,0],[1,0],[0,0]]]}',
           '{"spatialReference":{"wkid":999999}}', "-20037508,-20037508,20037508,20037508", "1,2,3",
           "<script>alert(1)</script>", "j" + "0" * 32 + "_et", "ééé", "\u202e", "A" * 3000]
NAMES = ["f", "levels", "exportBy", "exportExtent", "areaOfInterest", "polygon", "tilePackage", "storageFormatType",
         "storageFormat", "optimizeTilesForSize", "compressionQuality", "aoiSR", "token", "LEVELS", "x"]
OPS = ["exportTiles", "estimateExportTilesSize", "exportTiles/submitJob", "jobs/{job}", "exportTiles/jobs/{job}",
       "estimateExportTilesSize/jobs/{job}", "jobs/{job}/cancel", "exportTiles/jobs/{job}/results/{seg}",
       "jobs/{job}/inputs/{seg}", "tile/{seg}/{seg}/{seg}", "tilemap/{seg}/{seg}/{seg}/{seg}/{seg}", "", "0",
       "layers", "{seg}", "jobs/{seg}"]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
value = st.one_of(st.sampled_from(HOSTILE), text, st.integers().map(str), st.floats().map(str))
segment = st.one_of(st.sampled_from(["0", "1", "3", "-1", "99999999999999", "x", "%2e%2e", "out_service_url",
                                     "levels", "1e3"]), st.text("abc019_-.", min_size=1, max_size=12))


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("fuzzserver")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {"World": {"source": sample_v2},
                                                       "Limited": {"source": sample_v2, "maxExportTilesCount": 10}})
    srv = Server(cfg, data, free_port()).start()
    # a real finished job, so job URLs are exercised on an existing id as well
    job = srv.submit("World", "exportTiles", {"levels": "0", "tilePackage": "true"})
    srv.poll("World", "exportTiles", job["jobId"])
    srv.real_job = job["jobId"]
    yield srv
    srv.stop()


def check(reply, expect_json: bool) -> None:
    assert 200 <= reply.status < 500, (reply.status, reply.body[:300])
    ctype = reply.headers.get("Content-Type", "")
    if ctype.startswith("application/json"):
        obj = reply.json()
        if "error" in obj:
            err = obj["error"]
            assert isinstance(err["code"], int) and isinstance(err["message"], str)
            assert isinstance(err["details"], list)
    else:
        assert not expect_json or reply.status == 200 and ctype.startswith(("image/", "application/octet-stream")), \
            (reply.status, ctype, reply.body[:200])


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from(OPS), service=st.sampled_from(["World", "Limited", "Nope", "w%20x"]),
       params=st.dictionaries(st.sampled_from(NAMES), value, max_size=7),
       fmt=st.sampled_from(["json", "pjson", "JSON", "", "html", "kml", None]),
       seg=segment, use_real_job=st.booleans(), method=st.sampled_from(["GET", "POST"]))
def test_every_operation_answers_2xx_or_4xx(server, op, service, params, fmt, seg, use_real_job, method):
    job = server.real_job if use_real_job else seg
    path = f"/arcgis/rest/services/{service}/MapServer/" + op.format(job=job, seg=seg)
    reply, wants_json = send(server, path, params, fmt, method)
    check(reply, expect_json=wants_json)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.lists(segment, max_size=4), fmt=st.sampled_from(["json", "pjson", None]))
def test_directories_answer_2xx_or_4xx(server, path, fmt):
    reply = server.get("/arcgis/rest/directories/arcgisoutput/" + "/".join(path), {"f": fmt} if fmt else None)
    check(reply, expect_json=True)


def test_nothing_crashed(server):
    """After the hostile requests: the server still works and logged no unexpected error."""
    assert_log_clean(server)


def send(server, path: str, params: dict, fmt: str | None, method: str):
    """GET or POST drawn parameters (and f=fmt unless None) to `path`: the reply, and whether JSON was asked for."""
    params = dict(params)
    if fmt is not None:
        params["f"] = fmt
    reply = server.get(path, params) if method == "GET" else server.post(path, params)
    return reply, (params.get("f") or "").lower() in ("json", "pjson")


def assert_log_clean(server) -> None:
    """Once the log stops growing (the jobs the fuzzing submitted are done; 20 s at most): the server still
    answers and logged no unexpected error."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:   # let the jobs the fuzzing submitted finish
        log = server.log.read_text()
        r = server.get("/arcgis/rest/services", {"f": "json"})
        assert r.status == 200
        time.sleep(0.2)
        if server.log.read_text() == log:
            break
    log = server.log.read_text()
    assert "unexpected error answering" not in log and "failed unexpectedly" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

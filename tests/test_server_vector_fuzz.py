"""Hostile parameters and paths to every VectorTileServer and ImageServer route of a real server (as
tests/test_server_fuzz.py does for MapServer): only 2xx/4xx answers, Esri error JSON where JSON is due,
and nothing unexpected in the server log."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import real_path
from test_server_fuzz import HOSTILE, NAMES, assert_log_clean, segment, send, value
from test_server_support import free_port, write_config
from test_server_vector import TypedServer
from tilecrate.sample import SampleSpec, make_sample

COMMON = ["exportTiles", "estimateExportTilesSize", "exportTiles/submitJob", "jobs/{job}", "exportTiles/jobs/{job}",
          "estimateExportTilesSize/jobs/{job}", "jobs/{job}/cancel", "exportTiles/jobs/{job}/results/{seg}",
          "jobs/{job}/inputs/{seg}", "tilemap/{seg}/{seg}/{seg}/{seg}/{seg}", "", "{seg}", "jobs/{seg}"]
VECTOR = COMMON + ["tile/{seg}/{seg}/{seg}.pbf", "tile/{seg}/{seg}/{seg}", "tilemap", "resources/styles",
                   "resources/styles/root.json", "resources/info", "resources/fonts/{seg}/{seg}.pbf",
                   "resources/fonts/{text}/0-255.pbf", "resources/sprites/{seg}", "resources/sprites/sprite{seg}",
                   "resources/{seg}"]
IMAGE = COMMON + ["tile/{seg}/{seg}/{seg}"]
BYTES = ("application/x-protobuf", "application/octet-stream", "image/")
path_text = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/?#%"), min_size=1,
                    max_size=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_dir):
    root = tmp_path_factory.mktemp("fuzzkinds")
    elev = make_sample(root / "elevation", SampleSpec(levels=(0, 1, 2), tile_format="LERC"))
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {
        "NE": {"source": real_path("natural-earth.vtpk")},
        "Small": {"source": real_path("natural-earth.vtpk"), "maxExportTilesCount": 3},
        "Elev": {"source": elev},
    })
    srv = TypedServer(cfg, data, free_port(), kinds={"NE": "VectorTileServer", "Small": "VectorTileServer",
                                                     "Elev": "ImageServer"}).start()
    srv.real_jobs = {}
    for name in ("NE", "Elev"):
        job = srv.submit(name, "exportTiles", {"levels": "0", "tilePackage": "true"})
        srv.poll(name, "exportTiles", job["jobId"])
        srv.real_jobs[name] = job["jobId"]
    yield srv
    srv.stop()


def check(reply, expect_json: bool) -> None:
    assert 200 <= reply.status < 500, (reply.status, reply.body[:300])
    ctype = reply.headers.get("Content-Type", "")
    if ctype.startswith("application/json"):
        obj = reply.json()
        if isinstance(obj, dict) and "error" in obj:
            err = obj["error"]
            assert isinstance(err["code"], int) and isinstance(err["message"], str)
            assert isinstance(err["details"], list)
    else:
        assert not expect_json or reply.status == 200 and ctype.startswith(BYTES) or ctype.startswith("text/html"), \
            (reply.status, ctype, reply.body[:200])


def _request(server, kind, op, service, params, fmt, seg, text, use_real_job, method):
    job = server.real_jobs.get(service, seg) if use_real_job else seg
    from urllib.parse import quote

    path = f"/arcgis/rest/services/{service}/{kind}/" + op.format(job=job, seg=quote(seg), text=quote(text))
    reply, wants_json = send(server, path, params, fmt, method)
    check(reply, expect_json=wants_json)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from(VECTOR), service=st.sampled_from(["NE", "Small", "Elev", "Nope"]),
       params=st.dictionaries(st.sampled_from(NAMES), value, max_size=7),
       fmt=st.sampled_from(["json", "pjson", "", "html", "kml", None]), seg=segment, text=path_text,
       use_real_job=st.booleans(), method=st.sampled_from(["GET", "POST"]))
def test_vector_routes_answer_2xx_or_4xx(server, op, service, params, fmt, seg, text, use_real_job, method):
    _request(server, "VectorTileServer", op, service, params, fmt, seg, text, use_real_job, method)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(op=st.sampled_from(IMAGE), service=st.sampled_from(["Elev", "NE", "Nope"]),
       params=st.dictionaries(st.sampled_from(NAMES + ["blankTile"]), value, max_size=7),
       fmt=st.sampled_from(["json", "pjson", "", "html", None]), seg=segment, text=path_text,
       use_real_job=st.booleans(), method=st.sampled_from(["GET", "POST"]))
def test_image_routes_answer_2xx_or_4xx(server, op, service, params, fmt, seg, text, use_real_job, method):
    _request(server, "ImageServer", op, service, params, fmt, seg, text, use_real_job, method)


@pytest.mark.parametrize("levels", HOSTILE[:30])
def test_hostile_levels_on_both_kinds(server, levels):
    for name in ("NE", "Elev"):
        r = server.get(f"{server.svc(name)}/exportTiles", {"f": "json", "levels": levels, "exportBy": "Resolution"})
        check(r, expect_json=True)


def test_head_never_submits(server):
    import urllib.request

    for name in ("NE", "Elev"):
        req = urllib.request.Request(f"{server.svc(name)}/exportTiles?f=json&levels=0", method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        assert status == 405, name


def test_operation_pages_in_a_browser(server):
    """The bare operation URL with f=html (a person clicking through) answers a page, not an error."""
    for name in ("NE", "Elev"):
        for op in ("exportTiles", "estimateExportTilesSize/submitJob"):
            r = server.get(f"{server.svc(name)}/{op}", {"f": "html"})
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html"), (name, op, r.body[:300])
            job = server.real_jobs[name]
            r = server.get(f"{server.svc(name)}/jobs/{job}", {"f": "html"})
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html"), (name, r.body[:300])


def test_nothing_crashed(server):
    assert_log_clean(server)

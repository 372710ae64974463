"""Hostile requests to the admin and token routes of a real secured server (issue 14): only 2xx/4xx
answers, JSON in an Esri or Admin error shape where JSON is due, no traceback, and no change of
state (the settings store's version does not move; the administrator's values read the same)."""
from __future__ import annotations

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_auth_support import admin_get, secured_config, sign_in
from test_server_fuzz import HOSTILE
from test_server_support import Server, free_port

PATHS = ["/arcgis/admin", "/arcgis/admin/", "/arcgis/admin/generateToken", "/arcgis/admin/services",
         "/arcgis/admin/services/System", "/arcgis/admin/services/S.MapServer", "/arcgis/admin/services/S.MapServer/edit",
         "/arcgis/admin/services/S.ImageServer/edit", "/arcgis/admin/services/..%2FS.MapServer/edit",
         "/arcgis/admin/services/System/CachingControllers.GPServer",
         "/arcgis/admin/services/System/CachingControllers.GPServer/edit", "/arcgis/admin/system",
         "/arcgis/admin/system/properties", "/arcgis/admin/system/properties/update", "/arcgis/admin/services/{seg}",
         "/arcgis/admin/services/{seg}/edit", "/arcgis/admin/{seg}", "/arcgis/tokens", "/arcgis/tokens/",
         "/arcgis/tokens/generateToken", "/arcgis/rest/info", "/arcgis/rest/services/S/MapServer"]
NAMES = ["f", "token", "Token", "username", "password", "client", "referer", "referrer", "ip", "expiration",
         "service", "properties", "runAsync", "request", "serviceDefinition"]
EDITS = ['{"serviceName":"S","type":"MapServer","properties":{"maxExportTilesCount":"x"}}',
         '{"properties":{"exportTilesAllowed":"perhaps"}}', '{"properties":{"maximumOutstandingJobs":-7}}',
         '{"exportTilesUsingLocalTempFolder":"yes"}', '{"serviceName":"Evil"}', '[' * 3000, '{"a":' * 100]

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
value = st.one_of(st.sampled_from(HOSTILE + EDITS + ["alice", "admin", "referer", "requestip", "ip", "html"]), text,
                  st.integers().map(str))
segment = st.one_of(st.sampled_from(["S.MapServer", "S", "System", "x.y.z", "%2e%2e", "CachingControllers.GPServer"]),
                    st.text("abcS019_-.", min_size=1, max_size=12))


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("authfuzz")
    data = root / "data"
    cfg = secured_config(root / "tilecrate.toml", data, {"S": {"source": sample_v2}},
                         auth={"max_failed_signins": 1000, "signin_window": 60})
    srv = Server(cfg, data, free_port()).start()
    srv.tokens = {"alice": sign_in(srv, "alice"), "admin": sign_in(srv, "admin")}
    yield srv
    srv.stop()


def _state(srv: Server) -> tuple:
    env = lmdb.open(str(srv.data_dir / "site.lmdb"), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        raw = txn.get(b"version")
    env.close()
    tok = srv.tokens["admin"]
    return (bytes(raw), admin_get(srv, "services/S.MapServer", tok).json(),
            admin_get(srv, "services/System/CachingControllers.GPServer", tok).json(),
            admin_get(srv, "system/properties", tok).json())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), seg=segment, post=st.booleans(),
       who=st.sampled_from([None, "alice", "admin", "garbage", "tampered"]),
       params=st.dictionaries(st.sampled_from(NAMES), value, max_size=5))
def test_hostile_admin_and_token_requests(server, path, seg, post, who, params):
    srv = server
    before = getattr(srv, "state", None) or _state(srv)
    srv.state = before
    if who == "admin":
        post = False  # an administrator's POST may legitimately change settings; GETs must never
    url = path.replace("{seg}", seg)
    headers = {}
    if who in ("alice", "admin"):
        headers["X-Esri-Authorization"] = f"Bearer {srv.tokens[who]}"
    elif who == "tampered":
        t = srv.tokens["admin"]
        params = {**params, "token": t[:-4] + "AAAA"}
    elif who == "garbage":
        headers["X-Esri-Authorization"] = "Bearer " + "é" * 3
    r = srv.post(url, params, headers=headers) if post else srv.get(url, params, headers=headers)
    assert 200 <= r.status < 500 or r.status == 503, (r.status, r.body[:300])
    assert b"Traceback" not in r.body
    if r.headers.get("Content-Type", "").startswith("application/json"):
        body = r.json()
        if "error" in body:
            assert isinstance(body["error"]["code"], int) and isinstance(body["error"]["details"], list)
        elif body.get("status") == "error":
            assert isinstance(body["code"], int) and body["messages"]
    assert _state(srv) == before


def test_fuzzed_server_logged_no_traceback(server):
    assert "Traceback" not in server.log.read_text()

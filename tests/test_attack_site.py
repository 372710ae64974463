"""Attacks on a secured site's tokens and Administrator Directory (a real server process): admin
edits sent as GET links with a valid administrator token (a cross-site request through an <img>
or a link needs no form), a non-administrator's edits, megabyte usernames, passwords, tokens and
referers (scrypt cost, sign-in count keys), a token replayed with another referer and on the other
front-end process. Each must be refused with an Esri or Admin error, quickly, with no change of
state and nothing grown by the hostile sizes."""
from __future__ import annotations

import json
import os
import time

import lmdb
import pytest

from test_auth_support import PASSWORDS, secured_config, sign_in
from test_server_support import Server, free_port

SVC = "services/S.MapServer"


@pytest.fixture(scope="module")
def site(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("attacksite")
    data = root / "data"
    cfg = secured_config(root / "tilecrate.toml", data, {"S": {"source": sample_v2, "export": ["alice"]}},
                         auth={"max_failed_signins": 1000, "signin_window": 60})
    srv = Server(cfg, data, free_port(), extra_args=["--processes", "2"]).start()
    srv.admin = sign_in(srv, "admin")
    srv.alice = sign_in(srv, "alice")
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text()


def _version(srv: Server) -> bytes:
    env = lmdb.open(str(srv.data_dir / "site.lmdb"), readonly=True, lock=False, subdir=True)
    try:
        with env.begin() as txn:
            return bytes(txn.get(b"version") or b"")
    finally:
        env.close()


def _definition(srv: Server) -> dict:
    return srv.get(f"/arcgis/admin/{SVC}", {"f": "json", "token": srv.admin}).json()


def _refused(r) -> bool:
    """An Admin error ({"status": "error"}), an Esri error, or an HTTP error status."""
    if r.status >= 400:
        return True
    body = r.json()
    return body.get("status") == "error" or "error" in body


def test_edits_by_get_or_by_a_non_administrator_change_nothing(site):
    srv = site
    before, version = _definition(srv), _version(srv)
    d = dict(before)
    d["properties"] = {**d["properties"], "exportTilesAllowed": "false", "maxExportTilesCount": "1"}
    edit = {"service": json.dumps(d), "f": "json"}
    for who in (srv.admin, srv.alice):
        # a link or an <img> on another site can make a browser GET this with the token in the URL
        r = srv.get(f"/arcgis/admin/{SVC}/edit", {**edit, "token": who})
        assert _refused(r), r.body[:300]
        r = srv.get("/arcgis/admin/system/properties/update", {"properties": '{"x": "1"}', "f": "json",
                                                                 "token": who})
        assert _refused(r), r.body[:300]
    for who in (srv.alice, srv.alice + "x", None):
        r = srv.post(f"/arcgis/admin/{SVC}/edit", {**edit, **({"token": who} if who else {})})
        assert _refused(r), r.body[:300]
    assert _version(srv) == version and _definition(srv) == before
    assert srv.get(f"{srv.svc('S')}", {"f": "json", "token": srv.alice}).json()["exportTilesAllowed"] is True


def test_megabyte_credentials_are_cheap_to_refuse(site):
    """A long password must not reach scrypt (its cost grows with the input's PBKDF2 pass), a long
    username must not become a sign-in count key of that size, a long token or referer is refused
    before any signature check."""
    srv = site
    counts = srv.data_dir / "signins.lmdb"
    size0 = sum(f.stat().st_size for f in counts.iterdir()) if counts.is_dir() else counts.stat().st_size
    big = "p" * (1 << 20)
    t = time.monotonic()
    for fields in ({"username": "alice", "password": big}, {"username": "u" * (1 << 20), "password": "x"},
                   {"username": "alice", "password": PASSWORDS["alice"], "referer": big, "client": "referer"},
                   {"username": "alice", "password": PASSWORDS["alice"], "expiration": "9" * 5000}):
        r = srv.post("/arcgis/tokens/generateToken", {**fields, "f": "json"})
        answer = r.json()
        if "token" in answer:                   # a huge expiration is capped, not refused
            assert fields.get("expiration") and answer["expires"] < (time.time() + 400 * 86400) * 1000
        else:
            assert answer["error"]["code"] in (400, 429), answer
    mid = len(srv.alice) // 2       # a middle character carries 6 bits of the signed bytes (the last may not)
    tampered = srv.alice[:mid] + ("A" if srv.alice[mid] != "A" else "B") + srv.alice[mid + 1:]
    for token in (big, srv.alice * 200, tampered):
        r = srv.get(srv.svc("S"), {"f": "json"}, headers={"Authorization": f"Bearer {token}"}) \
            if len(token) < 60000 else srv.post(srv.svc("S"), {"f": "json", "token": token})
        assert r.json()["error"]["code"] in (498, 499, 400), r.body[:300]
    assert time.monotonic() - t < 10
    size1 = sum(f.stat().st_size for f in counts.iterdir()) if counts.is_dir() else counts.stat().st_size
    assert size1 - size0 < 256 << 10, (size0, size1)


def test_a_bound_token_replayed_on_either_process(site):
    """A token bound to a referer works with it on both front-end processes (fresh connections are
    spread over them), and with another referer or none on neither. Before: bound to
    https://app.example, it was accepted from https://app.example.evil/ (a bare prefix match)."""
    srv = site
    bound = sign_in(srv, "alice", client="referer", referer="https://app.example")
    for _ in range(12):
        ok = srv.get(srv.svc("S"), {"f": "json", "token": bound}, headers={"Referer": "https://app.example/x"})
        assert "tileInfo" in ok.json()
        for headers in ({}, {"Referer": "https://app.example.evil/x"}, {"Referer": "https://app.example:8443/"},
                        {"Referer": "https://evil/https://app.example"}):
            r = srv.get(srv.svc("S"), {"f": "json", "token": bound}, headers=headers)
            assert r.json().get("error", {}).get("code") == 498, (headers, r.body[:200])

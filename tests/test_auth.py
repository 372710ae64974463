"""Users and tokens on a real server (issue 14): rest/info → the token service → a token on every
request; expired, tampered, foreign-bound tokens get 498, missing ones 499; per-service view/export
lists; jobs answer only their owner and administrators (status, messages, inputs, results,
download, cancel, the output listing); a burst of wrong passwords is refused; tokens are never
stored in job records; the shared static token keeps working."""
from __future__ import annotations

import json
import time

import lmdb
import pytest

from test_auth_support import PASSWORDS, bearer, secured_config, sign_in
from test_server_support import Server, free_port

from tilecrate.admin.tokens import TokenSigner

EXPORT = "exportTiles"


@pytest.fixture(scope="module")
def site(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("authsite")
    data = root / "data"
    services = {"S": {"source": sample_v2},
                "Private": {"source": sample_v2, "view": ["alice"], "export": ["role:administrator"]},
                "Open": {"source": sample_v2, "view": ["*"], "export": ["role:publisher"]}}
    cfg = secured_config(root / "tilecrate.toml", data, services,
                         auth={"max_failed_signins": 3, "signin_window": 3, "max_token_expiration": 120},
                         token="shared-static-token")
    srv = Server(cfg, data, free_port(), token="shared-static-token").start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text()


def _error(r) -> int:
    body = r.json()
    return body["error"]["code"] if "error" in body else 0


def test_sign_in_through_rest_info_and_use_the_token(site):
    srv = site
    info = srv.get("/arcgis/rest/info", {"f": "json"}).json()  # no token needed here
    auth = info["authInfo"]
    assert auth["isTokenBasedSecurity"] is True and auth["shortLivedTokenValidity"] == 60
    url = auth["tokenServicesUrl"]
    assert url == f"{srv.base}/arcgis/tokens/"
    # the JS API posts to that URL itself: no client, no referer
    before = time.time() * 1000
    r = srv.post(url, {"request": "getToken", "username": "alice", "password": PASSWORDS["alice"],
                       "expiration": "100000", "f": "json"})
    body = r.json()
    assert set(body) == {"token", "expires", "ssl"} and body["ssl"] is False
    assert before + 119 * 60000 <= body["expires"] <= time.time() * 1000 + 120 * 60000  # capped at 120 minutes
    tok = body["token"]
    # without a token: 499 in the body (HTTP 200) for JSON, 401 for a tile; with it: the resource
    r = srv.get(srv.svc("S"), {"f": "json"})
    assert r.status == 200 and _error(r) == 499 and r.json()["error"]["message"] == "Token Required"
    assert srv.get(f"{srv.svc('S')}/tile/0/0/0").status == 401
    assert srv.get(srv.svc("S"), {"f": "json"}, headers=bearer(tok)).json()["tileInfo"]
    assert srv.get(srv.svc("S"), {"f": "json", "token": tok}).json()["tileInfo"]
    assert srv.post(srv.svc("S"), {"f": "json", "Token": tok}).json()["tileInfo"]
    assert srv.get(f"{srv.svc('S')}/tile/0/0/0", {"token": tok}).status in (200, 404)
    # an invalid token is 498 wherever it is sent, also on public services
    tampered = tok[:-3] + ("AAA" if not tok.endswith("AAA") else "BBB")
    for t in (tampered, "x", "a.b", tok + "x", "é" * 10, "A" * 5000):
        r = srv.get(srv.svc("S"), {"f": "json", "token": t})
        assert _error(r) == 498 and r.json()["error"]["message"] == "Invalid Token", (t[:20], r.json())
    assert srv.get(f"{srv.svc('Open')}/tile/0/0/0", {"token": tampered}).status == 401
    # the generateToken answer for a wrong password, an unknown user and a GET
    r = srv.post(url, {"username": "alice", "password": "nope", "f": "json"})
    assert r.json()["error"]["details"] == ["Invalid username or password."]
    r = srv.get(url + "generateToken", {"username": "alice", "password": PASSWORDS["alice"], "f": "json"})
    assert "token" not in r.json() and "POST" in r.json()["error"]["details"][0]


def test_expired_and_foreign_tokens_are_498(site):
    srv = site
    # a token the server itself would have signed, but expired: made with the store's secret
    env = lmdb.open(str(srv.data_dir / "site.lmdb"), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        secret = bytes(txn.get(b"secret"))
    env.close()
    signer = TokenSigner(secret)
    hashes = _hashes(srv)
    fp = signer.fingerprint("alice", hashes["alice"])
    expired = signer.issue("alice", fp, int(time.time() * 1000) - 1000)
    live = signer.issue("alice", fp, int(time.time() * 1000) + 60000)
    assert srv.get(srv.svc("S"), {"f": "json", "token": live}).json()["tileInfo"]
    assert _error(srv.get(srv.svc("S"), {"f": "json", "token": expired})) == 498
    stale = signer.issue("alice", signer.fingerprint("alice", "an older hash"), int(time.time() * 1000) + 60000)
    assert _error(srv.get(srv.svc("S"), {"f": "json", "token": stale})) == 498  # the password changed since
    ghost = signer.issue("mallory", fp, int(time.time() * 1000) + 60000)
    assert _error(srv.get(srv.svc("S"), {"f": "json", "token": ghost})) == 498
    # bound to a referer: good with it (by prefix, as browsers send page URLs), 498 without
    bound = sign_in(srv, "alice", client="referer", referer="http://app.example")
    assert srv.get(srv.svc("S"), {"f": "json", "token": bound},
                   headers={"Referer": "http://app.example/page.html"}).json()["tileInfo"]
    assert _error(srv.get(srv.svc("S"), {"f": "json", "token": bound})) == 498
    assert _error(srv.get(srv.svc("S"), {"f": "json", "token": bound}, headers={"Referer": "http://evil"})) == 498
    ip_bound = sign_in(srv, "alice", client="requestip")
    assert srv.get(srv.svc("S"), {"f": "json", "token": ip_bound}).json()["tileInfo"]
    other_ip = sign_in(srv, "alice", client="ip", ip="10.9.8.7")
    assert _error(srv.get(srv.svc("S"), {"f": "json", "token": other_ip})) == 498


def _hashes(srv: Server) -> dict:
    import tomllib

    return {n: t["password_hash"] for n, t in tomllib.loads(srv.config.read_text())["users"].items()}


def test_service_permissions(site):
    srv = site
    alice, bob, admin = (sign_in(srv, u) for u in ("alice", "bob", "admin"))
    # Private: alice may view, only administrators may export
    assert srv.get(srv.svc("Private"), {"f": "json", "token": alice}).json()["tileInfo"]
    assert _error(srv.get(srv.svc("Private"), {"f": "json", "token": bob})) == 403
    assert srv.get(f"{srv.svc('Private')}/tile/0/0/0", {"token": bob}).status == 403
    assert _error(srv.get(f"{srv.svc('Private')}/{EXPORT}", {"f": "json", "levels": "0", "token": alice})) == 403
    assert "jobId" in srv.get(f"{srv.svc('Private')}/{EXPORT}", {"f": "json", "levels": "0", "token": admin}).json()
    # Open: anyone may view without a token, only publishers export; a missing token is 499 there
    assert srv.get(srv.svc("Open"), {"f": "json"}).json()["tileInfo"]
    assert srv.get(f"{srv.svc('Open')}/tile/0/0/0").status in (200, 404)
    assert _error(srv.get(f"{srv.svc('Open')}/{EXPORT}", {"f": "json", "levels": "0"})) == 499
    assert _error(srv.get(f"{srv.svc('Open')}/{EXPORT}", {"f": "json", "levels": "0", "token": alice})) == 403
    assert "jobId" in srv.get(f"{srv.svc('Open')}/{EXPORT}", {"f": "json", "levels": "0", "token": bob}).json()
    # the directory lists what each may view
    def listed(token):
        return {s["name"] for s in srv.get("/arcgis/rest/services", {"f": "json", **token}).json()["services"]}
    assert listed({}) == {"Open"} and listed({"token": bob}) == {"Open", "S"}
    assert listed({"token": alice}) == listed({"token": admin}) == {"Open", "S", "Private"}
    # the shared static token works as before users existed
    assert srv.get(srv.svc("Private"), {"f": "json", "token": "shared-static-token"}).json()["tileInfo"]


def test_jobs_answer_only_their_owner_and_administrators(site):
    srv = site
    alice, bob, admin = (sign_in(srv, u) for u in ("alice", "bob", "admin"))
    job_id = srv.post(f"{srv.svc('S')}/{EXPORT}", {"f": "json", "levels": "0-1", "tilePackage": "true",
                                                    "token": alice}).json()["jobId"]
    srv.token = alice
    job = srv.poll("S", EXPORT, job_id)
    assert job["jobStatus"] == "esriJobSucceeded"
    folder = srv.result("S", EXPORT, job)
    listing, _ = srv.download_all(folder, srv.data_dir.parent)
    file_url = listing["files"][0]["url"]
    assert "token" not in file_url and alice not in folder
    srv.token = None
    job_url = f"{srv.svc('S')}/{EXPORT}/jobs/{job_id}"
    never = f"{srv.svc('S')}/{EXPORT}/jobs/j{'0' * 32}_et"
    for suffix in ("", "/results/out_service_url", "/inputs/levels", "/cancel"):
        mine = srv.get(job_url + suffix, {"f": "json", "token": alice}).json()
        assert "error" not in mine or suffix == "/cancel", mine
        theirs = srv.get(job_url + suffix, {"f": "json", "token": bob}).json()
        missing = srv.get(never + suffix, {"f": "json", "token": bob}).json()
        assert theirs["error"]["message"] == missing["error"]["message"] == "Invalid URL", (suffix, theirs)
        assert theirs["error"]["details"][0].replace(job_id, "J") == missing["error"]["details"][0].replace(
            f"j{'0' * 32}_et", "J")  # the same answer as an id that never existed
        assert "error" not in srv.get(job_url + suffix, {"f": "json", "token": admin}).json() or suffix == "/cancel"
    assert srv.get(f"{srv.svc('S')}/jobs/{job_id}", {"f": "json", "token": bob}).json()["error"]["code"] == 400
    assert srv.get(file_url, {"token": bob}).status == 404
    assert srv.get(file_url).status == 401  # no token at all
    assert srv.get(folder, {"token": bob}).status == 404
    assert srv.get(file_url, {"token": alice}).status == 200
    assert srv.get(file_url, {"token": admin}).status == 200
    # the listing of the service folder shows alice's job folder to alice and administrators only
    base = f"{srv.base}/arcgis/rest/directories/arcgisoutput"
    assert job_id in srv.get(base + "/S_MapServer", {"f": "json", "token": alice}).json()["folders"]
    assert job_id in srv.get(base + "/S_MapServer", {"f": "json", "token": admin}).json()["folders"]
    assert job_id not in json.dumps(srv.get(base + "/S_MapServer", {"f": "json", "token": bob}).json())
    assert job_id not in json.dumps(srv.get(base + "/S_MapServer", {"f": "json"}).json())
    # bob cannot cancel alice's running job; alice can
    running = srv.post(f"{srv.svc('S')}/{EXPORT}", {"f": "json", "levels": "0-6", "tilePackage": "true",
                                                     "token": alice}).json()["jobId"]
    r = srv.post(f"{srv.svc('S')}/{EXPORT}/jobs/{running}/cancel", {"f": "json", "token": bob}).json()
    assert r["error"]["message"] == "Invalid URL"
    status = srv.get(f"{srv.svc('S')}/{EXPORT}/jobs/{running}", {"f": "json", "token": alice}).json()["jobStatus"]
    assert status != "esriJobCancelled"
    # tokens are kept out of job records: the job store's bytes hold none of them
    raw = b"".join(p.read_bytes() for p in (srv.data_dir / "jobs.lmdb").glob("*.mdb"))
    for tok in (alice, bob, admin):
        assert tok.encode() not in raw and tok.split(".")[1].encode() not in raw
    assert b"user:alice" in raw


def test_a_burst_of_wrong_passwords_is_refused(site):
    srv = site
    url = "/arcgis/tokens/generateToken"
    time.sleep(3.2)  # failures of the other tests from this address leave the 3 s window
    answers = [srv.post(url, {"username": "bob", "password": f"guess{i}", "f": "json"}).json() for i in range(8)]
    details = [a["error"]["details"][0] for a in answers]
    assert details[:3] == ["Invalid username or password."] * 3
    assert all(d.startswith("Too many failed sign-ins") for d in details[3:]), details
    # the right password is refused too while the lockout lasts (a guess cannot get through)
    r = srv.post(url, {"username": "bob", "password": PASSWORDS["bob"], "f": "json"})
    assert r.json()["error"]["details"][0].startswith("Too many failed sign-ins")
    assert int(r.headers["Retry-After"]) >= 1
    time.sleep(3.2)
    assert "token" in srv.post(url, {"username": "bob", "password": PASSWORDS["bob"], "f": "json"}).json()

"""Job pages, output folders and download links of VectorTileServer and ImageServer jobs (issue 13):
real `tilecrate serve` processes; every link of an f=html job page followed; outputs under
`<service>_<type>` as ArcGIS names them (jobs stored under the old `_MapServer` name stay
downloadable); on a secured site the html page's download link carries the page's own token, JSON
answers never do."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import real_path
from test_auth_support import bearer, secured_config, sign_in
from test_server_support import Reply, Server, free_port, write_config

from tilecrate.jobs.model import EXPORT, SUCCEEDED, Job, new_job_id
from tilecrate.jobs.store import JobStore
from tilecrate.sample import SampleSpec, make_sample

ROOT = "/arcgis/rest"
OUT = f"{ROOT}/directories/arcgisoutput"
ENDED = ("esriJobSucceeded", "esriJobFailed", "esriJobCancelled")
KINDS = {"NE": "VectorTileServer", "Hidden": "VectorTileServer", "Elev": "ImageServer", "Map": "MapServer"}


class _Links(HTMLParser):
    """Every href, src and form action of a page."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (attribute, url)
        self.forms: list[tuple[str, str]] = []  # (method, action)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("href", "src"):
            if a.get(name):
                self.links.append((name, a[name]))
        if tag == "form":
            self.forms.append(((a.get("method") or "get").lower(), a.get("action") or ""))


def links_of(body: bytes) -> _Links:
    """The links of an HTML page."""
    p = _Links()
    p.feed(body.decode())
    return p


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def no_follow(url: str, data: dict | None = None) -> Reply:
    """GET (or POST a form) without following a redirect."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body)
    try:
        with _OPENER.open(req, timeout=30) as resp:
            return Reply(resp.status, dict(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, dict(e.headers.items()), e.read())


def svc_url(srv: Server, name: str) -> str:
    """A service's URL under its own type."""
    return f"{srv.base}{ROOT}/services/{name}/{KINDS.get(name, 'MapServer')}"


def submit(srv: Server, name: str, params: dict, token: str | None = None) -> str:
    """exportTiles / estimate with f=json; the job id."""
    op = params.pop("op", "exportTiles")
    r = srv.get(f"{svc_url(srv, name)}/{op}", {"f": "json", **params, **({"token": token} if token else {})})
    body = r.json()
    assert "jobId" in body, body
    return body["jobId"]


def wait(srv: Server, name: str, job_id: str, token: str | None = None, timeout: float = 60) -> dict:
    """Poll a job until it ends."""
    deadline = time.monotonic() + timeout
    while True:
        job = srv.get(f"{svc_url(srv, name)}/jobs/{job_id}", {"f": "json", **({"token": token} if token else {})}).json()
        if job.get("jobStatus") in ENDED:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def result_value(srv: Server, name: str, job_id: str, token: str | None = None):
    """The out_service_url value of a job."""
    r = srv.get(f"{svc_url(srv, name)}/exportTiles/jobs/{job_id}/results/out_service_url",
                {"f": "json", **({"token": token} if token else {})})
    return r.json()["value"]


@pytest.fixture(scope="module")
def elev(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pages-lerc") / "elevation"
    make_sample(out, SampleSpec(levels=(0, 1, 2), tile_format="LERC"))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_dir, elev, sample_v2):
    root = tmp_path_factory.mktemp("pages")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {
        "NE": {"source": real_path("natural-earth.vtpk")}, "Elev": {"source": elev}, "Map": {"source": sample_v2}})
    # each bundle written sleeps 0.3 s: a job runs long enough for its page to show the cancel form
    srv = Server(cfg, data, free_port(), delay=0.3).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text()


def check_page_links(srv: Server, page: bytes, kind: str, seen: set, token: str | None = None) -> list[str]:
    """Every href/src of a page answers 200 (followed once each), none leaves the page's service
    type; the downloads it links (arcgisoutput files) are returned."""
    assert b"/MapServer" not in page or kind == "MapServer", page.decode()[:2000]
    files = []
    for _, url in links_of(page).links:
        full = urllib.parse.urljoin(srv.base + "/", url)
        assert full.startswith(srv.base), url
        if full in seen:
            continue
        seen.add(full)
        r = srv.get(full)
        assert r.status == 200, (url, r.status, r.body[:300])
        assert b'"error"' not in r.body[:200], (url, r.body[:300])
        if token is not None:
            assert urllib.parse.parse_qs(urllib.parse.urlsplit(full).query).get("token") == [token], url
        path = urllib.parse.urlsplit(full).path
        if path.startswith(OUT) and r.headers.get("Content-Type") == "application/octet-stream":
            files.append(full)
        elif r.headers.get("Content-Type", "").startswith("text/html") and path.startswith(OUT):
            files += check_page_links(srv, r.body, kind, seen, token)  # a cache folder's own page
    return files


@pytest.mark.parametrize("name, params", [
    ("NE", {"levels": "0-3"}),
    ("Elev", {"levels": "0-2", "tilePackage": "false"}),
    ("Elev", {"levels": "0-2", "tilePackage": "true", "storageFormatType": "esriMapCacheStorageModeCompactV2"}),
])
def test_job_page_links_stay_under_the_service_type(server, name, params):
    kind = KINDS[name]
    base = svc_url(server, name)
    # the browser form's submit: redirected to the job page under the service's own type
    r = no_follow(f"{base}/exportTiles?" + urllib.parse.urlencode({"f": "html", **params}))
    assert r.status == 303, (r.status, r.body[:300])
    location = r.headers["Location"]
    assert f"/services/{name}/{kind}/exportTiles/jobs/" in location and "/MapServer/" not in location
    job_id = location.split("/jobs/")[1].split("?")[0]
    # while it runs: the cancel form posts to this type's cancel route (checked on the last case)
    page = server.get(location).body
    assert b"/MapServer" not in page
    job = wait(server, name, job_id)
    assert job["jobStatus"] == "esriJobSucceeded", job
    page = server.get(location)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    files = check_page_links(server, page.body, kind, set())
    assert files, page.body.decode()[:2000]  # the download links are there and each answered 200
    folder = f"{name}_{kind}/{job_id}"
    for url in files:
        assert f"{OUT}/{urllib.parse.quote(name)}_{kind}/{job_id}/" in url
    assert result_value(server, name, job_id) == f"{server.base}{OUT}/{folder}"
    r = server.get(f"{base}/exportTiles/jobs/{job_id}/inputs/service_url", {"f": "json"}).json()
    assert r == {"paramName": "service_url", "dataType": "GPString", "value": f"{name}:{kind}"}
    assert (server.data_dir / "arcgisoutput" / f"{name}_{kind}" / job_id).is_dir()
    assert not (server.data_dir / "arcgisoutput" / f"{name}_MapServer").exists()
    if params.get("tilePackage") == "false":
        assert any("/Layers/" in u or "/_alllayers/" in u for u in files), files  # the cache folder's files


@pytest.mark.parametrize("name", ["NE", "Elev"])
def test_cancel_form_and_estimate_page(server, name):
    kind = KINDS[name]
    base = svc_url(server, name)
    levels = "0-5" if name == "NE" else "0-2"
    job_id = submit(server, name, {"levels": levels, "tilePackage": "true"})
    page = server.get(f"{base}/exportTiles/jobs/{job_id}", {"f": "html"}).body
    forms = links_of(page).forms
    if not forms:  # it ended before the page was read: nothing left to cancel
        pytest.fail(f"the job ended within one request despite the slowed export: {page[:500]!r}")
    method, action = forms[0]
    assert method == "post" and f"/services/{name}/{kind}/exportTiles/jobs/{job_id}/cancel" in action
    r = no_follow(urllib.parse.urljoin(server.base, action), {})
    assert r.status == 303 and f"/{kind}/exportTiles/jobs/{job_id}" in r.headers["Location"]
    job = wait(server, name, job_id)
    assert job["jobStatus"] in ("esriJobCancelled", "esriJobSucceeded")
    assert server.get(urllib.parse.urljoin(server.base, r.headers["Location"])).status == 200
    # the estimate job's page: its links too
    r = no_follow(f"{base}/estimateExportTilesSize?" + urllib.parse.urlencode({"f": "html", "levels": levels}))
    assert r.status == 303 and f"/{kind}/estimateExportTilesSize/jobs/" in r.headers["Location"]
    est = r.headers["Location"].split("/jobs/")[1].split("?")[0]
    wait(server, name, est)
    page = server.get(urllib.parse.urljoin(server.base, r.headers["Location"])).body
    assert b"Tiles to export" in page
    check_page_links(server, page, kind, set())


def test_mapserver_job_page_unchanged(server):
    job_id = submit(server, "Map", {"levels": "0-1", "tilePackage": "true"})
    wait(server, "Map", job_id)
    page = server.get(f"{svc_url(server, 'Map')}/exportTiles/jobs/{job_id}", {"f": "html"}).body
    files = check_page_links(server, page, "MapServer", set())
    assert files and all(f"/Map_MapServer/{job_id}/" in u for u in files)
    # a token parameter is carried into links as data, never as markup
    evil = '"><script>alert(1)</script>&x=1'
    page = server.get(f"{svc_url(server, 'Map')}/exportTiles/jobs/{job_id}", {"f": "html", "token": evil}).body
    assert b"<script>" not in page
    for _, url in links_of(page).links:
        assert urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["token"] == [evil], url


def test_output_root_lists_every_type(server):
    listing = server.get(OUT, {"f": "json"}).json()
    assert {"NE_VectorTileServer", "Elev_ImageServer"} <= set(listing["folders"])
    page = server.get(OUT, {"f": "html"}).body
    check_page_links(server, page, "any", set())
    # service folders list no job folders, whatever the type
    for folder in ("NE_VectorTileServer", "Elev_ImageServer"):
        assert server.get(f"{OUT}/{folder}", {"f": "json"}).json() == {"folders": [], "files": []}


# ------------------------------------------------------------------------------------------
# a job stored before the type was in the folder name


def test_job_stored_under_the_old_mapserver_folder_stays_downloadable(server, tmp_path):
    job_id = submit(server, "NE", {"levels": "0-1"})
    assert wait(server, "NE", job_id)["jobStatus"] == "esriJobSucceeded"
    server.stop()
    out = server.data_dir / "arcgisoutput"
    (out / "NE_MapServer").mkdir(exist_ok=True)
    os.rename(out / "NE_VectorTileServer" / job_id, out / "NE_MapServer" / job_id)
    store = JobStore(str(server.data_dir / "jobs.lmdb"))
    try:
        def old_name(job: Job) -> None:
            job.result = {**job.result, "folder": f"NE_MapServer/{job_id}"}
        store.update(job_id, old_name)
    finally:
        store.close()
    server.start()
    value = result_value(server, "NE", job_id)
    assert value == f"{server.base}{OUT}/NE_MapServer/{job_id}"  # read from the record, not recomputed
    listing = server.get(value).json()
    assert [f["name"] for f in listing["files"]] == ["NE.vtpk"]
    got = server.get(listing["files"][0]["url"])
    assert got.status == 200 and len(got.body) == listing["files"][0]["size"]
    page = server.get(f"{svc_url(server, 'NE')}/exportTiles/jobs/{job_id}", {"f": "html"}).body
    assert f"{OUT}/NE_MapServer/{job_id}/NE.vtpk".encode() in page
    # a restart's recovery left it alone (a known job), the listing of the root names both folders
    assert (out / "NE_MapServer" / job_id / "NE.vtpk").is_file()


# ------------------------------------------------------------------------------------------
# expiry and recovery in-process: every type's folders are recognised


def test_expiry_and_recovery_know_every_type(tmp_path, sample_v2):
    from tilecrate.cache import open_cache
    from tilecrate.jobs import JobRunner, JobService
    from tilecrate.jobs.runner import service_folder, service_of_folder

    assert service_of_folder("A_VectorTileServer") == ("A", "VectorTileServer")
    assert service_of_folder("A_MapServer_ImageServer") == ("A_MapServer", "ImageServer")
    assert service_of_folder("_MapServer") is None and service_of_folder("A_GPServer") is None
    assert service_folder("A", "ImageServer") == "A_ImageServer"
    with pytest.raises(ValueError):
        JobService("S", None, kind="FeatureServer")
    store = JobStore(str(tmp_path / "db"))
    out = tmp_path / "out"
    now = time.time()
    jobs = {}
    for folder in ("S_ImageServer", "S_MapServer", "V_VectorTileServer"):
        job = Job(new_job_id(), EXPORT, folder.split("_")[0], {"levels": "0"}, status=SUCCEEDED,
                  finished=now - 100, result={"folder": f"{folder}/placeholder", "name": "x.tpkx"})
        job.result["folder"] = f"{folder}/{job.id}"
        store.put(job)
        (out / folder / job.id).mkdir(parents=True)
        (out / folder / job.id / "x.tpkx").write_bytes(b"package")
        jobs[folder] = job
    strays = [out / f / new_job_id() for f in ("S_ImageServer", "V_VectorTileServer")]
    for p in strays:
        p.mkdir()
        os.utime(p, (now - 120, now - 120))
    with open_cache(str(sample_v2)) as cache:
        r = JobRunner(store, {"S": JobService("S", cache, kind="ImageServer"),
                              "V": JobService("V", cache, kind="VectorTileServer")}, str(out), workers=1,
                      max_file_age=10)
        try:
            r.recover()
            assert not any(p.exists() for p in strays)  # stray folders under every type are swept
            for folder, job in jobs.items():
                assert (out / folder / job.id / "x.tpkx").is_file()
                assert r.job_dir(store.get(job.id)) == str(out / folder / job.id)  # the stored folder
            # a forged stored folder is not trusted: the type's own folder instead
            odd = Job(new_job_id(), EXPORT, "S", {}, result={"folder": "../../etc"})
            assert r.job_dir(odd) == str(out / "S_ImageServer" / odd.id)
            fresh = Job(new_job_id(), EXPORT, "V", {})
            assert r.job_folder(fresh) == f"V_VectorTileServer/{fresh.id}"
            for job in jobs.values():
                store.set_expiry(job.id, now - 1)
            assert sorted(r.cleanup(now)) == sorted(j.id for j in jobs.values())
            for folder, job in jobs.items():
                assert not (out / folder / job.id).exists(), folder
        finally:
            r.close()
    store.close()


# ------------------------------------------------------------------------------------------
# a secured site: the html page's download link carries its token; JSON never does


@pytest.fixture(scope="module")
def site(tmp_path_factory, real_dir, elev):
    root = tmp_path_factory.mktemp("pages-secured")
    data = root / "data"
    services = {"NE": {"source": real_path("natural-earth.vtpk")},
                "Elev": {"source": elev},
                "Hidden": {"source": real_path("natural-earth.vtpk"), "view": ["alice"]}}
    cfg = secured_config(root / "tilecrate.toml", data, services, token="shared-static-token")
    srv = Server(cfg, data, free_port()).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text()


@pytest.mark.parametrize("name, params", [("NE", {"levels": "0-2"}),
                                          ("Elev", {"levels": "0-1", "tilePackage": "true"})])
def test_secured_download_link_carries_the_page_token(site, name, params):
    kind = KINDS[name]
    tok = sign_in(site, "alice")
    job_id = submit(site, name, dict(params), token=tok)
    assert wait(site, name, job_id, token=tok)["jobStatus"] == "esriJobSucceeded"
    # JSON: no token anywhere, even when the request carried one
    value = result_value(site, name, job_id, token=tok)
    assert "token" not in value and value == f"{site.base}{OUT}/{name}_{kind}/{job_id}"
    listing = site.get(value, {"token": tok}).json()
    assert "token" not in json.dumps(listing) and tok not in json.dumps(listing)
    # the html page opened with ?token=: its download link works as it stands
    page = site.get(f"{svc_url(site, name)}/exportTiles/jobs/{job_id}", {"f": "html", "token": tok})
    assert page.status == 200 and b"/MapServer" not in page.body
    downloads = [u for _, u in links_of(page.body).links if u.startswith(f"{site.base}{OUT}/")]
    assert len(downloads) == 1, downloads
    got = site.get(downloads[0])
    assert got.status == 200 and got.body[:2] == b"PK" and len(got.body) == listing["files"][0]["size"]
    with zipfile.ZipFile(__import__("io").BytesIO(got.body)) as zf:
        assert zf.testzip() is None
    check_page_links(site, page.body, kind, set(), token=tok)  # every link of the page, token included
    # without the token: refused as before (token required; another user: not found)
    bare = downloads[0].split("?")[0]
    r = site.get(bare)
    assert r.status == 401 and r.json()["error"]["code"] == 499
    r = site.get(bare, headers=bearer(sign_in(site, "bob")))
    assert r.status == 404
    # the shared static token's page: the same, with that token
    page = site.get(f"{svc_url(site, name)}/exportTiles/jobs/{job_id}", {"f": "html", "token": "shared-static-token"})
    shared = [u for _, u in links_of(page.body).links if u.startswith(f"{site.base}{OUT}/")]
    assert shared == [f"{bare}?token=shared-static-token"]
    assert site.get(shared[0]).body == got.body
    # a signed-in owner's page without a token in its URL (a header) gets links without one
    page = site.get(f"{svc_url(site, name)}/exportTiles/jobs/{job_id}", {"f": "html"}, headers=bearer(tok)).body
    assert b"token=" not in page


def test_private_service_folder_is_not_revealed_for_any_type(site):
    alice, bob = sign_in(site, "alice"), sign_in(site, "bob")
    job_id = submit(site, "Hidden", {"levels": "0-1"}, token=alice)
    assert wait(site, "Hidden", job_id, token=alice)["jobStatus"] == "esriJobSucceeded"
    assert (site.data_dir / "arcgisoutput" / "Hidden_VectorTileServer" / job_id).is_dir()
    seen = {who: site.get(OUT, {"f": "json"}, headers=bearer(t) if t else None).json()["folders"]
            for who, t in (("alice", alice), ("bob", bob), ("anon", None))}
    assert "Hidden_VectorTileServer" in seen["alice"]
    assert "Hidden_VectorTileServer" not in seen["bob"] and "Hidden_VectorTileServer" not in seen["anon"]
    # bob gets what a folder that never existed answers; anonymous callers are told to sign in
    hidden = site.get(f"{OUT}/Hidden_VectorTileServer", {"f": "json"}, headers=bearer(bob))
    never = site.get(f"{OUT}/Nope_VectorTileServer", {"f": "json"}, headers=bearer(bob))
    assert hidden.status == never.status == 404
    assert hidden.json()["error"]["code"] == never.json()["error"]["code"]
    assert site.get(f"{OUT}/Hidden_VectorTileServer/{job_id}/Hidden.vtpk", headers=bearer(bob)).status == 404
    assert site.get(f"{OUT}/Hidden_VectorTileServer/{job_id}/Hidden.vtpk").status == 401
    own = site.get(f"{OUT}/Hidden_VectorTileServer", {"f": "json"}, headers=bearer(alice)).json()
    assert own["folders"] == [job_id]
    got = site.get(f"{OUT}/Hidden_VectorTileServer/{job_id}/Hidden.vtpk", headers=bearer(alice))
    assert got.status == 200 and got.body[:2] == b"PK"
    # the html root listing as bob names no hidden folder either
    assert b"Hidden_" not in site.get(OUT, {"f": "html", "token": bob}).body

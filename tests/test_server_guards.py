"""Each route's guard (server/app.py `guarded`, no aiohttp middleware): what no route takes is still
answered as before (CORS preflight anywhere, Esri 404 / 405), the named routes' string matching
agrees with aiohttp's regular expressions, and the settings check by LMDB transaction id still
sees an edit made by another process on the very next request (issue 11)."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from tilecrate.sample import SampleSpec, make_sample
from tilecrate.server.app import _NamedServiceResource
from test_server_support import Server, free_port

_OP = "{op:(?i:exportTiles|estimateExportTilesSize)}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    make_sample(root / "c", SampleSpec(levels=(0, 1)))
    cfg = root / "t.toml"
    cfg.write_text(f'[server]\ndata_dir = "{root / "data"}"\n[services.Sample]\nsource = "{root / "c"}"\n')
    srv = Server(cfg, root / "data", free_port()).start()
    try:
        yield srv
    finally:
        srv.stop()


def _call(srv: Server, path: str, method: str) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(srv.url(path), method=method, headers={"Origin": "http://example.org"},
                                 data=b"x" if method in ("PUT", "PATCH") else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_what_no_route_takes_is_answered_as_esri_errors_with_cors(server):
    svc = server.svc("Sample")
    for path in (svc + "/tile/0/0/0", "/arcgis/rest/nothing/here", "/"):
        status, headers, body = _call(server, path, "OPTIONS")  # a preflight: any path
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "*", (path, status)
        assert "GET" in headers["Access-Control-Allow-Methods"] and body == b""
    status, headers, body = _call(server, "/arcgis/rest/nothing/here?f=json", "GET")
    assert status == 404 and headers["Access-Control-Allow-Origin"] == "*"
    assert json.loads(body)["error"]["code"] == 404
    for path in (svc + "/tile/0/0/0", svc, "/arcgis/rest/info"):  # a resource, a method it does not take
        status, headers, body = _call(server, path, "PUT")
        assert status == 405 and json.loads(body)["error"]["code"] == 405, (path, status, body[:200])
        assert headers["Access-Control-Allow-Origin"] == "*"
    status, _, body = _call(server, "/arcgis/rest/nothing/here", "PUT")  # no resource at all: 404
    assert status == 404 and json.loads(body)["error"]["code"] == 404
    status, _, _ = _call(server, "/arcgis/rest/nothing/here", "HEAD")
    assert status == 404
    # the guard's own answers are there too: a bad level is an Esri 400, a tile is bytes with CORS
    status, headers, body = _call(server, svc + "/tile/x/0/0", "GET")
    assert status == 400 and json.loads(body)["error"]["code"] == 400
    status, headers, body = _call(server, svc + "/tile/0/0/0", "GET")
    assert status == 200 and body[:2] == b"\xff\xd8" and headers["Access-Control-Allow-Origin"] == "*"


_ROUTES = [
    (f"/arcgis/rest/services/{{service}}/MapServer/{_OP}/jobs/{{job}}", {"op": "exportTiles"}),
    (f"/arcgis/rest/services/{{service}}/MapServer/{_OP}/jobs/{{job}}/", {"op": "estimateExportTilesSize"}),
    (f"/arcgis/rest/services/{{service}}/MapServer/{_OP}/jobs/{{job}}/cancel", {}),
    ("/arcgis/rest/services/{service}/MapServer/jobs/{job}/results/{param}", {}),
    ("/arcgis/rest/services/{service}/MapServer/tile/{level}/{row}/{col}", {}),
    ("/arcgis/rest/services/{service}/VectorTileServer/tile/{level}/{row}/{col}.pbf", {}),
    ("/arcgis/rest/services/{service}/MapServer/tilemap/{level}/{row}/{col}/{width}/{height}", {}),
    ("/arcgis/rest/services/{service}/MapServer", {}),
    ("/arcgis/rest/services/{service}/MapServer/", {}),
    ("/arcgis/rest/services/{service}/MapServer/{layer:[0-9]+}", {}),
]
_RESTS = ["MapServer/exportTiles/jobs/j1_et", "MapServer/exportTiles/jobs/j1_et/",
          "MapServer/estimateExportTilesSize/jobs/j1_et/", "MapServer/EXPORTTILES/jobs/j1/cancel",
          "MapServer/exportTiles/jobs/j1/cancel", "MapServer/exportTiles/jobs/", "MapServer/exportTiles/jobs",
          "MapServer/exportTiles/jobs/a{b", "MapServer/exportTiles/jobs/a}", "MapServer/exportTiles/jobs/a%2Fb",
          "MapServer/exportTiles/jobs/a%25b%2f", "MapServer/jobs/j/results/out_service_url",
          "MapServer/jobs/j/results/", "MapServer/tile/1/2/3", "MapServer/tile/1/2", "MapServer/tile/1/2/3/",
          "MapServer/tile/1//3", "MapServer/tile/é/2/3", "MapServer/tile/1/2/3\n",
          "VectorTileServer/tile/1/2/3.pbf", "VectorTileServer/tile/1/2/3", "MapServer/tilemap/3/0/0/8/8",
          "MapServer/tilemap/3/0/0/8", "MapServer", "MapServer/", "MapServerX", "MapServer/0", "MapServer/x",
          "mapserver", ""]
_PATHS = [f"/arcgis/rest/services/{name}/{rest}" for name in ("Sample", "S.two", "sample", "Sample2")
          for rest in _RESTS] + ["/arcgis/rest/services//MapServer/tile/1/2/3",
                                 "//arcgis/rest/services/Sample/MapServer"]


@pytest.mark.parametrize("path,literals", _ROUTES)
@pytest.mark.parametrize("name", ["Sample", "S.two"])
def test_named_route_string_matching_agrees_with_the_regular_expression(path, literals, name):
    resource = _NamedServiceResource(path, {"service": name, **literals})
    for p in _PATHS:
        assert resource._match(p) == web.DynamicResource._match(resource, p), (path, p)
    probe = f"/arcgis/rest/services/{name}/MapServer/exportTiles/jobs/j1_et"
    if path.endswith("/jobs/{job}") and literals:  # the status route is the one that must take the fast way
        assert resource._fast is not None and resource._match(probe) == {"service": name, "op": "exportTiles",
                                                                         "job": "j1_et"}


_EDIT = r"""
import sys
from tilecrate.admin.settings import ServiceSettings, SiteSettings
site = SiteSettings(sys.argv[1])
site.set_service("Sample", ServiceSettings(sys.argv[2] == "1", int(sys.argv[3])))
site.close()
"""


def test_an_edit_by_another_process_applies_on_the_next_request(server):
    """The guard compares the settings environment's last transaction id instead of reading the
    settings: a write from any process moves it, so the next request applies the edit."""
    root = server.svc("Sample") + "?f=json"
    site = str(Path(server.data_dir) / "site.lmdb")
    for allowed, count in ((1, 4321), (0, 4321), (1, 100000)):
        before = server.get(root).json()["maxExportTilesCount"]
        subprocess.run([sys.executable, "-c", _EDIT, site, str(allowed), str(count)], check=True, timeout=60)
        info = server.get(root).json()  # the very next request: no wait, no TTL
        assert info["maxExportTilesCount"] == count and info["exportTilesAllowed"] is bool(allowed), (before, info)
        refused = server.get(server.svc("Sample") + "/exportTiles", {"f": "json", "levels": "0"}).json()
        assert ("error" in refused) is (not allowed), refused
        if allowed:
            server.poll("Sample", "exportTiles", refused["jobId"])


_UPDATE = r"""
import sys
from tilecrate.jobs.store import JobStore
store = JobStore(sys.argv[1])
def change(job):
    job.messages.append({"type": "esriJobMessageTypeInformative", "description": sys.argv[3]})
store.update(sys.argv[2], change)
store.close()
"""


def test_status_kept_between_commits_follows_a_write_by_another_process(server):
    """The store keeps public bodies until the environment's next commit; a job record written by
    another process (another `serve --processes` front end, a cluster runner) is answered on the
    next poll, never the body kept from before."""
    job = server.submit("Sample", "estimateExportTilesSize", {"levels": "0"})
    server.poll("Sample", "estimateExportTilesSize", job["jobId"])
    url = f"{server.svc('Sample')}/estimateExportTilesSize/jobs/{job['jobId']}?f=json"
    first = server.get(url)
    assert server.get(url).body == first.body  # kept: the same bytes
    store = str(Path(server.data_dir) / "jobs.lmdb")
    for i in range(3):
        note = f"written by another process, round {i}"
        subprocess.run([sys.executable, "-c", _UPDATE, store, job["jobId"], note], check=True, timeout=60)
        after = server.get(url).json()  # the very next poll
        assert after["messages"][-1]["description"] == note, after["messages"][-2:]
        assert server.get(url).json() == after


class _MetaAhead:
    """The job store's environment as a reader sees it between a writer's two last steps: the meta
    page already names the new transaction, the readers' table (what a read transaction starts
    from) not yet."""

    def __init__(self, env):
        self.env = env

    def info(self):
        info = dict(self.env.info())
        info["last_txnid"] += 1
        return info

    def __getattr__(self, name):
        return getattr(self.env, name)


def test_store_keeps_only_a_body_read_at_the_last_commit(tmp_path):
    from tilecrate.jobs import JobStore
    from tilecrate.jobs.model import EXPORT, Job, new_job_id

    store = JobStore(str(tmp_path / "db"))
    try:
        job = Job(new_job_id(), EXPORT, "Sample", {"levels": "0"}, client="c")
        store.admit(job, None)
        before = store.public_body(job.id, "Sample")
        real = store.env
        store.env = _MetaAhead(real)
        assert store.public_body(job.id, "Sample") == before  # read at the older state...
        store.env = real

        def note(j):
            j.messages.append({"type": "esriJobMessageTypeInformative", "description": "later"})
        store.update(job.id, note)  # ... the commit the meta page announced lands
        after = store.public_body(job.id, "Sample")
        assert after != before and b"later" in after  # the older body was not kept under its id
        assert store.public_body(job.id, "Sample") is after  # this one is
    finally:
        store.close()

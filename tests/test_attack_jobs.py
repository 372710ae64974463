"""Attacks on the status poll's hot path (issue 11): `JobStore.public_body` keeps bodies per LMDB
transaction id, polls skip the settings check, `?f=json` GETs are not parsed, and named service
routes match by string comparison. On a secured site a kept body must still answer its owner (and
administrators) only, through every spelling of the job's URL; a body is never another service's;
and the string matching agrees with aiohttp's regular expressions on hostile paths."""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

import pytest
from aiohttp import web

from test_auth_support import bearer, secured_config, sign_in
from test_server_guards import _ROUTES
from test_server_support import Server, free_port, write_config
from tilecrate.server.app import _NamedServiceResource

ESTIMATE = "estimateExportTilesSize"


@pytest.fixture(scope="module")
def site(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("attackjobs")
    data = root / "data"
    services = {"S": {"source": sample_v2, "view": ["*"], "export": ["alice", "bob"]},
                "S2": {"source": sample_v2, "view": ["*"], "export": ["alice", "bob"]}}
    cfg = secured_config(root / "tilecrate.toml", data, services)
    srv = Server(cfg, data, free_port()).start()
    yield srv
    srv.stop()
    assert "Traceback" not in srv.log.read_text()


def _spellings(srv: Server, service: str, job_id: str) -> list[str]:
    """Every URL a client may poll a job at: both operations, any case, a trailing slash, the bare
    jobs URL, the service name percent-encoded."""
    quoted = "".join(f"%{b:02X}" for b in service.encode())
    out = []
    for name in (service, quoted):
        base = f"{srv.base}/arcgis/rest/services/{name}/MapServer"
        out += [f"{base}/{ESTIMATE}/jobs/{job_id}", f"{base}/exportTiles/jobs/{job_id}",
                f"{base}/EXPORTTILES/jobs/{job_id}", f"{base}/{ESTIMATE.lower()}/jobs/{job_id}/",
                f"{base}/jobs/{job_id}"]
    return out


def _poll(srv: Server, url: str, token: str | None, how: str) -> dict:
    """A status poll as clients send them: `?f=json` alone with the token in a header (the unparsed
    hot path), the token as a parameter, or a POST form."""
    if how == "header":
        return srv.get(url + "?f=json", headers=bearer(token) if token else None).json()
    if how == "query":
        return srv.get(url, {"f": "json", **({"token": token} if token else {})}).json()
    return srv.post(url, {"f": "json", **({"token": token} if token else {})}).json()


def test_a_kept_status_body_answers_its_owner_only(site):
    srv = site
    alice, bob, admin = (sign_in(srv, u) for u in ("alice", "bob", "admin"))
    job_id = srv.post(f"{srv.svc('S')}/{ESTIMATE}", {"f": "json", "levels": "0-2", "token": alice}).json()["jobId"]
    srv.token = alice
    done = srv.poll("S", ESTIMATE, job_id)
    srv.token = None
    assert done["jobStatus"] == "esriJobSucceeded"
    never = "j" + "0" * 32 + "_ee"
    for url in _spellings(srv, "S", job_id):
        for how in ("header", "query", "post"):
            mine = _poll(srv, url, alice, how)  # read (and kept) right before each foreign poll
            assert mine.get("jobId") == job_id and mine["jobStatus"] == "esriJobSucceeded", (url, how, mine)
            for who in (bob, None):
                theirs = _poll(srv, url, who, how)
                missing = _poll(srv, url.replace(job_id, never), who, how)
                assert "jobStatus" not in theirs and theirs["error"]["message"] == "Invalid URL", (url, how, theirs)
                assert theirs["error"]["details"][0].replace(job_id, "J") == \
                    missing["error"]["details"][0].replace(never, "J")
            assert _poll(srv, url, admin, how).get("jobId") == job_id
    # a kept body is never another service's, whoever asks
    for url in _spellings(srv, "S2", job_id):
        for who in (alice, admin):
            other = _poll(srv, url, who, "header")
            assert "jobStatus" not in other and other["error"]["message"] == "Invalid URL", (url, other)
    # ids that are not job ids never reach the store, kept or not
    for bad in ("..", "%2e%2e", job_id + "%00", job_id.upper(), job_id + "x", "a" * 5000):
        r = srv.get(f"{srv.svc('S')}/{ESTIMATE}/jobs/{bad}?f=json", headers=bearer(alice))
        assert r.status in (200, 404, 414) and "jobStatus" not in r.body.decode("utf-8", "replace"), (bad, r.status)


_ATOMS = ["Sample", "S.two", "sample", "MapServer", "VectorTileServer", "exportTiles", "EXPORTTILES",
          "estimateExportTilesSize", "jobs", "j1", "tile", "tilemap", "1", "3.pbf", "results", "cancel",
          "%2F", "%2f", "%25", "%", "{", "}", "é", "\n", ".", "..", "", "a", "x y", "+", "%20", "\x00", "/",
          ";", "0", "Sample2", "S.tw", "%53ample"]


@pytest.mark.parametrize("path,literals", _ROUTES)
def test_named_routes_agree_with_the_regular_expression_on_hostile_paths(path, literals):
    """Random paths built from hostile pieces (percent escapes, braces, dots, unicode, NUL, names that
    are prefixes or case variants of the service's): the string comparison answers what aiohttp's
    regular expression answers, on every one."""
    rng = random.Random(zlib.crc32(path.encode()))
    for name in ("Sample", "S.two"):
        resource = _NamedServiceResource(path, {"service": name, **literals})
        for _ in range(3000):
            p = re.sub(r"\{[^}]*\}", lambda m: "".join(rng.choice(_ATOMS) for _ in range(rng.randint(0, 2))),
                       resource.canonical)
            if rng.random() < 0.3:
                segments = p.split("/")
                segments[rng.randrange(len(segments))] = "".join(rng.choice(_ATOMS) for _ in range(rng.randint(0, 3)))
                p = "/".join(segments)
            if rng.random() < 0.2:
                p += rng.choice(["/", "//", "/x", "%2F"])
            p = urllib.parse.unquote(p) if rng.random() < 0.1 else p
            assert resource._match(p) == web.DynamicResource._match(resource, p), (path, name, p)


_RANK = {"esriJobNew": 0, "esriJobSubmitted": 1, "esriJobWaiting": 2, "esriJobExecuting": 3, "esriJobSucceeded": 4}


def test_polls_spread_over_two_front_ends_never_go_back(tmp_path, sample_v2):
    """Two `serve --processes 2` front ends share the LMDB store, each keeping bodies per transaction id;
    polls on fresh connections (the kernel spreads them over both) while the job runs: no poll sees an
    older state than one an earlier poll saw, and once one poll answered succeeded, every poll begun
    after it does too (a body kept by the other process before the end is never answered again)."""
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}})
    srv = Server(cfg, data, free_port(), delay=0.05, extra_args=["--processes", "2"]).start()
    try:
        job_id = srv.submit("S", "exportTiles", {"levels": "0-5", "tilePackage": "true"})["jobId"]
        url = f"/arcgis/rest/services/S/MapServer/exportTiles/jobs/{job_id}?f=json"
        polls: list[tuple[float, float, int, int, int]] = []   # start, end, thread, rank, messages
        done = threading.Event()

        def poller(n: int) -> None:
            extra = 0
            while extra < 30:
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)   # a new connection each
                t0 = time.monotonic()
                conn.request("GET", url)
                body = json.loads(conn.getresponse().read())
                polls.append((t0, time.monotonic(), n, _RANK[body["jobStatus"]], len(body["messages"])))
                conn.close()
                if done.is_set() or body["jobStatus"] == "esriJobSucceeded":
                    done.set()
                    extra += 1
        threads = [threading.Thread(target=poller, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive()
        ranks = {r for _, _, _, r, _ in polls}
        assert 4 in ranks and 3 in ranks, ranks             # seen running, then succeeded
        for n in range(4):
            mine = [(r, m) for _, _, k, r, m in sorted(polls) if k == n]
            assert mine == sorted(mine), (n, mine)           # never back to an older state
        first_end = min(end for _, end, _, r, _ in polls if r == 4)
        late = [(s, r) for s, _, _, r, _ in polls if s > first_end]
        assert late and all(r == 4 for _, r in late), [r for _, r in late]
        assert "Traceback" not in srv.log.read_text()
    finally:
        srv.stop()


_READER = r"""
import sys, time, lmdb
env = lmdb.open(sys.argv[1], map_size=int(sys.argv[2]), max_dbs=8, subdir=True, max_readers=256)
txn = env.begin()                     # a read transaction, open when the process is killed
txn.get(b"anything")
print("reading", flush=True)
time.sleep(120)
"""


def _killed_in_a_read_transaction(path: str, map_size: int = 8 << 30) -> int:
    """The pid of a process that opened an LMDB store (the job store's by default), began a read
    transaction and was SIGKILLed."""
    child = subprocess.Popen([sys.executable, "-c", _READER, path, str(map_size)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "reading"
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
    return child.pid


def _reader_pids(where, map_size: int = 8 << 30) -> set[int]:
    """Pids in the reader table of the LMDB store at a path, or of an open environment."""
    import lmdb

    env = lmdb.open(where, map_size=map_size, max_dbs=8, subdir=True, max_readers=256) \
        if isinstance(where, str) else where
    try:
        return {int(line.split()[0]) for line in env.readers().splitlines()[1:] if line.strip()}
    finally:
        if env is not where:
            env.close()


def test_a_process_killed_while_reading_does_not_pin_the_store(tmp_path):
    """A process SIGKILLed inside a read transaction leaves its LMDB reader slot, which pins the
    snapshot it read: every page freed after it stays unused, so each job update grew the data file
    (300 updates of a 10 kB record: 16 MB, 0.1 MB without it) until the 8 GB map was full. The
    store frees such slots when opened and on every sweep."""
    from tilecrate.jobs import JobStore
    from tilecrate.jobs.model import EXPORT, Job, new_job_id

    path = str(tmp_path / "jobs.lmdb")
    store = JobStore(path)
    try:
        job = Job(new_job_id(), EXPORT, "S", {"levels": "0"}, client="c")
        store.admit(job, None)
        dead = _killed_in_a_read_transaction(path)
        assert dead in _reader_pids(store.env)
        assert store.clear_stale_readers() == 1 and dead not in _reader_pids(store.env)
        size = os.path.getsize(os.path.join(path, "data.mdb"))

        def rewrite(j):
            j.messages = [{"type": "esriJobMessageTypeInformative", "description": os.urandom(5000).hex()}]
        for _ in range(300):
            store.update(job.id, rewrite)
        assert os.path.getsize(os.path.join(path, "data.mdb")) - size < 1 << 20
    finally:
        store.close()


def test_the_servers_sweep_frees_a_killed_processs_reader_slot(tmp_path, sample_v2):
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}})
    srv = Server(cfg, data, free_port()).start()
    try:
        path = str(data / "jobs.lmdb")
        dead = _killed_in_a_read_transaction(path)
        deadline = time.monotonic() + 15
        while dead in _reader_pids(path):
            assert time.monotonic() < deadline, "the dead process's reader slot is still there"
            time.sleep(0.2)
        job = srv.submit("S", ESTIMATE, {"levels": "0"})
        assert srv.poll("S", ESTIMATE, job["jobId"])["jobStatus"] == "esriJobSucceeded"
    finally:
        srv.stop()


def test_the_sign_in_counts_and_site_settings_are_not_pinned_either(tmp_path, sample_v2):
    """The same for the secured site's other LMDB stores: a killed process's slot in the sign-in
    counts (written on every sign-in: pinned, some 5 500 failed sign-ins filled their 64 MB and every
    sign-in was then refused) and in the site settings is freed by the server's sweep."""
    data = tmp_path / "data"
    cfg = secured_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}})
    srv = Server(cfg, data, free_port()).start()
    try:
        stores = [str(data / "signins.lmdb"), str(data / "site.lmdb")]
        dead = {path: _killed_in_a_read_transaction(path, 64 << 20) for path in stores}
        deadline = time.monotonic() + 15
        for path, pid in dead.items():
            while pid in _reader_pids(path, 64 << 20):
                assert time.monotonic() < deadline, f"{path}: the dead process's reader slot is still there"
                time.sleep(0.2)
        assert sign_in(srv, "alice")
        assert "Traceback" not in srv.log.read_text()
    finally:
        srv.stop()

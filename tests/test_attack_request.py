"""Attacks on the request side of a real `tilecrate serve` process: connections held open with half a
request (slowloris) from one address and from many, against a process whose descriptor limit is
small enough to reach; hostile exportTiles / estimateExportTilesSize parameters (deep levels,
astronomical tile counts, non-finite and giant numbers, odd spatial references, inverted extents).
Each must be answered (Esri error JSON, or a job that ends) at once, and the server must go on
serving others; nothing may be logged as a traceback."""
from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

import pytest

from test_server_support import Server, free_port, write_config

ESTIMATE = "estimateExportTilesSize"
NOFILE = 1024         # the server's descriptor limit in these tests (its default max_connections: 128)


def _start_with_nofile(srv: Server) -> Server:
    """Start the server with RLIMIT_NOFILE at NOFILE, soft and hard (so `serve` cannot raise it)."""
    srv.nofile = (NOFILE, NOFILE)
    return srv.start()


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_v2):
    root = tmp_path_factory.mktemp("attackreq")
    data = root / "data"
    cfg = write_config(root / "tilecrate.toml", data, {"S": {"source": sample_v2}},
                       limits={"max_connections_per_client": 50})
    srv = _start_with_nofile(Server(cfg, data, free_port()))
    yield srv
    srv.stop()
    log = srv.log.read_text()
    assert "Traceback" not in log and "Too many open files" not in log, log[-3000:]


def _half_requests(srv: Server, n: int, sources: list[str]) -> list[socket.socket]:
    """n connections, spread over source addresses, each holding half a request line."""
    out = []
    for i in range(n):
        s = socket.socket()
        s.bind((sources[i % len(sources)], 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(b"GET /arcgis/rest/services?f=json HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        out.append(s)
    return out


def _get(srv: Server, path: str, source: str = "127.0.0.1", conn: http.client.HTTPConnection | None = None):
    """(status, body) of a GET on a connection from `source` (a new one unless given), in 5 s at most."""
    c = conn or http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5, source_address=(source, 0))
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        if conn is None:
            c.close()


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed this connection at once: a 503 with an Esri error, or a reset (its
    half request was never read, so the kernel may answer the close with RST before the 503 is read)."""
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True
    head, _, body = got.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 503") and json.loads(body)["error"]["code"] == 503


def test_one_address_holding_half_requests_does_not_lock_out_others(server):
    """Before: 1100 such connections from one client took all 1024 descriptors; accept() failed with
    EMFILE (logged with a traceback per attempt) and every other client timed out."""
    path = f"/arcgis/rest/services/S/MapServer/tile/0/0/0"
    socks = _half_requests(server, 1100, ["127.0.0.1"])
    try:
        assert _closed_by_server(socks[-1])     # the server has accepted (and refused) them all
        t = time.monotonic()
        status, body = _get(server, path, source="127.0.0.2")
        assert status == 200 and body[:2] == b"\xff\xd8" and time.monotonic() - t < 2, body[:300]
        status, body = _get(server, path, source="127.0.0.1")
        assert status == 503 and "max_connections_per_client" in json.loads(body)["error"]["details"][0]
        refused = [s for s in socks[50:60] if _closed_by_server(s)]
        assert len(refused) == 10
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 5
    while _get(server, path)[0] != 200:
        assert time.monotonic() < deadline, "the client was not let in again once its connections closed"
        time.sleep(0.1)


def test_many_addresses_cannot_take_the_descriptors_files_need(server):
    """Half requests from 250 addresses (5 each, within the per-client limit) pass the process's total
    (its descriptors less room for files and accept bursts): new connections are answered 503 at once, and a client already connected
    still gets tiles and jobs (bundles, the job store and outputs still open)."""
    keep = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=("127.0.0.250", 0))
    path = f"/arcgis/rest/services/S/MapServer/tile/5/10/10"
    assert _get(server, path, conn=keep)[0] in (200, 404)
    socks = _half_requests(server, 1250, [f"127.0.1.{i}" for i in range(1, 251)])
    try:
        assert _closed_by_server(socks[-1])
        t = time.monotonic()
        status, body = _get(server, "/arcgis/rest/services?f=json", source="127.0.0.251")
        assert status == 503 and "max_connections" in body.decode() and time.monotonic() - t < 2
        assert _get(server, path, conn=keep)[0] in (200, 404)
        keep.request("GET", f"/arcgis/rest/services/S/MapServer/{ESTIMATE}/submitJob?f=json&levels=0-3")
        job = json.loads(keep.getresponse().read())
        assert "jobId" in job, job
        deadline = time.monotonic() + 30
        while True:
            keep.request("GET", f"/arcgis/rest/services/S/MapServer/{ESTIMATE}/jobs/{job['jobId']}?f=json")
            state = json.loads(keep.getresponse().read())
            if state["jobStatus"] in ("esriJobSucceeded", "esriJobFailed"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert state["jobStatus"] == "esriJobSucceeded", state
    finally:
        keep.close()
        for s in socks:
            s.close()


def _nofile_of(pid: int) -> int:
    """The soft 'Max open files' of a running process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def test_serve_raises_its_descriptor_limit_towards_the_hard_one(tmp_path, sample_v2):
    """A soft limit of 1024 (the usual default) would leave a front end some 128 connections: `serve` raises
    it to the hard limit (at most DESCRIPTORS_WANTED), and a connection count that 1024 would refuse is served."""
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample_v2}})
    srv = Server(cfg, data, free_port(), nofile=(1024, 4096)).start()
    try:
        assert _nofile_of(srv.proc.pid) == 4096
        socks = []
        try:
            for i in range(300):              # past the 128 a 1024 limit allows, within the per-client 256
                s = socket.socket()
                s.bind((f"127.0.2.{i % 250 + 1}", 0))
                s.settimeout(5)
                s.connect(("127.0.0.1", srv.port))
                socks.append(s)
            status, body = _get(srv, "/arcgis/rest/services/S/MapServer/tile/0/0/0", source="127.0.0.3")
            assert status == 200 and body[:2] == b"\xff\xd8", body[:300]
            for s in socks[-5:]:               # still open: nothing comes within a moment
                s.settimeout(0.3)
                assert not _closed_by_server(s)
        finally:
            for s in socks:
                s.close()
    finally:
        srv.stop()


BAD_HTTP = [b"GET /\x00 HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX\x01Y: 1\r\n\r\n"]


def test_requests_that_are_not_http_cannot_fill_the_log(server):
    """Before: each was logged with a full traceback, some 560 bytes for a 19-byte request (30x), so
    the log (and the operator's disk) grew as fast as a client could send; now one line each, at most
    ten a minute."""
    before = server.log.stat().st_size
    for i in range(300):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        try:
            s.sendall(BAD_HTTP[i % len(BAD_HTTP)])
            head = s.recv(64)
            assert head.startswith(b"HTTP/1.") and b" 400 " in head, head
        finally:
            s.close()
    assert _get(server, "/arcgis/rest/services?f=json")[0] == 200
    time.sleep(0.2)
    grown = server.log.read_bytes()[before:]
    assert b"Traceback" not in grown and len(grown) < 4000, grown[:2000]
    assert grown.count(b"not valid HTTP") <= 10


def test_a_levels_list_of_repeats_is_read_once(monkeypatch):
    """Before: a 256 KiB `levels` of "5,5,5,..." (128 000 items, stored as a job: under max_input_bytes)
    was 128 000 regular-expression matches and LOD lookups, three times per request: about 1 s of CPU
    each, and four clients sending them put 150 ms on every tile request of the process."""
    from tilecrate import request as rq

    calls = []
    real = rq._ITEM_RE

    class Counting:
        def match(self, text):
            calls.append(text)
            return real.match(text)

    monkeypatch.setattr(rq, "_ITEM_RE", Counting())
    req = rq.ExportRequest.from_params({"levels": ",".join(["5"] * 128_000 + [" 5", "05", "5.0", "3-4"])})
    assert req.level_items == [(5.0, 5.0), (3.0, 4.0)]
    assert req.level_items == [(5.0, 5.0), (3.0, 4.0)]
    assert len(calls) == 4               # '5', '05', '5.0', '3-4': each distinct text once, parsed once
    with pytest.raises(rq.RequestError, match="10001 items; at most 10000 different"):
        rq.parse_levels(",".join(str(i) for i in range(10_001)))
    with pytest.raises(rq.RequestError, match="20000 items; at most 10000 different"):
        rq.parse_levels("[" + ",".join(["5"] * 20_000) + "]")     # a JSON list is not deduplicated first
    assert rq.parse_levels("[5, 5, 5.0, [1, 2], [1, 2]]") == [(5.0, 5.0), (1.0, 2.0)]
    with pytest.raises(rq.RequestError, match="empty item"):
        rq.parse_levels("5,,5")


HOSTILE = [
    ({"levels": "0-30"}, "level 24-30 not in"),
    ({"levels": "1e308"}, "not in the cache's tiling scheme"),
    ({"levels": "9223372036854775807"}, "not in the cache's tiling scheme"),
    ({"levels": "0-1e300"}, "absurdly long"),
    ({"levels": "nan", "exportBy": "Resolution"}, "bad level item"),
    ({"levels": "inf", "exportBy": "Scale"}, "bad level item"),
    ({"levels": "1e-320", "exportBy": "Scale"}, "matches no level"),
    ({"levels": "-1-0", "exportBy": "Scale"}, "not positive"),
    ({"levels": "[[1, [2]]]"}, "bad level"),
    ({"levels": "[" * 5000 + "]" * 5000}, "levels"),
    ({"levels": "0-5", "exportExtent": '{"xmin": 1e6, "ymin": 1e6, "xmax": -1e6, "ymax": -1e6}'}, "inverted"),
    ({"levels": "0-5", "exportExtent": '{"xmin": NaN, "ymin": 0, "xmax": 1, "ymax": 1}'}, "not a finite number"),
    ({"levels": "0-5", "exportExtent": '{"xmin": -Infinity, "ymin": 0, "xmax": 1, "ymax": 1}'}, "not a finite"),
    ({"levels": "0-5", "exportExtent": '{"xmin": -1' + "0" * 5000 + ', "ymin": 0, "xmax": 1, "ymax": 1}'}, "not valid JSON"),
    ({"levels": "0-5", "exportExtent": '{"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1, "spatialReference": '
                                       '{"wkid": 1180591620717411303424}}'}, "spatialReference"),
    ({"levels": "0-5", "exportExtent": '{"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1, "spatialReference": '
                                       '{"wkid": -1, "latestWkid": "x"}}'}, "unknown spatial reference"),
    ({"levels": "0-5", "exportExtent": '{"xmin": 0, "xmin": "a", "ymin": 0, "xmax": 1, "ymax": 1}'}, "not a number"),
    ({"levels": "0-5", "areaOfInterest": '{"type":"GeometryCollection","geometries":[' * 50 + "]}" * 50},
     "nested more than"),
    ({"levels": "0-5", "compressionQuality": "1e400"}, "compressionQuality"),
    ({"levels": "0-5", "exportBy": ["Scale", "x"]}, "exportBy"),
    # astronomical tile counts: the whole world at the deepest levels, work bounded by the cache's bundles
    ({"levels": "0-23", "exportExtent": '{"xmin": -1e308, "ymin": -1e308, "xmax": 1e308, "ymax": 1e308}'}, None),
    ({"levels": "1e-300-1e300", "exportBy": "Scale"}, None),
    ({"levels": "0-23", "exportExtent": '{"xmin": -1e10, "ymin": -1e10, "xmax": 1e10, "ymax": 1e10, '
                                        '"spatialReference": {"wkid": 4326}}'}, None),
]


@pytest.mark.parametrize("params, error", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_parameters_are_answered_at_once(server, params, error):
    """An Esri 400 naming the problem, or a job that succeeds, each within seconds (held)."""
    url = f"{server.svc('S')}/{ESTIMATE}/submitJob"
    t = time.monotonic()
    r = server.post(url, {"f": "json", **{k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()}})
    body = r.json()
    if error is not None:
        assert body["error"]["code"] == 400 and error in " ".join(body["error"]["details"]), body
    else:
        job = server.poll("S", ESTIMATE, body["jobId"], timeout=30)
        assert job["jobStatus"] == "esriJobSucceeded", job
    assert time.monotonic() - t < 10

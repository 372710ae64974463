"""The hot routes' fast paths (issue 11) answer what the general paths answer, keep their checks, and
never answer bytes of a cache version that is gone: per-service routes, ?f=json without parsing,
ready-made tilemaps checked against the bundles' identities, the read gate's slots and timeouts."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from tilecrate.sample import SampleSpec, make_sample
from tilecrate.server.config import load_config
from tilecrate.server.errors import EsriError
from tilecrate.server.reads import ReadGate
from tilecrate.server.service import open_service
from tilecrate.server.tilemap import TilemapCache
from test_cache_changes import make_cache, replace_by_rename, version_tiles, write_bundle
from test_server_support import Server, free_port, write_config
from tilecrate.sample import _v2_bundle


def _presence(version: int, level: int, row: int, col: int, width: int, height: int) -> list[int]:
    """The tilemap `data` of a window of bundle R0000C0000, from the tiles the test wrote."""
    cells = version_tiles(version, level)
    return [1 if (r < 128 and c < 128 and r * 128 + c in cells) else 0
            for r in range(row, row + height) for c in range(col, col + width)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hotbase") / "c"
    make_sample(root, SampleSpec(levels=(0, 1, 2)))
    return root


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hot")
    cache = make_cache(base, root / "cache")
    other = make_cache(base, root / "other", version=1)
    cfg = root / "t.toml"  # a name with a dot: quoted in TOML, escaped in the route's pattern
    cfg.write_text(f'[server]\ndata_dir = "{root / "data"}"\n[services.Sample]\nsource = "{cache}"\n'
                   f'[services."S.two"]\nsource = "{other}"\n')
    srv = Server(cfg, root / "data", free_port()).start()
    try:
        yield srv, cache
    finally:
        srv.stop()


def test_named_routes_answer_each_service_and_unknown_names_as_before(server):
    srv, _ = server
    for name in ("Sample", "S.two"):
        r = srv.get(srv.svc(name), {"f": "json"})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        assert r.json() == srv.get(srv.svc(name), {"f": "pjson"}).json()
        assert r.json()["layers"][0]["name"] == name
    # a name no service has, and one a regular expression would confuse with S.two
    for name in ("Nope", "SXtwo"):
        r = srv.get(srv.svc(name), {"f": "json"})
        assert r.json()["error"]["code"] == 404 and "not found" in r.json()["error"]["message"].lower(), r.body
        t = srv.get(srv.svc(name) + "/tile/0/0/0")
        assert t.status == 404 and t.headers["Access-Control-Allow-Origin"] == "*"
    # the VectorTileServer and ImageServer URLs of a MapServer stay unknown
    r = srv.get(f"{srv.base}/arcgis/rest/services/Sample/VectorTileServer", {"f": "json"})
    assert r.json()["error"]["code"] == 404


def test_tile_and_methods_on_named_routes(server):
    srv, _ = server
    want = version_tiles(0, 1)[1 * 128 + 1]
    r = srv.get(srv.svc("Sample") + "/tile/1/1/1")
    assert r.status == 200 and r.body == want
    assert r.headers["Access-Control-Allow-Origin"] == "*" and r.headers["Cache-Control"] == "max-age=3600"
    import urllib.request
    head = urllib.request.Request(srv.svc("Sample") + "/tile/1/1/1", method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as h:
        assert h.status == 200 and h.read() == b""
    put = urllib.request.Request(srv.svc("Sample") + "/tile/1/1/1", method="PUT", data=b"x")
    try:
        urllib.request.urlopen(put, timeout=10)
        raise AssertionError("PUT answered")
    except urllib.error.HTTPError as e:
        assert e.code == 405 and json.loads(e.read())["error"]["code"] == 405
    # HEAD of an operation that acts stays refused on the named routes too
    head = urllib.request.Request(srv.svc("Sample") + "/exportTiles?f=json&levels=0", method="HEAD")
    try:
        urllib.request.urlopen(head, timeout=10)
        raise AssertionError("HEAD of exportTiles answered")
    except urllib.error.HTTPError as e:
        assert e.code == 405


def test_job_status_fast_path_answers_the_stored_json(server):
    srv, _ = server
    job = srv.submit("Sample", "estimateExportTilesSize", {"levels": "0-1"})
    done = srv.poll("Sample", "estimateExportTilesSize", job["jobId"])
    url = f"{srv.svc('Sample')}/estimateExportTilesSize/jobs/{job['jobId']}"
    fast = srv.get(url + "?f=json")
    assert fast.status == 200 and fast.headers["Access-Control-Allow-Origin"] == "*"
    assert fast.json() == done
    assert fast.body == srv.post(url, {"f": "json"}).body == srv.get(url, {"f": "json", "x": "1"}).body
    assert srv.get(url, {"f": "pjson"}).json() == done
    # the operation in any case: the generic route behind the literal one answers the same
    assert srv.get(url.replace("estimateExportTilesSize", "ESTIMATEexporttilesSIZE") + "?f=json").body == fast.body
    assert srv.get(f"{srv.svc('Sample')}/jobs/{job['jobId']}?f=json").body == fast.body
    # the job's id under another service, and a made-up id: Esri errors, as before
    bad = srv.get(f"{srv.svc('S.two')}/estimateExportTilesSize/jobs/{job['jobId']}?f=json")
    assert bad.json()["error"]["code"] == 400 and "does not exist" in bad.json()["error"]["details"][0]
    bad = srv.get(f"{srv.svc('Sample')}/estimateExportTilesSize/jobs/j{'0' * 32}_et?f=json")
    assert bad.json()["error"]["code"] == 400


def test_tilemap_follows_every_change_of_the_bundles(server):
    srv, cache = server
    url = srv.svc("Sample") + "/tilemap/2/0/0/4/4"
    first = srv.get(url + "?f=json")
    assert first.status == 200 and first.headers["Access-Control-Allow-Origin"] == "*"
    assert first.json()["data"] == _presence(0, 2, 0, 0, 4, 4)
    assert srv.get(url + "?f=json").body == first.body  # the kept answer, byte for byte
    assert srv.get(url, {"f": "pjson"}).json() == first.json()
    # rewritten in place, then replaced by rename: the next request sees each version
    write_bundle(cache, 2, 1)
    assert srv.get(url + "?f=json").json()["data"] == _presence(1, 2, 0, 0, 4, 4)
    replace_by_rename(cache / "_alllayers" / "L02" / "R0000C0000.bundle", _v2_bundle(version_tiles(2, 2)))
    assert srv.get(url + "?f=json").json()["data"] == _presence(2, 2, 0, 0, 4, 4)


def test_tilemap_cache_keeps_bodies_per_bundle_identity(base, tmp_path):
    cache = make_cache(base, tmp_path / "c")
    cfg = load_config(str(write_config(tmp_path / "t.toml", tmp_path / "d", {"S": {"source": cache}})))
    svc = open_service(cfg.services["S"])
    try:
        maps = TilemapCache(max_entries=2)
        body = maps.body(svc, 2, 0, 0, 4, 4)
        assert json.loads(body) == svc.tilemap(2, 0, 0, 4, 4) and maps.hits == 0
        assert maps.body(svc, 2, 0, 0, 4, 4) is body and maps.hits == 1
        write_bundle(cache, 2, 1)
        changed = maps.body(svc, 2, 0, 0, 4, 4)
        assert maps.hits == 1 and json.loads(changed)["data"] == _presence(1, 2, 0, 0, 4, 4)
        for w in (1, 2, 3):  # bounded: the oldest windows go
            maps.body(svc, 1, 0, 0, w, w)
        assert len(maps._lru) == 2
        # a level the cache does not have: built every time, never kept
        empty = maps.body(svc, 9, 0, 0, 2, 2)
        assert json.loads(empty)["data"] == [0, 0, 0, 0] and len(maps._lru) == 2
    finally:
        svc.close()


def test_read_gate_bounds_concurrency_and_hands_slots_on():
    lock = threading.Lock()
    running, peak = [0], [0]

    def read(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i

    async def main():
        gate = ReadGate(2, 5.0)
        try:
            got = await asyncio.gather(*(gate.run(("k", i % 3), read, i) for i in range(20)))
            assert got == list(range(20)) and peak[0] == 2 and gate._workers == 2
        finally:
            gate.close()
    asyncio.run(main())


def test_read_gate_dropped_and_timed_out_reads_leak_no_thread():
    release = threading.Event()

    async def main():
        gate = ReadGate(1, 0.3, max_stuck=3, quarantine=60)
        try:
            holder = asyncio.ensure_future(gate.run("hang", release.wait, 5))
            await asyncio.sleep(0.05)
            waiter = asyncio.ensure_future(gate.run("other", lambda: 1))
            await asyncio.sleep(0.05)
            waiter.cancel()  # a client gone while its read waits in the queue
            with pytest.raises(asyncio.CancelledError):
                await waiter
            late = asyncio.ensure_future(gate.run("third", lambda: 3))
            with pytest.raises(EsriError) as e:  # the slot holder times out; its thread is stuck
                await holder
            assert e.value.code == 503
            assert await late == 3  # run by the thread that took the stuck one's place
            assert gate.stuck == 1 and gate._workers - gate.stuck == 1  # a new thread took the stuck one's place
            # two more hung reads, the second waiting for the first's slot: both time out in turn
            hung = [asyncio.ensure_future(gate.run(f"hang{i}", release.wait, 5)) for i in (2, 3)]
            for fut in hung:
                with pytest.raises(EsriError, match="within 0.3 seconds"):
                    await fut
            # the second's read may not have started when its time ran out (then it is not stuck)
            assert gate.stuck in (2, 3) and gate._workers - gate.stuck == 1
            release.set()
            for _ in range(100):
                if gate.stuck == 0:
                    break
                await asyncio.sleep(0.02)
            assert gate.stuck == 0 and await gate.run("ok", lambda: 7) == 7 and gate._workers == 1  # the extra ones ended
            with pytest.raises(EsriError, match="did not finish"):  # the hung file stays quarantined
                await gate.run("hang", lambda: 1)
        finally:
            release.set()
            gate.close()
    asyncio.run(main())


def test_store_public_body_is_the_public_json_of_that_service_only(tmp_path):
    from tilecrate.jobs import JobStore
    from tilecrate.jobs.model import EXPORT, Job, new_job_id

    store = JobStore(str(tmp_path / "db"))
    try:
        job = Job(new_job_id(), EXPORT, "Sample", {"levels": "0"}, client="c")
        store.admit(job, None)
        service, _, body = store.public(job.id)
        assert service == "Sample" and store.public_body(job.id, "Sample") == body
        for other in ("Sam", "Sample2", "", "S"):  # a prefix of the name, or the name as a prefix
            assert store.public_body(job.id, other) is None
        assert store.public_body(new_job_id(), "Sample") is None
    finally:
        store.close()

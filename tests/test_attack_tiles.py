"""Attacks on the tile route's hot path (issue 11 made it answer from the page cache on the event
loop: `Cache.tile_cached`, preadv RWF_NOWAIT then an fstat). A real `tilecrate serve` process on
127.0.0.1, real bundle files changed under it by another thread while clients read:

* replaced by rename, rewritten in place through O_TRUNC (as cp does), truncated: every 200 is
  exactly the bytes of one version of that tile (never an index of one version with the bytes of
  another), everything else is an Esri error, never a hang or a 5xx from a crash, and once the
  writer stops the next requests answer its last version;
* bundles whose index points past the end, with a huge size, empty files, a sparse giant: Esri
  errors at once, the rest of the service unharmed;
* a package's central directory read again after a replacement (slow, or hung on a network mount)
  must not hold the lock the event loop takes for every tile.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from tilecrate import open_cache
from tilecrate.errors import BundleError
from tilecrate.export import export
from tilecrate.request import ExportRequest
from tilecrate.sample import SampleSpec, _v2_bundle, make_sample
from tilecrate.server.service import WOULD_BLOCK
from tilecrate.sources import compact
from test_server_support import Server, free_port

CELLS = [r * 128 + c for r in range(0, 8) for c in range(0, 8)]   # 64 tiles of level 2's first bundle


def _version(k: int) -> dict[int, bytes]:
    """Version k of the bundle: every tile's bytes name the version and cell, and their lengths differ
    per version, so an index of one version with the bytes of another can never look right."""
    rng = random.Random(k)
    return {i: b"V%04d|cell%05d|" % (k, i) + bytes([65 + k % 26]) * (3000 + rng.randrange(9000))
            for i in CELLS}


def _start(root: Path, source: Path, name: str = "Sample") -> Server:
    cfg = root / "t.toml"
    cfg.write_text(f'[server]\ndata_dir = "{root / "data"}"\n[services.{name}]\nsource = "{source}"\n')
    return Server(cfg, root / "data", free_port()).start()


class _Client:
    """One keep-alive HTTP connection, as a map client holds one."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.HTTPException, ConnectionError):
                if attempt:
                    raise
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    root = tmp_path / "c"
    make_sample(root, SampleSpec(levels=(0, 1, 2)))
    return root


def _bundle_path(cache_dir: Path, level: int) -> Path:
    return cache_dir / "_alllayers" / f"L{level:02d}" / "R0000C0000.bundle"


def _race(srv, legit: dict, writer, seconds: float) -> dict[int, int]:
    """Run `writer(stop)` against three readers of random CELLS tiles for `seconds`; every 200 must be one
    of `legit[cell]`, every other answer an Esri 400, no request may hang. {status: count} seen."""
    stop = threading.Event()
    seen: dict[int, int] = {}
    bad: list = []

    def reader(seed: int):
        rng = random.Random(seed)
        client = _Client(srv.port)
        try:
            while not stop.is_set():
                i = rng.choice(CELLS)
                status, body = client.get(f"/arcgis/rest/services/Sample/MapServer/tile/2/{i // 128}/{i % 128}")
                seen[status] = seen.get(status, 0) + 1
                if status == 200 and body not in legit[i] or \
                        status != 200 and (status != 400 or json.loads(body)["error"]["code"] != 400):
                    bad.append((i, status, body[:60]))
        finally:
            client.close()

    threads = [threading.Thread(target=writer, args=(stop,))] + \
              [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(seconds)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert not bad, (bad[:5], seen)
    assert seen.get(200, 0) > 100, seen           # the readers were served, not only refused
    return seen


def _assert_serves(srv, tiles: dict) -> None:
    """Every CELLS tile is answered with exactly `tiles[cell]`."""
    client = _Client(srv.port)
    try:
        for i in CELLS:
            status, body = client.get(f"/arcgis/rest/services/Sample/MapServer/tile/2/{i // 128}/{i % 128}")
            assert (status, body) == (200, tiles[i]), (i, status, body[:40])
    finally:
        client.close()


def test_tiles_read_while_the_bundle_is_replaced_rewritten_and_truncated(cache_dir, tmp_path):
    versions = [_version(k) for k in range(6)]
    blobs = [_v2_bundle(v) for v in versions]
    legit = {i: {v[i] for v in versions} for i in CELLS}
    path = _bundle_path(cache_dir, 2)
    path.write_bytes(blobs[0])
    srv = _start(tmp_path, cache_dir)
    last = [0]

    def writer(stop):
        k, step = 0, 0
        while not stop.is_set():
            k = (k + 1) % len(blobs)
            mode = step % 3
            step += 1
            if mode == 0:                              # a new version renamed over the old one
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(blobs[k])
                os.replace(tmp, path)
            elif mode == 1:                            # rewritten in place, as cp does (O_TRUNC)
                with open(path, "wb", buffering=0) as f:
                    for at in range(0, len(blobs[k]), 65536):
                        f.write(blobs[k][at:at + 65536])
            else:                                      # cut short, then written again in full
                os.truncate(path, len(blobs[k - 1]) // 2 if k else 1000)
                time.sleep(0.002)
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(blobs[k])
                os.replace(tmp, path)
            last[0] = k
            time.sleep(random.random() * 0.004)

    try:
        for i in CELLS[:8]:                            # the descriptor held, the bytes in the page cache
            assert _Client(srv.port).get(f"/arcgis/rest/services/Sample/MapServer/tile/2/{i // 128}/{i % 128}") \
                == (200, versions[0][i])
        _race(srv, legit, writer, 3.0)
        time.sleep(0.2)                                # past the held descriptor's path check (50 ms)
        _assert_serves(srv, versions[last[0]])         # the writer's last version, on the next request
        assert srv.proc.poll() is None
        assert "unexpected error" not in srv.log.read_text()
    finally:
        srv.stop()


def _index_record(offset: int, size: int) -> bytes:
    return struct.pack("<Q", offset | (size << 40))


def test_hostile_bundles_are_esri_errors_at_once(cache_dir, tmp_path):
    """A bundle the server cannot trust answers Esri 400 for its tiles, at once and in bounded memory;
    tiles of the other bundles are served as before, and the bundle made whole again is served."""
    path = _bundle_path(cache_dir, 1)
    good = path.read_bytes()
    want = {}
    srv = _start(tmp_path, cache_dir)
    client = _Client(srv.port)
    url = "/arcgis/rest/services/Sample/MapServer/tile/{}/{}/{}"
    try:
        cache = open_cache(str(cache_dir))
        offsets, sizes = cache.index(compact.BundleRef(1, 0, 0))
        _, sizes2 = cache.index(compact.BundleRef(2, 0, 0))
        cache.close()
        present = [int(i) for i in range(len(sizes)) if sizes[i]]
        for i in present:
            want[i] = client.get(url.format(1, i // 128, i % 128))
            assert want[i][0] == 200
        j = next(int(j) for j in range(len(sizes2)) if sizes2[j])
        other_url = url.format(2, j // 128, j % 128)
        other = client.get(other_url)
        assert other[0] == 200
        i = present[0]
        at = 64 + 8 * i
        attacks = {
            "past the end": good[:at] + _index_record(len(good) - 10, 1000) + good[at + 8:],
            "huge size": good[:at] + _index_record(64 + 8 * 128 * 128, (1 << 24) - 1) + good[at + 8:],
            "offset at 2^40": good[:at] + _index_record((1 << 40) - 1, 5) + good[at + 8:],
            "empty file": b"",
            "index cut short": good[:70000],
            "header only": good[:64],
        }
        for what, data in attacks.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            time.sleep(0.06)                          # past the held descriptor's path check
            t0 = time.monotonic()
            status, body = client.get(url.format(1, i // 128, i % 128))
            assert time.monotonic() - t0 < 5, what
            assert status == 400 and json.loads(body)["error"]["code"] == 400, (what, status, body[:200])
            assert client.get(other_url) == other, what
        # a sparse giant (1 TiB, its index intact): only the index and the tile are read
        with open(path, "r+b") as f:
            f.write(good)
            f.truncate(1 << 40)
        time.sleep(0.06)
        status, body = client.get(url.format(1, i // 128, i % 128))
        assert (status, body) == want[i]
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(good)
        os.replace(tmp, path)
        time.sleep(0.06)
        for j in present:
            assert client.get(url.format(1, j // 128, j % 128)) == want[j]
        assert srv.proc.poll() is None and "unexpected error" not in srv.log.read_text()
    finally:
        client.close()
        srv.stop()


def test_a_package_listed_again_never_holds_the_event_loops_lock(cache_dir, tmp_path, monkeypatch):
    """A replaced package's central directory is read again by a read thread; while that read is slow
    or hangs (a network mount), the event loop's `tile_cached` must still answer at once (bytes, or
    WOULD_BLOCK for the read threads), never wait for it: it runs for every tile of the server."""
    tpk = tmp_path / "p.tpk"
    export(str(cache_dir), ExportRequest(levels="0-2"), str(tpk))
    cache = open_cache(str(tpk))
    try:
        offsets, sizes = cache.index(compact.BundleRef(2, 0, 0))
        i = next(int(i) for i in range(len(sizes)) if sizes[i])
        row, col = i // 128, i % 128
        want = cache.tile(2, row, col)
        assert cache.tile_cached(2, row, col) == want
        entered, release = threading.Event(), threading.Event()
        real = compact.ZipStore

        class HangingStore(real):
            def __init__(self, path):
                entered.set()
                release.wait(30)                       # the directory read that does not come back
                super().__init__(path)

        monkeypatch.setattr(compact, "ZipStore", HangingStore)
        lister = threading.Thread(target=cache._refresh_package, args=(False,))
        lister.start()
        assert entered.wait(10)
        answered = []
        loop = threading.Thread(target=lambda: answered.append(cache.tile_cached(2, row, col)))
        loop.start()
        loop.join(2)
        hung = loop.is_alive()
        release.set()
        loop.join(30)
        lister.join(30)
        assert not hung, "tile_cached waited for a read thread's central directory read"
        assert answered[0] in (want, WOULD_BLOCK)
        assert cache.tile(2, row, col) == want        # the listing read meanwhile is still right
    finally:
        cache.close()


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_v1_size_prefix_claiming_hundreds_of_megabytes(tmp_path):
    """A compact V1 tile's size is the 4-byte prefix in the .bundle (up to 4 GiB) and only has to fit
    the file, which may be sparse: the event loop's read made and filled a buffer of that size (a
    300 MB tile of zeros: 1.2 s and 570 MB on the loop) and served it, while the read threads failed
    with a bare ValueError and exports refuse it as over 16 MiB. Now: an Esri 400 naming the bundle,
    nothing allocated, the other tiles of the bundle served."""
    size = 300_000_000
    root = tmp_path / "c"
    make_sample(root, SampleSpec(levels=(0, 1, 2), version=1))
    level_dir = root / "_alllayers" / "L02"
    bundle, bundlx = level_dir / "R0000C0000.bundle", level_dir / "R0000C0000.bundlx"
    cache = open_cache(str(root))
    _, sizes = cache.index(compact.BundleRef(2, 0, 0))
    cache.close()
    good = next(int(i) for i in range(len(sizes)) if sizes[i])
    hostile = next(r * 128 + c for r in range(128) for c in range(128) if not sizes[r * 128 + c])
    end = bundle.stat().st_size
    index = bytearray(bundlx.read_bytes())
    cell = (hostile % 128) * 128 + hostile // 128          # .bundlx is column-major
    index[16 + 5 * cell:16 + 5 * cell + 5] = end.to_bytes(5, "little")
    bundlx.write_bytes(index)
    with open(bundle, "r+b") as f:
        f.seek(end)
        f.write(struct.pack("<I", size) + b"Z" * 64)
        f.truncate(end + 4 + size)                          # sparse: no disk used
    cache = open_cache(str(root))
    try:
        assert cache.tile(2, good // 128, good % 128)       # held, its index in memory
        tracemalloc.start()
        try:
            assert cache.tile_cached(2, hostile // 128, hostile % 128) is WOULD_BLOCK
            assert tracemalloc.get_traced_memory()[1] < 16 << 20
        finally:
            tracemalloc.stop()
        with pytest.raises(BundleError, match=r"R0000C0000.bundle: tile at row \d+, column \d+ .*over 16 MiB"):
            cache.tile(2, hostile // 128, hostile % 128)
    finally:
        cache.close()
    srv = _start(tmp_path, root)
    client = _Client(srv.port)
    url = "/arcgis/rest/services/Sample/MapServer/tile/2/{}/{}"
    try:
        want = client.get(url.format(good // 128, good % 128))
        assert want[0] == 200
        before = _vm_hwm_kib(srv.proc.pid)
        for _ in range(3):
            status, body = client.get(url.format(hostile // 128, hostile % 128))
            assert status == 400 and json.loads(body)["error"]["code"] == 400, (status, body[:200])
            assert client.get(url.format(good // 128, good % 128)) == want
        assert _vm_hwm_kib(srv.proc.pid) - before < 100_000  # KiB: never the claimed 300 MB
        assert "unexpected error" not in srv.log.read_text()
    finally:
        client.close()
        srv.stop()


def test_a_package_replaced_by_rename_while_served(cache_dir, tmp_path):
    """A .tpk served while new versions are renamed over it (its central directory read again by a
    read thread, outside the lock the event loop takes): every 200 is one version's exact tile, the
    rest Esri errors, and once the writer stops the next requests answer its last version."""
    versions = [_version(k) for k in range(3)]
    packages = []
    for k, tiles in enumerate(versions):
        _bundle_path(cache_dir, 2).write_bytes(_v2_bundle(tiles))
        out = tmp_path / f"v{k}.tpk"
        export(str(cache_dir), ExportRequest(levels="0-2"), str(out))
        packages.append(out.read_bytes())
    legit = {i: {v[i] for v in versions} for i in CELLS}
    served = tmp_path / "served.tpk"
    served.write_bytes(packages[0])
    srv = _start(tmp_path, served)
    last = [0]

    def writer(stop):
        k = 0
        while not stop.is_set():
            k = (k + 1) % len(packages)
            tmp = served.with_suffix(".tmp")
            tmp.write_bytes(packages[k])
            os.replace(tmp, served)
            last[0] = k
            time.sleep(random.random() * 0.01)

    try:
        _race(srv, legit, writer, 2.5)
        time.sleep(1.2)                                # past the package's relisting period (1 s)
        _assert_serves(srv, versions[last[0]])
        assert srv.proc.poll() is None and "unexpected error" not in srv.log.read_text()
    finally:
        srv.stop()

"""Property: a REAL `tilecrate serve` process stays right while its folder cache and its .tpkx change.

Hypothesis draws sequences of changes (bundles and the package rewritten in place, replaced by
rename, truncated, removed, re-added) applied while a client thread hammers tile requests and an
export job runs. Every tile answer must be a correct tile of some version that was written, a
404, or Esri error JSON (never a 5xx, never bytes that belong to no version); every package a
finished job produced must hold, bundle by bundle, exactly one version's tiles (read back with
the FORMATS.md reference reader of test_fixtures, which shares no code with tilecrate).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tilecrate
from tilecrate.cache import RELIST_SECONDS
from tilecrate.sample import SampleSpec, _v2_bundle, make_sample
from test_cache_changes import replace_by_rename, tile_bytes, version_tiles
from test_fixtures import reference_tiles
from test_server_support import Server, free_port, write_config

LEVELS = (0, 1, 2)
VERSIONS = 4


def _bundle_bytes(version: int, level: int) -> bytes:
    return _v2_bundle(version_tiles(version, level))


class World:
    """The served files, what was ever written to them, and the running server."""

    def __init__(self, root: Path):
        self.root = root
        self.folder = root / "cache"
        make_sample(root / "base", SampleSpec(levels=LEVELS))
        shutil.copytree(root / "base", self.folder)
        for lv in LEVELS:
            self.bundle(lv).write_bytes(_bundle_bytes(0, lv))
        self.packages: dict[int, bytes] = {}
        for v in range(VERSIONS):
            src = root / f"pkgsrc{v}"
            shutil.copytree(root / "base", src)
            for lv in LEVELS:
                (src / "_alllayers" / f"L{lv:02d}" / "R0000C0000.bundle").write_bytes(_bundle_bytes(v, lv))
            out = root / f"pkg{v}.tpkx"
            tilecrate.export(str(src), tilecrate.ExportRequest(levels="0-2"), str(out))
            self.packages[v] = out.read_bytes()
        self.package = root / "live.tpkx"
        self.package.write_bytes(self.packages[0])
        self.written = {("Live", lv): {0} for lv in LEVELS}     # versions ever written per bundle
        self.written_pkg = {0}
        data = root / "data"
        cfg = write_config(root / "tilecrate.toml", data, {"Live": {"source": self.folder},
                                                           "LivePkg": {"source": self.package}})
        self.server = Server(cfg, data, free_port()).start()
        self.lock = threading.Lock()

    def bundle(self, level: int) -> Path:
        return self.folder / "_alllayers" / f"L{level:02d}" / "R0000C0000.bundle"

    # the changes ---------------------------------------------------------------------------

    def apply(self, op: tuple) -> None:
        kind, target, level, version, frac = op
        if target == "pkg":
            path = self.package
            new = self.packages[version]
            with self.lock:
                self.written_pkg.add(version)
        else:
            path = self.bundle(level)
            new = _bundle_bytes(version, level)
            with self.lock:
                self.written[("Live", level)].add(version)
        if kind == "in_place":
            # overwritten in place, as `cp` or a tool opening with O_TRUNC does: same inode
            with open(path, "r+b" if path.exists() else "wb") as f:
                f.truncate(0)
                f.write(new)
        elif kind == "rename":
            replace_by_rename(path, new)
        elif kind == "truncate":
            if path.exists():
                os.truncate(path, int(path.stat().st_size * frac))
        elif kind == "remove":
            if path.exists() and target != "pkg":
                path.unlink()

    # the checks ----------------------------------------------------------------------------

    def valid_tile(self, service: str, level: int, row: int, col: int, body: bytes) -> bool:
        with self.lock:
            versions = set(self.written_pkg) if service == "LivePkg" else set(self.written[("Live", level)])
        return any(version_tiles(v, level).get(row * 128 + col) == body for v in versions)

    def check_answer(self, service: str, level: int, row: int, col: int, status: int, headers: dict,
                     body: bytes) -> str | None:
        """None when the answer is acceptable, else what is wrong with it."""
        if status == 200:
            return None if self.valid_tile(service, level, row, col, body) else f"wrong bytes {body[:40]!r}"
        if status >= 500:
            return f"HTTP {status}: {body[:200]!r}"
        try:
            err = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} without Esri error JSON: {body[:200]!r}"
        if status != 404 and not isinstance(err.get("message"), str):
            return f"HTTP {status} error without a message: {err}"
        if "Traceback" in body.decode("utf-8", "replace"):
            return "a traceback in the answer"
        return None

    def check_package(self, service: str, path: Path, changed: bool) -> str | None:
        """Each bundle of the package holds one version's tiles: all of them when the source did not
        change during the job; when it did, the tiles may be those of the version read at copy time
        within the cells selected earlier (see the report: the export does not yet pin the version
        it selected), but never tiles of two versions, and never foreign bytes."""
        tiles = reference_tiles(path)
        for lv in LEVELS:
            got = {r * 128 + c: t for (level, r, c), t in tiles.items() if level == lv}
            with self.lock:
                versions = set(self.written_pkg) if service == "LivePkg" else set(self.written[("Live", lv)])
            if not got:
                continue
            if not changed:
                if not any(got == version_tiles(v, lv) for v in versions):
                    return f"level {lv} of the package is not the one version of the unchanged source"
            elif not any(all(version_tiles(v, lv).get(i) == t for i, t in got.items()) for v in versions):
                return f"level {lv} of the package mixes versions or holds foreign bytes"
        return None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("live"))
    yield w
    w.server.stop()


def _hammer(world: World, stop: threading.Event, problems: list, seed: int, counts: dict) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        service = rng.choice(("Live", "LivePkg"))
        level = rng.choice(LEVELS)
        n = 1 << level
        row, col = rng.randrange(n), rng.randrange(n)
        r = world.server.get(f"{world.server.svc(service)}/tile/{level}/{row}/{col}")
        counts[r.status] = counts.get(r.status, 0) + 1
        problem = world.check_answer(service, level, row, col, r.status, r.headers, r.body)
        if problem:
            problems.append((service, level, row, col, problem))


_op = st.tuples(st.sampled_from(["in_place", "rename", "truncate", "remove"]),
                st.sampled_from(["folder", "pkg"]), st.sampled_from(LEVELS),
                st.integers(0, VERSIONS - 1), st.floats(0.0, 0.99))


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=6), service=st.sampled_from(["Live", "LivePkg"]),
       seed=st.integers(0, 2**16))
def test_answers_stay_correct_while_the_cache_changes(world, tmp_path, ops, service, seed):
    problems: list = []
    counts: dict = {}
    stop = threading.Event()
    hammer = threading.Thread(target=_hammer, args=(world, stop, problems, seed, counts))
    hammer.start()
    try:
        sub = world.server.submit(service, "exportTiles", {"tilePackage": "true", "exportBy": "LevelID",
                                                           "levels": "0-2", "storageFormat": "tpkx"})
        for op in ops:
            world.apply(op)
            time.sleep(0.01)
        job = world.server.poll(service, "exportTiles", sub["jobId"], timeout=60)
        status = job["jobStatus"]
        assert status in ("esriJobSucceeded", "esriJobFailed"), job
        if status == "esriJobSucceeded":
            value = world.server.result(service, "exportTiles", job)
            dest = tmp_path / "dl"
            dest.mkdir(exist_ok=True)
            _, files = world.server.download_all(value, dest)
            pkg = [f for f in files if f.suffix == ".tpkx"]
            assert len(pkg) == 1
            touched = any((op[1] == "pkg") == (service == "LivePkg") for op in ops)
            problem = world.check_package(service, pkg[0], touched)
            assert problem is None, (problem, ops)
        else:
            messages = " ".join(m.get("description", "") for m in job.get("messages", []))
            assert messages.strip() and "Traceback" not in messages, job
        time.sleep(0.05)
    finally:
        stop.set()
        hammer.join(30)
    assert not problems, problems[:5]
    assert world.server.proc.poll() is None, "the server died"
    # the cache is put back in order: the next example starts from readable files
    for lv in LEVELS:
        world.apply(("rename", "folder", lv, 0, 0.0))
    world.apply(("rename", "pkg", 0, 0, 0.0))
    for svc in ("Live", "LivePkg"):
        # a re-added bundle is seen after a re-listing, a renamed one after a path check
        deadline = time.monotonic() + 3 * RELIST_SECONDS + 2
        while True:
            r = world.server.get(f"{world.server.svc(svc)}/tile/2/1/0")
            if (r.status == 200 and r.body == tile_bytes(0, 2, 1, 0)) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status == 200 and r.body == tile_bytes(0, 2, 1, 0), (svc, r.status, r.body[:200])

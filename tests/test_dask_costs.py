"""What a cluster export costs besides the tiles (issue 10's benchmarks): the runner's own LocalCluster
config, task groups, and pass-through recipes small enough to travel through the scheduler cheaply.

A real LocalCluster (`local_cluster`, the one `[cluster] scheduler = "local"` starts) with worker
processes; the recipes are checked against the in-process plan byte for byte.
"""
from __future__ import annotations

import os
import pickle
import socket
import warnings
import zipfile
import zlib

import pytest
from distributed import Client

from test_dask import WIDE_LEVEL, leftovers, package_contents, widen
from tilecrate.cache import open_cache
from tilecrate.export import export
from tilecrate.plan import make_plan
from tilecrate.request import ExportRequest
from tilecrate.runners.assemble import Assembler
from tilecrate.runners.dask import GROUP_BYTES, GROUP_MAX, QUIET_CLUSTER, DaskRunner, group_tasks, local_cluster
from tilecrate.runners.tasks import bundle_recipe, prepare_bundle, stage_recipes
from tilecrate.package.zipstream import ZipWriter


@pytest.fixture(scope="module")
def wide(sample_v2, tmp_path_factory):
    return widen(sample_v2, tmp_path_factory.mktemp("wide") / "wide", 24)


def _worker_view():
    import dask
    return ({k: dask.config.get(k) for k in QUIET_CLUSTER if "pre-spawn-environ" not in k},
            {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")})


def test_local_cluster_runs_quiet_and_leaves_8787_alone(monkeypatch, wide, tmp_path):
    # a nanny of an earlier cluster leaves Dask's trim threshold in this process's environment
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    taken = socket.socket()
    try:
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen(1)
        except OSError:
            pass                       # already in use: the case the warning was about
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with local_cluster(2) as lc, Client(lc, set_as_default=False) as client:
                views = list(client.run(_worker_view).values())
                runner = DaskRunner(client)
                req = ExportRequest(levels=f"0-{WIDE_LEVEL}")
                there = export(str(wide), req, str(tmp_path / "c.tpkx"), scheduler=runner)
    finally:
        taken.close()
    assert not [w for w in seen if "8787" in str(w.message)]
    assert len(views) == 2
    for config, env in views:
        assert config["distributed.worker.profile.enabled"] is False
        assert config["distributed.admin.tick.interval"] == "500ms"
        assert env == {"MALLOC_TRIM_THRESHOLD_": str(128 << 20), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    here = export(str(wide), req, str(tmp_path / "i.tpkx"))
    assert package_contents(there.path) == package_contents(here.path)
    assert leftovers(tmp_path) == []


def test_pass_through_groups_ramp_up_and_re_encoding_groups_balance(wide, tmp_path):
    plan = make_plan(str(wide), ExportRequest(levels=f"0-{WIDE_LEVEL}"), tmp_path / "g.tpkx")
    tasks = list(plan.tasks())
    groups = group_tasks(plan, tasks, 2)
    assert [t.index for g in groups for t in g] == list(range(len(tasks)))
    assert len(groups[0]) == 1                              # the copy starts after one bundle
    assert all(len(b) <= 2 * len(a) for a, b in zip(groups, groups[1:]))
    assert all(len(g) <= GROUP_MAX and (len(g) == 1 or sum(t.tile_bytes for t in g) <= GROUP_BYTES)
               for g in groups)
    assert len(groups) <= 6                                 # 31 bundles: 1, 2, 4, 8, 16
    policy = make_plan(str(wide), ExportRequest(levels=str(WIDE_LEVEL), optimize_tiles_for_size=True,
                                                compression_quality=40), tmp_path / "r.tpkx")
    groups = group_tasks(policy, list(policy.tasks()), 2)
    loads = [sum(t.tiles for t in g) for g in groups]
    assert len(groups) == 8 and max(loads) == min(loads)    # 24 equal bundles: 4 groups per worker


@pytest.mark.parametrize("fixture", ["sample_v2", "sample_v1"])
def test_staged_recipes_are_small_and_assemble_the_same_entries(request, fixture, tmp_path):
    src = request.getfixturevalue(fixture)
    ext = ".tpkx" if fixture == "sample_v2" else ".tpk"
    plan = make_plan(str(src), ExportRequest(levels="0-5"), tmp_path / f"p{ext}")
    staging = tmp_path / "staging"
    staging.mkdir()
    recipes = [bundle_recipe(t) for t in plan.tasks(str(staging))]
    assert all(r is not None for r in recipes)
    stage_recipes(recipes, str(staging))
    staged = [p.name for p in staging.iterdir()]
    assert staged == [f".heads-{recipes[0].index}"]           # one file for the whole group
    with open_cache(src) as cache:
        preps = [prepare_bundle(t, cache) for t in plan.tasks()]
    try:
        with open(staging / staged[0], "rb") as f:
            heads = f.read()
        for r, prep in zip(recipes, preps):
            assert r.aux is None and r.bundlx is None
            assert len(pickle.dumps(r)) < 2048                 # was 128 KB and more per bundle
            assert heads[r.head_offset:r.head_offset + r.head_size] == bytes(prep.plan.aux)
            if prep.plan.bundlx is not None:                  # V1: the .bundlx staged with its CRC
                bx = heads[r.bundlx_offset:r.bundlx_offset + r.bundlx_size]
                assert bx == bytes(prep.plan.bundlx) and r.bundlx_crc32 == zlib.crc32(bx)
            else:
                assert r.bundlx_size == 0
        with open(tmp_path / "all.zip", "wb") as out:
            sink = Assembler(writer=ZipWriter(out))
            for r in recipes:
                sink.add_recipe(r)
            sink.close()
        with zipfile.ZipFile(tmp_path / "all.zip") as zf:
            for r, prep in zip(recipes, preps):
                assert zf.read(r.name) == b"".join(bytes(c) for c in prep.plan.chunks())
                assert zf.getinfo(r.name).CRC == r.crc32
                if prep.plan.bundlx is not None:
                    assert zf.read(r.name[:-1] + "x") == bytes(prep.plan.bundlx)
    finally:
        for prep in preps:
            prep.release()
    # the front end drops what it copied: staging holds only what is not assembled yet
    assert list(staging.iterdir()) == []


def test_thumbnail_plan_renders_the_same_thumbnail_with_less(wide, tmp_path):
    import pickle

    from tilecrate.package.thumbnail import render_thumbnail
    from tilecrate.runners.dask import _thumbnail_plan

    for levels in (f"0-{WIDE_LEVEL}", str(WIDE_LEVEL), "3-5"):
        plan = make_plan(str(wide), ExportRequest(levels=levels), tmp_path / "t.tpkx")
        small = _thumbnail_plan(plan)
        with open_cache(wide) as cache:
            assert render_thumbnail(cache, small.selection, small.info) == \
                   render_thumbnail(cache, plan.selection, plan.info)
        assert small.source_sizes == {} and len(pickle.dumps(small)) <= len(pickle.dumps(plan))
    # levels past the first wider than 3 tiles are never looked at: they do not travel
    plan = make_plan(str(wide), ExportRequest(levels=f"0-{WIDE_LEVEL}"), tmp_path / "t.tpkx")
    assert [lv.level for lv in _thumbnail_plan(plan).selection.levels][-1] < WIDE_LEVEL


def test_front_end_makes_pass_through_groups_the_cluster_has_not_returned(wide, tmp_path, monkeypatch):
    import time

    import tilecrate.runners.dask as runners_dask

    # by default only the first group (one bundle, submitted a moment before); any number here
    monkeypatch.setattr(runners_dask, "HEAD_START", 10 ** 6)
    req = ExportRequest(levels=f"0-{WIDE_LEVEL}")
    here = export(str(wide), req, str(tmp_path / "i.tpkx"))
    with local_cluster(1) as lc, Client(lc, set_as_default=False) as client:
        runner = DaskRunner(client)
        # the only worker thread is busy: no group comes back, the front end makes every one
        busy = client.submit(time.sleep, 30, pure=False)
        while not any(client.processing().values()):
            time.sleep(0.05)
        t0 = time.monotonic()
        there = export(str(wide), req, str(tmp_path / "c.tpkx"), scheduler=runner)
        assert time.monotonic() - t0 < 20
        assert runner.stats["groups"] > 1 and runner.stats["groups_here"] == runner.stats["groups"]
        client.cancel(busy, force=True)
        # the default: the front end makes at most the first group, the cluster all the others
        monkeypatch.setattr(runners_dask, "HEAD_START", 1)
        again = export(str(wide), req, str(tmp_path / "d.tpkx"), scheduler=runner)
        assert runner.stats["groups_here"] <= 1 < runner.stats["groups"]
    assert package_contents(there.path) == package_contents(here.path) == package_contents(again.path)
    assert leftovers(tmp_path) == []

"""ExportPlan: resolved once, picklable, and its bundle tasks make the bundles export() writes."""
from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

from tilecrate.cache import open_cache
from tilecrate.errors import BundleError, Cancelled
from tilecrate.estimate import estimate, estimate_plan
from tilecrate.export import export, export_plan
from tilecrate.plan import make_plan, pack_mask, unpack_mask
from tilecrate.request import ExportRequest
from tilecrate.runners.tasks import run_bundle_task

EXTENT = "-10,35,25,55"


def test_mask_packing_round_trips_and_refuses_bad_lengths():
    rng = np.random.default_rng(1)
    m = (rng.random((128, 128)) < 0.3).astype(np.uint8)
    assert len(pack_mask(m)) == 2048
    assert np.array_equal(unpack_mask(pack_mask(m)), m)
    with pytest.raises(ValueError, match="2048"):
        unpack_mask(b"\0" * 100)


@pytest.mark.parametrize("opts", [{}, {"storage_format": "Compact"}, {"tile_package": False},
                                  {"optimize_tiles_for_size": True, "compression_quality": 40}])
def test_plan_pickles_and_resolves_once(sample_v2, tmp_path, opts):
    req = ExportRequest(levels="1-5", extent=EXTENT, aoi_sr=4326, **opts)
    plan = make_plan(str(sample_v2), req, tmp_path / "o")
    back = pickle.loads(pickle.dumps(plan))
    assert back.layout == plan.layout and back.policy == plan.policy and back.quality_used == plan.quality_used
    assert back.tiles == plan.tiles > 0 and back.predicted() == plan.predicted()
    assert [(t.name, t.packed_mask, t.tiles) for t in back.tasks()] == [(t.name, t.packed_mask, t.tiles)
                                                                         for t in plan.tasks()]
    # the pickled form carries bit-packed masks: about 2 KB a bundle, not 16 KB
    assert len(pickle.dumps(plan)) < 4000 * plan.bundles + 20000
    assert (plan.policy is not None) == bool(opts.get("optimize_tiles_for_size"))
    assert estimate_plan(plan).total_size == estimate(str(sample_v2), req).total_size == plan.predicted()[0]


@pytest.mark.parametrize("opts,name", [({}, "a.tpkx"), ({"storage_format": "Compact"}, "a.tpk"),
                                       ({"optimize_tiles_for_size": True, "compression_quality": 40}, "r.tpkx")])
def test_bundle_tasks_write_the_bundles_export_writes(sample_v1, tmp_path, opts, name):
    req = ExportRequest(levels="0-5", **opts)
    out = tmp_path / name
    plan = make_plan(str(sample_v1), req, out)
    result = export_plan(plan)
    staging = tmp_path / "staging"
    for d in plan.dirs():
        (staging / d).mkdir(parents=True, exist_ok=True)
    outputs = [run_bundle_task(t) for t in plan.tasks(str(staging))]
    again = [run_bundle_task(t) for t in plan.tasks(str(staging))]        # idempotent: same files, same CRCs
    assert [(o.size, o.crc32, o.bundlx_crc32) for o in outputs] == [(o.size, o.crc32, o.bundlx_crc32) for o in again]
    assert not [f for _, _, fs in os.walk(staging) for f in fs if ".tmp-" in f]
    with zipfile.ZipFile(out) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for o in outputs:
            assert open(o.path, "rb").read() == zf.read(o.name)
            assert infos[o.name].CRC == o.crc32 and infos[o.name].file_size == o.size
            if o.bundlx_path:
                bx = o.name[:-1] + "x"
                assert open(o.bundlx_path, "rb").read() == zf.read(bx) and infos[bx].CRC == o.bundlx_crc32
    assert sum(o.tiles for o in outputs) == result.tiles == plan.tiles


def test_task_refuses_a_source_changed_since_planning(sample_v2, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    plan = make_plan(str(src), ExportRequest(levels="5"), tmp_path / "x.tpkx")
    task = next(plan.tasks(str(tmp_path)))
    for d in plan.dirs():
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    bundle = src / "_alllayers" / "L05" / os.path.basename(task.name)
    with open(bundle, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(BundleError, match="changed"):
        run_bundle_task(task)


def test_task_sees_a_cancel_before_writing(sample_v2, tmp_path):
    import threading

    plan = make_plan(str(sample_v2), ExportRequest(levels="5", optimize_tiles_for_size=True, compression_quality=30),
                     tmp_path / "x.tpkx")
    for d in plan.dirs():
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    flag = threading.Event()
    flag.set()
    with pytest.raises(Cancelled):
        run_bundle_task(next(plan.tasks(str(tmp_path))), flag)
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs]


def test_export_equals_plan_export(sample_v2, tmp_path):
    req = ExportRequest(levels="0-4")
    a = export(str(sample_v2), req, str(tmp_path / "a.tpkx"))
    with open_cache(sample_v2) as cache:
        b = export_plan(make_plan(cache, req, tmp_path / "b.tpkx"), cache)
    with zipfile.ZipFile(a.path) as za, zipfile.ZipFile(b.path) as zb:
        assert {i.filename: za.read(i) for i in za.infolist() if ".bundle" in i.filename} == \
               {i.filename: zb.read(i) for i in zb.infolist() if ".bundle" in i.filename}
    assert a.size == b.size


def test_pass_through_recipes_carry_the_crc_and_refuse_wrong_prefixes(sample_v2, tmp_path):
    import shutil

    from tilecrate.cache import open_cache as oc
    from tilecrate.runners.tasks import bundle_recipe

    req = ExportRequest(levels="3-5")
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    plan = make_plan(str(src), req, tmp_path / "a.tpkx")
    result = export_plan(plan)
    with zipfile.ZipFile(result.path) as zf:
        crcs = {i.filename: i.CRC for i in zf.infolist()}
    recipes = [bundle_recipe(t) for t in plan.tasks()]
    assert all(r is not None for r in recipes)
    assert {r.name: r.crc32 for r in recipes} == {r.name: crcs[r.name] for r in recipes}
    assert sum(length for r in recipes for _, length in r.ranges) + sum(len(r.aux) for r in recipes) == \
           sum(r.size for r in recipes)
    # a tile whose size prefix in the source is wrong: the bundle must be written fixed, not copied
    task = next(t for t in plan.tasks() if t.ref.level == 5)
    with oc(src) as cache:
        offsets, sizes = cache.index(task.ref)
    cell = int(np.flatnonzero(sizes)[0])
    bundle = src / "_alllayers" / "L05" / os.path.basename(task.name)
    with open(bundle, "r+b") as f:
        f.seek(int(offsets[cell]) - 4)
        f.write(b"\xff\xff\xff\x7f")
    fresh = make_plan(str(src), req, tmp_path / "b.tpkx")
    assert bundle_recipe(next(t for t in fresh.tasks() if t.ref.level == 5)) is None
    assert bundle_recipe(next(t for t in make_plan(str(src), ExportRequest(
        levels="5", optimize_tiles_for_size=True, compression_quality=30), tmp_path / "c.tpkx").tasks())) is None

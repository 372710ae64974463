"""Remembered run CRCs (kcopy.RUN_CRCS): a repeat export copies its runs in the kernel without
reading them, adjacent runs in one span, byte-identical to the buffered path; a source rewritten
(even with its old mtime put back) or holding wrong size prefixes is read again, never trusted."""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tilecrate
from tilecrate.package import kcopy
from tilecrate.request import ExportRequest


def _bundles(path: Path) -> dict[str, str]:
    """{entry or relative path: sha256} of every .bundle/.bundlx of a package or folder."""
    if path.is_dir():
        return {str(p.relative_to(path)).replace(os.sep, "/").split("_alllayers/")[1]:
                hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*.bundl*"))}
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None        # every CRC-32 in the central directory is the bytes'
        return {i.filename.split("/", 1)[1]: hashlib.sha256(zf.read(i)).hexdigest()
                for i in zf.infolist() if i.filename.endswith((".bundle", ".bundlx"))}


def _export(monkeypatch, mode: str, src: Path, out: Path, **kw):
    monkeypatch.setattr(kcopy, "COPY_METHOD", mode)
    return tilecrate.export(str(src), ExportRequest(**kw), str(out))


class _Counts:
    """Counts user-space reads of source ranges and kernel copies (calls and bytes)."""

    def __init__(self, monkeypatch):
        self.reads = 0
        self.copies = 0
        self.copied = 0
        read, copy = kcopy.read_range, kcopy.KernelCopier.copy

        def counted_read(part, view, *a, **k):
            self.reads += 1
            return read(part, view, *a, **k)

        def counted_copy(copier, fd, offset, length, label):
            self.copies += 1
            self.copied += length
            return copy(copier, fd, offset, length, label)
        monkeypatch.setattr(kcopy, "read_range", counted_read)
        monkeypatch.setattr(kcopy.KernelCopier, "copy", counted_copy)


@pytest.fixture
def fresh_crcs(monkeypatch):
    """An empty, enabled RUN_CRCS for this test (the process-wide one is left as it was)."""
    crcs = kcopy.RunCrcs()
    crcs.enabled = True
    monkeypatch.setattr(kcopy, "RUN_CRCS", crcs)
    monkeypatch.setattr(kcopy, "RACY_NS", 0)       # the samples were written a moment ago
    return crcs


def test_a_version_changed_within_the_racy_window_is_not_remembered(tmp_path):
    """A file rewritten within one coarse timestamp tick keeps its (size, mtime, ctime) version: a CRC
    remembered for it could be another content's, so only versions older than RACY_NS are kept."""
    import time

    crcs = kcopy.RunCrcs()
    crcs.enabled = True
    f = tmp_path / "b"
    f.write_bytes(b"x" * 100)
    young = kcopy.version(os.stat(f))
    crcs.put(young, 0, 100, 5)
    assert crcs.get(young, 0, 100) is None
    settled = young[:4] + (time.time_ns() - kcopy.RACY_NS - 1,)
    crcs.put(settled, 0, 100, 5)
    assert crcs.get(settled, 0, 100) == 5
    crcs.put(young[:4], 0, 100, 5)                  # an identity without ctime is never a key
    assert crcs.get(young[:4], 0, 100) is None


def test_run_crcs_forget_the_least_recently_used_and_answer_nothing_when_disabled():
    crcs = kcopy.RunCrcs(limit=2)
    crcs.enabled = True
    fid = (1, 2, 3, 4, 5)
    crcs.put(fid, 0, 10, 0x1_0000_0001)            # kept as a CRC-32
    crcs.put(fid, 10, 10, 7)
    assert crcs.get(fid, 0, 10) == 1                # now the most recent
    crcs.put(fid, 20, 10, 9)                        # evicts (10, 10)
    assert crcs.get(fid, 10, 10) is None and crcs.get(fid, 20, 10) == 9 and len(crcs) == 2
    assert crcs.get(fid, 0, 11) is None and crcs.get((1, 2, 3, 4, 6), 0, 10) is None
    assert crcs.get(None, 0, 10) is None
    crcs.enabled = False
    assert crcs.get(fid, 0, 10) is None
    crcs.put(fid, 30, 10, 1)
    crcs.enabled = True
    assert crcs.get(fid, 30, 10) is None and crcs.get(fid, 0, 10) == 1


@pytest.mark.parametrize("kind,kw", [("whole.tpkx", dict(levels="0-5")),
                                     ("bbox.tpk", dict(levels="0-5", extent="-10,30,40,60", aoi_sr=4326)),
                                     ("folder", dict(levels="0-5", tile_package=False))])
def test_a_repeat_export_copies_remembered_runs_without_reading_them(monkeypatch, tmp_path, sample_v2,
                                                                     fresh_crcs, kind, kw):
    _export(monkeypatch, "chunks", sample_v2, tmp_path / ("chunks-" + kind), **kw)
    want = _bundles(tmp_path / ("chunks-" + kind))
    monkeypatch.setattr(kcopy, "KERNEL_MIN", 0)     # every run of this small sample by the kernel
    first = _export(monkeypatch, "auto", sample_v2, tmp_path / ("first-" + kind), **kw)
    assert _bundles(tmp_path / ("first-" + kind)) == want
    if kind != "folder":                            # read for the CRCs (by the prescan or the writer)
        assert len(fresh_crcs) > 0
    else:                                           # a folder needs no CRC: nothing read to remember
        assert len(fresh_crcs) == 0
        return
    counts = _Counts(monkeypatch)
    again = _export(monkeypatch, "auto", sample_v2, tmp_path / ("again-" + kind), **kw)
    assert _bundles(tmp_path / ("again-" + kind)) == want and again.size == first.size
    assert counts.reads == 0, "a remembered run was read again"
    assert counts.copies > 0 and counts.copied > 0
    if kind.startswith("whole"):                    # one kernel copy per bundle: adjacent runs coalesced
        assert counts.copies == sum(1 for name in want if name.endswith(".bundle"))


def test_a_whole_bundle_is_one_kernel_copy_span(monkeypatch, tmp_path, sample_v2, fresh_crcs):
    monkeypatch.setattr(kcopy, "KERNEL_MIN", 0)
    _export(monkeypatch, "auto", sample_v2, tmp_path / "a.tpkx", levels="0-5")
    counts = _Counts(monkeypatch)
    _export(monkeypatch, "auto", sample_v2, tmp_path / "b.tpkx", levels="0-5")
    with zipfile.ZipFile(tmp_path / "b.tpkx") as zf:
        bundles = [i for i in zf.infolist() if i.filename.endswith(".bundle")]
    # every byte after each bundle's 64-byte header and index came through the kernel
    assert counts.copies == len(bundles)
    assert counts.copied == sum(i.file_size - 64 - 131072 for i in bundles)


def test_a_rewritten_source_with_its_old_mtime_put_back_is_read_again(monkeypatch, tmp_path, sample_v2, fresh_crcs):
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    monkeypatch.setattr(kcopy, "KERNEL_MIN", 0)
    _export(monkeypatch, "auto", src, tmp_path / "before.tpkx", levels="0-5")
    bundle = max(src.rglob("*.bundle"), key=lambda p: p.stat().st_size)
    st = bundle.stat()
    raw = bytearray(bundle.read_bytes())
    index = np.frombuffer(bytes(raw[64:64 + 16384 * 8]), dtype="<u8")
    cells = np.flatnonzero(index >> 40)
    off = int(index[cells[len(cells) // 2]] & ((1 << 40) - 1))
    raw[off + 20:off + 40] = bytes(b ^ 0x5A for b in raw[off + 20:off + 40])   # JPEG body bytes, same size
    with open(bundle, "r+b") as f:
        f.write(raw)
    os.utime(bundle, ns=(st.st_atime_ns, st.st_mtime_ns))                     # same size and mtime
    assert (bundle.stat().st_size, bundle.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    _export(monkeypatch, "chunks", src, tmp_path / "chunks.tpkx", levels="0-5")
    _export(monkeypatch, "auto", src, tmp_path / "after.tpkx", levels="0-5")
    assert _bundles(tmp_path / "after.tpkx") == _bundles(tmp_path / "chunks.tpkx")
    assert _bundles(tmp_path / "after.tpkx") != _bundles(tmp_path / "before.tpkx")


def test_runs_with_wrong_source_prefixes_are_never_remembered(monkeypatch, tmp_path, sample_v2, fresh_crcs):
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    bundle = max(src.rglob("*.bundle"), key=lambda p: p.stat().st_size)
    raw = bytearray(bundle.read_bytes())
    index = np.frombuffer(bytes(raw[64:64 + 16384 * 8]), dtype="<u8")
    for k, cell in enumerate(np.flatnonzero(index >> 40)):
        if k % 10 == 0:
            off = int(index[cell] & ((1 << 40) - 1))
            assert struct.unpack_from("<I", raw, off - 4)[0] == int(index[cell] >> 40)
            raw[off - 4:off] = b"\xee\xee\xee\xee"
    bundle.write_bytes(bytes(raw))
    monkeypatch.setattr(kcopy, "KERNEL_MIN", 0)
    _export(monkeypatch, "chunks", src, tmp_path / "chunks.tpkx", levels="0-5")
    want = _bundles(tmp_path / "chunks.tpkx")
    for name in ("one.tpkx", "two.tpkx", "three.tpkx"):
        _export(monkeypatch, "auto", src, tmp_path / name, levels="0-5")
        assert _bundles(tmp_path / name) == want
    ino = bundle.stat().st_ino
    assert not [k for k in fresh_crcs._d if k[0][1] == ino], "a spoiled bundle's run was remembered"
    assert len(fresh_crcs) > 0                  # the other bundles' runs were


def test_a_bundle_truncated_after_planning_fails_the_export_with_its_name(monkeypatch, tmp_path, sample_v2, fresh_crcs):
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    bundle = max(src.rglob("*.bundle"), key=lambda p: p.stat().st_size)
    from tilecrate.runners import inprocess
    prepare = inprocess.prepare_bundle

    def prepare_then_truncate(task, cache, **kw):
        prep = prepare(task, cache, **kw)
        if prep.plan.file == str(bundle):     # planned whole; the prescan and the writer find it cut
            os.truncate(bundle, prep.plan.file_size // 2)
        return prep
    monkeypatch.setattr(inprocess, "prepare_bundle", prepare_then_truncate)
    monkeypatch.setattr(kcopy, "KERNEL_MIN", 0)
    with pytest.raises(Exception, match=bundle.name):
        _export(monkeypatch, "auto", src, tmp_path / "out.tpkx", levels="0-5")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert not [k for k in fresh_crcs._d if k[0][1] == bundle.stat().st_ino]


def test_cluster_recipes_take_remembered_run_crcs_without_reading(monkeypatch, tmp_path, sample_v2, fresh_crcs):
    import zlib

    from tilecrate.plan import make_plan
    from tilecrate.runners import tasks
    plan = make_plan(str(sample_v2), ExportRequest(levels="0-5"), str(tmp_path / "out.tpkx"))
    first = [tasks.bundle_recipe(t) for t in plan.tasks()]
    assert all(r is not None for r in first) and len(fresh_crcs) > 0
    reads = []
    real = tasks.os.preadv
    monkeypatch.setattr(tasks.os, "preadv", lambda *a: reads.append(a) or real(*a))
    again = [tasks.bundle_recipe(t) for t in plan.tasks()]
    assert not reads, "a remembered run was read again"
    assert [(r.crc32, r.ranges) for r in again] == [(r.crc32, r.ranges) for r in first]
    for r in again:                     # the CRC is the one of the header block and the ranges' bytes
        with open(r.file, "rb") as f:
            data = r.aux + b"".join(os.pread(f.fileno(), length, offset) for offset, length in r.ranges)
        assert zlib.crc32(data) == r.crc32 and len(data) == r.size


def test_prescan_remembers_each_run_once_and_leaves_short_runs_to_the_writer(tmp_path, sample_v2, fresh_crcs):
    import zlib

    from tilecrate.cache import open_cache
    from tilecrate.plan import make_plan
    from tilecrate.runners.tasks import prepare_bundle
    with open_cache(sample_v2) as cache:
        plan = make_plan(cache, ExportRequest(levels="0-5"), str(tmp_path / "out.tpkx"))
        preps = [prepare_bundle(t, cache) for t in plan.tasks()]
        try:
            plans = [p.plan for p in preps if p.plan.file is not None]
            assert plans
            longest = max(int(r[1]) + 4 for p in plans for r in p.runs.tolist())
            assert sum(kcopy.prescan_plan(p, min_length=longest + 1) for p in plans) == 0
            assert len(fresh_crcs) == 0
            read = sum(kcopy.prescan_plan(p) for p in plans)
            assert read == sum(int(r[1]) + 4 for p in plans for r in p.runs.tolist())
            assert sum(kcopy.prescan_plan(p) for p in plans) == 0        # all remembered
            for (fid, offset, length), crc in fresh_crcs._d.items():      # each the CRC of those bytes
                path = next(p.file for p in plans if os.stat(p.file).st_ino == fid[1])
                with open(path, "rb") as f:
                    assert zlib.crc32(os.pread(f.fileno(), length, offset)) == crc
        finally:
            for p in preps:
                p.release()

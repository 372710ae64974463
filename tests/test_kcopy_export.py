"""Exports through kernel copies: byte-identical to the buffered path for every sink and source
kind, source prefixes fixed, a source changed between planning and copying refused."""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

import tilecrate
from tilecrate.cache import open_cache
from tilecrate.errors import BundleError, ExportError
from tilecrate.package import kcopy
from tilecrate.package.bundles import plan_bundle
from tilecrate.package.folder import FolderSink
from tilecrate.package.zipstream import ZipSink, ZipWriter
from tilecrate.request import ExportRequest

MODES = ["copy_file_range", "sendfile", "readwrite", "auto", "buffered"]
BBOX = dict(extent="-10,30,40,60", aoi_sr=4326)


def _bundles(path: Path) -> dict[str, tuple]:
    """Every .bundle/.bundlx of a package or folder: {name: (sha256, CRC-32 or None)}."""
    out = {}
    if path.is_dir():
        for p in sorted(path.rglob("*.bundl*")):
            data = p.read_bytes()
            out[str(p.relative_to(path))] = (hashlib.sha256(data).hexdigest(), zlib.crc32(data))
        return out
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        for info in zf.infolist():
            if info.filename.endswith((".bundle", ".bundlx")):
                data = zf.read(info)
                out[info.filename] = (hashlib.sha256(data).hexdigest(), info.CRC, info.header_offset)
    return out


def _export(monkeypatch, mode: str, src, out: Path, **kw):
    monkeypatch.setattr(kcopy, "COPY_METHOD", mode)
    return tilecrate.export(str(src), ExportRequest(**kw), str(out))


CASES = [("whole.tpkx", dict(levels="0-5")), ("bbox.tpk", dict(levels="0-5", **BBOX)),
         ("v2", dict(levels="0-5", tile_package=False, storage_format="CompactV2", **BBOX)),
         ("v1", dict(levels="0-4", tile_package=False, storage_format="Compact"))]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_every_copy_method_writes_the_bytes_of_the_buffered_path(monkeypatch, tmp_path, sample_v2, name, kw):
    base = _export(monkeypatch, "chunks", sample_v2, tmp_path / ("chunks-" + name), **kw)
    want = _bundles(tmp_path / ("chunks-" + name))
    assert want and base.tiles > 0
    for mode in MODES:
        out = tmp_path / f"{mode}-{name}"
        # auto: a small threshold so this sample's runs go both ways
        monkeypatch.setattr(kcopy, "KERNEL_MIN", 64 << 10)
        result = _export(monkeypatch, mode, sample_v2, out, **kw)
        assert result.size == base.size and result.tiles == base.tiles
        assert _bundles(out) == want, mode


@pytest.mark.parametrize("kind", ["tpkx", "tpk"])
def test_package_sources_copy_from_inside_the_zip(monkeypatch, tmp_path, sample_v1, kind):
    src = tmp_path / f"src.{kind}"
    _export(monkeypatch, "chunks", sample_v1, src, levels="0-5")
    for mode in ["chunks", "copy_file_range"]:
        _export(monkeypatch, mode, src, tmp_path / f"{mode}.tpkx", levels="0-5", **BBOX)
        _export(monkeypatch, mode, src, tmp_path / f"{mode}-folder", levels="0-5", tile_package=False)
    assert _bundles(tmp_path / "copy_file_range.tpkx") == _bundles(tmp_path / "chunks.tpkx")
    assert _bundles(tmp_path / "copy_file_range-folder") == _bundles(tmp_path / "chunks-folder")


def _spoil_prefixes(folder: Path) -> tuple[Path, int]:
    """Overwrite the size prefix of every tenth tile of the largest bundle with garbage."""
    bundle = max(folder.rglob("*.bundle"), key=lambda p: p.stat().st_size)
    raw = bytearray(bundle.read_bytes())
    index = np.frombuffer(bytes(raw[64:64 + 16384 * 8]), dtype="<u8")
    offsets = index & ((1 << 40) - 1)
    sizes = index >> 40
    spoiled = 0
    for k, cell in enumerate(np.flatnonzero(sizes)):
        if k % 10 == 0:
            off = int(offsets[cell])
            assert struct.unpack_from("<I", raw, off - 4)[0] == sizes[cell]
            raw[off - 4:off] = b"\xee\xee\xee\xee"
            spoiled += 1
    bundle.write_bytes(bytes(raw))
    return bundle, spoiled


def test_wrong_source_prefixes_are_fixed_not_copied(monkeypatch, tmp_path, sample_v2):
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    _, spoiled = _spoil_prefixes(src)
    assert spoiled > 1
    _export(monkeypatch, "chunks", src, tmp_path / "chunks.tpkx", levels="0-5")
    _export(monkeypatch, "copy_file_range", src, tmp_path / "kernel.tpkx", levels="0-5")
    _export(monkeypatch, "copy_file_range", src, tmp_path / "kernel-folder", levels="0-5", tile_package=False)
    monkeypatch.setattr(kcopy, "KERNEL_MIN", 64 << 10)
    _export(monkeypatch, "auto", src, tmp_path / "auto.tpkx", levels="0-5")
    want = _bundles(tmp_path / "chunks.tpkx")
    assert _bundles(tmp_path / "kernel.tpkx") == want
    assert _bundles(tmp_path / "auto.tpkx") == want
    folder = {k.replace(os.sep, "/").split("_alllayers/")[1]: v[0] for k, v in _bundles(tmp_path / "kernel-folder").items()}
    assert folder == {k.split("tile/")[1]: v[0] for k, v in want.items()}
    with open_cache(tmp_path / "kernel.tpkx") as out, open_cache(sample_v2) as ref:
        for level in ref.levels:
            for ref_b in ref.bundles(level):
                data = ref.open_bundle(ref_b)
                try:
                    got = out.open_bundle(ref_b)
                    try:
                        assert np.array_equal(got.sizes, data.sizes)
                    finally:
                        got.close()
                finally:
                    data.close()


@pytest.mark.parametrize("sink_kind", ["zip", "folder"])
@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_source_changed_after_planning_is_refused(tmp_path, sample_v2, sink_kind, change):
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    with open_cache(src) as cache:
        ref = max((b for lv in cache.levels for b in cache.bundles(lv)),
                  key=lambda b: cache.bundle_file(b)[2])
        data = cache.open_bundle(ref)
        try:
            plan = plan_bundle(data, np.ones((128, 128), bool), 2, "b", cache)
        finally:
            data.close()
    assert plan.file is not None
    path = Path(plan.file)
    if change == "truncate":
        os.truncate(path, plan.file_size - 1000)
    else:                       # same size, new content and mtime
        raw = path.read_bytes()
        os.utime(path, ns=(0, 0))
        path.write_bytes(raw)
        if getattr(plan, "file_id", None) is None:
            pytest.fail("the plan carries no file identity: a same-size rewrite cannot be detected")
    if sink_kind == "zip":
        with open(tmp_path / "o.zip", "wb") as f:
            sink = ZipSink(ZipWriter(f))
            with pytest.raises(BundleError, match="changed"):
                sink.add_bundle("a.bundle", plan)
    else:
        sink = FolderSink(str(tmp_path / "out"))
        with pytest.raises(BundleError, match="changed"):
            sink.add_bundle("a.bundle", plan)
        sink.close()


def test_a_source_truncated_during_an_export_leaves_no_output(monkeypatch, tmp_path, sample_v2):
    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    biggest = max(src.rglob("*.bundle"), key=lambda p: p.stat().st_size)
    calls = []

    def progress(p):
        calls.append(p)
        if len(calls) == 1:
            os.truncate(biggest, biggest.stat().st_size // 2)

    monkeypatch.setattr(kcopy, "COPY_METHOD", "copy_file_range")
    out = tmp_path / "out.tpkx"
    with pytest.raises((BundleError, ExportError)) as info:
        tilecrate.export(str(src), ExportRequest(levels="0-5"), str(out), progress=progress)
    assert biggest.name in str(info.value) or "changed" in str(info.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

"""export(): every output kind re-read tile for tile, exact size prediction, progress, cancel, errors."""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import zipfile

import numpy as np
import pytest

import tilecrate
from tilecrate.cache import COMPACT_V1, COMPACT_V2, open_cache
from tilecrate.errors import BundleError, Cancelled, ExportError, RequestError
from tilecrate.estimate import estimate
from tilecrate.export import ExportProgress, export
from tilecrate.package.sizing import predict_package_size
from tilecrate.request import ExportRequest
from tilecrate.selection import select

from conftest import real_path

EXTENT = "-10,35,25,55"   # lon/lat, inside the sample


def folder_size(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def written_size(path) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else folder_size(path)


def selected_tiles(cache, selection) -> dict:
    """{(level, row, col): bytes} of the selection, read from the source with open_cache."""
    out = {}
    for b in selection.bundles():
        with cache.open_bundle(b.ref) as data:
            for i in np.flatnonzero(np.asarray(b.mask).ravel()):
                r, c = divmod(int(i), 128)
                out[(b.ref.level, b.ref.row0 + r, b.ref.col0 + c)] = data.tile(b.ref.row0 + r, b.ref.col0 + c)
    return out


def all_tiles(path) -> dict:
    with open_cache(path) as c:
        return {(lv, r, col): data for lv, r, col, data in c.iter_tiles()}


CASES = [  # (output name, request options, kind, storage format)
    ("out.tpkx", {}, "tpkx", COMPACT_V2),
    ("out.tpk", {}, "tpk", COMPACT_V1),
    ("outv2", {"tile_package": False, "storage_format": "CompactV2"}, "folder", COMPACT_V2),
    ("outv1", {"tile_package": False, "storage_format": "Compact"}, "folder", COMPACT_V1),
]


@pytest.mark.parametrize("source", ["sample_v2", "sample_v1", "sample_mixed"])
@pytest.mark.parametrize("name,opts,kind,storage", CASES)
def test_export_round_trip_and_exact_size(request, tmp_path, source, name, opts, kind, storage):
    src = request.getfixturevalue(source)
    req = ExportRequest(levels="1-5", extent=EXTENT, aoi_sr=4326, **opts)
    out = tmp_path / name
    with open_cache(src) as cache:
        sel = select(cache, req)
        expected = selected_tiles(cache, sel)
        predicted, per_level = predict_package_size(cache, sel, req, out=str(out))
        result = export(cache, req, str(out))
    assert result.path == str(out) and result.kind == kind and result.storage_format == storage
    assert result.tiles == len(expected) == sel.tiles
    assert result.size == written_size(out) == predicted
    assert {lv: v["size"] for lv, v in result.levels.items()} == {lv: s for lv, s in per_level.items() if s}
    assert sum(v["tiles"] for v in result.levels.values()) == result.tiles
    with open_cache(out) as back:
        assert back.storage_format == storage
        assert back.kind == kind
    assert all_tiles(out) == expected
    if out.is_file():
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_estimate_equals_bytes_written(sample_v2, tmp_path):
    for fmt, name in (("CompactV2", "e.tpkx"), ("Compact", "e.tpk")):
        req = ExportRequest(levels="0-5", storage_format=fmt)
        est = estimate(str(sample_v2), req)
        result = export(str(sample_v2), req, str(tmp_path / name))
        assert est.total_size == result.size == os.path.getsize(tmp_path / name)
        assert est.total_tiles == result.tiles


def test_forced_zip64_package_is_exact_and_readable(sample_v2, tmp_path):
    req = ExportRequest(levels="0-5")
    out = tmp_path / "z.tpkx"
    with open_cache(sample_v2) as cache:
        sel = select(cache, req)
        predicted, _ = predict_package_size(cache, sel, req, zip64_limit=4096)
        result = export(cache, req, str(out), zip64_limit=4096, selection=sel)
    raw = out.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw
    assert result.size == len(raw) == predicted
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    assert all_tiles(out) == all_tiles(sample_v2)


def test_output_format_follows_extension_and_request(sample_v2, tmp_path):
    assert export(sample_v2, ExportRequest(levels="0-1"), str(tmp_path / "a.tpk")).kind == "tpk"
    assert export(sample_v2, ExportRequest(levels="0-1"), str(tmp_path / "a.tpkx")).kind == "tpkx"
    # no telling extension: the storage format decides, else the source's own
    assert export(sample_v2, ExportRequest(levels="0-1", storage_format="Compact"), str(tmp_path / "a.pkg")).kind == "tpk"
    assert export(sample_v2, ExportRequest(levels="0-1"), str(tmp_path / "b.pkg")).kind == "tpkx"
    folder = export(sample_v2, ExportRequest(levels="0-1", tile_package=False), str(tmp_path / "d"))
    assert (folder.kind, folder.storage_format) == ("folder", COMPACT_V2)      # the source's own format
    with pytest.raises(RequestError, match="tpkx"):
        export(sample_v2, ExportRequest(levels="0-1", storage_format="CompactV2"), str(tmp_path / "c.tpk"))


def test_progress_is_monotonic_and_complete(sample_v2, tmp_path):
    seen: list[ExportProgress] = []
    result = export(sample_v2, ExportRequest(levels="0-5"), str(tmp_path / "p.tpkx"), progress=seen.append,
                    threads=2)
    assert seen[0].tiles_done == 0
    assert [p.tiles_done for p in seen] == sorted(p.tiles_done for p in seen)
    assert seen[-1].tiles_done == seen[-1].tiles_total == result.tiles
    assert seen[-1].bytes_total == result.size
    assert seen[-1].bytes_done == result.size


def test_threads_do_not_change_the_bundles(sample_v2, tmp_path):
    outs = []
    for n in (1, 2, 4):
        out = tmp_path / f"t{n}.tpkx"
        export(sample_v2, ExportRequest(levels="0-5"), str(out), threads=n)
        with zipfile.ZipFile(out) as zf:
            outs.append({i.filename: zf.read(i) for i in zf.infolist() if i.filename.endswith(".bundle")})
    assert outs[0] == outs[1] == outs[2]


def test_cancel_removes_partial_output(sample_v2, tmp_path):
    cancel = threading.Event()

    def stop_after_first(p: ExportProgress) -> None:
        if p.tiles_done > 0:
            cancel.set()

    for name, opts in (("c.tpkx", {}), ("cdir", {"tile_package": False})):
        with pytest.raises(Cancelled):
            export(sample_v2, ExportRequest(levels="0-5", **opts), str(tmp_path / name),
                   progress=stop_after_first, cancel=cancel)
        cancel.clear()
    assert os.listdir(tmp_path) == []


def test_corrupt_source_bundle_fails_cleanly(sample_v2, tmp_path):
    req = ExportRequest(levels="0-5")
    with open_cache(sample_v2) as cache:
        sel = select(cache, req)      # made before the damage: select would read the broken index
    broken = tmp_path / "broken"
    shutil.copytree(sample_v2, broken)
    bundle = broken / "_alllayers" / "L05" / "R0000C0000.bundle"
    data = bytearray(bundle.read_bytes())
    data[60:64] = (12345).to_bytes(4, "little")        # index size field: not a V2 bundle any more
    bundle.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(BundleError, match="R0000C0000.bundle"):
        # levels 0-4 are fine and get written first; the failure at level 5 must remove them
        export(str(broken), req, str(out_dir / "x.tpkx"), selection=sel)
    assert os.listdir(out_dir) == []


def test_disk_full_becomes_a_clear_export_error(sample_v2, tmp_path, monkeypatch):
    from tilecrate.package import zipstream

    real = zipstream.ZipWriter._write
    calls = {"n": 0}

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(zipstream.ZipWriter, "_write", failing)
    with pytest.raises(ExportError, match="disk is full"):
        export(sample_v2, ExportRequest(levels="0-5"), str(tmp_path / "full.tpkx"))
    assert os.listdir(tmp_path) == []


def test_refusals(sample_v2, tmp_path):
    with pytest.raises(ExportError, match="vector tile"):
        export(str(real_path("natural-earth.vtpk")), ExportRequest(levels="0-2"), str(tmp_path / "v.tpkx"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(ExportError, match="exists"):
        export(sample_v2, ExportRequest(levels="0", tile_package=False), str(tmp_path / "taken"))
    with pytest.raises(ExportError, match="does not exist"):
        export(sample_v2, ExportRequest(levels="0"), str(tmp_path / "nowhere" / "x.tpkx"))
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_cli_export(sample_v2, tmp_path, capsys):
    from tilecrate.cli import main

    out = tmp_path / "cli.tpk"
    assert main(["export", str(sample_v2), "-o", str(out), "--levels", "0-3", "--extent=-10,35,25,55",
                 "--aoi-sr", "4326", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "tpk" and doc["size"] == out.stat().st_size and doc["tiles"] > 0
    assert set(doc["levels"]) == {"0", "1", "2", "3"}
    assert main(["export", str(sample_v2), "-o", str(tmp_path / "d"), "--levels", "0-1", "--no-tile-package",
                 "--storage-format", "Compact", "-q"]) == 0
    with open_cache(tmp_path / "d") as back:
        assert back.storage_format == COMPACT_V1
    capsys.readouterr()
    assert main(["export", str(sample_v2), "-o", str(tmp_path / "bad.tpkx"), "--levels", "0-99", "--json"]) == 1
    assert "level" in json.loads(capsys.readouterr().out)["error"]
    assert main(["export", str(sample_v2), "-o", str(tmp_path / "q.tpkx"), "--levels", "0",
                 "--compression-quality", "50"]) == 1
    assert not (tmp_path / "bad.tpkx").exists() and not (tmp_path / "q.tpkx").exists()


def test_public_api(sample_v2, tmp_path):
    assert tilecrate.export is export
    r = tilecrate.export(str(sample_v2), tilecrate.ExportRequest(levels="0-2"), str(tmp_path / "api.tpkx"))
    assert r.to_json()["tiles"] == r.tiles == 9


def test_an_output_that_is_not_a_file_or_folder_is_refused(sample_v2, tmp_path):
    fifo = tmp_path / "x.tpkx"
    os.mkfifo(fifo)
    link = tmp_path / "l.tpkx"
    link.symlink_to(tmp_path / "elsewhere.tpkx")
    for out in (fifo, link):
        with pytest.raises(ExportError, match="not a regular file or folder"):
            export(sample_v2, ExportRequest(levels="0-1"), str(out))
    assert sorted(os.listdir(tmp_path)) == ["l.tpkx", "x.tpkx"] and os.path.islink(link)
    import stat
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_cli_workers_is_bounded(sample_v2, tmp_path, capsys):
    from tilecrate.cli import main

    for n in ("0", str(4 * (os.cpu_count() or 1) + 1)):
        assert main(["export", str(sample_v2), "-o", str(tmp_path / "w.tpkx"), "--levels", "0",
                     "--scheduler", "local", "--workers", n, "--json"]) == 1
        assert "--workers" in json.loads(capsys.readouterr().out)["error"]
    assert main(["export", str(sample_v2), "-o", str(tmp_path / "w.tpkx"), "--levels", "0", "--workers", "2",
                 "--json"]) == 1
    assert "--scheduler local" in json.loads(capsys.readouterr().out)["error"]
    assert os.listdir(tmp_path) == []

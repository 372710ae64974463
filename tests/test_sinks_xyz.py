"""XYZ folder output, and what every open-format output shares: temp name + rename, cancel, a failed
write, refused outputs and sources, estimates."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import real_path
from tilecrate.cache import open_cache
from tilecrate.errors import Cancelled, ExportError, TilecrateError
from tilecrate.export import export
from tilecrate.plan import make_plan
from tilecrate.request import ExportRequest
from tilecrate.sinks import estimate_open, sink_kind

OUTS = {"mbtiles": "o.mbtiles", "gpkg": "o.gpkg", "pmtiles": "o.pmtiles", "xyz": "o_xyz"}


def _export(src, kind, out, **kw):
    return export(str(src), kw.pop("request", ExportRequest("0-5")), str(out),
                  format="xyz" if kind == "xyz" else None, **kw)


def test_xyz_folder(sample_mixed, tmp_path):
    out = tmp_path / "xyz"
    res = _export(sample_mixed, "xyz", out)
    assert res.kind == "xyz"
    n = 0
    with open_cache(str(sample_mixed)) as cache:
        for z, row, col, data in cache.iter_tiles():
            ext = "jpg" if data[:3] == b"\xff\xd8\xff" else "png"
            assert (out / str(z) / str(col) / f"{row}.{ext}").read_bytes() == data
            n += 1
        meta = json.loads((out / "metadata.json").read_text())
        assert meta["name"] == (cache.item.title or cache.name) and meta["scheme"] == "xyz"
        assert (meta["minzoom"], meta["maxzoom"]) == (0, 5) and len(meta["bounds"]) == 4
    files = [f for _, _, fs in os.walk(out) for f in fs]
    assert len(files) == n + 1 == res.tiles + 1
    total, _, note = estimate_open(make_plan(str(sample_mixed), ExportRequest("0-5")), "xyz")
    assert note is None and total == res.size == sum(os.path.getsize(os.path.join(d, f))
                                                    for d, _, fs in os.walk(out) for f in fs)


def test_xyz_keeps_levels_of_other_schemes(tmp_path):
    out = tmp_path / "geo"
    res = _export(real_path("wgs84.tpkx"), "xyz", out, request=ExportRequest("0-2"))
    assert res.tiles == 2 + 6 + 15
    assert "tilingScheme" in json.loads((out / "metadata.json").read_text())


@pytest.mark.parametrize("kind", sorted(OUTS))
def test_output_appears_only_complete(sample_v2, tmp_path, kind):
    """While tiles are written only a hidden temp exists; the output appears by rename at the end."""
    out = tmp_path / OUTS[kind]
    seen = []

    def progress(p):
        names = sorted(os.listdir(tmp_path))
        seen.append(names)

    _export(sample_v2, kind, out, progress=progress)
    middle = [names for names in seen[1:-1]]
    assert middle and all(OUTS[kind] not in names for names in middle)
    # every format, PMTiles too, writes its tiles straight into the one temp next to the output
    assert all(len(names) == 1 for names in middle)
    assert all(n.startswith(f".{OUTS[kind]}.tmp-") for names in middle for n in names)
    assert os.listdir(tmp_path) == [OUTS[kind]]


@pytest.mark.parametrize("kind", sorted(OUTS))
def test_cancel_leaves_nothing(sample_v2, tmp_path, kind):
    cancel = threading.Event()

    def progress(p):
        if p.tiles_done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        _export(sample_v2, kind, tmp_path / OUTS[kind], progress=progress, cancel=cancel)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", sorted(OUTS))
def test_failed_write_is_one_line_and_leaves_nothing(sample_v2, tmp_path, kind):
    """A write that fails midway (a 64 KiB file size limit: EFBIG, as a full disk would) is one line."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out" / OUTS[kind]
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "tilecrate.cli", "export", str(sample_v2), "-o", str(out), "--levels", "0-5"]
    if kind == "xyz":
        cmd += ["--format", "xyz"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    if kind == "xyz":      # every tile file is below the limit: the folder is written
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith("tilecrate: error: ") and "Traceback" not in r.stderr
    assert os.listdir(out.parent) == []


def test_disk_full_names_the_disk(sample_v2, tmp_path, monkeypatch):
    import errno

    from tilecrate.sinks import pmtiles as pm

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pm, "write_all", full)
    with pytest.raises(ExportError, match="disk is full"):
        _export(sample_v2, "pmtiles", tmp_path / "o.pmtiles")
    assert os.listdir(tmp_path) == []


def test_refused_outputs_and_sources(sample_v2, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_bytes(b"x")
    with pytest.raises(ExportError, match="not an empty folder"):
        _export(sample_v2, "xyz", tmp_path / "taken")
    (tmp_path / "d.mbtiles").mkdir()
    with pytest.raises(ExportError, match="not a regular file"):
        _export(sample_v2, "mbtiles", tmp_path / "d.mbtiles")
    with pytest.raises(ExportError, match="does not fit format"):
        export(str(sample_v2), ExportRequest("0"), str(tmp_path / "a.gpkg"), format="pmtiles")
    with pytest.raises(ExportError, match="unknown output format"):
        export(str(sample_v2), ExportRequest("0"), str(tmp_path / "a"), format="kml")
    with pytest.raises(ExportError, match="Dask"):
        export(str(sample_v2), ExportRequest("0"), str(tmp_path / "a.pmtiles"), scheduler="local")
    with pytest.raises(TilecrateError, match="vector|pbf"):
        export(str(real_path("natural-earth.vtpk")), ExportRequest("0"), str(tmp_path / "v.mbtiles"))
    assert sorted(os.listdir(tmp_path)) == ["d.mbtiles", "taken"]
    assert sink_kind("a.TPKX") is None and sink_kind("a.MBTiles") == "mbtiles" and sink_kind("dir", "xyz") == "xyz"


def test_source_changed_after_planning_is_an_error(sample_v2, tmp_path):
    """A bundle that lost tiles between planning and writing: a clear error, nothing left."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sample_v2, src)
    from tilecrate.selection import select

    with open_cache(str(src)) as cache:
        selection = select(cache, ExportRequest("0-5"))
    bundle = next(p for p in src.rglob("*.bundle") if "L05" in str(p))
    bundle.write_bytes(bundle.read_bytes()[:64])       # truncated: the index is gone
    out = tmp_path / "o.mbtiles"
    with open_cache(str(src)) as cache, pytest.raises(TilecrateError):
        export(cache, ExportRequest("0-5"), str(out), selection=selection)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".o.mbtiles")]


def test_level_ids_that_are_not_zooms_and_metadata_everywhere(tmp_path):
    """nonstandard_zoom_levels.tpk: LODs 0-2 are zooms 2-4 (mapped by resolution); its credits reach
    MBTiles, PMTiles and XYZ."""
    import sqlite3

    from pmtiles.reader import Reader

    src = str(real_path("nonstandard_zoom_levels.tpk"))
    export(src, ExportRequest("0-2"), str(tmp_path / "n.mbtiles"))
    export(src, ExportRequest("0-2"), str(tmp_path / "n.pmtiles"))
    export(src, ExportRequest("0-2"), str(tmp_path / "n"), format="xyz")
    db = sqlite3.connect(tmp_path / "n.mbtiles")
    rows = db.execute("SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles").fetchall()
    meta = dict(db.execute("SELECT name, value FROM metadata"))
    db.close()
    data = (tmp_path / "n.pmtiles").read_bytes()
    reader = Reader(lambda off, n: data[off:off + n])
    xyz = json.loads((tmp_path / "n" / "metadata.json").read_text())
    with open_cache(src) as cache:
        assert sorted({z for z, *_ in rows}) == [2, 3, 4] and len(rows) == 2 + 4 + 16
        for z, x, y, blob in rows:
            row = (1 << z) - 1 - y
            assert cache.tile(z - 2, row, x) == blob == reader.get(z, x, row)
            assert (tmp_path / "n" / str(z) / str(x) / f"{row}.png").read_bytes() == blob
        credits = cache.item.credits
    assert credits == "US Census Bureau"
    assert meta["attribution"] == reader.metadata()["attribution"] == xyz["attribution"] == credits
    assert (meta["minzoom"], meta["maxzoom"]) == ("2", "4") and (xyz["minzoom"], xyz["maxzoom"]) == (2, 4)

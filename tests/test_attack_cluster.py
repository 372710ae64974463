"""Attacks on the Dask scale-out between the workers and the assembly: staged bundles deleted,
truncated, grown or overwritten before the client copies them into the package. Each must end as
one readable error naming the staged file, with nothing at the final name and no staging left
behind; never a bare OSError or a hang. A same-size overwrite is not noticed by the assembly (the
CRC-32 the worker computed is used, never recomputed, as designed: whoever can write the staging
folder can write the package too), but it must not go unnoticed by a zip reader either: the entry's
CRC no longer matches."""
from __future__ import annotations

import os
import zipfile

import pytest
from distributed import Client, LocalCluster

from test_dask import WIDE_LEVEL, leftovers, widen
from tilecrate.errors import TilecrateError
from tilecrate.export import export
from tilecrate.request import ExportRequest
from tilecrate.runners import assemble
from tilecrate.runners.dask import DaskRunner


@pytest.fixture(scope="module")
def runner():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      silence_logs=50) as lc, Client(lc, set_as_default=False) as c:
        yield DaskRunner(c)


@pytest.fixture(scope="module")
def wide(sample_v2, tmp_path_factory):
    return widen(sample_v2, tmp_path_factory.mktemp("wide") / "wide", 6)


def _delete(path):
    os.unlink(path)


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _grow(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)


def _scribble(path):
    """Same size, other bytes: the CRC-32 the worker computed no longer matches."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xa5" * 64)


def _directory(path):
    os.unlink(path)
    os.mkdir(path)


@pytest.mark.parametrize("harm", [_delete, _truncate, _grow, _directory], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("name", ["a.tpkx", "a.tpk"])
def test_a_staged_bundle_harmed_before_assembly(runner, wide, tmp_path, monkeypatch, harm, name):
    out = tmp_path / "out"
    seen = _harm_second(monkeypatch, harm)
    out.mkdir()
    with pytest.raises(TilecrateError) as info:
        export(str(wide), REQ, str(out / name), scheduler=runner)
    text = str(info.value)
    assert "\n" not in text.strip() and "Traceback" not in text and seen[1] in text, text
    assert len(seen) >= 2, "the harm must hit a bundle before the last"
    assert os.listdir(out) == [] and leftovers(tmp_path) == [], os.listdir(out)


# recompressed, so the workers stage whole bundles (not pass-through recipes)
REQ = ExportRequest(levels=str(WIDE_LEVEL), optimize_tiles_for_size=True, compression_quality=30)


def _harm_second(monkeypatch, harm, method: str = "add_output", path=lambda out: out.path,
                 name=lambda out: out.name) -> list[str]:
    """Harm the second item the assembly takes (`Assembler.<method>`: a staged bundle, or a recipe's source)
    right before it is copied: `harm(path(item))`; the names of the items seen, in order."""
    real = getattr(assemble.Assembler, method)
    seen: list[str] = []

    def harmed(self, item):
        if len(seen) == 1:
            harm(path(item))
        seen.append(name(item))
        return real(self, item)

    monkeypatch.setattr(assemble.Assembler, method, harmed)
    return seen


def test_a_staged_bundle_overwritten_in_place_fails_the_zip_crc(runner, wide, tmp_path, monkeypatch):
    seen = _harm_second(monkeypatch, _scribble)
    result = export(str(wide), REQ, str(tmp_path / "a.tpkx"), scheduler=runner)
    with zipfile.ZipFile(result.path) as zf:
        assert zf.testzip() == seen[1]


def _source_scribble(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x5a" * 64)


def _source_renamed_over(path):
    tmp = path + ".new"
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2:len(data) // 2 + 64] = b"\x5a" * 64
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@pytest.mark.parametrize("harm", [_source_scribble, _source_renamed_over, os.unlink], ids=["scribble", "renamed", "deleted"])
def test_a_source_bundle_changed_before_its_recipe_is_assembled(runner, wide, tmp_path, monkeypatch, harm):
    """Pass-through bundles are recipes: the workers stage headers only and the client copies the tile
    ranges from the source. A source changed between the worker's read and that copy must fail the
    export (its CRC-32 and ranges describe the old bytes), never make a package of mixed bytes."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(wide, src)                       # the module's cache stays intact
    seen = _harm_second(monkeypatch, harm, "add_recipe", path=lambda r: r.file, name=lambda r: r.file)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(TilecrateError) as info:
        export(str(src), ExportRequest(levels=str(WIDE_LEVEL)), str(out / "p.tpkx"), scheduler=runner)
    text = str(info.value)
    assert len(seen) >= 2 and "\n" not in text.strip() and os.path.basename(seen[1]) in text, text
    assert os.listdir(out) == [] and leftovers(tmp_path) == []

"""Exports whose every output file is hashed (sha256), for the byte-identity check of the package
metadata writers (tests/test_esri_files.py) and for before/after comparisons of a refactoring.

`python tests/package_golden.py OUT.json [--all]` writes the manifest: with `--all` every zip member
and folder file (bundles, thumbnail, a .vtpk's copied resources), else the metadata files only. The item GUID and time are the
only run-dependent bytes; Stamp.now is fixed while the exports run, so item files are compared too.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import tilecrate
from tilecrate.package.metadata import Stamp
from tilecrate.request import ExportRequest
from tilecrate.sample import SampleSpec, make_sample

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import REAL_SOURCES, real_path  # noqa: E402

FIXED = Stamp("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", 1764633600000)
BUNDLE_SUFFIXES = (".bundle", ".bundlx", ".png")   # tile and thumbnail bytes: not metadata
# (source key, request, outputs); a request is (levels, extent or None)
RASTER_OUTPUTS = ("tpk", "tpkx", "folder")
SAMPLES = {
    "sample-jpeg-v2": SampleSpec(levels=(0, 1, 2, 3), tile_format="JPEG", version=2),
    "sample-png-v1": SampleSpec(levels=(0, 1, 2), tile_format="PNG", version=1),
    "sample-lerc": SampleSpec(levels=(0, 1, 2), tile_format="LERC", version=2),
}


def _source_path(key: str, samples: Path) -> Path:
    return samples / key if key in SAMPLES else real_path(key)


def cases() -> list[tuple[str, str, tuple]]:
    """(source key, output kind, request) of every export hashed."""
    out = []
    for key in list(REAL_SOURCES) + list(SAMPLES):
        if key == "natural-earth.vtpk":
            out += [(key, "vtpk", ("0-5", None)), (key, "vtpk", ("1-3", None))]
            continue
        levels = sorted(SAMPLES[key].levels) if key in SAMPLES else sorted(REAL_SOURCES[key][1])
        whole = f"{levels[0]}-{levels[-1]}"
        for kind in RASTER_OUTPUTS:
            out.append((key, kind, (whole, None)))
            out.append((key, kind, (str(levels[-1]), None)))
    return out


def _export(src: Path, kind: str, req: tuple, tmp: Path) -> Path:
    levels, extent = req
    if kind == "folder":
        out = tmp / "folder"
        tilecrate.export(str(src), ExportRequest(levels, extent=extent, tile_package=False), str(out))
        return out
    out = tmp / f"out.{kind}"
    tilecrate.export(str(src), ExportRequest(levels, extent=extent), str(out))
    return out


def _hashes(out: Path, everything: bool) -> dict[str, str]:
    files: dict[str, bytes] = {}
    if out.is_dir():
        for p in sorted(out.rglob("*")):
            if p.is_file():
                files[p.relative_to(out).as_posix()] = p.read_bytes()
    else:
        with zipfile.ZipFile(out) as z:
            for info in z.infolist():
                if not info.is_dir():
                    files[info.filename] = z.read(info)
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())
            if everything or not (name.lower().endswith(BUNDLE_SUFFIXES) or "/resources/" in name)}


def manifest(everything: bool = False) -> dict[str, dict[str, str]]:
    """{"<source> <kind> <levels>": {member: sha256}} of every case, Stamp.now fixed."""
    old = Stamp.__dict__["now"]
    Stamp.now = classmethod(lambda cls: FIXED)
    try:
        with tempfile.TemporaryDirectory() as d:
            base = Path(d)
            samples = base / "samples"
            for name, spec in SAMPLES.items():
                make_sample(samples / name, spec)
            result = {}
            for i, (key, kind, req) in enumerate(cases()):
                tmp = base / f"case{i}"
                tmp.mkdir()
                out = _export(_source_path(key, samples), kind, req, tmp)
                result[f"{key} {kind} {req[0]}"] = _hashes(out, everything)
            return result
    finally:
        Stamp.now = old


if __name__ == "__main__":
    data = manifest("--all" in sys.argv[2:])
    Path(sys.argv[1]).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(len(data), "exports,", sum(len(v) for v in data.values()), "files")

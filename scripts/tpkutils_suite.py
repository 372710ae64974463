#!/usr/bin/env python3
"""Run tpkutils' own test suite, unchanged, against tilecrate re-exports of its three ArcGIS-written
fixtures (issue 12): `.venv/bin/python scripts/tpkutils_suite.py TPKUTILS_CHECKOUT`.

tpkutils' tests/ are not in its PyPI sdist (tpkutils-0.8.2.tar.gz holds only the package, README,
LICENSE, setup.py and pyproject.toml) and CI reaches only the package registries, so this is a script
for a machine that has a tpkutils checkout (at the commit ../shared/fixtures/real/PROVENANCE.md names),
not part of the CI suite; their code is never committed here. The suite runs in its own venv,
.venv-tpkutils/, made on first use: tpkutils 0.8.2's `tpk` CLI imports pkg_resources, which
setuptools >= 81 no longer ships, and our .venv keeps the newest setuptools.
Exit 0 when every test passes (but any known, explained failure listed below); 1 otherwise.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ("states_filled.tpk", "nonstandard_zoom_levels.tpk", "alt_root_name.tpk")
# sha256 of the repository's fixtures at commit 0e8460f (the same bytes as ../shared/fixtures/real)
ORIGINALS = {
    "states_filled.tpk": "f2b958672c7d5d08e7b71a6108777c8db1f921bb63ac56207a1da66f95baf20d",
    "nonstandard_zoom_levels.tpk": "fc86541420684dc56c801d99ada34794e1049b00f989fc151f6c4eb9e8eb5103",
    "alt_root_name.tpk": "882c975e48e2a4d650c00ccdf88bb4a8c23682d9c27e2c76ff0da42c9a2eb11e",
}
EXPECTED_TESTS = 23   # tests/test_tpk.py 13 + tests/test_cli.py 10 at that commit
# Known, explained failures: test -> the one assertion allowed to fail (strict: a pass is reported).
# None today: test_metadata's bounds are ArcGIS's mapserver.json geoFullExtent, which a whole-source
# re-export now writes back unchanged (package.metadata.package_info, issue 12).
KNOWN_FAILURES: dict[str, str] = {}


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tpkutils_python() -> str:
    """The interpreter of .venv-tpkutils (tpkutils 0.8.2, pytest, setuptools < 81), made if missing."""
    venv = ROOT / ".venv-tpkutils"
    py = venv / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "tpkutils==0.8.2", "setuptools<81", "pytest>=8"],
                       check=True)
    return str(py)


def run_suite(python: str, folder: Path, work: Path) -> ET.Element:
    """tpkutils' pytest run in a fresh interpreter from `folder` (its tests use relative paths)."""
    junit = work / f"junit-{folder.name}.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--rootdir", str(folder), "-c", os.devnull, f"--junitxml={junit}", "tests"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    if not junit.is_file():
        raise SystemExit(f"tpkutils' suite did not run (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    suite = ET.parse(junit).getroot()
    return suite.find("testsuite") if suite.tag == "testsuites" else suite


def failures(suite: ET.Element) -> list[str]:
    """Every failed, erroring or skipped test but the known failures (which must fail as explained)."""
    out = []
    for case in suite.iter("testcase"):
        key = f"{case.get('classname')}.{case.get('name')}"
        found = [(bad, case.find(bad)) for bad in ("failure", "error", "skipped") if case.find(bad) is not None]
        if key in KNOWN_FAILURES:
            where = KNOWN_FAILURES[key]
            if [b for b, _ in found] != ["failure"] or where not in (found[0][1].text or ""):
                out.append(f"{key}: expected to fail only at `{where}`, got {[(b, e.get('message')) for b, e in found]}")
            continue
        out += [f"{key}: {bad}: {el.get('message')}" for bad, el in found]
    return out


def main(argv: list[str]) -> int:
    """Re-export tpkutils' fixtures with tilecrate, swap them in, run its suite, report."""
    import tilecrate
    from tilecrate.cache import open_cache
    from tilecrate.request import ExportRequest

    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    tests = Path(argv[0]) / "tests"
    for name, digest in ORIGINALS.items():
        if not (tests / "data" / name).is_file() or sha256(tests / "data" / name) != digest:
            print(f"{tests / 'data' / name}: not tpkutils' fixture at commit 0e8460f", file=sys.stderr)
            return 2
    python = tpkutils_python()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tpkutils"
        shutil.copytree(tests, work / "tests")
        for name in FIXTURES:
            out = Path(tmp) / name
            with open_cache(str(tests / "data" / name)) as cache:
                tilecrate.export(cache, ExportRequest(tuple(cache.levels),
                                                      storage_format="esriMapCacheStorageModeCompact"), str(out))
            with zipfile.ZipFile(out) as z:
                assert z.testzip() is None
            shutil.copyfile(out, work / "tests" / "data" / name)
        suite = run_suite(python, work, Path(tmp))
        bad = failures(suite)
        total = int(suite.get("tests"))
    print(f"tpkutils' suite on tilecrate re-exports: {total} tests, "
          f"{total - len(KNOWN_FAILURES) - len(bad)} passed, known failure(s): {', '.join(KNOWN_FAILURES) or 'none'}")
    for line in bad:
        print("  " + line)
    return 0 if not bad and total == EXPECTED_TESTS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

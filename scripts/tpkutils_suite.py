#!/usr/bin/env python3
"""Run tpkutils' own test suite, unchanged, against tilecrate re-exports of its three ArcGIS-written
fixtures (issue 12): `.venv/bin/python scripts/tpkutils_suite.py [TPKUTILS_CHECKOUT]`.

Without an argument it runs the copy of tpkutils' tests/ vendored in thirdparty/tpkutils/ (ISC
licence, commit 0e8460f, byte for byte: checked against VENDORED) on the fixtures of
../shared/fixtures/real/tpkutils/tests/data (or $TILECRATE_FIXTURES/tpkutils/tests/data): tpkutils'
PyPI sdist has no tests/ and CI reaches only the package registries, so this is how CI runs it
(tests/test_tpkutils_suite.py). With a tpkutils checkout at that commit it runs the checkout's tests/.
The suite runs in its own venv, .venv-tpkutils/, made from PyPI on first use: tpkutils 0.8.2's `tpk`
CLI imports pkg_resources, which setuptools >= 81 no longer ships, and our .venv keeps the newest
setuptools. Exit 0 when all 23 tests pass (but any known, explained failure listed below), 1 when a
test fails, 2 when the suite cannot be run (a missing or altered fixture or vendored file, pip failing).
"""
from __future__ import annotations

import fcntl
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
VENDORED_DIR = ROOT / "thirdparty" / "tpkutils"
VENV = ROOT / ".venv-tpkutils"
REQUIREMENTS = ("tpkutils==0.8.2", "setuptools<81", "pytest>=8")
# sha256 of the files copied from tpkutils' repository at commit 0e8460fd7175cc31a4e898e863f3df9c36472236
VENDORED = {
    "LICENSE.md": "c437c1b224ee68a30d62af41d1f9646db4c0bfd61ce6b8353bed6854b3dbeba4",
    "tests/__init__.py": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "tests/test_tpk.py": "8c8db291bdf6e57347e0519721315a8fb418c5669845ea26ebba8a8ca0709ddc",
    "tests/test_cli.py": "726992d2959a2a5c959393d39f031a96795d8895f6ad3018e09aa95043abce49",
}
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


class SuiteError(Exception):
    """The suite could not be run (not a test failure): a missing fixture, an altered file, pip failing."""


def real_fixtures() -> Path:
    """tpkutils' fixtures among the shared real ones ($TILECRATE_FIXTURES like tests/conftest.py)."""
    real = Path(os.environ.get("TILECRATE_FIXTURES", ROOT.parent / "shared" / "fixtures" / "real"))
    return real / "tpkutils" / "tests" / "data"


def check_vendored() -> Path:
    """thirdparty/tpkutils/tests, after checking every vendored file is the snapshot's bytes."""
    for rel, digest in VENDORED.items():
        path = VENDORED_DIR / rel
        if not path.is_file():
            raise SuiteError(f"{path}: missing (vendored from tpkutils at commit 0e8460f)")
        if sha256(path) != digest:
            raise SuiteError(f"{path}: changed since vendored from tpkutils at 0e8460f (sha256 {sha256(path)})")
    extra = sorted(p.name for p in (VENDORED_DIR / "tests").iterdir()
                   if p.name.endswith(".py") and f"tests/{p.name}" not in VENDORED)
    if extra:
        raise SuiteError(f"{VENDORED_DIR / 'tests'}: files not from tpkutils: {', '.join(extra)}")
    return VENDORED_DIR / "tests"


def _venv_ready(py: Path) -> bool:
    """Whether `py` imports what the suite needs, at the pinned versions (a half-made venv does not)."""
    probe = ("import importlib.metadata as m, pkg_resources, pytest, pymbtiles, tpkutils.cli; "
             "assert m.version('tpkutils') == '0.8.2'")
    return py.is_file() and subprocess.run([str(py), "-c", probe], capture_output=True, timeout=120).returncode == 0


def tpkutils_python() -> str:
    """The interpreter of .venv-tpkutils (tpkutils 0.8.2, pytest, setuptools < 81), made if missing or broken."""
    py = VENV / "bin" / "python"
    # one builder at a time (two test runs, or the script beside a test); the lock lives outside the tree
    lock_path = Path(tempfile.gettempdir()) / f"tilecrate-venv-tpkutils-{hashlib.sha1(bytes(VENV)).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _venv_ready(py):
            return str(py)
        # --clear: a venv left half-made by a killed run or a failed pip is rebuilt, not reused
        steps = ([sys.executable, "-m", "venv", "--clear", str(VENV)],
                 [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS])
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise SuiteError(f"making {VENV}: `{' '.join(cmd[1:])}` took over 600 s") from None
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SuiteError(f"making {VENV}: `{' '.join(cmd[1:])}` failed (rc {proc.returncode}): {tail[0]}")
        if not _venv_ready(py):
            raise SuiteError(f"{VENV}: made, but tpkutils 0.8.2, pkg_resources or pytest does not import")
        return str(py)


def run_suite(python: str, folder: Path, work: Path) -> ET.Element:
    """tpkutils' pytest run in a fresh interpreter from `folder` (its tests use relative paths)."""
    junit = work / f"junit-{folder.name}.xml"
    # PYTHONPATH/PYTHONHOME would let our own modules or pytest plugins leak into tpkutils' venv
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        proc = subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--rootdir", str(folder), "-c", os.devnull, f"--junitxml={junit}", "tests"],
            cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise SuiteError("tpkutils' suite ran over 300 s") from None
    if not junit.is_file():
        raise SuiteError(f"tpkutils' suite did not run (rc {proc.returncode}): "
                         f"{' | '.join((proc.stdout + proc.stderr).strip().splitlines()[-5:])}")
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


def reexport(source: Path, out: Path) -> None:
    """A whole-source tilecrate re-export of one fixture, as a .tpk (compact storage, like ArcGIS's)."""
    import tilecrate
    from tilecrate.cache import open_cache
    from tilecrate.request import ExportRequest

    with open_cache(str(source)) as cache:
        tilecrate.export(cache, ExportRequest(tuple(cache.levels), storage_format="esriMapCacheStorageModeCompact"),
                         str(out))
    with zipfile.ZipFile(out) as z:
        if z.testzip() is not None:
            raise SuiteError(f"{out}: tilecrate's re-export of {source.name} has a bad CRC")
    if sha256(out) == ORIGINALS[source.name]:
        raise SuiteError(f"{out}: the same bytes as ArcGIS's {source.name}, so it tests nothing of tilecrate")


def run(argv: list[str]) -> int:
    """Re-export tpkutils' fixtures with tilecrate, swap them in, run its suite, report."""
    if len(argv) > 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    if argv:
        tests = Path(argv[0]) / "tests"
        data = tests / "data"
    else:
        tests, data = check_vendored(), real_fixtures()
    for name, digest in ORIGINALS.items():
        if not (data / name).is_file():
            raise SuiteError(f"{data / name}: missing (tpkutils' fixture at commit 0e8460f; set TILECRATE_FIXTURES)")
        if sha256(data / name) != digest:
            raise SuiteError(f"{data / name}: not tpkutils' fixture at commit 0e8460f")
    python = tpkutils_python()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tpkutils"
        (work / "tests" / "data").mkdir(parents=True)
        # only its test modules: the ArcGIS fixtures in a checkout's tests/data are never what runs
        for module in sorted(tests.glob("*.py")):
            shutil.copyfile(module, work / "tests" / module.name)
        for name in FIXTURES:
            reexport(data / name, work / "tests" / "data" / name)
        suite = run_suite(python, work, Path(tmp))
        bad = failures(suite)
        total = int(suite.get("tests"))
    print(f"tpkutils' suite on tilecrate re-exports: {total} tests, "
          f"{total - len(KNOWN_FAILURES) - len(bad)} passed, known failure(s): {', '.join(KNOWN_FAILURES) or 'none'}")
    for line in bad:
        print("  " + line)
    if total != EXPECTED_TESTS:
        print(f"  expected {EXPECTED_TESTS} tests (tpkutils at 0e8460f), ran {total}")
    return 0 if not bad and total == EXPECTED_TESTS else 1


def main(argv: list[str]) -> int:
    """`run`, with a suite that cannot run reported in one line (exit 2)."""
    try:
        return run(argv)
    except SuiteError as exc:
        print(f"tpkutils_suite: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""tpkutils' own test suite (its tests/ at commit 0e8460f, vendored unchanged in thirdparty/tpkutils/)
passes on tilecrate re-exports of its three ArcGIS-written fixtures (issue 12): scripts/tpkutils_suite.py
run as CI runs it, .venv-tpkutils made from PyPI on first use; a pip failure, a missing fixture or a
failing test fails here, nothing skips. Also the item metadata its test_metadata checks, in-process,
into a .tpk's iteminfo.xml and a .tpkx's iteminfo.json."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pyproject's tomli dependency
    import tomli as tomllib

import pytest

import tilecrate
from tilecrate.request import ExportRequest

from conftest import real_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tpkutils_suite.py"
# recorded from `git show 0e8460f:<path> | sha256sum` on the tpkutils repository (git blob ids in
# thirdparty/tpkutils/README.md), independently of the script's own table
SNAPSHOT_SHA256 = {
    "LICENSE.md": "c437c1b224ee68a30d62af41d1f9646db4c0bfd61ce6b8353bed6854b3dbeba4",
    "tests/__init__.py": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "tests/test_tpk.py": "8c8db291bdf6e57347e0519721315a8fb418c5669845ea26ebba8a8ca0709ddc",
    "tests/test_cli.py": "726992d2959a2a5c959393d39f031a96795d8895f6ad3018e09aa95043abce49",
}


def load_script():
    """scripts/tpkutils_suite.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tpkutils_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vendored_files_are_the_snapshot():
    vendored = ROOT / "thirdparty" / "tpkutils"
    got = {rel: hashlib.sha256((vendored / rel).read_bytes()).hexdigest() for rel in SNAPSHOT_SHA256}
    assert got == SNAPSHOT_SHA256
    assert load_script().VENDORED == SNAPSHOT_SHA256
    assert sorted(p.name for p in (vendored / "tests").iterdir() if p.suffix == ".py") == \
        ["__init__.py", "test_cli.py", "test_tpk.py"]
    assert "Permission to use, copy, modify, and/or distribute" in (vendored / "LICENSE.md").read_text()


def test_our_run_never_collects_the_vendored_tests():
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert opts["testpaths"] == ["tests"] and "thirdparty" in opts["norecursedirs"]
    # collecting the whole tree but tests/ and benchmarks/ finds nothing: thirdparty/ is not entered
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "--ignore=tests", "--ignore=benchmarks", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5 and "no tests collected" in proc.stdout, proc.stdout + proc.stderr


def test_missing_fixture_fails_the_run(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT)], env={"TILECRATE_FIXTURES": str(tmp_path), "PATH": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"tpkutils_suite: {tmp_path}/tpkutils/tests/data/states_filled.tpk: missing "
        "(tpkutils' fixture at commit 0e8460f; set TILECRATE_FIXTURES)"]


def test_pip_failure_fails_the_run(tmp_path):
    mod = load_script()
    mod.VENV = tmp_path / "venv"
    mod.REQUIREMENTS = ("tpkutils==999.0",)   # no such release: pip fails as it would offline
    with pytest.raises(mod.SuiteError, match=r"making .*venv: `-m pip install .*` failed \(rc 1\)"):
        mod.tpkutils_python()


def test_tpkutils_suite_passes_on_our_reexports(real_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tpkutils' suite on tilecrate re-exports: 23 tests, 23 passed, known failure(s): none" in proc.stdout

    # the same machinery reports a failing test: a run of it is not a pass by construction
    mod = load_script()
    (tmp_path / "suite" / "tests").mkdir(parents=True)
    (tmp_path / "suite" / "tests" / "test_bad.py").write_text(
        "import tpkutils\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    suite = mod.run_suite(mod.tpkutils_python(), tmp_path / "suite", tmp_path)
    assert suite.get("tests") == "2"
    assert [line.split(":")[0] for line in mod.failures(suite)] == ["tests.test_bad.test_bad"]


def test_item_travels_into_tpkx_and_tpk(real_dir, tmp_path):
    src = real_path("states_filled.tpk")
    for ext in ("tpkx", "tpk"):
        out = tmp_path / f"states.{ext}"
        tilecrate.export(str(src), ExportRequest("0-4"), str(out))
        with zipfile.ZipFile(out) as z:
            if ext == "tpkx":
                item = json.loads(z.read("iteminfo.json"))
                got = (item["title"], item["summary"], item["tags"], item["accessInformation"], item["description"])
            else:
                root = ET.fromstring(z.read("esriinfo/iteminfo.xml"))
                got = tuple(root.find(k).text for k in ("title", "summary", "tags", "accessinformation"))
                got += (root.find("description").text or "",)
        assert got == ("states_filled", "states", "states", "US Census Bureau", ""), ext

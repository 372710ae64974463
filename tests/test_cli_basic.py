"""`tilecrate sample` and `tilecrate inspect` as a user runs them: real processes, JSON on stdout."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import real_path
from tilecrate.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "tilecrate.cli", *args], capture_output=True, text=True, timeout=120)


def test_sample_then_inspect_json(tmp_path):
    out = tmp_path / "s"
    r = run("sample", str(out), "--levels", "0-3", "--format", "MIXED", "--storage-format", "Compact", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["storageFormat"] == "Compact" and made["levels"] == [0, 1, 2, 3]
    r = run("inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tiles"] == made["tiles"] and info["bytes"] == made["tileBytes"]
    assert info["storageFormat"] == "esriMapCacheStorageModeCompact" and info["tileFormat"] == "MIXED"
    assert sorted(info["levels"]) == ["0", "1", "2", "3"]
    assert list((out / "_alllayers" / "L00").iterdir())          # V1: .bundle and .bundlx
    assert {p.suffix for p in (out / "_alllayers" / "L03").iterdir()} == {".bundle", ".bundlx"}


def test_inspect_real_package_table(real_dir, capsys):
    assert main(["inspect", str(real_path("Usa.tpkx"))]) == 0
    text = capsys.readouterr().out
    assert "tpkx" in text and "144" in text and "PNG" in text


def test_errors_are_one_line(tmp_path):
    r = run("inspect", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.strip() == f"tilecrate: error: {tmp_path / 'nope'}: no such file or folder"
    r = run("inspect", str(tmp_path / "nope"), "--json")
    assert json.loads(r.stdout) == {"error": f"{tmp_path / 'nope'}: no such file or folder"}
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    r = run("sample", str(tmp_path / "exists"))
    assert r.returncode == 1 and "not empty" in r.stderr and "Traceback" not in r.stderr


def test_version_names_the_pil():
    r = run("--version")
    assert r.returncode == 0 and "tilecrate" in r.stdout and "PIL" in r.stdout


def test_version_names_the_active_pil(tmp_path, monkeypatch):
    """pillow-simd is the PIL in use; an install with Pillow as well is called out."""
    from tilecrate.cli import version_text

    text = version_text()
    assert "(pillow-simd)" in text and "WARNING" not in text
    # a second distribution owning PIL, found on sys.path the way importlib.metadata finds it
    dist = tmp_path / "pillow-9.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: Pillow\nVersion: 9.0.0\n\nbody\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "pillow-simd, Pillow" in version_text() and "WARNING" in version_text()


def test_serve_announces_itself_as_json_once_listening(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tilecrate.cli", "serve", "--demo", "--json", "--quiet",
                             "--port", str(port), "--data-dir", str(tmp_path / "d")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] != "}\n":
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        info = json.loads("".join(lines))
        assert info["services"] == ["SampleWorld"] and info["url"].endswith(f":{port}/arcgis/rest/services")
        with urllib.request.urlopen(info["url"] + "?f=json", timeout=10) as r:
            assert [s["name"] for s in json.load(r)["services"]] == ["SampleWorld"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)

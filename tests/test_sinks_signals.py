"""Open-format exports in a real CLI process: SIGTERM / SIGINT mid-way remove the partial output;
after SIGKILL the next export to the same name sweeps the dead process's temp."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli_signals import SLOW


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("sink_signals") / "s"
    make_sample(out, SampleSpec())          # levels 0-5, 123 tiles in 6 bundles
    return out


def _temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".tmp-" in p.name)


def _start(tmp_path: Path, cache: Path, out: Path, *more) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW)
    proc = subprocess.Popen([sys.executable, str(script), "export", str(cache), "-o", str(out), "--levels", "0-5",
                             *more], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not _temps(out.parent):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the export never started writing: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("name, more", [("o.mbtiles", ()), ("o.gpkg", ()), ("o", ("--format", "xyz"))],
                         ids=["mbtiles", "gpkg", "xyz"])
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_signal_removes_partial_output(cache, tmp_path, name, more, sig, code):
    out = tmp_path / "out" / name
    out.parent.mkdir()
    proc = _start(tmp_path, cache, out, *more)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr[-2000:]
    assert len(stderr.splitlines()) == 1 and stderr.startswith("tilecrate: error: ")
    assert _temps(out.parent) == [] and not out.exists()


def test_sigkill_temp_is_swept_by_the_next_export(cache, tmp_path):
    out = tmp_path / "out" / "o.mbtiles"
    out.parent.mkdir()
    proc = _start(tmp_path, cache, out)
    proc.kill()
    proc.wait(timeout=30)
    assert len(_temps(out.parent)) == 1 and not out.exists()
    done = subprocess.run([sys.executable, "-m", "tilecrate.cli", "export", str(cache), "-o", str(out),
                           "--levels", "0-5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _temps(out.parent) == []
    db = sqlite3.connect(out)
    assert db.execute("SELECT count(*) FROM tiles").fetchone()[0] == 123
    db.close()

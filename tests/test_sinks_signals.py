"""Open-format exports in a real CLI process: SIGTERM / SIGINT mid-way remove the partial output;
after SIGKILL the next export to the same name sweeps the dead process's temp."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_signals import SLOW, start_slow_export, temps


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("sink_signals") / "s"
    make_sample(out, SampleSpec())          # levels 0-5, 123 tiles in 6 bundles
    return out


def _start(tmp_path: Path, cache: Path, out: Path, *more) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW)
    return start_slow_export(script, cache, out, *more)


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
    assert temps(out.parent) == [] and not out.exists()


def test_sigkill_temp_is_swept_by_the_next_export(cache, tmp_path):
    out = tmp_path / "out" / "o.mbtiles"
    out.parent.mkdir()
    proc = _start(tmp_path, cache, out)
    proc.kill()
    proc.wait(timeout=30)
    assert len(temps(out.parent)) == 1 and not out.exists()
    done = subprocess.run([sys.executable, "-m", "tilecrate.cli", "export", str(cache), "-o", str(out),
                           "--levels", "0-5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert temps(out.parent) == []
    db = sqlite3.connect(out)
    assert db.execute("SELECT count(*) FROM tiles").fetchone()[0] == 123
    db.close()

"""Peak RSS of an export process against the package's size, for every package source kind (issue 11:
"peak RSS for 25 MB, 1.8 GB and 5 GB packages from folder, .tpk and .tpkx sources (flat, < 150 MB)").

The small source is `tilecrate sample --levels 0-7` (1 484 tiles, ~20 MB). The two large ones are
the same cache with its level-7 bundle (15 MB) hard-linked to 120 and 330 bundle positions of level
12, so ~1.8 GB and ~5 GB of real tiles cost no sample generation and no disk for the folder source.
From each folder the benchmark writes a `.tpk` and a `.tpkx` (in this process), then runs, as a
fresh process each, a whole export of every source (folder, .tpk, .tpkx) to `.tpkx` and reads the
child's own peak (VmHWM: anonymous and file-backed resident pages; ru_maxrss would carry over the
parent's across execve). The page cache is not counted in either.

Run: `.venv/bin/pytest benchmarks/bench_rss.py --benchmark-enable -s` (needs ~20 GB free under
$TILECRATE_BENCH_DIR, default /tmp/tilecrate-bench; about 2-5 minutes, mostly disk writes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tilecrate
from tilecrate.request import ExportRequest
from conftest import report

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(os.environ.get("TILECRATE_BENCH_DIR", "/tmp/tilecrate-bench"))
COPIES = {"small": 0, "1.8GB": 120, "5GB": 330}
WIDE_LEVEL = 12
LIMIT_MB = 150

_RSS_SCRIPT = """
import json, sys, tilecrate
r = tilecrate.export(sys.argv[1], tilecrate.ExportRequest(levels=sys.argv[3]), sys.argv[2])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"size": r.size, "tiles": r.tiles, "hwm_kb": hwm}))
"""


@pytest.fixture(scope="module")
def base() -> Path:
    """The small sample (made once under BENCH_DIR, reused while its marker exists)."""
    out = BENCH_DIR / "rss-0-7"
    if not (out / ".complete").exists():
        if out.exists():
            shutil.rmtree(out)
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "tilecrate.cli", "sample", str(out), "--levels", "0-7", "--quiet"],
                       check=True, cwd=ROOT)
        (out / ".complete").write_text("")
    return out


def _widen(base: Path, dst: Path, copies: int) -> Path:
    """`base` hard-linked, plus `copies` links of its level-7 bundle at level WIDE_LEVEL."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(base, dst, copy_function=os.link)
    bundle = next((dst / "_alllayers" / "L07").glob("*.bundle"))
    level = dst / "_alllayers" / f"L{WIDE_LEVEL:02d}"
    level.mkdir()
    side = (1 << WIDE_LEVEL) // 128
    for i in range(copies):
        os.link(bundle, level / f"R{(i // side) * 128:04x}C{(i % side) * 128:04x}.bundle")
    return dst


def _peak(source: Path, out: Path, levels: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(source), str(out), levels],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, f"export of {source.name} failed: {done.stderr.strip()[-2000:]}"
    out.unlink()
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_rss_flat_in_package_size(request, base, tmp_path):
    """Peak RSS of whole exports to .tpkx from folder, .tpk and .tpkx sources of three sizes."""
    if shutil.disk_usage(tmp_path).free < 22e9:
        pytest.fail(f"bench_rss needs ~22 GB free under {tmp_path}")
    peaks: dict[str, dict[str, dict]] = {}
    for name, copies in COPIES.items():
        folder = _widen(base, tmp_path / f"src-{name}", copies) if copies else base
        levels = f"0-{WIDE_LEVEL}" if copies else "0-7"
        sources = {"folder": folder}
        for ext in ("tpk", "tpkx"):
            sources[ext] = tmp_path / f"src-{name}.{ext}"
            tilecrate.export(str(folder), ExportRequest(levels=levels), str(sources[ext]))
        peaks[name] = {kind: _peak(src, tmp_path / f"out-{name}-{kind}.tpkx", levels)
                       for kind, src in sources.items()}
        for kind in ("tpk", "tpkx"):
            sources[kind].unlink()
        if copies:
            shutil.rmtree(folder)
    for kind in ("folder", "tpk", "tpkx"):
        row = {f"{name}_MB": round(peaks[name][kind]["size"] / 1e6) for name in COPIES}
        row.update({f"{name}_rss_MiB": round(peaks[name][kind]["hwm_kb"] / 1024, 1) for name in COPIES})
        row["rss_5GB_minus_small_MiB"] = round((peaks["5GB"][kind]["hwm_kb"] - peaks["small"][kind]["hwm_kb"]) / 1024, 1)
        report(request, f"peak RSS, whole export to .tpkx from a {kind} source", **row)
    for name in COPIES:
        for kind in ("folder", "tpk", "tpkx"):
            assert peaks[name][kind]["tiles"] == peaks[name]["folder"]["tiles"]
            assert peaks[name][kind]["hwm_kb"] / 1024 < LIMIT_MB, (name, kind, peaks[name][kind])
    assert peaks["5GB"]["folder"]["size"] > 4.5e9

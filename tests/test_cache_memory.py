"""Peak memory of an export from a .tpk does not grow with the package (issue 11: no whole-zip mapping).

Two stored V1 .tpk packages of one full bundle each (16 384 tiles: 33 MB and 98 MB) are exported to
.tpkx in fresh processes; the peak RSS (anonymous and file-backed) of the larger may exceed the
smaller's only by a small fraction of their 65 MB difference. With the package mapped and the size
prefixes read through the mapping, every page of the package was resident: +65 MB.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tilecrate.sample import SampleSpec, _conf_xml, _v1_bundle

LEVEL = 7
SCRIPT = r"""
import sys
import tilecrate
import tilecrate.export, tilecrate.selection        # every import done before the peak is reset

def hwm_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

with open("/proc/self/clear_refs", "w") as f:      # reset the peak (VmHWM) to the RSS of now
    f.write("5")
before = hwm_kb()
out = tilecrate.export(sys.argv[1], tilecrate.ExportRequest(levels=sys.argv[3]), sys.argv[2], threads=1)
print(out.tiles, hwm_kb() - before)
"""


def _tpk(path: Path, tile_size: int) -> int:
    blob = os.urandom(1 << 16)
    tiles = {i: blob[i % 4096:][:tile_size - i % 7] for i in range(16384)}
    bundle, bundlx = _v1_bundle(tiles, 0, 0)
    base = "v101/Layers/"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(base + "conf.xml", _conf_xml(SampleSpec(version=1)))
        z.writestr(f"{base}_alllayers/L{LEVEL:02d}/R0000C0000.bundle", bundle)
        z.writestr(f"{base}_alllayers/L{LEVEL:02d}/R0000C0000.bundlx", bundlx)
    return path.stat().st_size


def _peak_kb(src: Path, out: Path) -> tuple[int, int]:
    """(tiles exported, growth of the peak RSS during the export in KiB), in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(out), str(LEVEL)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tiles, kb = proc.stdout.split()
    return int(tiles), int(kb)


def test_export_peak_rss_is_flat_in_package_size(tmp_path):
    small, large = tmp_path / "small.tpk", tmp_path / "large.tpk"
    # both larger than the 8 MiB copy runs, so the buffers are alike and only the package size differs
    small_size, large_size = _tpk(small, 2000), _tpk(large, 6000)
    assert large_size - small_size > 60 << 20
    tiles_s, rss_s = _peak_kb(small, tmp_path / "s.tpkx")
    tiles_l, rss_l = _peak_kb(large, tmp_path / "l.tpkx")
    assert tiles_s == tiles_l == 16384
    grew = (rss_l - rss_s) * 1024
    # the copy buffer (8 MiB runs) and the index arrays are the same for both; allow noise
    assert grew < 0.25 * (large_size - small_size), (rss_s, rss_l, small_size, large_size)

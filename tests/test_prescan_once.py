"""A first export reads each source run once: the writer waits for a prescan that has started on its bundle
instead of reading the same runs again (runners.inprocess + package.kcopy.prescan_plan)."""
from __future__ import annotations

import threading
import time
import zipfile
from collections import Counter

from tilecrate import export
from tilecrate.package import kcopy
from tilecrate.request import ExportRequest


def test_each_run_is_read_once_when_the_writer_catches_up(tmp_path, sample_v2, monkeypatch):
    reads: Counter = Counter()
    by_thread: Counter = Counter()
    real = kcopy.read_range

    def slow_read(part, view, *a, **k):
        name = threading.current_thread().name
        if name.startswith("tilecrate-prescan"):
            time.sleep(0.03)            # the writer reaches the bundle while its prescan is still reading
        reads[(part.label, part.offset, part.length)] += 1
        by_thread[name.split("_")[0]] += 1
        return real(part, view, *a, **k)

    monkeypatch.setattr(kcopy, "read_range", slow_read)
    monkeypatch.setattr(kcopy, "KERNEL_MIN", 4096)      # the sample's runs go by prescan + kernel copy
    monkeypatch.setattr(kcopy, "RACY_NS", 0)            # the sample was just written: remember its CRCs anyway
    kcopy.RUN_CRCS.clear()
    out = tmp_path / "a.tpkx"
    export(str(sample_v2), ExportRequest(levels="0-5"), str(out))
    assert reads and max(reads.values()) == 1, [k for k, v in reads.items() if v > 1]
    assert by_thread["tilecrate-prescan"] > 0, by_thread
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    # and the package is the one the path without prescans writes
    kcopy.RUN_CRCS.clear()
    monkeypatch.setattr(kcopy.RUN_CRCS, "enabled", False)
    ref = tmp_path / "b.tpkx"
    export(str(sample_v2), ExportRequest(levels="0-5"), str(ref))
    with zipfile.ZipFile(out) as a, zipfile.ZipFile(ref) as b:
        bundles = [i.filename for i in a.infolist() if i.filename.endswith(".bundle")]
        assert bundles and all(a.read(n) == b.read(n) and a.getinfo(n).CRC == b.getinfo(n).CRC for n in bundles)

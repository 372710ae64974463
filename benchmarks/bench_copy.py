"""Pass-through exports vs `cp` of the same bytes: the copy path of package.kcopy ("new", the
default "auto", as the first export of these bundles in the process: the planning threads read
runs of KERNEL_MIN bytes or more for their CRC-32 and the writer copies them by copy_file_range,
shorter ones are read by the writer's helper thread and written from its buffers; "repeat": the
same with the run CRCs remembered from the last export, as a server exporting the same bundles
again, so nothing is read in user space; "helper": the previous round's path, remembered CRCs
off, every run read by the writer's helper thread; "buffered": every run written from the
buffers; "cfr": every run by copy_file_range) against the path before kernel copies ("old": read,
CRC and write one after the other on the writer's thread), whole sample and a bbox, in-process
and as a process, page cache warm and cold. Ratios from one run, each a median over paired
rounds; CPU seconds (user + system, every thread) too, less at the mercy of the machine's load
than wall time. Two floors are printed with them: `kernel_floor_vs_cp`, the package's bundle bytes
copied by copy_file_range and nothing else (no CRC, headers or planning), and `process_floor_vs_cp`,
that copy plus a process that only starts and imports the compiled core (numpy with it): no export
in-process resp. as a process can reach a ratio above them.

Run: `.venv/bin/pytest benchmarks/bench_copy.py --benchmark-enable -s`. The process contenders cache their
bytecode in a private folder (as an installed package does); the warm-up round writes it.
The sample (levels 0-9 of `tilecrate sample`, ~305 MB; TILECRATE_COPY_LEVELS to change) is made
once under $TILECRATE_BENCH_DIR (default /tmp/tilecrate-bench) and reused. Cold rounds drop the
page cache (`echo 3 > /proc/sys/vm/drop_caches`) before every contender; without permission they
are skipped with a printed note.
"""
from __future__ import annotations

import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import tilecrate
from tilecrate.package import kcopy
from tilecrate.request import ExportRequest
from conftest import report

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(os.environ.get("TILECRATE_BENCH_DIR", "/tmp/tilecrate-bench"))
LEVELS = os.environ.get("TILECRATE_COPY_LEVELS", "0-9")
BBOX = "-10,30,40,60"            # lon/lat: Western Europe and the Mediterranean
ROUNDS = int(os.environ.get("TILECRATE_COPY_ROUNDS", "3"))
TILECRATE = [sys.executable, "-m", "tilecrate.cli"]


@pytest.fixture(scope="module")
def medium() -> Path:
    """The medium sample (made once, reused while its marker exists)."""
    out = BENCH_DIR / f"medium-{LEVELS}"
    if not (out / ".complete").exists():
        if out.exists():
            shutil.rmtree(out)
        BENCH_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(TILECRATE + ["sample", str(out), "--levels", LEVELS, "--quiet"], check=True, cwd=ROOT)
        (out / ".complete").write_text("")
    return out


def _can_drop() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _warm(folder: Path) -> None:
    for p in folder.rglob("*.bundle*"):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def _rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _bundle_digest(path: Path) -> str:
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".bundle"):
                h.update(info.filename.encode() + info.CRC.to_bytes(4, "little") + zf.read(info))
    return h.hexdigest()


def _bundle_spans(path: Path) -> list[tuple[int, int]]:
    """(data offset, length) of each stored .bundle entry of a package."""
    spans = []
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".bundle"):
                f.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                spans.append((info.header_offset + 30 + name_len + extra_len, info.compress_size))
    return spans


def _export_args(src: Path, out: Path, bbox: bool) -> list[str]:
    args = [str(src), "-o", str(out), "--levels", LEVELS, "--quiet"]
    return args + (["--extent=" + BBOX, "--aoi-sr", "4326"] if bbox else [])


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _timed(fn, who: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads or of the children) of one call."""
    c0 = _cpu(who)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu(who) - c0


def _contenders(src: Path, tmp: Path, bbox: bool):
    """name -> a function that runs it once and returns (wall, CPU) seconds (output removed before)."""
    req = ExportRequest(levels=LEVELS, **({"extent": BBOX, "aoi_sr": 4326} if bbox else {}))
    outs = {m: tmp / f"{m}.tpkx" for m in ("new", "repeat", "helper", "buffered", "cfr", "old", "new_proc",
                                            "old_proc")}

    def inproc(mode: str, out: Path, crcs: str = "off"):
        """crcs: "off" (none remembered, none looked up), "first" (forgotten before the run), "kept"."""
        def run() -> tuple[float, float]:
            _rm(out)
            old, enabled = kcopy.COPY_METHOD, kcopy.RUN_CRCS.enabled
            kcopy.COPY_METHOD = mode
            kcopy.RUN_CRCS.enabled = crcs != "off"
            if crcs == "first":
                kcopy.RUN_CRCS.clear()
            try:
                return _timed(lambda: tilecrate.export(str(src), req, str(out)), resource.RUSAGE_SELF)
            finally:
                kcopy.COPY_METHOD, kcopy.RUN_CRCS.enabled = old, enabled
        return run

    def proc(mode: str, out: Path):
        # bytecode cached as an installed package's is (PYTHONDONTWRITEBYTECODE is set here and the
        # install is editable: without this every process compiled the files edited since install)
        env = dict(os.environ, TILECRATE_COPY_METHOD=mode, PYTHONPYCACHEPREFIX=str(tmp / "pycache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)

        def run() -> tuple[float, float]:
            _rm(out)
            return _timed(lambda: subprocess.run(TILECRATE + ["export"] + _export_args(src, out, bbox), check=True,
                                                 env=env, cwd=ROOT), resource.RUSAGE_CHILDREN)
        return run

    cp_src = tmp / "new.tpkx"               # cp of the package's bytes (made by the first round)
    cp_dst = tmp / "cp-copy.tpkx"

    def cp() -> tuple[float, float]:
        _rm(cp_dst)
        return _timed(lambda: subprocess.run(["cp", str(cp_src), str(cp_dst)], check=True), resource.RUSAGE_CHILDREN)

    core_env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPYCACHEPREFIX=str(tmp / "pycache"))
    core_env.pop("PYTHONDONTWRITEBYTECODE", None)

    def core() -> tuple[float, float]:
        # a process that only starts and imports the compiled core (numpy with it), OpenBLAS on one thread
        # as the CLI loads it: what every export process pays before its first byte
        return _timed(lambda: subprocess.run([sys.executable, "-c", "import tilecrate._bundle"], check=True,
                                             env=core_env), resource.RUSAGE_CHILDREN)

    kernel_dst = tmp / "kernel-floor.bin"

    def kernel() -> tuple[float, float]:
        # the package's bundle bytes copied by copy_file_range, one call an entry, at their offsets: no
        # CRC, no zip headers, no planning; what an exporter copying them in the kernel cannot go under
        spans = _bundle_spans(cp_src)
        _rm(kernel_dst)

        def copy() -> None:
            src_fd = os.open(cp_src, os.O_RDONLY)
            dst_fd = os.open(kernel_dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for offset, length in spans:
                    done = 0
                    while done < length:
                        n = os.copy_file_range(src_fd, dst_fd, length - done, offset + done, offset + done)
                        if n <= 0:
                            raise OSError(f"copy_file_range returned {n}")
                        done += n
            finally:
                os.close(src_fd)
                os.close(dst_fd)
        return _timed(copy, resource.RUSAGE_SELF)

    runs = {"new": inproc("auto", outs["new"], "first"), "repeat": inproc("auto", outs["repeat"], "kept"),
            "helper": inproc("auto", outs["helper"]), "buffered": inproc("buffered", outs["buffered"]),
            "cfr": inproc("copy_file_range", outs["cfr"]),
            "old": inproc("chunks", outs["old"]), "new_proc": proc("auto", outs["new_proc"]),
            "old_proc": proc("chunks", outs["old_proc"]), "cp": cp, "core": core, "kernel": kernel}
    if not bbox:                            # the whole sample: also `cp -r` of the source bundles
        tree = tmp / "cp-tree"

        def cp_r() -> tuple[float, float]:
            _rm(tree)
            return _timed(lambda: subprocess.run(["cp", "-r", str(src / "_alllayers"), str(tree)], check=True),
                          resource.RUSAGE_CHILDREN)
        runs["cp_r"] = cp_r
    return runs, outs


@pytest.mark.parametrize("cache", ["warm", "cold"])
@pytest.mark.parametrize("area", ["whole", "bbox"])
def test_passthrough_export_vs_cp(benchmark, request, medium, tmp_path, area, cache):
    """Kernel-copy export vs cp and vs the buffered path, medians of paired rounds."""
    if cache == "cold" and not _can_drop():
        print(f"\nNOTE: cold rounds skipped: /proc/sys/vm/drop_caches is not writable (root: {os.geteuid() == 0})")
        pytest.skip("cannot drop the page cache here (needs root and a writable /proc/sys/vm/drop_caches)")
    runs, outs = _contenders(medium, tmp_path, area == "bbox")
    runs["new"]()                           # the package cp copies, and a first import of everything
    runs["new_proc"]()                      # the processes' bytecode cache
    times: dict[str, list[float]] = {k: [] for k in runs}
    cpus: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            if cache == "cold":
                _drop_caches()
            else:
                _warm(medium)
            wall, cpu = run()
            times[name].append(wall)
            cpus[name].append(cpu)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    benchmark.pedantic(runs["new"], rounds=1, iterations=1)
    size = outs["new"].stat().st_size
    digests = {_bundle_digest(outs[m]) for m in outs}
    assert len(digests) == 1, "the copy paths wrote different bundles"
    figures = dict(MB=round(size / 1e6, 1), rounds=ROUNDS,
                   new_MB_s=size / 1e6 / med["new"], cp_MB_s=size / 1e6 / med["cp"],
                   new_vs_cp=med["cp"] / med["new"], repeat_vs_cp=med["cp"] / med["repeat"],
                   helper_vs_cp=med["cp"] / med["helper"], new_process_vs_cp=med["cp"] / med["new_proc"],
                   cfr_vs_cp=med["cp"] / med["cfr"], buffered_vs_cp=med["cp"] / med["buffered"],
                   old_vs_cp=med["cp"] / med["old"], old_process_vs_cp=med["cp"] / med["old_proc"],
                   new_vs_old=med["old"] / med["new"], new_vs_helper=med["helper"] / med["new"],
                   new_process_vs_old=med["old_proc"] / med["new_proc"])
    # the floors: the bundle bytes copied in the kernel and nothing else, in this process and after a
    # process start that imports the compiled core (a process export cannot take less than that sum)
    figures.update(kernel_floor_vs_cp=med["cp"] / med["kernel"],
                   process_floor_vs_cp=statistics.median(
                       times["cp"][i] / (times["core"][i] + times["kernel"][i]) for i in range(ROUNDS)),
                   core_start_s=med["core"], new_process_minus_new_s=med["new_proc"] - med["new"])
    if "cp_r" in med:
        figures.update(new_vs_cp_r=med["cp_r"] / med["new"], new_process_vs_cp_r=med["cp_r"] / med["new_proc"])
    # CPU seconds (user + system) are less at the mercy of the machine's load than wall time
    figures.update(cpu_new_vs_cp=cpu["cp"] / cpu["new"], cpu_repeat_vs_cp=cpu["cp"] / cpu["repeat"],
                   cpu_helper_vs_cp=cpu["cp"] / cpu["helper"], cpu_old_vs_cp=cpu["cp"] / cpu["old"],
                   cpu_cfr_vs_cp=cpu["cp"] / cpu["cfr"], cpu_buffered_vs_cp=cpu["cp"] / cpu["buffered"], cpu_new_process_vs_cp=cpu["cp"] / cpu["new_proc"])
    figures["load1"] = round(os.getloadavg()[0], 2)
    report(request, f"pass-through export ({area}, {cache}) vs cp", **figures)
    print(f"\n{area} {cache}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in figures.items()))
    print("  medians (s): " + ", ".join(f"{k}={v:.3f}" for k, v in med.items()))
    print("  CPU medians (s): " + ", ".join(f"{k}={v:.3f}" for k, v in cpu.items()))

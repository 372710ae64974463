"""CLI start-up: `tilecrate --version`, `import tilecrate` and a ~100-tile export as whole processes, next to
`python -c pass` and to the same export in-process (ratios from one run, paired rounds, medians).

Targets (issue 11): `--version` and the export process under 3x `python -c pass`; the export process
within 2x the in-process export. The floors are printed next to them: `python -c "import numpy"` and
`python -c "import tilecrate._bundle"` (the compiled core needs numpy; also with OpenBLAS on one thread, as
the CLI loads it) vs `python -c pass`, and what a process doing only that import plus the in-process export
would take; a ratio under its floor is out of
reach without dropping numpy from the compiled core. `interpreter_floor_vs_in_process` is `python -c pass`
plus the in-process export over the in-process export: a process export cannot be nearer its in-process
time than that. Bytecode is cached (in a private PYTHONPYCACHEPREFIX) as an
installed package's would be, even where PYTHONDONTWRITEBYTECODE is set.

Run: `.venv/bin/python -m pytest benchmarks/bench_startup.py --benchmark-enable`
Where the time goes: `.venv/bin/python -X importtime -m tilecrate.cli export ... 2>&1 | sort -t'|' -k2 -n`.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tilecrate
from conftest import report
from tilecrate.request import ExportRequest

ROUNDS = 15
CONSOLE = Path(sys.executable).with_name("tilecrate")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The subprocesses' environment: bytecode cached in a private folder, as in an installed package."""
    e = dict(os.environ)
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("pycache"))
    return e


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, str]:
    """A sample cache and the levels of a ~100-tile export from it."""
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("startup") / "s"
    make_sample(out, SampleSpec())          # levels 0-5: 123 tiles
    return out, "0-5"


def _cli() -> list[str]:
    if not CONSOLE.exists():
        pytest.fail(f"{CONSOLE}: the console script is not installed (scripts/install.sh)")
    return [str(CONSOLE)]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


class Paired:
    """Seconds of each contender, run in turn round after round (load changes hit all alike).

    Medians per contender for the times; a ratio is the median of the rounds' ratios, so a burst of
    load on this shared machine that hits one round does not skew it the way a ratio of medians is.
    """

    def __init__(self, contenders: dict, rounds: int = ROUNDS):
        self.times: dict[str, list[float]] = {k: [] for k in contenders}
        self.cpu: dict[str, list[float]] = {k: [] for k in contenders}
        for fn in contenders.values():        # warm-up: bytecode written, files in the page cache
            fn()
        for _ in range(rounds):
            for name, fn in contenders.items():
                # CPU-seconds of the child process, or of this one for in-process contenders: steadier
                # than wall time on a machine others load
                c0, p0 = _children_cpu(), time.process_time()
                self.times[name].append(fn())
                child = _children_cpu() - c0
                self.cpu[name].append(child if child > 0 else time.process_time() - p0)

    def ms(self, name: str) -> float:
        """Median milliseconds of one contender."""
        return statistics.median(self.times[name]) * 1e3

    def cpu_ms(self, name: str) -> float:
        """Median CPU milliseconds (user + system) of one contender."""
        return statistics.median(self.cpu[name]) * 1e3

    def ratio(self, num: str, *den: str, plus: tuple[str, ...] = ()) -> float:
        """Median over rounds of (num + plus...) / (den...)."""
        t = self.times
        return statistics.median((t[num][i] + sum(t[p][i] for p in plus)) / sum(t[d][i] for d in den)
                                 for i in range(len(t[num])))


def test_version_and_import_vs_python(benchmark, request, env):
    """`tilecrate --version` and `import tilecrate` as processes vs `python -c pass` (target < 3x)."""
    python = [sys.executable, "-c", "pass"]
    version = _cli() + ["--version"]
    imp = [sys.executable, "-c", "import tilecrate"]
    run = Paired({"python": lambda: _timed(python, env), "version": lambda: _timed(version, env),
                  "import": lambda: _timed(imp, env)})
    benchmark.pedantic(_timed, args=(version, env), rounds=5, iterations=1)
    report(request, "startup: tilecrate --version", python_ms=run.ms("python"), version_ms=run.ms("version"),
           import_ms=run.ms("import"), cpu_python_ms=run.cpu_ms("python"), cpu_version_ms=run.cpu_ms("version"),
           version_vs_python=run.ratio("version", "python"),
           import_vs_python=run.ratio("import", "python"))


def test_small_export_process_vs_in_process(benchmark, request, env, small, tmp_path):
    """A 123-tile .tpkx export: whole process vs python -c pass (target < 3x) and vs in-process (target <= 2x)."""
    cache, levels = small
    out_proc = tmp_path / "proc.tpkx"
    out_in = tmp_path / "in.tpkx"
    req = ExportRequest(levels=levels)
    cmd = _cli() + ["export", str(cache), "-o", str(out_proc), "--levels", levels, "--quiet"]

    def process() -> float:
        if out_proc.exists():
            out_proc.unlink()
        return _timed(cmd, env)

    def in_process() -> float:
        if out_in.exists():
            out_in.unlink()
        t0 = time.perf_counter()
        tilecrate.export(str(cache), req, str(out_in))      # opens the cache, as the process does
        return time.perf_counter() - t0

    python = [sys.executable, "-c", "pass"]
    numpy = [sys.executable, "-c", "import numpy"]
    core = [sys.executable, "-c", "import tilecrate._bundle"]     # the compiled core, which imports numpy
    # as the CLI loads it: OpenBLAS (numpy's) with one thread, not one per core
    env1 = dict(env, OPENBLAS_NUM_THREADS="1")
    run = Paired({"python": lambda: _timed(python, env), "numpy": lambda: _timed(numpy, env),
                  "core": lambda: _timed(core, env), "core_1thread": lambda: _timed(core, env1),
                  "process": process, "in_process": in_process})
    result = benchmark.pedantic(in_process, rounds=5, iterations=1)
    assert result > 0 and out_proc.exists() and out_in.stat().st_size == out_proc.stat().st_size
    report(request, "startup: 123-tile export", python_ms=run.ms("python"), process_ms=run.ms("process"),
           in_process_ms=run.ms("in_process"), process_vs_python=run.ratio("process", "python"),
           process_vs_in_process=run.ratio("process", "in_process"))
    # the floors no change of ours can go under: a process that only imports numpy, or our compiled
    # core, and a process that would do nothing but that import and the in-process export
    report(request, "startup: floors of a 123-tile export process", numpy_ms=run.ms("numpy"),
           core_ms=run.ms("core"), core_1thread_ms=run.ms("core_1thread"),
           numpy_vs_python=run.ratio("numpy", "python"), core_vs_python=run.ratio("core", "python"),
           core_1thread_vs_python=run.ratio("core_1thread", "python"),
           # the bare interpreter's start plus the in-process export: no process export can go under it
           interpreter_floor_vs_in_process=run.ratio("python", "in_process", plus=("in_process",)),
           floor_vs_python=run.ratio("core_1thread", "python", plus=("in_process",)),
           floor_vs_in_process=run.ratio("core_1thread", "in_process", plus=("in_process",)),
           process_vs_floor=run.ratio("process", "core_1thread", "in_process"),
           cpu_process_ms=run.cpu_ms("process"), cpu_in_process_ms=run.cpu_ms("in_process"),
           cpu_core_ms=run.cpu_ms("core"), cpu_core_1thread_ms=run.cpu_ms("core_1thread"),
           cpu_python_ms=run.cpu_ms("python"),
           process_minus_floor_ms=statistics.median(
               (run.times["process"][i] - run.times["core_1thread"][i] - run.times["in_process"][i]) * 1e3
               for i in range(len(run.times["process"]))))


def test_import_profile(request, env, small, tmp_path):
    """The heaviest imports of a small export's process (-X importtime, cumulative), for the record."""
    cache, levels = small
    out = tmp_path / "p.tpkx"
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tilecrate.cli", "export", str(cache), "-o",
                        str(out), "--levels", levels, "--quiet"], env=env, capture_output=True, text=True, check=True)
    roots = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        if name[1:2] != " ":            # the tree's roots: what each first import from our code costs
            roots.append((int(cumulative), name.strip()))
    roots = sorted(roots, reverse=True)[:8]
    report(request, "startup: heaviest imports of an export (ms, cumulative)",
           **{n: us / 1e3 for us, n in roots})
    shutil.rmtree(tmp_path, ignore_errors=True)

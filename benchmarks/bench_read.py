"""Reading caches: index reads with pread vs the old mapping, and the cost of validating every read
(identity checks) on the tile route and on exports, each as a ratio to the same work in the same run.

Run: `.venv/bin/pytest benchmarks/bench_read.py --benchmark-enable` (generated data, ~100 MB in a
temporary folder); the large-sample figures need `--large-sample data/large` as well.
"""
from __future__ import annotations

import mmap
import os
import random
import struct
import time

import numpy as np
import pytest

import tilecrate
from tilecrate import _bundle, cache as cache_mod, sourcefiles
from tilecrate.sample import SampleSpec, _conf_xml, _v1_bundle, _v2_bundle
from conftest import report

ROUNDS = 5


def _bundle_files(cache):
    return [(ref, cache._loc(ref).bundle) for ref in cache.bundles()]


def _best(fn, rounds: int = ROUNDS) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _paired(a, b, rounds: int = ROUNDS) -> tuple[float, float]:
    """Best times of a and b, measured alternately (and each first in turn) so load changes and
    order effects hit both alike."""
    best = {a: float("inf"), b: float("inf")}
    for k in range(rounds):
        for fn in ((a, b) if k % 2 == 0 else (b, a)):
            t0 = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - t0)
    return best[a], best[b]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """V2: 4 bundles x 1024 tiles of 16 KiB (64 MiB); V1: 1 bundle of 4096 tiles of 2 KiB."""
    rng = random.Random(5)
    root = tmp_path_factory.mktemp("read")
    v2 = root / "v2"
    (v2 / "_alllayers" / "L08").mkdir(parents=True)
    (v2 / "conf.xml").write_text(_conf_xml(SampleSpec()))
    blob = os.urandom(1 << 20)
    for b in range(4):
        cells = rng.sample(range(16384), 1024)
        tiles = {c: blob[(k * 16384) % (1 << 20):][:16384 - (k % 7)] for k, c in enumerate(cells)}
        (v2 / "_alllayers" / "L08" / f"R0000C{b * 128:04x}.bundle").write_bytes(_v2_bundle(tiles))
    v1 = root / "v1"
    (v1 / "_alllayers" / "L08").mkdir(parents=True)
    (v1 / "conf.xml").write_text(_conf_xml(SampleSpec(version=1)))
    tiles = {c: blob[k * 97 % 50000:][:2048 - (k % 13)] for k, c in enumerate(rng.sample(range(16384), 4096))}
    bundle, bundlx = _v1_bundle(tiles, 0, 0)
    (v1 / "_alllayers" / "L08" / "R0000C0000.bundle").write_bytes(bundle)
    (v1 / "_alllayers" / "L08" / "R0000C0000.bundlx").write_bytes(bundlx)
    return v2, v1


def _mapped_parse(path: str, bundlx: bytes | None):
    """The old path: map the whole bundle, parse from the mapping."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        if bundlx is None:
            return _bundle.parse_v2(mm, path)
        return _bundle.parse_v1(bundlx, mm, path)
    finally:
        mm.close()


def test_index_reads_pread_vs_mapping(benchmark, generated, request):
    figures = {}
    for name, root in zip(("v2", "v1"), generated):
        cache = tilecrate.open_cache(root)
        files = _bundle_files(cache)
        bx = {path: (open(path[:-1] + "x", "rb").read() if name == "v1" else None) for _, path in files}

        def by_pread():
            cache._index_cache.clear()
            for ref, _ in files:
                cache.index(ref)

        def by_mapping():
            for _, path in files:
                _mapped_parse(path, bx[path])

        for (ref, path) in files:          # the same index both ways
            o, s = cache.index(ref)
            mo, ms = _mapped_parse(path, bx[path])
            assert (o == mo).all() and (s == ms).all()
        t_pread, t_map = _paired(by_pread, by_mapping, rounds=9)
        figures[f"{name}_index_ms_pread"] = t_pread / len(files) * 1e3
        figures[f"{name}_index_ms_mapping"] = t_map / len(files) * 1e3
        figures[f"{name}_pread_vs_mapping"] = t_pread / t_map
        cache.close()
    cache = tilecrate.open_cache(generated[1])
    ref = cache.bundles()[0]

    def one_v1():
        cache._index_cache.clear()
        cache.index(ref)

    benchmark.pedantic(one_v1, rounds=5, iterations=1)
    report(request, "index reads, pread vs the old mapping (ratio < 1: pread faster)", **figures)


def _tiles_of(cache, n: int, seed: int = 3):
    present = []
    for ref in cache.bundles():
        _, sizes = cache.index(ref)
        present += [(ref.level, ref.row0 + int(i) // 128, ref.col0 + int(i) % 128) for i in np.flatnonzero(sizes)]
    return random.Random(seed).choices(present, k=n)


def test_tile_route_validation_cost(benchmark, generated, request, monkeypatch):
    """Cache.tile with its identity checks (pread + fstat of the held descriptor in the compiled core,
    a stat of the path every PATH_CHECK_SECONDS) vs the same call reading with a plain os.pread and
    no check at all."""
    cache = tilecrate.open_cache(generated[0])
    keys = _tiles_of(cache, 1000)
    expected = sum(len(cache.tile(*k)) for k in keys)

    def validated():
        assert sum(len(cache.tile(*k)) for k in keys) == expected

    saved = (sourcefiles.Source.check, sourcefiles.Source.still_current, sourcefiles.Source.pread_current)

    def pread_unchecked(self, offset, n):
        return os.pread(self.fd, n, self.base + offset), True

    def unvalidated():
        sourcefiles.Source.check = lambda self: None
        sourcefiles.Source.still_current = lambda self: True
        sourcefiles.Source.pread_current = pread_unchecked
        try:
            assert sum(len(cache.tile(*k)) for k in keys) == expected
        finally:
            sourcefiles.Source.check, sourcefiles.Source.still_current, sourcefiles.Source.pread_current = saved

    locs = {ref: cache._loc(ref).bundle for ref in cache.bundles()}
    index = {ref: cache.index(ref) for ref in cache.bundles()}
    plan = []
    for lv, row, col in keys:
        ref = cache_mod.BundleRef(lv, row - row % 128, col - col % 128)
        i = (row % 128) * 128 + col % 128
        plan.append((locs[ref], int(index[ref][0][i]), int(index[ref][1][i])))

    def raw_reads():             # no Cache at all: open, pread, close of the same bytes
        n = 0
        for path, off, size in plan:
            fd = os.open(path, os.O_RDONLY)
            n += len(os.pread(fd, size, off))
            os.close(fd)
        assert n == expected

    t_val, t_off = _paired(validated, unvalidated, rounds=60)
    t_raw = _best(raw_reads)
    benchmark.pedantic(validated, rounds=3, iterations=1)
    report(request, "tile route (Cache.tile, 1 000 reads of 16 KiB, best of 60 paired rounds, page cache warm; the raw baseline "
           "has no Cache at all)",
           us_per_tile_validated=t_val / len(keys) * 1e6, us_per_tile_check_off=t_off / len(keys) * 1e6,
           validated_vs_check_off=t_val / t_off, validated_vs_raw_open_pread_close=t_val / t_raw,
           load_1min=os.getloadavg()[0])
    cache.close()


def test_export_validation_cost(benchmark, generated, request, tmp_path):
    """A whole .tpkx export with every identity check vs the same export with the checks switched off."""
    src = str(generated[0])
    req = tilecrate.ExportRequest(levels="8")
    real_check = sourcefiles.Source.check
    real_read = cache_mod.BundleReader.read_into

    def read_unchecked(self, view, offset):
        n, done = len(view), 0
        while done < n:
            done += os.preadv(self._fd, [view[done:]], self.base + offset + done)

    out = tmp_path / "o.tpkx"

    def validated():
        tilecrate.export(src, req, str(out), threads=2)
        os.unlink(out)

    def unvalidated():
        sourcefiles.Source.check = lambda self: None
        cache_mod.BundleReader.read_into = read_unchecked
        try:
            tilecrate.export(src, req, str(out), threads=2)
            os.unlink(out)
        finally:
            sourcefiles.Source.check = real_check
            cache_mod.BundleReader.read_into = real_read

    validated()
    t_val, t_off = _paired(validated, unvalidated, rounds=10)
    benchmark.pedantic(validated, rounds=3, iterations=1)
    size = sum(os.path.getsize(p) for _, p in _bundle_files(tilecrate.open_cache(src)))
    report(request, "export of 64 MiB of bundles to .tpkx (page cache warm)", load_1min=os.getloadavg()[0],
           ms_validated=t_val * 1e3, ms_checks_off=t_off * 1e3, validated_vs_checks_off=t_val / t_off,
           MB_per_s=size / t_val / 1e6)


# --------------------------------------------------------------------------------------------
# the large sample (optional)


def _python_parse_v2(data: bytes):
    """A plain-Python parse of the same index, the baseline the compiled core is measured against."""
    recs = struct.unpack_from("<16384Q", data, 64)
    return [(r & (2**40 - 1), r >> 40) for r in recs if r >> 40]


def test_index_parsing(benchmark, large_sample, request):
    cache = tilecrate.open_cache(large_sample)
    files = _bundle_files(cache)
    head = _bundle.V2_DATA_START

    def plain_reads():
        for _, path in files:
            with open(path, "rb") as f:
                f.read(head)

    def index_all():
        cache._index_cache.clear()        # measure the reads, not the LRU
        for ref, _ in files:
            cache.index(ref)

    index_all()                                           # warm the page cache
    t_read = _best(plain_reads)
    heads = []
    for _, path in files:
        with open(path, "rb") as f:
            heads.append(f.read(head))
    t0 = time.perf_counter()
    for h in heads:
        _python_parse_v2(h)
    t_py = time.perf_counter() - t0
    t0 = time.perf_counter()
    for h in heads:
        _bundle.parse_v2_index(h, 1 << 40, "b")
    t_cy = time.perf_counter() - t0
    benchmark.pedantic(index_all, rounds=5, iterations=1)
    t_index = benchmark.stats.stats.mean
    report(request, "index parsing", bundles=len(files), index_bundles_per_s=len(files) / t_index,
           index_vs_plain_header_read=t_index / t_read, cython_vs_python_parse_speedup=t_py / t_cy)
    cache.close()


def test_tile_read_throughput(benchmark, large_sample, request):
    cache = tilecrate.open_cache(large_sample)
    files = _bundle_files(cache)
    total = sum(int(cache.index(ref)[1].sum(dtype=np.uint64)) for ref, _ in files)

    def read_tiles():
        n = 0
        for ref, _ in files:
            with cache.open_bundle(ref) as data:
                for i in np.flatnonzero(data.sizes):
                    off = int(data.offsets[i])
                    n += len(data.buf[off:off + int(data.sizes[i])])
        return n

    def plain_reads():
        n = 0
        buf = bytearray(64 << 20)
        for _, path in files:
            with open(path, "rb", buffering=0) as f:
                while True:
                    k = f.readinto(buf)
                    if not k:
                        break
                    n += k
        return n

    plain_reads()
    t0 = time.perf_counter()
    file_bytes = plain_reads()
    t_plain = time.perf_counter() - t0
    assert benchmark.pedantic(read_tiles, rounds=2, iterations=1) == total
    t_tiles = benchmark.stats.stats.mean
    report(request, "tile reads", tiles_MB_per_s=total / t_tiles / 1e6,
           plain_file_MB_per_s=file_bytes / t_plain / 1e6,
           tile_rate_vs_plain_rate=(total / t_tiles) / (file_bytes / t_plain))
    cache.close()

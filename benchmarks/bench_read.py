"""Reading the large sample: bundle-index parsing (bundles/s) and tile reads (MB/s), each next to plain file reads.

Run: `.venv/bin/pytest benchmarks/bench_read.py --benchmark-enable --large-sample data/large`
"""
from __future__ import annotations

import mmap
import struct
import time

import numpy as np
import pytest

import tilecrate
from tilecrate import _bundle
from conftest import report


def _bundle_files(cache):
    return [(ref, cache._loc(ref).bundle) for ref in cache.bundles()]


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

    def parse_all():
        for ref, _ in files:
            with cache.open_bundle(ref):
                pass

    parse_all()                                           # warm the page cache
    t0 = time.perf_counter()
    for _ in range(5):
        plain_reads()
    t_read = (time.perf_counter() - t0) / 5
    maps = []
    for _, path in files:
        with open(path, "rb") as f:
            maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    t0 = time.perf_counter()
    for m in maps:
        _python_parse_v2(m)
    t_py = time.perf_counter() - t0
    t0 = time.perf_counter()
    for m in maps:
        _bundle.parse_v2(m, "b")
    t_cy = time.perf_counter() - t0
    for m in maps:
        m.close()
    def index_all():
        cache._index_cache.clear()        # measure the reads, not the LRU
        for ref, _ in files:
            cache.index(ref)

    t0 = time.perf_counter()
    for _ in range(5):
        index_all()
    t_index = (time.perf_counter() - t0) / 5
    benchmark.pedantic(parse_all, rounds=5, iterations=1)
    t_parse = benchmark.stats.stats.mean
    report(request, "index parsing", bundles=len(files), index_bundles_per_s=len(files) / t_index,
           index_vs_plain_header_read=t_index / t_read,
           open_map_parse_bundles_per_s=len(files) / t_parse,
           open_map_parse_vs_plain_header_read=t_parse / t_read,
           cython_vs_python_parse_speedup=t_py / t_cy)
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
                    n += len(bytes(data.buf[off:off + int(data.sizes[i])]))
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

"""Output bundles from blocks held in memory: slices of the source when its size prefixes are right."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from tilecrate import _bundle
from tilecrate.cache import BundleRef
from test_package_bundles import _handmade_v2, read_v1, read_v2
from tilecrate.package import bundles


def _plan(src: bytes, version: int):
    offsets, sizes = _bundle.parse_v2(src)
    return bundles._make(BundleRef(0, 0, 0), memoryview(src), len(src), offsets, sizes,
                         np.ones((128, 128), np.uint8), version, "x")


@pytest.mark.parametrize("version", [2, 1])
def test_prefixed_source_is_yielded_in_slices(version):
    tiles = {0: b"A" * 10, 1: b"B" * 7, 130: b"C" * 300, 16383: b"D"}
    src = _handmade_v2(tiles, prefix=True)
    plan = _plan(src, version)
    chunks = list(plan.chunks())
    assert all(c.obj is src for c in chunks[1:])          # no copy: views of the source
    out = b"".join(bytes(c) for c in chunks)
    assert len(out) == plan.size
    got = read_v2(out)["tiles"] if version == 2 else read_v1(out, plan.bundlx)["tiles"]
    assert got == tiles


def test_one_wrong_prefix_takes_the_copying_path():
    tiles = {0: b"A" * 10, 1: b"B" * 7, 130: b"C" * 300}
    src = bytearray(_handmade_v2(tiles, prefix=True))
    offsets, _ = _bundle.parse_v2(bytes(src))
    struct.pack_into("<I", src, int(offsets[130]) - 4, 299)          # a lying prefix before the last tile
    plan = _plan(bytes(src), 2)
    chunks = [bytes(c) for c in plan.chunks()]
    assert read_v2(b"".join(chunks))["tiles"] == tiles               # the reader checks every prefix
    assert not bundles._prefixed(memoryview(bytes(src)), plan.tile_offsets, plan.tile_sizes)


def test_prefix_check_refuses_tiles_at_the_edges():
    src = memoryview(b"\x03\x00\x00\x00abc")
    assert bundles._prefixed(src, np.array([4], np.uint64), np.array([3], np.uint32))
    assert not bundles._prefixed(src, np.array([3], np.uint64), np.array([3], np.uint32))   # no room for a prefix
    assert not bundles._prefixed(src, np.array([4], np.uint64), np.array([4], np.uint32))   # past the end
    assert not bundles._prefixed(src, np.zeros(0, np.uint64), np.zeros(0, np.uint32))

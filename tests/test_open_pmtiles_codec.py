"""tilecrate._pmtiles (TileIDs and varints in C) against the `pmtiles` package's own functions."""
from __future__ import annotations

import io

import numpy as np
import pytest
from pmtiles.tile import read_varint, zxy_to_tileid

from tilecrate._pmtiles import tile_ids, varints


@pytest.mark.parametrize("z", [0, 1, 2, 7, 10, 13, 24, 31])
def test_tile_ids_agree_with_pmtiles(z):
    rng = np.random.default_rng(z)
    n = 1 << z
    x = np.concatenate([rng.integers(0, n, 300), [0, n - 1, 0, n - 1]])
    y = np.concatenate([rng.integers(0, n, 300), [0, 0, n - 1, n - 1]])
    assert tile_ids(z, x, y).tolist() == [zxy_to_tileid(z, int(a), int(b)) for a, b in zip(x, y)]


def test_tile_ids_refuse_tiles_outside_the_zoom():
    with pytest.raises(ValueError, match="outside zoom 3"):
        tile_ids(3, [0, 8], [0, 0])
    with pytest.raises(ValueError, match="outside zoom 3"):
        tile_ids(3, [0], [-1])
    with pytest.raises(ValueError, match="0 to 31"):
        tile_ids(32, [0], [0])
    with pytest.raises(ValueError, match="as many"):
        tile_ids(3, [0, 1], [0])
    assert tile_ids(5, [], []).shape == (0,)


def test_varints_read_back_by_pmtiles():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.integers(0, 2 ** 63, 500, dtype=np.uint64),
                             np.array([0, 1, 127, 128, 16383, 16384, 2 ** 64 - 1], dtype=np.uint64)])
    data = io.BytesIO(varints(values))
    assert [read_varint(data) for _ in range(values.size)] == values.tolist()
    assert data.read() == b"" and varints(np.zeros(0, np.uint64)) == b""

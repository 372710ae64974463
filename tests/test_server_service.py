"""Service JSON, tiles and tilemaps for every real fixture, in-process (no HTTP)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REAL_SOURCES, real_path
from tilecrate.server.config import ConfigError, ServiceConfig
from tilecrate.server.service import open_service
from tilecrate.tiling import PACKET


@pytest.mark.parametrize("key", sorted(REAL_SOURCES))
def test_real_sources_as_services(key, real_dir):
    cfg = ServiceConfig(name="S", source=str(real_path(key)))
    if key.endswith(".vtpk"):
        with pytest.raises(ConfigError, match="vector tile package"):
            open_service(cfg)
        return
    svc = open_service(cfg)
    try:
        info = svc.root_json()
        json.dumps(info, allow_nan=False)      # what the server sends: no NaN or infinity anywhere
        assert info["tileInfo"]["lods"] and info["storageInfo"]["packetSize"] == PACKET
        assert info["minLOD"] <= info["maxLOD"]
        cache = svc.cache
        lv = cache.levels[0]
        ref = cache.bundles(lv)[0]
        _, sizes = cache.index(ref)
        present = np.flatnonzero(sizes)
        i = int(present[0])
        row, col = ref.row0 + i // PACKET, ref.col0 + i % PACKET
        data, ctype = svc.tile(lv, row, col)
        assert data == cache.tile(lv, row, col) and ctype.startswith(("image/", "application/"))
        tm = svc.tilemap(lv, ref.row0, ref.col0, PACKET, PACKET)
        assert tm["data"] == (sizes > 0).astype(int).tolist()
        assert svc.tile(lv, ref.row0 + PACKET * 1000, 0) is None
    finally:
        svc.close()

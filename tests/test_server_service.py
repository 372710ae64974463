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
    if key.endswith(".vtpk"):  # served as a VectorTileServer (tests/test_server_vector.py), never a MapServer
        with pytest.raises(ConfigError, match="vector tiles; it cannot be served as a MapServer"):
            open_service(ServiceConfig(name="S", source=str(real_path(key)), type="MapServer"))
        svc = open_service(cfg)
        assert svc.kind == "VectorTileServer"
        svc.close()
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


def _args(**kw):
    import argparse

    base = dict(config=None, cache=None, name=None, demo=False, host=None, port=None, data_dir=None, token=None,
                max_file_age=None, max_outstanding_jobs=None, max_export_tiles=None, workers=None, quiet=True)
    base.update(kw)
    return argparse.Namespace(**base)


def test_serve_command_configs(tmp_path, real_dir):
    from tilecrate.commands.serve import build_config

    usa = str(real_path("Usa.tpkx"))
    cfg = build_config(_args(cache=usa, data_dir=str(tmp_path), port=9000, token="t", max_export_tiles=5))
    svc = cfg.services["Usa"]
    assert (svc.source, svc.max_export_tiles_count, cfg.port, cfg.token, cfg.host) == (usa, 5, 9000, "t", "127.0.0.1")
    assert cfg.output_dir == str(tmp_path / "arcgisoutput")
    assert list(build_config(_args(cache=usa, name="Other", data_dir=str(tmp_path))).services) == ["Other"]
    for bad in (_args(), _args(cache=usa, demo=True), _args(cache=usa, name="a/b"),
                _args(cache=usa, max_outstanding_jobs=-2), _args(cache=usa, port=-1)):
        with pytest.raises(ConfigError):
            build_config(bad)


def test_service_json_carries_the_source_item_and_the_config_overrides_it(real_dir, tmp_path):
    """A re-served ArcGIS package keeps what its licence asks for (credits "US Census Bureau"), its title
    and tags in the service JSON; the config's copyrightText / description / summary / tags come first."""
    from tilecrate.server.config import load_config

    src = str(real_path("states_filled.tpk"))
    svc = open_service(ServiceConfig(name="S", source=src))
    try:
        item = svc.cache.item
        info = svc.root_json()
        assert item.credits and "Census" in item.credits
        assert info["copyrightText"] == item.credits == svc.layer_json(0)["copyrightText"]
        assert info["documentInfo"]["Title"] == item.title
        assert info["documentInfo"]["Keywords"] == ",".join(item.tags)
        assert info["description"] == (item.description or item.summary or "")
    finally:
        svc.close()
    conf = tmp_path / "site.toml"
    conf.write_text(f'[services.S]\nsource = "{src}"\ncopyrightText = "Our credits"\nsummary = "Sum"\n'
                    f'tags = ["a", "b"]\ndescription = "Desc"\n')
    cfg = load_config(str(conf)).services["S"]
    assert (cfg.copyright, cfg.summary, cfg.tags, cfg.description) == ("Our credits", "Sum", ["a", "b"], "Desc")
    svc = open_service(cfg)
    try:
        info = svc.root_json()
        assert (info["copyrightText"], info["description"]) == ("Our credits", "Desc")
        assert (info["documentInfo"]["Subject"], info["documentInfo"]["Keywords"]) == ("Sum", "a,b")
    finally:
        svc.close()

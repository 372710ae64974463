"""Estimates: counts from the selection, sizes equal to what export() really writes; the CLI."""
from __future__ import annotations

import json
import os

import pytest

from tilecrate.cache import open_cache
from tilecrate.cli import main
from tilecrate.estimate import Estimate, estimate
from tilecrate.request import ExportRequest
from tilecrate.selection import select

AOI = {"features": [{"geometry": {"rings": [[[-12.3, 30.1], [31.7, 58.3], [38.2, 9.7], [4.4, -21.9], [-12.3, 30.1]]],
                                  "spatialReference": {"wkid": 4326}}}]}


def _folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("storage, tile_package", [("CompactV2", True), ("Compact", True), (None, False)])
def test_estimate_is_the_exported_size(sample_v2, tmp_path, storage, tile_package):
    from tilecrate.export import export
    req = ExportRequest("0-5", area_of_interest=AOI, storage_format=storage, tile_package=tile_package)
    est = estimate(str(sample_v2), req)
    out = tmp_path / ("out.tpkx" if storage == "CompactV2" else "out.tpk" if storage else "out")
    res = export(str(sample_v2), req, str(out))
    on_disk = os.path.getsize(res.path) if tile_package else _folder_size(res.path)
    assert est.total_size == on_disk == res.size
    assert est.total_tiles == res.tiles
    assert {lv: v["tiles"] for lv, v in est.levels.items()} == {lv: v["tiles"] for lv, v in res.levels.items()}


def test_estimate_counts_are_the_selection(sample_v2):
    req = ExportRequest("2-5", extent="-10,35,20,55", aoi_sr=4326)
    with open_cache(str(sample_v2)) as cache:
        sel = select(cache, req)
        est = estimate(cache, req)
    assert est.total_tiles == sel.tiles > 0
    assert sorted(est.levels) == [2, 3, 4, 5]
    for ls in sel.levels:
        assert est.levels[ls.level]["tiles"] == ls.tiles
        assert est.levels[ls.level]["tileBytes"] == ls.tile_bytes
        # a level's bundles hold its tiles, a 4-byte prefix each, and a header + index per bundle
        assert est.levels[ls.level]["size"] == ls.tile_bytes + 4 * ls.tiles + 131136 * len(ls.bundles)
    assert est.total_size > sum(v["size"] for v in est.levels.values())   # plus metadata and zip records


def test_to_json_shape():
    est = Estimate(3, 1000, {1: {"tiles": 1, "size": 10, "tileBytes": 5}, 0: {"tiles": 2, "size": 20, "tileBytes": 6}})
    js = est.to_json()
    assert list(js) == ["totalTilesToExport", "totalSize", "levels"]
    assert list(js["levels"]) == ["0", "1"] and js["totalSize"] == 1000
    json.dumps(js)


def test_cli_json(sample_v2, capsys):
    assert main(["estimate", str(sample_v2), "--levels", "0-5", "--aoi", json.dumps(AOI), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    est = estimate(str(sample_v2), ExportRequest("0-5", area_of_interest=AOI))
    assert out == est.to_json()
    assert isinstance(out["totalTilesToExport"], int) and isinstance(out["totalSize"], int)


def test_cli_table_aoi_file_and_options(sample_v2, tmp_path, capsys):
    geojson = {"type": "Polygon", "coordinates": AOI["features"][0]["geometry"]["rings"]}
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps(geojson))
    assert main(["estimate", str(sample_v2), "--levels", "3-5", "--aoi", str(path), "--storage-format", "Compact",
                 "--no-tile-package"]) == 0
    text = capsys.readouterr().out
    est = estimate(str(sample_v2), ExportRequest("3-5", area_of_interest=geojson, storage_format="Compact",
                                                 tile_package=False))
    assert f"totalTilesToExport {est.total_tiles}, totalSize {est.total_size} bytes" in text
    assert text.count("\n") == 1 + 3 + 2


@pytest.mark.parametrize("args, message", [
    (["--levels", "0-40"], "level 24-40 not in the cache's tiling scheme"),
    (["--levels", "0-3", "--aoi", "missing.json"], "neither JSON nor a readable file"),
    (["--levels", "0-3", "--extent", "150,-40,160,-30", "--aoi-sr", "4326"], "outside the cache's extent"),
    (["--levels", "1", "--export-by", "Scale"], "matches no level"),
])
def test_cli_errors(sample_v2, capsys, args, message):
    assert main(["estimate", str(sample_v2), *args, "--json"]) == 1
    captured = capsys.readouterr()
    assert message in json.loads(captured.out)["error"]
    assert message in captured.err


def test_presence_store_gives_the_same_answer_and_hits(sample_v2, tmp_path):
    from tilecrate.presence import PresenceStore, decode, encode

    req = ExportRequest("0-5", area_of_interest=AOI)
    with open_cache(str(sample_v2)) as cache:
        plain = select(cache, req)
        with PresenceStore(str(tmp_path / "presence")) as store:
            first = select(cache, req, presence=store)
            assert store.misses > 0 and store.hits == 0
        with PresenceStore(str(tmp_path / "presence")) as store:
            second = select(cache, req, presence=store)
            assert store.hits == store.misses + store.hits > 0
            est = estimate(cache, req, presence=store)
        for sel in (first, second):
            assert [(b.ref, b.tiles, b.tile_bytes) for b in sel.bundles()] == \
                   [(b.ref, b.tiles, b.tile_bytes) for b in plain.bundles()]
            assert all((x.mask == y.mask).all() for x, y in zip(sel.bundles(), plain.bundles()))
        assert est.to_json() == estimate(cache, req).to_json()
        for ref in cache.bundles():
            sizes = cache.index(ref)[1]
            assert (decode(encode(sizes)) == sizes).all()
    assert decode(b"junk") is None and decode(encode(sizes)[:-1]) is None


def test_presence_store_ignores_a_rewritten_bundle(sample_v2, tmp_path):
    import shutil

    from tilecrate.presence import PresenceStore

    src = tmp_path / "cache"
    shutil.copytree(sample_v2, src)
    req = ExportRequest("5")
    store_dir = str(tmp_path / "presence")
    with open_cache(str(src)) as cache, PresenceStore(store_dir) as store:
        before = select(cache, req, presence=store).tiles
    # replace the level-5 bundle by the level-4 one (fewer tiles): size and mtime change
    l5 = next((src / "_alllayers" / "L05").glob("*.bundle"))
    l4 = next((src / "_alllayers" / "L04").glob("*.bundle"))
    shutil.copyfile(l4, l5)
    os.utime(l5, (1, 1))
    with open_cache(str(src)) as cache, PresenceStore(store_dir) as store:
        after = select(cache, req, presence=store).tiles
        assert store.misses == 1
    assert after != before and after == 24


def test_cli_presence_store(sample_v2, tmp_path, capsys):
    args = ["estimate", str(sample_v2), "--levels", "0-5", "--json", "--presence-store", str(tmp_path / "p")]
    assert main(args) == 0 and main(args) == 0
    a, b = capsys.readouterr().out.strip().split("\n}\n")
    assert json.loads(a + "}") == json.loads(b)

"""A whole-source export states the source service's own extents (issue 12): a .tpk's mapserver.json
fullExtent / initialExtent / geoFullExtent / geoInitialExtent and its item's extent, a .tpkx's root.json
extents and iteminfo.json extent, written back unchanged into .tpk and .tpkx re-exports, as ArcGIS
would re-package the same service; an export limited by levels, extent or polygon states the extent of
the tiles it holds. Read back with zipfile/json/ElementTree and with tpkutils (its `bounds`)."""
from __future__ import annotations

import json
import pickle
import shutil
import xml.etree.ElementTree as ET
import zipfile

import pytest

import tilecrate
from tilecrate.cache import open_cache
from tilecrate.plan import make_plan
from tilecrate.request import ExportRequest
from tilecrate.sources.esri import ServiceExtents, parse_item_extent, parse_mapserver_json
from tilecrate.tiling import WEB_MERCATOR, SpatialRef

from conftest import real_path

MAPSERVER = "servicedescriptions/mapserver/mapserver.json"
BOX = ("xmin", "ymin", "xmax", "ymax")


def _box(obj) -> tuple[float, ...]:
    return tuple(float(obj[k]) for k in BOX)


def _mapserver(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(MAPSERVER))


def _item_xml_extent(path) -> tuple[float, ...]:
    with zipfile.ZipFile(path) as z:
        ext = ET.fromstring(z.read("esriinfo/iteminfo.xml")).find("extent")
    return tuple(float(ext.find(k).text) for k in BOX)


def _tpkx_json(path, name: str) -> dict:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(name))


def _export(src, out, levels: str | tuple = "0-4", **kw) -> None:
    tilecrate.export(str(src), ExportRequest(levels, **kw), str(out))


def _with_mapserver(tmp_path, data: bytes, name: str = "edited.tpk"):
    """states_filled.tpk with its mapserver.json replaced (entries stored, as ArcGIS writes them)."""
    out = tmp_path / name
    with zipfile.ZipFile(real_path("states_filled.tpk")) as zin, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename == MAPSERVER else zin.read(info))
    return out


def test_tpk_source_states_its_service_extents(real_dir):
    src = real_path("states_filled.tpk")
    ms = _mapserver(src)
    with open_cache(src) as cache:
        s = cache.service_extents
    assert s is not None
    assert _box(s.full.to_json()) == _box(ms["contents"]["fullExtent"])
    assert _box(s.initial.to_json()) == _box(ms["contents"]["initialExtent"])
    assert s.full.spatial_ref.code == 3857
    assert _box(s.geo_full.to_json()) == _box(ms["resourceInfo"]["geoFullExtent"])
    assert _box(s.geo_initial.to_json()) == _box(ms["resourceInfo"]["geoInitialExtent"])
    assert _box(s.item.to_json()) == _item_xml_extent(src)


def test_whole_tpk_reexport_writes_the_service_extents_unchanged(real_dir, tmp_path):
    from tpkutils import TPK

    src = real_path("states_filled.tpk")
    ms = _mapserver(src)
    out = tmp_path / "states.tpk"
    _export(src, out)
    got = _mapserver(out)
    for key in ("fullExtent", "initialExtent"):
        assert _box(got["contents"][key]) == _box(ms["contents"][key]), key
        assert got["contents"][key]["spatialReference"] == {"wkid": 102100, "latestWkid": 3857}
    for key in ("geoFullExtent", "geoInitialExtent"):
        assert got["resourceInfo"][key] == ms["resourceInfo"][key], key
    assert _item_xml_extent(out) == _item_xml_extent(src)
    with TPK(str(out)) as tpk:
        assert tpk.bounds == [-179.23108600000003, -14.601813000000014, 179.859681, 71.441059]
    # conf.cdi keeps the data envelope: the tiles' extent clipped to the source's conf.cdi
    with open_cache(out) as again, open_cache(src) as orig:
        assert _box(again.full_extent.to_json()) == pytest.approx(_box(orig.full_extent.to_json()))
        assert again.service_extents == orig.service_extents


def test_whole_tpk_to_tpkx_and_back(real_dir, tmp_path):
    src = real_path("states_filled.tpk")
    ms = _mapserver(src)
    tpkx = tmp_path / "states.tpkx"
    _export(src, tpkx)
    root = _tpkx_json(tpkx, "root.json")
    assert _box(root["fullExtent"]) == _box(ms["contents"]["fullExtent"])
    assert _box(root["initialExtent"]) == _box(ms["contents"]["initialExtent"])
    assert _box(_tpkx_json(tpkx, "iteminfo.json")["extent"]) == _item_xml_extent(src)
    # .tpkx -> .tpk: the native extents travel; the WGS 84 ones are projected from them
    back = tmp_path / "back.tpk"
    _export(tpkx, back)
    got = _mapserver(back)
    assert _box(got["contents"]["fullExtent"]) == _box(ms["contents"]["fullExtent"])
    assert _box(got["contents"]["initialExtent"]) == _box(ms["contents"]["initialExtent"])
    assert _box(got["resourceInfo"]["geoFullExtent"]) == pytest.approx(_box(ms["resourceInfo"]["geoFullExtent"]),
                                                                       abs=1e-6)
    assert _box(got["resourceInfo"]["geoInitialExtent"]) == pytest.approx(
        _box(ms["resourceInfo"]["geoInitialExtent"]), abs=1e-6)
    assert _item_xml_extent(back) == _item_xml_extent(src)


def test_whole_tpkx_reexport_keeps_root_and_item_extents(real_dir, tmp_path):
    src = real_path("Usa.tpkx")
    root, item = _tpkx_json(src, "root.json"), _tpkx_json(src, "iteminfo.json")
    out = tmp_path / "usa.tpkx"
    _export(src, out, "0-5")
    got_root, got_item = _tpkx_json(out, "root.json"), _tpkx_json(out, "iteminfo.json")
    for key in ("fullExtent", "initialExtent"):
        assert _box(got_root[key]) == _box(root[key]), key
    assert _box(got_item["extent"]) == _box(item["extent"])


def test_extracted_tpkx_folder_states_its_root_json_extents(real_dir):
    folder = real_path("Usa_extracted")
    root = json.loads((folder / "root.json").read_text("utf-8-sig"))
    with open_cache(folder) as cache:
        s = cache.service_extents
    assert s is not None and _box(s.full.to_json()) == _box(root["fullExtent"])
    item = json.loads((folder / "iteminfo.json").read_text("utf-8-sig"))
    assert _box(s.item.to_json()) == _box(item["extent"])


@pytest.mark.parametrize("limit", [
    {"levels": "0-2"},                                           # not every level the source holds
    {"extent": {"xmin": -11e6, "ymin": 3e6, "xmax": -9e6, "ymax": 5e6,
                "spatialReference": {"wkid": 102100}}},
])
def test_a_limited_export_states_the_extent_of_its_tiles(real_dir, tmp_path, limit):
    src = real_path("states_filled.tpk")
    ms = _mapserver(src)
    kw = {k: v for k, v in limit.items() if k != "levels"}
    out = tmp_path / "part.tpk"
    _export(src, out, limit.get("levels", "0-4"), **kw)
    got = _mapserver(out)
    full = _box(got["contents"]["fullExtent"])
    assert full == _box(got["contents"]["initialExtent"])
    assert full != _box(ms["contents"]["fullExtent"])
    assert got["resourceInfo"]["geoFullExtent"] != ms["resourceInfo"]["geoFullExtent"]
    with open_cache(out) as again:
        cdi = _box(again.full_extent.to_json())
    assert full == pytest.approx(cdi)     # today's computed extent, the same in mapserver.json and conf.cdi
    if "extent" in kw:
        e = kw["extent"]
        assert e["xmin"] - 2e6 <= full[0] and full[2] <= e["xmax"] + 2e6   # within a level-4 tile of the request


def test_estimate_of_a_whole_export_is_exact(real_dir, tmp_path):
    src = real_path("states_filled.tpk")
    for ext in ("tpk", "tpkx"):
        out = tmp_path / f"whole.{ext}"
        with open_cache(src) as cache:
            plan = make_plan(cache, ExportRequest("0-4"), out)
            assert plan.info.service is not None
            predicted = plan.predicted()[0]
        _export(src, out)
        assert out.stat().st_size == predicted, ext


def test_plan_pickle_keeps_whole_area(real_dir, tmp_path):
    with open_cache(real_path("states_filled.tpk")) as cache:
        whole = make_plan(cache, ExportRequest("0-4"), tmp_path / "a.tpk")
        part = make_plan(cache, ExportRequest("0-4", extent={"xmin": -11e6, "ymin": 3e6, "xmax": -9e6, "ymax": 5e6,
                                                            "spatialReference": {"wkid": 102100}}),
                         tmp_path / "b.tpk")
    assert pickle.loads(pickle.dumps(whole)).selection.whole_area is True
    assert pickle.loads(pickle.dumps(part)).selection.whole_area is False
    assert whole.info.service is not None and part.info.service is None


@pytest.mark.parametrize("data, warns", [
    (b"{not json", True),
    (b"[" * 200_000 + b"]" * 200_000, True),                     # deep nesting: no RecursionError escapes
    (b'"a string"', True),
    (json.dumps({"contents": {"fullExtent": {"xmin": "NaN", "ymin": 0, "xmax": 1, "ymax": 1}},
                 "resourceInfo": {"geoFullExtent": {"xmin": 1e999, "ymin": 0, "xmax": 1, "ymax": 1}}}).encode(), False),
    (json.dumps({"contents": {"fullExtent": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1,
                                             "spatialReference": {"wkid": 2263}}},
                 "resourceInfo": {"geoFullExtent": {"xmin": True, "ymin": 0, "xmax": 1, "ymax": 1}}}).encode(), False),
    (json.dumps({"contents": {"fullExtent": {"xmin": 5, "ymin": 0, "xmax": 1, "ymax": 1}},
                 "resourceInfo": {"geoFullExtent": [1, 2, 3]}}).encode(), False),
])
def test_unusable_mapserver_json_falls_back_to_computed_extents(real_dir, tmp_path, data, warns):
    src = _with_mapserver(tmp_path, data)
    with open_cache(src) as cache:
        s = cache.service_extents
        assert (s is None or (s.full, s.initial, s.geo_full, s.geo_initial) == (None,) * 4)
        assert any("service extents not read" in w for w in cache.warnings) == warns
    out = tmp_path / "out.tpk"
    _export(src, out)
    got = _mapserver(out)
    json.loads(json.dumps(got), parse_constant=lambda c: pytest.fail(f"{c} in mapserver.json"))
    with open_cache(real_path("states_filled.tpk")) as orig:
        cdi = _box(orig.full_extent.to_json())
    assert _box(got["contents"]["fullExtent"]) == pytest.approx(cdi)
    # the item's own extent still travels (the whole source was exported)
    assert _item_xml_extent(out) == _item_xml_extent(real_path("states_filled.tpk"))


def test_oversized_mapserver_json_is_not_read(real_dir, tmp_path):
    doc = json.dumps({"contents": {"fullExtent": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}},
                      "pad": "x" * (5 << 20)}).encode()
    with open_cache(_with_mapserver(tmp_path, doc)) as cache:
        assert cache.service_extents is None or cache.service_extents.full is None


def test_partial_service_extents_are_completed():
    ms = json.dumps({"contents": {"initialExtent": {"xmin": -1e6, "ymin": -1e6, "xmax": 1e6, "ymax": 1e6,
                                                    "spatialReference": {"wkid": 102100, "latestWkid": 3857}}},
                     "resourceInfo": {}}).encode()
    s = parse_mapserver_json(ms, "mapserver.json", WEB_MERCATOR)
    assert s.full is None and s.initial is not None and s.geo_full is None
    from tilecrate.package.metadata import service_extents
    done = service_extents(s, None, None)
    assert done.full == s.initial and done.initial == s.initial
    assert done.geo_full.xmin == pytest.approx(-8.983152841195214) and done.geo_full.ymax == pytest.approx(8.946573850543427)
    assert done.item == done.geo_initial == done.geo_full
    # a wkid the tiles do not use is not copied; a bare envelope takes the tiles' system
    other = json.dumps({"contents": {"fullExtent": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1,
                                                    "spatialReference": {"wkid": 4326}}}}).encode()
    assert parse_mapserver_json(other, "m", WEB_MERCATOR).full is None
    bare = json.dumps({"contents": {"fullExtent": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}}}).encode()
    assert parse_mapserver_json(bare, "m", SpatialRef(102100, 3857)).full.spatial_ref.code == 3857
    assert ServiceExtents().empty


def test_item_extent_readers():
    xml = b"<ESRI_ItemInformation><extent><xmin>-1.5</xmin><ymin>-2</ymin><xmax>3</xmax><ymax>4</ymax></extent>" \
          b"</ESRI_ItemInformation>"
    assert parse_item_extent(xml, "esriinfo/iteminfo.xml").to_json()["xmin"] == -1.5
    assert parse_item_extent(b"<a><extent><xmin>x</xmin></extent></a>", "iteminfo.xml") is None
    assert parse_item_extent(b"<a", "iteminfo.xml") is None
    pj = json.dumps({"extent": [[-10, -5], [10, 5]]}).encode()
    assert tuple(parse_item_extent(pj, "iteminfo.json").to_json()[k] for k in BOX) == (-10, -5, 10, 5)
    assert parse_item_extent(b"[" * 100_000, "iteminfo.json") is None
    assert parse_item_extent(json.dumps({"extent": {"xmin": 1e9, "ymin": 0, "xmax": 2e9, "ymax": 1}}).encode(),
                             "iteminfo.json") is None


def test_folder_without_root_json_states_none(real_dir, tmp_path):
    folder = tmp_path / "cache"
    shutil.copytree(real_path("raster-tiles-compactcache"), folder)
    with open_cache(folder) as cache:
        assert cache.service_extents is None

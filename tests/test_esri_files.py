"""The ArcGIS metadata files (tilecrate.esri): each reader reads back what the writer next to it writes
(conf.xml, conf.cdi, root.json, mapserver.json, the item extent), every real fixture's conf.xml and
root.json reads as an independent ElementTree/json reading of it says, and the metadata of every
package, folder and .vtpk we export stays byte-identical to the sha256 manifest in
tests/data/package_metadata_sha256.json (regenerate it with `python tests/package_golden.py
tests/data/package_metadata_sha256.json` only for an intended change, and say so in the commit)."""
from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from tilecrate.cache import open_cache
from tilecrate.errors import CacheError
from tilecrate.esri.common import COMPACT_V1, COMPACT_V2, CacheMeta, ServiceExtents
from tilecrate.esri.conf_xml import parse_conf_cdi, parse_conf_xml, write_conf_cdi, write_conf_xml
from tilecrate.esri.iteminfo import (
    ItemInfo,
    Stamp,
    parse_item_extent,
    parse_iteminfo_json,
    parse_iteminfo_xml,
    vtpk_item_texts,
    write_item_pkinfo,
    write_iteminfo_json,
    write_iteminfo_xml,
    write_vtpk_item_pkinfo,
    write_vtpk_iteminfo_xml,
)
from tilecrate.esri.mapserver_json import parse_mapserver_json, write_mapserver_json
from tilecrate.esri.root_json import parse_root_json, restate_root_json, write_root_json
from tilecrate.tiling import Extent, SpatialRef

from conftest import REAL, REAL_SOURCES, real_path

GOLDEN = Path(__file__).parent / "data" / "package_metadata_sha256.json"
RASTER = [k for k in REAL_SOURCES if k != "natural-earth.vtpk"]
WKT = ('PROJCS["WGS_1984_Web_Mercator_Auxiliary_Sphere",GEOGCS["GCS_WGS_1984",DATUM["D_WGS_1984",'
       'SPHEROID["WGS_1984",6378137.0,298.257223563]],PRIMEM["Greenwich",0.0],UNIT["Degree",0.0174532925199433]],'
       'PROJECTION["Mercator_Auxiliary_Sphere"],UNIT["Meter",1.0]] & <odd>')


def _meta(key: str, **kw) -> CacheMeta:
    with open_cache(real_path(key)) as c:
        base = CacheMeta(c.scheme, c.storage_format, c.tile_format, c.compression_quality)
    return dataclasses.replace(base, **kw)


def _sr_round(sr: SpatialRef) -> SpatialRef:
    """What an Esri JSON spatialReference keeps of `sr` (wkid/latestWkid, else the WKT)."""
    return SpatialRef.from_json(sr.to_json()) if sr.to_json() else SpatialRef()


# ------------------------------------------------------------------------------------------
# write -> read -> equal


@pytest.mark.parametrize("key", RASTER)
def test_conf_xml_round_trip(real_dir, key):
    meta = _meta(key)
    got = parse_conf_xml(write_conf_xml(meta))
    assert got == meta


@pytest.mark.parametrize("band_count,lerc_error", [(1, 0.1), (3, 0.0), (1, 2.5e-05), (None, 0.5), (2, None)])
def test_conf_xml_round_trip_elevation_fields(real_dir, band_count, lerc_error):
    meta = _meta("raster-tiles-compactcache", tile_format="LERC", quality=0, band_count=band_count,
                 lerc_error=lerc_error)
    data = write_conf_xml(meta)
    assert parse_conf_xml(data) == meta
    tii = ET.fromstring(data).find("TileImageInfo")
    assert (tii.find("BandCount") is None) == (band_count is None)
    assert (tii.find("LERCError") is None) == (lerc_error is None)


def test_conf_xml_without_elevation_fields_writes_none(real_dir):
    data = write_conf_xml(_meta("states_filled.tpk"))
    assert b"BandCount" not in data and b"LERCError" not in data


def test_conf_xml_lists_the_lods_asked_for(real_dir):
    meta = _meta("states_filled.tpk")
    got = parse_conf_xml(write_conf_xml(meta, meta.scheme.lods[:3]))
    assert got.scheme.lods == meta.scheme.lods[:3]


@pytest.mark.parametrize("key", RASTER)
def test_conf_cdi_round_trip(real_dir, key):
    with open_cache(real_path(key)) as c:
        sr, extent = c.scheme.spatial_ref, c.data_extent()
    ext = Extent(extent.xmin, extent.ymin, extent.xmax, extent.ymax, sr)
    got = parse_conf_cdi(write_conf_cdi(ext, sr), sr=sr)
    assert got == ext or (not (sr.code or sr.wkt) and got == dataclasses.replace(ext, spatial_ref=SpatialRef()))


def test_conf_cdi_with_wkt_and_markup_round_trips():
    sr = SpatialRef(None, None, WKT)
    ext = Extent(-1.5, -2.25, 1e7 + 0.125, 3.0e6, sr)
    assert parse_conf_cdi(write_conf_cdi(ext, sr)) == ext


def test_conf_cdi_without_extent_reads_as_none():
    assert parse_conf_cdi(write_conf_cdi(None, SpatialRef(3857, 3857))) is None


@pytest.mark.parametrize("key", RASTER)
@pytest.mark.parametrize("elevation", [(None, None), (1, 0.1)])
def test_root_json_round_trip(real_dir, key, elevation):
    base = _meta(key)
    sr = _sr_round(base.scheme.spatial_ref)
    scheme = dataclasses.replace(base.scheme, spatial_ref=sr)
    full = Extent(-1000.5, -2000.25, 3000.0, 4000.125, sr)
    initial = Extent(-10.0, -20.0, 30.0, 40.0, sr)
    meta = CacheMeta(scheme, COMPACT_V2, base.tile_format, base.quality, full, initial, f"{key} <&> ünï",
                     *elevation)
    data = write_root_json(meta, 0, 3, 1e8, 1e5)
    got, tbp = parse_root_json(data)
    assert got == meta
    assert tbp == "./tile"
    assert len(data) >= 512 and b"tileBundlesPath" in data[:1024]
    tii = json.loads(data)["tileImageInfo"]
    assert ("bandCount" in tii, "lercError" in tii) == (elevation[0] is not None, elevation[1] is not None)


def test_root_json_without_extents_round_trips(real_dir):
    base = _meta("Usa.tpkx")
    meta = dataclasses.replace(base, storage_format=COMPACT_V2, name="x")
    got, _ = parse_root_json(write_root_json(meta, 0, 5, 1e8, 1e5))
    assert got == meta and got.full_extent is None
    assert "fullExtent" not in json.loads(write_root_json(meta, 0, 5, 1e8, 1e5))


def test_vtpk_root_json_restated_reads_back(real_dir):
    with zipfile.ZipFile(real_path("natural-earth.vtpk")) as z:
        data = z.read("p12/root.json")
    before, tbp = parse_root_json(data)
    sr = before.full_extent.spatial_ref
    ext = Extent(-1e6, -2e6, 3e6, 4e6, SpatialRef(3857, 3857))
    doc = json.loads(data)
    out = restate_root_json(doc, [1, 2, 3], before.scheme.lod(1).scale, ext)
    got, got_tbp = parse_root_json(out)
    raw = json.loads(out)
    assert (raw["minLOD"], raw["maxLOD"], raw["minScale"]) == (1, 3, before.scheme.lod(1).scale)
    assert got_tbp == tbp and got.scheme == before.scheme and got.tile_format == before.tile_format
    # the export's box, in the spatialReference object the package wrote
    assert got.full_extent == got.initial_extent == Extent(-1e6, -2e6, 3e6, 4e6, sr)
    assert raw["fullExtent"]["spatialReference"] == json.loads(data)["fullExtent"]["spatialReference"]


def test_mapserver_json_round_trip(real_dir):
    meta = _meta("states_filled.tpk")
    sr = _sr_round(meta.scheme.spatial_ref)     # Esri JSON keeps the wkid, not the WKT beside it
    geo = SpatialRef(4326, 4326)
    ext = ServiceExtents(Extent(-2e7, -1e6, 2e7, 1.1e7, sr), Extent(-1.4e7, 2e6, -7e6, 7e6, sr),
                         Extent(-179.5, -14.25, 179.75, 71.5, geo), Extent(-125.0, 18.5, -66.75, 57.0, geo))
    data = write_mapserver_json(meta, ext, 1e8, 1e5)
    assert parse_mapserver_json(data, "mapserver.json", sr) == ext
    # no native extents: they read back as None, the geographic ones stay
    none = dataclasses.replace(ext, full=None, initial=None)
    assert parse_mapserver_json(write_mapserver_json(meta, none, 1e8, 1e5), "m", sr) == none


def test_item_extent_round_trip():
    ext = Extent(-125.38116189416786, 18.857715391921058, -66.79603152312673, 57.02513113017051, SpatialRef(4326, 4326))
    texts = {"title": "T & <b>", "summary": "s", "tags": "a, b", "description": "d", "credits": "US Census Bureau",
             "licence": "l"}
    stamp = Stamp.placeholder()
    assert parse_item_extent(write_iteminfo_json("n", texts, ext, stamp), "iteminfo.json") == ext
    assert parse_item_extent(write_iteminfo_xml("n", texts, ext, "WKID 3857", stamp), "iteminfo.xml") == ext


TEXTS = {"title": "States & <Territories>", "summary": "Filled states", "tags": "census, states",
         "description": "Polygons <b>filled</b>", "credits": "US Census Bureau", "licence": "Public domain"}


def test_item_texts_round_trip():
    ext = Extent(-125.5, 18.25, -66.75, 57.0, SpatialRef(4326, 4326))
    want = ItemInfo("états", TEXTS["title"], TEXTS["summary"], ("census", "states"), TEXTS["description"],
                    TEXTS["credits"], TEXTS["licence"])
    stamp = Stamp.now()
    assert parse_iteminfo_json(write_iteminfo_json("états", TEXTS, ext, stamp)) == want
    assert parse_iteminfo_xml(write_iteminfo_xml("états", TEXTS, ext, "WKID 3857", stamp)) == want
    pk = ET.fromstring(write_item_pkinfo("a & b", stamp))
    assert (pk.findtext("ID"), pk.findtext("name"), pk.findtext("created")) == (stamp.guid, "a & b", stamp.iso)


def test_vtpk_item_round_trip(real_dir):
    with zipfile.ZipFile(real_path("natural-earth.vtpk")) as z:
        source = vtpk_item_texts(z.read("esriinfo/iteminfo.xml"), "natural-earth")
    assert source["title"] and source["name"]
    texts = dict(source, description="<p>x & y</p>")
    stamp = Stamp.placeholder()
    data = write_vtpk_iteminfo_xml(texts, Extent(-180.0, -85.0, 180.0, 85.0, SpatialRef(4326, 4326)),
                                   "WGS_1984_Web_Mercator_Auxiliary_Sphere", {"minScale": 2.9e8, "maxScale": 1e6},
                                   stamp)
    assert vtpk_item_texts(data, "other") == texts
    root = ET.fromstring(data)
    assert root.findtext("type") == "Vector Tile Package" and float(root.findtext("minScale")) == 2.9e8
    assert parse_item_extent(data, "iteminfo.xml") == Extent(-180.0, -85.0, 180.0, 85.0, SpatialRef(4326, 4326))
    assert vtpk_item_texts(None, "n")["title"] == "n"
    with pytest.raises(CacheError):
        vtpk_item_texts(b"<not xml", "n")
    pk = ET.fromstring(write_vtpk_item_pkinfo(texts["name"], stamp))
    assert pk.findtext("name") == texts["name"] and pk.findtext("type") == "Vector Tile Package"


# ------------------------------------------------------------------------------------------
# the readers on every real fixture, against an independent reading


def _metadata_files():
    """(label, name, bytes) of every conf.xml and root.json among the real fixtures (in folders and zips)."""
    out = []
    for p in sorted(REAL.rglob("*")):
        low = p.name.lower()
        if p.is_file() and low in ("conf.xml", "root.json") and "resources" not in p.parts and "tilemap" not in p.parts:
            out.append((str(p), low, p.read_bytes()))
        elif p.is_file() and low.endswith((".tpk", ".tpkx", ".vtpk")):
            with zipfile.ZipFile(p) as z:
                for n in z.namelist():
                    base = n.rsplit("/", 1)[-1].lower()
                    if base in ("conf.xml", "root.json") and "/resources/" not in n and "tilemap/" not in n:
                        out.append((f"{p}!{n}", base, z.read(n)))
    return out


def test_every_real_metadata_file_reads_as_written(real_dir):
    files = _metadata_files()
    assert len([f for f in files if f[1] == "conf.xml"]) >= 10 and len([f for f in files if f[1] == "root.json"]) >= 4
    for label, name, data in files:
        if name == "conf.xml":
            meta = parse_conf_xml(data, label)
            root = ET.fromstring(data.lstrip(b"\xef\xbb\xbf").strip())
            lods = root.findall("TileCacheInfo/LODInfos/LODInfo")
            assert [l.level for l in meta.scheme.lods] == sorted(int(l.findtext("LevelID")) for l in lods), label
            res = {int(l.findtext("LevelID")): float(l.findtext("Resolution")) for l in lods}
            assert {l.level: l.resolution for l in meta.scheme.lods} == res, label
            assert meta.scheme.origin_x == float(root.findtext("TileCacheInfo/TileOrigin/X")), label
            assert meta.scheme.tile_cols == int(root.findtext("TileCacheInfo/TileCols")), label
            assert meta.tile_format == root.findtext("TileImageInfo/CacheTileFormat").strip(), label
            assert meta.storage_format == root.findtext("CacheStorageInfo/StorageFormat").strip(), label
        else:
            doc = json.loads(data.decode("utf-8-sig"))
            meta, tbp = parse_root_json(data, label)
            ti = doc["tileInfo"]
            assert [l.level for l in meta.scheme.lods] == sorted(l["level"] for l in ti["lods"]), label
            assert (meta.scheme.origin_x, meta.scheme.origin_y) == (ti["origin"]["x"], ti["origin"]["y"]), label
            assert (meta.scheme.tile_rows, meta.scheme.tile_cols) == (ti["rows"], ti["cols"]), label
            assert tbp == doc.get("tileBundlesPath", "./tile"), label
            for key, got in (("fullExtent", meta.full_extent), ("initialExtent", meta.initial_extent)):
                if key in doc:
                    assert [getattr(got, k) for k in ("xmin", "ymin", "xmax", "ymax")] == \
                        [doc[key][k] for k in ("xmin", "ymin", "xmax", "ymax")], label
            tii = doc.get("tileImageInfo", {})
            # ArcGIS states bandCount 1 / lercError 0 for every .tpkx (Usa.tpkx, googlemaps.tpkx)
            assert meta.band_count == tii.get("bandCount") and meta.lerc_error == tii.get("lercError"), label


@pytest.mark.parametrize("field,value", [("BandCount", "x"), ("BandCount", "0"), ("BandCount", "1.5"),
                                         ("LERCError", "-1"), ("LERCError", "nan"), ("LERCError", "inf"),
                                         ("LERCError", "")])
def test_unusable_elevation_fields_are_ignored(real_dir, field, value):
    meta = _meta("raster-tiles-compactcache", band_count=1, lerc_error=0.1)
    data = write_conf_xml(meta).replace(f"<{field}>".encode(), f"<{field}>{value}<!--".encode()) \
        .replace(f"</{field}>".encode(), f"--></{field}>".encode())
    got = parse_conf_xml(data)
    assert (got.band_count if field == "BandCount" else got.lerc_error) is None
    doc = json.loads(write_root_json(dataclasses.replace(meta, storage_format=COMPACT_V2), 0, 2, 1, 1))
    doc["tileImageInfo"]["bandCount" if field == "BandCount" else "lercError"] = value
    got, _ = parse_root_json(json.dumps(doc).encode())
    assert (got.band_count if field == "BandCount" else got.lerc_error) is None


@pytest.mark.parametrize("doc", [b'{"tileInfo": {"lods": []}, "tileImageInfo": []}',
                                 b'{"tileInfo": {"origin": {"x": 0, "y": 0}, "lods": [{"level": 0, "resolution": 1}]},'
                                 b' "tileImageInfo": "PNG"}'])
def test_root_json_with_odd_tile_image_info_is_read_or_refused_clearly(doc):
    try:
        meta, _ = parse_root_json(doc)
    except CacheError as e:
        assert "root.json" in str(e)
    else:
        assert meta.tile_format == "MIXED" and meta.band_count is None


# ------------------------------------------------------------------------------------------
# byte identity of what we write


def test_exported_metadata_is_byte_identical_to_the_manifest(real_dir):
    from package_golden import manifest

    want = json.loads(GOLDEN.read_text())
    got = manifest()
    assert sorted(got) == sorted(want)
    changed = {case: sorted(n for n in set(want[case]) | set(got[case]) if want[case].get(n) != got[case].get(n))
               for case in want}
    assert {k: v for k, v in changed.items() if v} == {}


def test_storage_names_are_the_sources_names():
    from tilecrate.sources import model

    assert (model.COMPACT_V1, model.COMPACT_V2) == (COMPACT_V1, COMPACT_V2)

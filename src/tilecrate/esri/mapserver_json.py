"""servicedescriptions/mapserver/mapserver.json of a .tpk: reader (the service's extents) and writer
side by side. tpkutils reads `resourceInfo.geoFullExtent` and `resources` of what we write."""
from __future__ import annotations

from tilecrate.errors import CacheError
from tilecrate.esri.common import (
    CacheMeta,
    ServiceExtents,
    compact_json,
    extent_json,
    geo_extent,
    json_doc,
    native_extent,
    sr_json,
)
from tilecrate.tiling import Extent, SpatialRef

MAPSERVER_JSON = "servicedescriptions/mapserver/mapserver.json"   # where a .tpk holds it


def parse_mapserver_json(data: bytes, label: str, sr: SpatialRef) -> ServiceExtents:
    """The extents of a .tpk's mapserver.json (`contents.fullExtent`, `contents.initialExtent`,
    `resourceInfo.geoFullExtent`, `resourceInfo.geoInitialExtent`); `sr` is the tiling scheme's."""
    doc = json_doc(data, label)
    if not isinstance(doc, dict):
        raise CacheError(f"{label}: not a JSON object")
    contents = doc.get("contents") if isinstance(doc.get("contents"), dict) else {}
    info = doc.get("resourceInfo") if isinstance(doc.get("resourceInfo"), dict) else {}
    return ServiceExtents(native_extent(contents.get("fullExtent"), sr),
                          native_extent(contents.get("initialExtent"), sr),
                          geo_extent(info.get("geoFullExtent")), geo_extent(info.get("geoInitialExtent")))


def _box(g: Extent) -> dict:
    return {"xmin": g.xmin, "ymin": g.ymin, "xmax": g.xmax, "ymax": g.ymax}


def write_mapserver_json(meta: CacheMeta, extents: ServiceExtents, min_scale: float, max_scale: float) -> bytes:
    """mapserver.json stating `meta`'s scheme and formats and `extents` (native full/initial, may be None;
    geographic full/initial, required)."""
    s = meta.scheme
    contents = {
        "currentVersion": 10.31,
        "serviceDescription": "",
        "mapName": "Layers",
        "description": "",
        "copyrightText": "",
        "layers": [],
        "tables": [],
        "spatialReference": sr_json(s.spatial_ref),
        "singleFusedMapCache": True,
        "tileInfo": s.tile_info_json(meta.tile_format, meta.quality),
        "initialExtent": extent_json(extents.initial),
        "fullExtent": extent_json(extents.full),
        "minScale": min_scale,
        "maxScale": max_scale,
        "units": s.spatial_ref.units,
        "capabilities": "Map",
        "exportTilesAllowed": False,
    }
    doc = {
        "name": "MapServer",
        "contents": contents,
        "resourceInfo": {"geoFullExtent": _box(extents.geo_full), "geoInitialExtent": _box(extents.geo_initial)},
        "resources": [
            {"name": "layers", "contents": {"layers": []}},
            {"name": "tables", "contents": {"tables": []}},
            {"name": "legend", "contents": {"layers": []}},
        ],
    }
    return compact_json(doc)

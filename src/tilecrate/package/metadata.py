"""Package metadata: conf.xml, conf.cdi, root.json, iteminfo.json, iteminfo.xml, item.pkinfo, mapserver.json.

Spellings follow what ArcGIS writes and what readers dereference (FORMATS.md §5.4, §7):
root.json as in Esri's Usa.tpkx (`tileBundlesPath` early, for GDAL's sniffing of the first
1024 bytes), iteminfo.xml with every element tpkutils reads. Everything variable between two runs
of the same export (the GUID, the creation time) has a fixed width, so the package size can be
predicted exactly from the same builders.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from tilecrate.cache import COMPACT_V1, COMPACT_V2, Cache
from tilecrate.sources.esri import ServiceExtents
from tilecrate.tiling import PACKET, Extent, SpatialRef

WGS84 = SpatialRef(4326, 4326)
WEB_MERCATOR_CODES = (3857, 102100, 102113, 900913)
_R = 6378137.0
CREATOR = "tilecrate"


def escape(text: str) -> str:
    """`&`, `<` and `>` as XML entities (xml.sax.saxutils.escape's output, byte for byte)."""
    # saxutils imports urllib.request -> http.client -> email.*: tens of ms of a small export process
    return text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")


@dataclass(frozen=True)
class Stamp:
    """What differs between two runs of one export: item GUID and creation time (fixed widths)."""

    guid: str          # 36 characters, upper case, no braces (as ArcGIS writes it)
    created_ms: int    # milliseconds since 1970 (13 digits until the year 2286)

    @classmethod
    def now(cls) -> "Stamp":
        """A fresh GUID and the current time."""
        return cls(str(uuid.uuid4()).upper(), int(time.time() * 1000))

    @classmethod
    def placeholder(cls) -> "Stamp":
        """Same widths as `now()`, for predicting sizes."""
        return cls("0" * 8 + "-" + "0" * 4 + "-" + "0" * 4 + "-" + "0" * 4 + "-" + "0" * 12, 10**12)

    @property
    def iso(self) -> str:
        """Creation time as `YYYY-MM-DDTHH:MM:SS` UTC (19 characters)."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.created_ms / 1000))


@dataclass
class PackageInfo:
    """What the metadata of one export says: name, levels, extents, format, quality."""

    name: str
    version: int                       # 1 = compact V1 (.tpk / Compact folder), 2 = V2
    levels: list[int]                  # exported levels that hold tiles, ascending
    extent: Extent | None              # native coordinates, the exported data's extent
    geo_extent: Extent | None          # the same in WGS 84 (None when it cannot be projected)
    tile_format: str
    quality: int
    scheme: object = field(repr=False, default=None)   # tiling.TileScheme
    item: object = field(repr=False, default=None)     # sources.item.ItemInfo of the source, or None
    # a whole-source export: the source service's extents, every field filled (see service_extents),
    # written instead of `extent`/`geo_extent` into mapserver.json, root.json and the item files
    service: ServiceExtents | None = field(repr=False, default=None)

    @property
    def storage_format(self) -> str:
        """The long storage format name."""
        return COMPACT_V2 if self.version == 2 else COMPACT_V1


def _selection_extent(cache: Cache, selection) -> Extent | None:
    """Bounds of the selected tiles at the finest exported level, clipped to the cache's data extent."""
    levels = [lv for lv in selection.levels if lv.tiles > 0]
    if not levels:
        return None
    finest = levels[-1]
    if not cache.scheme.has_level(finest.level):
        return cache.full_extent
    bounds = finest.tile_range()
    if bounds is None:
        return cache.full_extent
    rmin, rmax, cmin, cmax = bounds
    x0, _, _, y1 = cache.scheme.tile_bounds(finest.level, rmin, cmin)
    _, y0, x1, _ = cache.scheme.tile_bounds(finest.level, rmax, cmax)
    tiles = Extent(x0, y0, x1, y1, cache.scheme.spatial_ref)
    full = cache.full_extent
    if full is not None and full.intersects(tiles):
        clipped = Extent(max(x0, full.xmin), max(y0, full.ymin), min(x1, full.xmax), min(y1, full.ymax),
                         cache.scheme.spatial_ref)
        if clipped.xmin < clipped.xmax and clipped.ymin < clipped.ymax:
            return clipped
    return tiles


def to_wgs84(extent: Extent | None) -> Extent | None:
    """An extent in WGS 84 degrees (edges densified), or None if its coordinate system is unknown."""
    if extent is None:
        return None
    sr = extent.spatial_ref
    if sr.code == 4326:
        return Extent(extent.xmin, extent.ymin, extent.xmax, extent.ymax, WGS84)
    if sr.code in WEB_MERCATOR_CODES:
        # closed form (the sphere of radius 6378137, as EPSG:3857 defines it), monotonic in x and y;
        # importing pyproj costs 0.2 s of a small export process
        def lon(x: float) -> float:
            return max(-180.0, min(180.0, math.degrees(x / _R)))

        def lat(y: float) -> float:
            return math.degrees(2 * math.atan(math.exp(max(-50.0, min(50.0, y / _R)))) - math.pi / 2)
        vals = (lon(extent.xmin), lat(extent.ymin), lon(extent.xmax), lat(extent.ymax))
        return Extent(*vals, WGS84) if all(math.isfinite(v) for v in vals) else None
    try:
        from pyproj import CRS, Transformer

        if sr.code:
            try:
                crs = CRS.from_user_input(f"EPSG:{sr.code}")
            except Exception:
                crs = CRS.from_user_input(f"ESRI:{sr.code}")
        elif sr.wkt:
            crs = CRS.from_wkt(sr.wkt)
        else:
            return None
        tr = Transformer.from_crs(crs, CRS.from_epsg(4326), always_xy=True)
        x0, y0, x1, y1 = tr.transform_bounds(extent.xmin, extent.ymin, extent.xmax, extent.ymax, densify_pts=21)
    except Exception:  # pyproj raises several types for unknown or odd systems
        return None
    vals = (x0, y0, x1, y1)
    if not all(math.isfinite(v) for v in vals):
        return None
    return Extent(max(x0, -180.0), max(y0, -90.0), min(x1, 180.0), min(y1, 90.0), WGS84)


def whole_source(cache: Cache, selection) -> bool:
    """Whether `selection` takes the whole source: no extent or polygon, and every level holding bundles."""
    if not getattr(selection, "whole_area", False):
        return False
    chosen = {lv.level for lv in selection.levels}
    return all(lv in chosen for lv in cache.levels if cache.scheme.has_level(lv))


def service_extents(stated: ServiceExtents, extent: Extent | None, geo: Extent | None) -> ServiceExtents:
    """The source service's extents with what it leaves out filled in: the full extent from the initial one
    or the exported data's, WGS 84 ones projected from the native ones, the item's from the initial one."""
    full = stated.full or stated.initial or extent
    initial = stated.initial or full
    geo_full = stated.geo_full or to_wgs84(full) or geo
    geo_initial = stated.geo_initial or to_wgs84(initial) or geo_full
    # ArcGIS's iteminfo extent is the geographic initial extent (states_filled.tpk, Usa.tpkx)
    return ServiceExtents(full, initial, geo_full, geo_initial, stated.item or geo_initial)


def package_info(cache: Cache, selection, version: int, quality: int | None = None) -> PackageInfo:
    """The metadata facts of an export of `selection` from `cache`, written as compact V`version`.

    A whole-source export (whole_source) states the source service's own extents, as ArcGIS would
    re-package the same service; any other states the extent of the tiles it holds."""
    levels = [lv.level for lv in selection.levels if lv.tiles > 0]
    extent = _selection_extent(cache, selection)
    geo = to_wgs84(extent)
    q = cache.compression_quality if quality is None else quality
    stated = getattr(cache, "service_extents", None)
    service = service_extents(stated, extent, geo) if stated is not None and whole_source(cache, selection) else None
    return PackageInfo(cache.name or "Layers", version, levels, extent, geo,
                       cache.tile_format, int(q), cache.scheme, getattr(cache, "item", None), service)


# ------------------------------------------------------------------------------------------
# helpers


def _num(v: float) -> str:
    """A float as ArcGIS-style text (shortest repr; integers without '.0')."""
    f = float(v)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def _sr_json(sr: SpatialRef) -> dict:
    out = sr.to_json()
    return out or {"wkid": 0}


def _extent_json(ext: Extent | None) -> dict | None:
    return ext.to_json() if ext is not None else None


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _scales(info: PackageInfo) -> tuple[float, float]:
    """(minScale, maxScale) as ArcGIS means them: the coarsest and the finest exported scale."""
    lods = [l for l in info.scheme.lods if l.level in set(info.levels)] or list(info.scheme.lods)
    return max(l.scale for l in lods), min(l.scale for l in lods)


# ------------------------------------------------------------------------------------------
# conf.xml / conf.cdi (tpk, cache folders)


def _sr_xml(sr: SpatialRef) -> str:
    kind = "GeographicCoordinateSystem" if sr.is_geographic else "ProjectedCoordinateSystem"
    parts = [f"<SpatialReference xsi:type='typens:{kind}'>"]
    if sr.wkt:
        parts.append(f"<WKT>{escape(sr.wkt)}</WKT>")
    if sr.wkid is not None:
        parts.append(f"<WKID>{sr.wkid}</WKID>")
    if sr.latest_wkid is not None:
        parts.append(f"<LatestWKID>{sr.latest_wkid}</LatestWKID>")
    parts.append("</SpatialReference>")
    return "".join(parts)


_NS = ("xmlns:xsi='http://www.w3.org/2001/XMLSchema-instance' xmlns:xs='http://www.w3.org/2001/XMLSchema' "
       "xmlns:typens='http://www.esri.com/schemas/ArcGIS/10.3'")


def conf_xml(info: PackageInfo, up_to_exported: bool = False) -> bytes:
    """CacheInfo (conf.xml) for the exported cache; `up_to_exported` lists only LODs down to the finest exported.

    A cache folder read by GDAL's ESRIC driver has no maxLOD: GDAL takes the finest LOD listed as
    the full resolution and refuses schemes whose finest level exceeds its raster size limit (the
    usual 24-level Web Mercator scheme does), so cache folders list the LODs that can hold tiles.
    """
    s = info.scheme
    top = info.levels[-1] if (up_to_exported and info.levels) else None
    chosen = [l for l in s.lods if top is None or l.level <= top]
    lods = "".join(
        f"<LODInfo xsi:type='typens:LODInfo'><LevelID>{l.level}</LevelID><Scale>{_num(l.scale)}</Scale>"
        f"<Resolution>{_num(l.resolution)}</Resolution></LODInfo>" for l in chosen)
    text = (
        f"<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<CacheInfo xsi:type='typens:CacheInfo' {_NS}>"
        f"<TileCacheInfo xsi:type='typens:TileCacheInfo'>{_sr_xml(s.spatial_ref)}"
        f"<TileOrigin xsi:type='typens:PointN'><X>{_num(s.origin_x)}</X><Y>{_num(s.origin_y)}</Y></TileOrigin>"
        f"<TileCols>{s.tile_cols}</TileCols><TileRows>{s.tile_rows}</TileRows>"
        f"<DPI>{s.dpi}</DPI><PreciseDPI>{s.dpi}</PreciseDPI>"
        f"<LODInfos xsi:type='typens:ArrayOfLODInfo'>{lods}</LODInfos></TileCacheInfo>"
        f"<TileImageInfo xsi:type='typens:TileImageInfo'><CacheTileFormat>{escape(info.tile_format)}</CacheTileFormat>"
        f"<CompressionQuality>{info.quality}</CompressionQuality><Antialiasing>false</Antialiasing></TileImageInfo>"
        f"<CacheStorageInfo xsi:type='typens:CacheStorageInfo'><StorageFormat>{info.storage_format}</StorageFormat>"
        f"<PacketSize>{PACKET}</PacketSize></CacheStorageInfo></CacheInfo>\n"
    )
    return text.encode("utf-8")


def conf_cdi(info: PackageInfo) -> bytes:
    """The data envelope (conf.cdi)."""
    e = info.extent
    vals = (e.xmin, e.ymin, e.xmax, e.ymax) if e is not None else (0.0, 0.0, 0.0, 0.0)
    text = (
        f"<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<EnvelopeN xsi:type='typens:EnvelopeN' {_NS}>"
        f"<XMin>{_num(vals[0])}</XMin><YMin>{_num(vals[1])}</YMin><XMax>{_num(vals[2])}</XMax>"
        f"<YMax>{_num(vals[3])}</YMax>{_sr_xml(info.scheme.spatial_ref)}</EnvelopeN>\n"
    )
    return text.encode("utf-8")


# ------------------------------------------------------------------------------------------
# .tpkx


def root_json(info: PackageInfo) -> bytes:
    """root.json of a .tpkx, keys as ArcGIS writes them, `tileBundlesPath` within the first bytes."""
    s = info.scheme
    sr = _sr_json(s.spatial_ref)
    min_scale, max_scale = _scales(info)
    min_lod = info.levels[0] if info.levels else s.lods[0].level
    max_lod = info.levels[-1] if info.levels else s.lods[-1].level
    root = {
        "tileImageInfo": {"format": info.tile_format, "compressionQuality": info.quality},
        "tileBundlesPath": "./tile",
        "name": info.name,
        "version": 1.0,
        "serviceDescription": "",
        "spatialReference": sr,
        "units": s.spatial_ref.units,
        "minLOD": min_lod,
        "maxLOD": max_lod,
        "minScale": min_scale,
        "maxScale": max_scale,
        "resampling": False,
        "tileInfo": {
            "rows": s.tile_rows, "cols": s.tile_cols, "dpi": s.dpi,
            "origin": {"x": s.origin_x, "y": s.origin_y},
            "spatialReference": sr,
            "lods": [l.to_json() for l in s.lods],
        },
        "exportTilesAllowed": False,
        "storageInfo": {"storageFormat": COMPACT_V2, "packetSize": PACKET},
        "layers": [],
    }
    full, initial = _native_extents(info)
    if full is not None:
        root["initialExtent"] = _extent_json(initial)
        root["fullExtent"] = _extent_json(full)
    data = json.dumps(root, ensure_ascii=False, indent=1).encode("utf-8")
    # GDAL identifies root.json only in files of at least 512 bytes
    return data if len(data) >= 512 else data + b" " * (512 - len(data))


def _geo_extent_dict(info: PackageInfo, geo: Extent | None = None) -> dict:
    g = geo or info.geo_extent or Extent(-180.0, -90.0, 180.0, 90.0, WGS84)
    return {"xmin": g.xmin, "ymin": g.ymin, "xmax": g.xmax, "ymax": g.ymax}


def _native_extents(info: PackageInfo) -> tuple[Extent | None, Extent | None]:
    """(full, initial) extent the service metadata states: the source's, else the exported data's."""
    if info.service is not None:
        return info.service.full, info.service.initial
    return info.extent, info.extent


def _item_extent_dict(info: PackageInfo) -> dict:
    """The item's geographic extent: the source item's on a whole-source export, else the data's."""
    return _geo_extent_dict(info, info.service.item if info.service is not None else None)


def _item_texts(info: PackageInfo) -> dict:
    """Title, summary, tags, description, credits and licence the item files carry: the source's
    (its credits are what its licence requires), the package name where the source says nothing."""
    item = info.item
    get = (lambda k: getattr(item, k, None) or "") if item is not None else (lambda k: "")
    tags = ", ".join(getattr(item, "tags", ()) or ()) if item is not None else ""
    return {"title": get("title") or info.name, "summary": get("summary") or info.name,
            "tags": tags or "tilecrate", "description": get("description"),
            "credits": get("credits") or CREATOR, "licence": get("licence")}


def iteminfo_json(info: PackageInfo, stamp: Stamp) -> bytes:
    """iteminfo.json of a .tpkx (type and typeKeywords as the tile package spec requires)."""
    t = _item_texts(info)
    item = {
        "creator": CREATOR,
        "name": info.name,
        "guid": stamp.guid,
        "version": 1.0,
        "created": stamp.created_ms,
        "snippet": "",
        "description": t["description"],
        "summary": t["summary"],
        "title": t["title"],
        "tags": t["tags"],
        "accessInformation": t["credits"],
        "licenseInfo": t["licence"],
        "type": "Compact Tile Package",
        "typeKeywords": ["Compact Tile Package", "Tile Package", "tpkx"],
        "thumbnail": "./thumbnail.png",
        "extent": {**_item_extent_dict(info), "spatialReference": {"wkid": 4326, "latestWkid": 4326}},
    }
    return _dumps(item)


# ------------------------------------------------------------------------------------------
# .tpk


def iteminfo_xml(info: PackageInfo, stamp: Stamp) -> bytes:
    """esriinfo/iteminfo.xml of a .tpk, with every element tpkutils dereferences."""
    g = _item_extent_dict(info)
    sr = info.scheme.spatial_ref
    sr_name = f"WKID {sr.code}" if sr.code else "Unknown"
    name = escape(info.name)
    t = {k: escape(v) for k, v in _item_texts(info).items()}
    keywords = "".join(f"<typekeyword>{k}</typekeyword>\n"
                       for k in ("Data", "Tile Package", "ArcMap", "ArcGlobe", "tpk"))
    text = (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<ESRI_ItemInformation Culture='en-US'>\n"
        f"<name>{name}</name>\n<guid>{stamp.guid}</guid>\n<catalogpath></catalogpath>\n"
        f"<snippet>{t['summary']}</snippet>\n<description>{t['description']}</description>\n"
        f"<summary>{t['summary']}</summary>\n"
        f"<title>{t['title']}</title>\n<tags>{t['tags']}</tags>\n<type>Tile Package</type>\n"
        f"<typekeywords>\n{keywords}</typekeywords>\n<thumbnail>thumbnail/thumbnail.png</thumbnail>\n"
        f"<documentation></documentation>\n<url></url>\n<datalastmodifiedtime>{stamp.iso}</datalastmodifiedtime>\n"
        f"<extent>\n<xmin>{_num(g['xmin'])}</xmin>\n<ymin>{_num(g['ymin'])}</ymin>\n"
        f"<xmax>{_num(g['xmax'])}</xmax>\n<ymax>{_num(g['ymax'])}</ymax>\n</extent>\n"
        f"<spatialreference>{escape(sr_name)}</spatialreference>\n"
        f"<accessinformation>{t['credits']}</accessinformation>\n<licenseinfo>{t['licence']}</licenseinfo>\n"
        "</ESRI_ItemInformation>\n"
    )
    return text.encode("utf-8")


def item_pkinfo(info: PackageInfo, stamp: Stamp) -> bytes:
    """esriinfo/item.pkinfo of a .tpk."""
    text = (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<pkinfo Culture='en-US'>\n"
        f"<ID>{stamp.guid}</ID>\n<name>{escape(info.name)}</name>\n<version>10.3</version>\n"
        f"<size>-1</size>\n<created>{stamp.iso}</created>\n<type>Tile Package</type>\n"
        "<servable>false</servable>\n<packagelocation></packagelocation>\n<pkinfolocation></pkinfolocation>\n"
        "</pkinfo>\n"
    )
    return text.encode("utf-8")


def mapserver_json(info: PackageInfo) -> bytes:
    """servicedescriptions/mapserver/mapserver.json of a .tpk (tpkutils reads geoFullExtent and resources)."""
    s = info.scheme
    sr = _sr_json(s.spatial_ref)
    min_scale, max_scale = _scales(info)
    full, initial = _native_extents(info)
    contents = {
        "currentVersion": 10.31,
        "serviceDescription": "",
        "mapName": "Layers",
        "description": "",
        "copyrightText": "",
        "layers": [],
        "tables": [],
        "spatialReference": sr,
        "singleFusedMapCache": True,
        "tileInfo": s.tile_info_json(info.tile_format, info.quality),
        "initialExtent": _extent_json(initial),
        "fullExtent": _extent_json(full),
        "minScale": min_scale,
        "maxScale": max_scale,
        "units": s.spatial_ref.units,
        "capabilities": "Map",
        "exportTilesAllowed": False,
    }
    s = info.service
    geo_full = _geo_extent_dict(info, s.geo_full if s is not None else None)
    geo_initial = _geo_extent_dict(info, s.geo_initial if s is not None else None)
    doc = {
        "name": "MapServer",
        "contents": contents,
        "resourceInfo": {"geoFullExtent": geo_full, "geoInitialExtent": geo_initial},
        "resources": [
            {"name": "layers", "contents": {"layers": []}},
            {"name": "tables", "contents": {"tables": []}},
            {"name": "legend", "contents": {"layers": []}},
        ],
    }
    return _dumps(doc)


def conf_properties() -> bytes:
    """conf.properties as ArcGIS writes it next to conf.xml in a .tpk."""
    return (b"<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<PropertySet xsi:type='typens:PropertySet' "
            + _NS.encode() + b"><PropertyArray xsi:type='typens:ArrayOfPropertySetProperty'>"
            b"<PropertySetProperty xsi:type='typens:PropertySetProperty'><Key>CacheTileContentType</Key>"
            b"<Value xsi:type='xs:string'>Map</Value></PropertySetProperty></PropertyArray></PropertySet>\n")


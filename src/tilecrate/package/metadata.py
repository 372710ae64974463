"""Package metadata: what an export states (PackageInfo) and the bytes of conf.xml, conf.cdi,
root.json, iteminfo.json, iteminfo.xml, item.pkinfo and mapserver.json written from it.

The file formats (readers and writers side by side) are in tilecrate.esri; this module decides what
an export says: the exported levels and the extent of the tiles it holds, or on a whole-source
export the source service's own extents (FORMATS.md §5.4, §7), and hands them to those writers.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from tilecrate.cache import Cache
from tilecrate.errors import TilecrateError
from tilecrate.esri.common import (  # noqa: F401 (escape, WGS84: re-exported, package.vtpk uses WGS84)
    COMPACT_V1,
    COMPACT_V2,
    WEB_MERCATOR_CODES,
    WGS84,
    CacheMeta,
    ServiceExtents,
    escape,
)
from tilecrate.esri.conf_xml import write_conf_cdi, write_conf_properties, write_conf_xml
from tilecrate.esri.iteminfo import CREATOR, ItemInfo, Stamp, write_item_pkinfo, write_iteminfo_json, write_iteminfo_xml
from tilecrate.esri.mapserver_json import write_mapserver_json
from tilecrate.esri.root_json import write_root_json
from tilecrate.tiling import PACKET, Extent, TileScheme

__all__ = ["CREATOR", "WGS84", "PackageInfo", "Stamp", "conf_cdi", "conf_properties", "conf_xml", "escape",
           "item_pkinfo", "iteminfo_json", "iteminfo_xml", "mapserver_json", "package_info", "root_json",
           "service_extents", "tile_image_facts", "to_wgs84", "whole_source"]

_R = 6378137.0
_LERC1_MAGIC = b"CntZImage "     # FORMATS.md §19.3: maxZError is the float64 at offset 26


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
    scheme: TileScheme = field(repr=False, default=None)
    item: ItemInfo | None = field(repr=False, default=None)   # the source's title, summary, credits...
    # a whole-source export: the source service's extents, every field filled (see service_extents),
    # written instead of `extent`/`geo_extent` into mapserver.json, root.json and the item files
    service: ServiceExtents | None = field(repr=False, default=None)
    # an elevation (LERC) source: its bands and LERC maxZError (tile_image_facts); None for others
    band_count: int | None = None
    lerc_error: float | None = None

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


def lerc1_max_z_error(blob: bytes) -> float | None:
    """The maxZError a LERC1 (`CntZImage`) tile header states, or None if the blob is not one."""
    if len(blob) < 34 or blob[:10] != _LERC1_MAGIC:
        return None
    (err,) = struct.unpack_from("<d", blob, 26)
    return err if math.isfinite(err) and err >= 0 else None


def tile_image_facts(cache: Cache) -> tuple[int | None, float | None]:
    """(bandCount, lercError) of an elevation (LERC) source, (None, None) for any other.

    What the source states (conf.xml TileImageInfo, root.json tileImageInfo) first; else LERC1's one
    band and the maxZError in the header of the first tile of the coarsest level (LERC1 tiles carry
    it; ArcGIS writes one error for a whole cache). Other sources say nothing, so their metadata
    stays as it was."""
    if str(cache.tile_format).upper() != "LERC":
        return None, None
    bands = getattr(cache, "band_count", None)
    err = getattr(cache, "lerc_error", None)
    if err is None and cache.levels:
        try:
            err = lerc1_max_z_error(_first_tile(cache, min(cache.levels)))
        except (TilecrateError, OSError):
            pass    # a damaged or vanished bundle fails the export's own read of it, with its own message
    return (bands if bands is not None else 1), err


def _first_tile(cache: Cache, level: int) -> bytes:
    """The first tile present at a level (b"" if none), read alone: a coarsest-level bundle can be big."""
    for ref in cache.bundles(level):
        present = np.flatnonzero(cache.index(ref)[1])
        if present.size:
            i = int(present[0])
            return cache.tile(level, ref.row0 + i // PACKET, ref.col0 + i % PACKET) or b""
    return b""


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
    bands, lerc_error = tile_image_facts(cache)
    return PackageInfo(cache.name or "Layers", version, levels, extent, geo,
                       cache.tile_format, int(q), cache.scheme, getattr(cache, "item", None), service,
                       bands, lerc_error)


# ------------------------------------------------------------------------------------------
# the files, written by tilecrate.esri from what the export states


def _scales(info: PackageInfo) -> tuple[float, float]:
    """(minScale, maxScale) as ArcGIS means them: the coarsest and the finest exported scale."""
    lods = [l for l in info.scheme.lods if l.level in set(info.levels)] or list(info.scheme.lods)
    return max(l.scale for l in lods), min(l.scale for l in lods)


def _native_extents(info: PackageInfo) -> tuple[Extent | None, Extent | None]:
    """(full, initial) extent the service metadata states: the source's, else the exported data's."""
    if info.service is not None:
        return info.service.full, info.service.initial
    return info.extent, info.extent


def _geo(info: PackageInfo, geo: Extent | None = None) -> Extent:
    return geo or info.geo_extent or Extent(-180.0, -90.0, 180.0, 90.0, WGS84)


def cache_meta(info: PackageInfo) -> CacheMeta:
    """What the export's conf.xml / root.json state, as the tilecrate.esri writers take it."""
    full, initial = _native_extents(info)
    return CacheMeta(info.scheme, info.storage_format, info.tile_format, info.quality, full, initial,
                     info.name, info.band_count, info.lerc_error)


def conf_xml(info: PackageInfo, up_to_exported: bool = False) -> bytes:
    """CacheInfo (conf.xml) for the exported cache; `up_to_exported` lists only LODs down to the finest exported.

    A cache folder read by GDAL's ESRIC driver has no maxLOD: GDAL takes the finest LOD listed as
    the full resolution and refuses schemes whose finest level exceeds its raster size limit (the
    usual 24-level Web Mercator scheme does), so cache folders list the LODs that can hold tiles.
    """
    top = info.levels[-1] if (up_to_exported and info.levels) else None
    lods = [l for l in info.scheme.lods if top is None or l.level <= top]
    return write_conf_xml(cache_meta(info), lods)


def conf_cdi(info: PackageInfo) -> bytes:
    """The data envelope (conf.cdi): the exported data's extent."""
    return write_conf_cdi(info.extent, info.scheme.spatial_ref)


def conf_properties() -> bytes:
    """conf.properties as ArcGIS writes it next to conf.xml in a .tpk."""
    return write_conf_properties()


def root_json(info: PackageInfo) -> bytes:
    """root.json of a .tpkx, keys as ArcGIS writes them, `tileBundlesPath` within the first bytes."""
    s = info.scheme
    min_scale, max_scale = _scales(info)
    min_lod = info.levels[0] if info.levels else s.lods[0].level
    max_lod = info.levels[-1] if info.levels else s.lods[-1].level
    return write_root_json(cache_meta(info), min_lod, max_lod, min_scale, max_scale)


def _item_texts(info: PackageInfo) -> dict:
    """Title, summary, tags, description, credits and licence the item files carry: the source's
    (its credits are what its licence requires), the package name where the source says nothing."""
    item = info.item
    get = (lambda k: getattr(item, k, None) or "") if item is not None else (lambda k: "")
    tags = ", ".join(getattr(item, "tags", ()) or ()) if item is not None else ""
    return {"title": get("title") or info.name, "summary": get("summary") or info.name,
            "tags": tags or "tilecrate", "description": get("description"),
            "credits": get("credits") or CREATOR, "licence": get("licence")}


def _item_extent(info: PackageInfo) -> Extent:
    """The item's geographic extent: the source item's on a whole-source export, else the data's."""
    return _geo(info, info.service.item if info.service is not None else None)


def iteminfo_json(info: PackageInfo, stamp: Stamp) -> bytes:
    """iteminfo.json of a .tpkx (type and typeKeywords as the tile package spec requires)."""
    return write_iteminfo_json(info.name, _item_texts(info), _item_extent(info), stamp)


def iteminfo_xml(info: PackageInfo, stamp: Stamp) -> bytes:
    """esriinfo/iteminfo.xml of a .tpk, with every element tpkutils dereferences."""
    code = info.scheme.spatial_ref.code
    return write_iteminfo_xml(info.name, _item_texts(info), _item_extent(info),
                              f"WKID {code}" if code else "Unknown", stamp)


def item_pkinfo(info: PackageInfo, stamp: Stamp) -> bytes:
    """esriinfo/item.pkinfo of a .tpk."""
    return write_item_pkinfo(info.name, stamp)


def mapserver_json(info: PackageInfo) -> bytes:
    """servicedescriptions/mapserver/mapserver.json of a .tpk (tpkutils reads geoFullExtent and resources)."""
    full, initial = _native_extents(info)
    s = info.service
    extents = ServiceExtents(full, initial, _geo(info, s.geo_full if s is not None else None),
                             _geo(info, s.geo_initial if s is not None else None))
    min_scale, max_scale = _scales(info)
    return write_mapserver_json(cache_meta(info), extents, min_scale, max_scale)

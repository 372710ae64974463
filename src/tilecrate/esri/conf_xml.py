"""conf.xml (CacheInfo), conf.cdi (the data envelope) and conf.properties of a cache folder or .tpk:
reader and writer side by side, so what one writes the other reads back (tests/test_esri_files.py).

The writer's spellings follow what ArcGIS writes and what readers dereference (FORMATS.md §5.4).
An elevation cache states BandCount and LERCError in TileImageInfo (ArcObjects ITileImageInfo3);
they are written only when known, so the conf.xml of other caches is unchanged.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Sequence

from tilecrate.errors import CacheError
from tilecrate.esri.common import (
    COMPACT_V1,
    COMPACT_V2,
    EXPLODED,
    CacheMeta,
    band_count,
    check_scheme,
    escape,
    fmt_num,
    lerc_error,
    xml_num,
    xml_root,
    xml_text,
)
from tilecrate.tiling import LOD, PACKET, Extent, SpatialRef, TileScheme

NS = ("xmlns:xsi='http://www.w3.org/2001/XMLSchema-instance' xmlns:xs='http://www.w3.org/2001/XMLSchema' "
      "xmlns:typens='http://www.esri.com/schemas/ArcGIS/10.3'")
_STORAGE_NAMES = {"compact": COMPACT_V1, "compactv1": COMPACT_V1, "tpk": COMPACT_V1,
                  "compactv2": COMPACT_V2, "tpkx": COMPACT_V2, "exploded": EXPLODED}


def normalize_storage_format(value: str) -> str:
    """The long esriMapCacheStorageMode* name for any spelling (`compactV2`, `COMPACT_V2`, `tpkx`, ...);
    an unknown value comes back as it was."""
    key = "".join(str(value).split()).lower().replace("_", "").replace("-", "")
    return _STORAGE_NAMES.get(key.replace("esrimapcachestoragemode", ""), str(value))


# ------------------------------------------------------------------------------------------
# reading


def _read_sr(el: ET.Element | None) -> SpatialRef:
    if el is None:
        return SpatialRef()
    wkid = xml_num(el, "WKID", conv=int)
    latest = xml_num(el, "LatestWKID", conv=int)
    return SpatialRef(wkid, latest, xml_text(el, "WKT"))


def parse_conf_xml(data: bytes, label: str = "conf.xml") -> CacheMeta:
    """Read a CacheInfo document (conf.xml)."""
    root = xml_root(data, label)
    tci = root.find("TileCacheInfo")
    if tci is None:
        raise CacheError(f"{label}: no TileCacheInfo element; is this a cache conf.xml?")
    try:
        sr = _read_sr(tci.find("SpatialReference"))
        origin = tci.find("TileOrigin")
        lods = []
        infos = tci.find("LODInfos")
        for li in (infos if infos is not None else []):
            lods.append(LOD(xml_num(li, "LevelID", conv=int), xml_num(li, "Resolution"), xml_num(li, "Scale")))
        if not lods:
            raise CacheError(f"{label}: no LODInfo elements")
        if origin is None:
            raise CacheError(f"{label}: no TileOrigin")
        cols = xml_num(tci, "TileCols", 256, int)
        rows = xml_num(tci, "TileRows", 256, int)
        dpi = xml_num(tci, "DPI", 96, lambda s: int(float(s)))
        tii = root.find("TileImageInfo")
        csi = root.find("CacheStorageInfo")
        storage = xml_text(csi, "StorageFormat", COMPACT_V1) or COMPACT_V1
        packet = xml_num(csi, "PacketSize", PACKET, int)
        scheme = TileScheme(xml_num(origin, "X"), xml_num(origin, "Y"), cols, rows, dpi,
                            tuple(sorted(lods, key=lambda l: l.level)), sr, packet)
        check_scheme(scheme, label)
        return CacheMeta(scheme, storage, xml_text(tii, "CacheTileFormat", "MIXED") or "MIXED",
                         xml_num(tii, "CompressionQuality", 0, lambda s: int(float(s))),
                         band_count=band_count(xml_text(tii, "BandCount")),
                         lerc_error=lerc_error(xml_text(tii, "LERCError")))
    except (TypeError, AttributeError) as e:
        raise CacheError(f"{label}: incomplete tiling scheme ({e})") from None


def parse_conf_cdi(data: bytes, label: str = "conf.cdi", sr: SpatialRef | None = None) -> Extent | None:
    """Read the data envelope (conf.cdi); None if it has no usable numbers or no area."""
    root = xml_root(data, label)
    try:
        vals = [xml_num(root, t) for t in ("XMin", "YMin", "XMax", "YMax")]
    except CacheError:
        return None
    if any(v is None for v in vals):
        return None
    esr = _read_sr(root.find("SpatialReference"))
    ext = Extent(*vals, esr if esr.code or esr.wkt else (sr or SpatialRef()))
    # an envelope of no area (the zeros write_conf_cdi writes for "no extent") is no data extent
    return ext if ext.is_valid and (ext.xmin < ext.xmax or ext.ymin < ext.ymax) else None


# ------------------------------------------------------------------------------------------
# writing


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


def write_conf_xml(meta: CacheMeta, lods: Sequence[LOD] | None = None) -> bytes:
    """CacheInfo (conf.xml) stating `meta` (its extents and name are not conf.xml's); `lods` limits the
    LODs listed (default: the whole scheme)."""
    s = meta.scheme
    chosen = s.lods if lods is None else lods
    lod_xml = "".join(
        f"<LODInfo xsi:type='typens:LODInfo'><LevelID>{l.level}</LevelID><Scale>{fmt_num(l.scale)}</Scale>"
        f"<Resolution>{fmt_num(l.resolution)}</Resolution></LODInfo>" for l in chosen)
    elevation = ""
    if meta.band_count is not None:
        elevation += f"<BandCount>{meta.band_count}</BandCount>"
    if meta.lerc_error is not None:
        elevation += f"<LERCError>{meta.lerc_error!r}</LERCError>"
    text = (
        f"<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<CacheInfo xsi:type='typens:CacheInfo' {NS}>"
        f"<TileCacheInfo xsi:type='typens:TileCacheInfo'>{_sr_xml(s.spatial_ref)}"
        f"<TileOrigin xsi:type='typens:PointN'><X>{fmt_num(s.origin_x)}</X><Y>{fmt_num(s.origin_y)}</Y></TileOrigin>"
        f"<TileCols>{s.tile_cols}</TileCols><TileRows>{s.tile_rows}</TileRows>"
        f"<DPI>{s.dpi}</DPI><PreciseDPI>{s.dpi}</PreciseDPI>"
        f"<LODInfos xsi:type='typens:ArrayOfLODInfo'>{lod_xml}</LODInfos></TileCacheInfo>"
        f"<TileImageInfo xsi:type='typens:TileImageInfo'><CacheTileFormat>{escape(meta.tile_format)}</CacheTileFormat>"
        f"<CompressionQuality>{meta.quality}</CompressionQuality><Antialiasing>false</Antialiasing>{elevation}"
        "</TileImageInfo>"
        f"<CacheStorageInfo xsi:type='typens:CacheStorageInfo'><StorageFormat>{meta.storage_format}</StorageFormat>"
        f"<PacketSize>{PACKET}</PacketSize></CacheStorageInfo></CacheInfo>\n"
    )
    return text.encode("utf-8")


def write_conf_cdi(extent: Extent | None, sr: SpatialRef) -> bytes:
    """The data envelope (conf.cdi) in `sr` (zeros when there is no extent)."""
    e = extent
    vals = (e.xmin, e.ymin, e.xmax, e.ymax) if e is not None else (0.0, 0.0, 0.0, 0.0)
    text = (
        f"<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<EnvelopeN xsi:type='typens:EnvelopeN' {NS}>"
        f"<XMin>{fmt_num(vals[0])}</XMin><YMin>{fmt_num(vals[1])}</YMin><XMax>{fmt_num(vals[2])}</XMax>"
        f"<YMax>{fmt_num(vals[3])}</YMax>{_sr_xml(sr)}</EnvelopeN>\n"
    )
    return text.encode("utf-8")


def write_conf_properties() -> bytes:
    """conf.properties as ArcGIS writes it next to conf.xml in a .tpk."""
    return (b"<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<PropertySet xsi:type='typens:PropertySet' "
            + NS.encode() + b"><PropertyArray xsi:type='typens:ArrayOfPropertySetProperty'>"
            b"<PropertySetProperty xsi:type='typens:PropertySetProperty'><Key>CacheTileContentType</Key>"
            b"<Value xsi:type='xs:string'>Map</Value></PropertySetProperty></PropertyArray></PropertySet>\n")

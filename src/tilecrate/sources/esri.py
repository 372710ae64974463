"""Readers of ArcGIS cache metadata: conf.xml (CacheInfo), conf.cdi (data envelope) and root.json
(.tpkx / .vtpk / cache folders). The writers of the same files are in tilecrate.package.metadata."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from tilecrate.errors import CacheError
from tilecrate.sources.model import COMPACT_V1, COMPACT_V2, EXPLODED
from tilecrate.tiling import LOD, PACKET, Extent, SpatialRef, TileScheme

SERVICE_LIMIT = 4 << 20   # a service description or item file larger than this is not read for extents
_GEO = SpatialRef(4326, 4326)
_WEB_MERCATOR_CODES = {3857, 102100, 102113, 900913}
# where ArcGIS puts the service description and the item file of a package (as sources.item looks)
MAPSERVER_JSON = "servicedescriptions/mapserver/mapserver.json"
ITEM_FILES = ("esriinfo/iteminfo.xml", "iteminfo.json", "esriinfo/iteminfo.json")


def _text(el: ET.Element | None, tag: str, default: str | None = None) -> str | None:
    if el is None:
        return default
    child = el.find(tag)
    if child is None or child.text is None:
        return default
    return child.text.strip()


def _num(el, tag, default=None, conv=float):
    txt = _text(el, tag)
    if txt is None or txt == "":
        return default
    try:
        return conv(txt)
    except ValueError:
        raise CacheError(f"{tag} is not a number: {txt!r}") from None


def _xml_root(data: bytes, label: str) -> ET.Element:
    try:
        return ET.fromstring(data.lstrip(b"\xef\xbb\xbf").strip())
    except ET.ParseError as e:
        raise CacheError(f"{label}: not valid XML ({e})") from None


@dataclass
class _Meta:
    scheme: TileScheme
    storage_format: str
    tile_format: str
    quality: int
    full_extent: Extent | None = None
    initial_extent: Extent | None = None
    name: str | None = None


def _spatial_ref_xml(el: ET.Element | None) -> SpatialRef:
    if el is None:
        return SpatialRef()
    wkid = _num(el, "WKID", conv=int)
    latest = _num(el, "LatestWKID", conv=int)
    return SpatialRef(wkid, latest, _text(el, "WKT"))


def parse_conf_xml(data: bytes, label: str = "conf.xml") -> _Meta:
    """Read a CacheInfo document (conf.xml)."""
    root = _xml_root(data, label)
    tci = root.find("TileCacheInfo")
    if tci is None:
        raise CacheError(f"{label}: no TileCacheInfo element; is this a cache conf.xml?")
    try:
        sr = _spatial_ref_xml(tci.find("SpatialReference"))
        origin = tci.find("TileOrigin")
        lods = []
        infos = tci.find("LODInfos")
        for li in (infos if infos is not None else []):
            lods.append(LOD(_num(li, "LevelID", conv=int), _num(li, "Resolution"), _num(li, "Scale")))
        if not lods:
            raise CacheError(f"{label}: no LODInfo elements")
        if origin is None:
            raise CacheError(f"{label}: no TileOrigin")
        cols = _num(tci, "TileCols", 256, int)
        rows = _num(tci, "TileRows", 256, int)
        dpi = _num(tci, "DPI", 96, lambda s: int(float(s)))
        tii = root.find("TileImageInfo")
        csi = root.find("CacheStorageInfo")
        storage = _text(csi, "StorageFormat", COMPACT_V1) or COMPACT_V1
        packet = _num(csi, "PacketSize", PACKET, int)
        scheme = TileScheme(_num(origin, "X"), _num(origin, "Y"), cols, rows, dpi,
                            tuple(sorted(lods, key=lambda l: l.level)), sr, packet)
        _check_scheme(scheme, label)
        return _Meta(scheme, storage, _text(tii, "CacheTileFormat", "MIXED") or "MIXED",
                     _num(tii, "CompressionQuality", 0, lambda s: int(float(s))))
    except (TypeError, AttributeError) as e:
        raise CacheError(f"{label}: incomplete tiling scheme ({e})") from None


def parse_conf_cdi(data: bytes, label: str = "conf.cdi", sr: SpatialRef | None = None) -> Extent | None:
    """Read the data envelope (conf.cdi); None if it has no usable numbers."""
    root = _xml_root(data, label)
    try:
        vals = [_num(root, t) for t in ("XMin", "YMin", "XMax", "YMax")]
    except CacheError:
        return None
    if any(v is None for v in vals):
        return None
    esr = _spatial_ref_xml(root.find("SpatialReference"))
    ext = Extent(*vals, esr if esr.code or esr.wkt else (sr or SpatialRef()))
    return ext if ext.is_valid else None


def _extent_json(obj, default_sr: SpatialRef) -> Extent | None:
    if not isinstance(obj, dict):
        return None
    try:
        vals = [float(obj[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (KeyError, TypeError, ValueError):
        return None
    sr = SpatialRef.from_json(obj.get("spatialReference")) if obj.get("spatialReference") else default_sr
    ext = Extent(*vals, sr)
    return ext if ext.is_valid else None


def _json_doc(data: bytes, label: str):
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{label}: not valid JSON ({e})") from None
    except RecursionError:
        # `[[[[...` a few hundred kB deep: the decoder recurses per level
        raise CacheError(f"{label}: not valid JSON (nested too deeply)") from None


def parse_root_json(data: bytes, label: str = "root.json") -> tuple[_Meta, str]:
    """Read a .tpkx/.vtpk root.json; returns the metadata and tileBundlesPath."""
    root = _json_doc(data, label)
    if not isinstance(root, dict) or not isinstance(root.get("tileInfo"), dict):
        raise CacheError(f"{label}: no tileInfo object")
    ti = root["tileInfo"]
    try:
        lods = tuple(sorted((LOD(int(l["level"]), float(l["resolution"]), float(l.get("scale", 0)))
                             for l in ti["lods"]), key=lambda l: l.level))
        sr = SpatialRef.from_json(ti.get("spatialReference") or root.get("spatialReference"))
        scheme = TileScheme(float(ti["origin"]["x"]), float(ti["origin"]["y"]), int(ti.get("cols", 256)),
                            int(ti.get("rows", 256)), int(float(ti.get("dpi", 96))), lods, sr)
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{label}: incomplete tileInfo ({e!r})") from None
    if not lods:
        raise CacheError(f"{label}: tileInfo has no lods")
    storage_info = root.get("storageInfo") or (root.get("resourceInfo") or {}).get("cacheInfo", {}).get("storageInfo") or {}
    storage = storage_info.get("storageFormat", COMPACT_V2)
    packet = int(storage_info.get("packetSize", PACKET))
    if packet != PACKET:
        scheme = TileScheme(scheme.origin_x, scheme.origin_y, scheme.tile_cols, scheme.tile_rows,
                            scheme.dpi, scheme.lods, scheme.spatial_ref, packet)
    _check_scheme(scheme, label)
    tii = root.get("tileImageInfo") or {}
    fmt = tii.get("format") or ti.get("format") or "MIXED"
    quality = tii.get("compressionQuality", ti.get("compressionQuality", 0)) or 0
    meta = _Meta(scheme, storage, str(fmt), int(quality),
                 _extent_json(root.get("fullExtent"), sr), _extent_json(root.get("initialExtent"), sr),
                 root.get("name") or None)
    return meta, str(root.get("tileBundlesPath", "./tile"))


def _check_scheme(scheme: TileScheme, label: str) -> None:
    if scheme.packet_size != PACKET:
        raise CacheError(f"{label}: packet size {scheme.packet_size} is not supported (compact caches use 128)")
    if not (0 < scheme.tile_cols <= 8192 and 0 < scheme.tile_rows <= 8192):
        raise CacheError(f"{label}: tile size {scheme.tile_cols}x{scheme.tile_rows} is out of range")
    for lod in scheme.lods:
        if not (lod.resolution > 0):
            raise CacheError(f"{label}: level {lod.level} has resolution {lod.resolution}")


_STORAGE_NAMES = {"compact": COMPACT_V1, "compactv1": COMPACT_V1, "tpk": COMPACT_V1,
                  "compactv2": COMPACT_V2, "tpkx": COMPACT_V2, "exploded": EXPLODED}


def normalize_storage_format(value: str) -> str:
    """The long esriMapCacheStorageMode* name for any spelling (`compactV2`, `COMPACT_V2`, `tpkx`, ...);
    an unknown value comes back as it was."""
    key = "".join(str(value).split()).lower().replace("_", "").replace("-", "")
    return _STORAGE_NAMES.get(key.replace("esrimapcachestoragemode", ""), str(value))


def _check_storage(meta: _Meta, label: str) -> None:
    meta.storage_format = normalize_storage_format(meta.storage_format)
    if meta.storage_format not in (COMPACT_V1, COMPACT_V2):
        raise CacheError(f"{label}: storage format {meta.storage_format} is not supported yet "
                         "(tilecrate reads compact V1 and V2 caches)")



# ------------------------------------------------------------------------------------------
# the service's own extents (mapserver.json of a .tpk, root.json and iteminfo.json of a .tpkx)


@dataclass(frozen=True)
class ServiceExtents:
    """The extents a package states for its service, as ArcGIS wrote them: the native full and
    initial extents, their WGS 84 counterparts and the item's geographic extent; None where the
    package says nothing. A whole-source export writes them back unchanged."""

    full: Extent | None = None
    initial: Extent | None = None
    geo_full: Extent | None = None
    geo_initial: Extent | None = None
    item: Extent | None = None        # iteminfo.xml <extent> / iteminfo.json "extent", WGS 84

    @property
    def empty(self) -> bool:
        """Whether the package states none of them."""
        return all(v is None for v in (self.full, self.initial, self.geo_full, self.geo_initial, self.item))


def _codes(sr: SpatialRef) -> set[int]:
    codes = {c for c in (sr.wkid, sr.latest_wkid) if c is not None}
    return {3857} if codes & _WEB_MERCATOR_CODES else codes


def _native_extent(obj, sr: SpatialRef) -> Extent | None:
    """An envelope in the tiling scheme's coordinates; None if unusable or in another system."""
    ext = _extent_json(obj, sr)
    if ext is None:
        return None
    own, scheme = _codes(ext.spatial_ref), _codes(sr)
    if own and scheme and not own & scheme:
        return None     # a service extent in another coordinate system than the tiles: not ours to copy
    return ext


def _geo_extent(obj) -> Extent | None:
    """A WGS 84 envelope from `{xmin, ymin, xmax, ymax}` or `[[xmin, ymin], [xmax, ymax]]`."""
    if isinstance(obj, list) and len(obj) == 2 and all(isinstance(p, list) and len(p) == 2 for p in obj):
        obj = {"xmin": obj[0][0], "ymin": obj[0][1], "xmax": obj[1][0], "ymax": obj[1][1]}
    if not isinstance(obj, dict):
        return None
    vals = []
    for k in ("xmin", "ymin", "xmax", "ymax"):
        v = obj.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return None
        try:
            vals.append(float(v))
        except (ValueError, OverflowError):
            return None
    ext = Extent(*vals, _GEO)
    # degrees: anything past a few turns is not a geographic extent
    return ext if ext.is_valid and all(abs(v) <= 720.0 for v in vals) else None


def parse_mapserver_json(data: bytes, label: str, sr: SpatialRef) -> ServiceExtents:
    """The extents of a .tpk's servicedescriptions/mapserver/mapserver.json (`contents.fullExtent`,
    `contents.initialExtent`, `resourceInfo.geoFullExtent`, `resourceInfo.geoInitialExtent`)."""
    doc = _json_doc(data, label)
    if not isinstance(doc, dict):
        raise CacheError(f"{label}: not a JSON object")
    contents = doc.get("contents") if isinstance(doc.get("contents"), dict) else {}
    info = doc.get("resourceInfo") if isinstance(doc.get("resourceInfo"), dict) else {}
    return ServiceExtents(_native_extent(contents.get("fullExtent"), sr),
                          _native_extent(contents.get("initialExtent"), sr),
                          _geo_extent(info.get("geoFullExtent")), _geo_extent(info.get("geoInitialExtent")))


def root_json_extents(meta: _Meta) -> ServiceExtents:
    """The extents a root.json states (parse_root_json read them into `meta`)."""
    sr = meta.scheme.spatial_ref
    keep = [e if e is not None and _native_extent(e.to_json(), sr) is not None else None
            for e in (meta.full_extent, meta.initial_extent)]
    return ServiceExtents(keep[0], keep[1])


def parse_item_extent(data: bytes, name: str) -> Extent | None:
    """The geographic extent of an iteminfo.xml (`<extent><xmin>…`) or iteminfo.json (`extent`);
    None if it states none or cannot be read (sources.item reports a broken item file)."""
    if name.lower().endswith(".json"):
        try:
            doc = _json_doc(data, name)
        except CacheError:
            return None
        return _geo_extent(doc.get("extent")) if isinstance(doc, dict) else None
    try:
        root = _xml_root(data, name)
    except CacheError:
        return None
    el = root.find("extent")
    if el is None:
        return None
    return _geo_extent({k: _text(el, k) for k in ("xmin", "ymin", "xmax", "ymax")})

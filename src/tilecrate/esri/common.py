"""What the ArcGIS metadata files share: the storage format names, the facts read from or written
into them (CacheMeta, ServiceExtents), and the text helpers their readers and writers use."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from tilecrate.errors import CacheError
from tilecrate.tiling import PACKET, Extent, SpatialRef, TileScheme

COMPACT_V1 = "esriMapCacheStorageModeCompact"
COMPACT_V2 = "esriMapCacheStorageModeCompactV2"
EXPLODED = "esriMapCacheStorageModeExploded"
WGS84 = SpatialRef(4326, 4326)
WEB_MERCATOR_CODES = (3857, 102100, 102113, 900913)


@dataclass
class CacheMeta:
    """What conf.xml (+ conf.cdi) or root.json say about a cache: its tiling scheme, storage and tile
    formats, quality, extents, name, and for an elevation (LERC) cache its band count and LERC error."""

    scheme: TileScheme
    storage_format: str
    tile_format: str
    quality: int
    full_extent: Extent | None = None
    initial_extent: Extent | None = None
    name: str | None = None
    band_count: int | None = None      # TileImageInfo BandCount / tileImageInfo.bandCount
    lerc_error: float | None = None    # TileImageInfo LERCError / tileImageInfo.lercError (maxZError)


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


# ------------------------------------------------------------------------------------------
# writing


def escape(text: str) -> str:
    """`&`, `<` and `>` as XML entities (xml.sax.saxutils.escape's output, byte for byte)."""
    # saxutils imports urllib.request -> http.client -> email.*: tens of ms of a small export process
    return text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")


def fmt_num(v: float) -> str:
    """A float as ArcGIS-style text (shortest repr; integers without '.0')."""
    f = float(v)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def sr_json(sr: SpatialRef) -> dict:
    """A spatial reference as JSON; `{"wkid": 0}` for an unknown one."""
    return sr.to_json() or {"wkid": 0}


def extent_json(ext: Extent | None) -> dict | None:
    """An extent as Esri JSON, or None."""
    return ext.to_json() if ext is not None else None


def compact_json(obj) -> bytes:
    """JSON without spaces, UTF-8, as the item and service files are written."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ------------------------------------------------------------------------------------------
# reading


def xml_text(el: ET.Element | None, tag: str, default: str | None = None) -> str | None:
    """The stripped text of `el`'s child `tag`, or `default`."""
    if el is None:
        return default
    child = el.find(tag)
    if child is None or child.text is None:
        return default
    return child.text.strip()


def xml_num(el, tag, default=None, conv=float):
    """A child's text as a number; CacheError if it is not one."""
    txt = xml_text(el, tag)
    if txt is None or txt == "":
        return default
    try:
        return conv(txt)
    except ValueError:
        raise CacheError(f"{tag} is not a number: {txt!r}") from None


def xml_root(data: bytes, label: str) -> ET.Element:
    """The root element of an XML document (a BOM tolerated); CacheError if it is not XML."""
    try:
        return ET.fromstring(data.lstrip(b"\xef\xbb\xbf").strip())
    except ET.ParseError as e:
        raise CacheError(f"{label}: not valid XML ({e})") from None


def json_doc(data: bytes, label: str):
    """A JSON document (a BOM tolerated); CacheError if it is not JSON."""
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{label}: not valid JSON ({e})") from None
    except RecursionError:
        # `[[[[...` a few hundred kB deep: the decoder recurses per level
        raise CacheError(f"{label}: not valid JSON (nested too deeply)") from None


def read_extent_json(obj, default_sr: SpatialRef) -> Extent | None:
    """An Esri JSON envelope (its own spatialReference, else `default_sr`); None if unusable."""
    if not isinstance(obj, dict):
        return None
    try:
        vals = [float(obj[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    except (KeyError, TypeError, ValueError):
        return None
    sr = SpatialRef.from_json(obj.get("spatialReference")) if obj.get("spatialReference") else default_sr
    ext = Extent(*vals, sr)
    return ext if ext.is_valid else None


def _codes(sr: SpatialRef) -> set[int]:
    codes = {c for c in (sr.wkid, sr.latest_wkid) if c is not None}
    return {3857} if codes & set(WEB_MERCATOR_CODES) else codes


def native_extent(obj, sr: SpatialRef) -> Extent | None:
    """An envelope in the tiling scheme's coordinates; None if unusable or in another system."""
    ext = read_extent_json(obj, sr)
    if ext is None:
        return None
    own, scheme = _codes(ext.spatial_ref), _codes(sr)
    if own and scheme and not own & scheme:
        return None     # a service extent in another coordinate system than the tiles: not ours to copy
    return ext


def geo_extent(obj) -> Extent | None:
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
    ext = Extent(*vals, WGS84)
    # degrees: anything past a few turns is not a geographic extent
    return ext if ext.is_valid and all(abs(v) <= 720.0 for v in vals) else None


def check_scheme(scheme: TileScheme, label: str) -> None:
    """CacheError if the scheme is not one compact caches can have (packet, tile size, resolutions)."""
    if scheme.packet_size != PACKET:
        raise CacheError(f"{label}: packet size {scheme.packet_size} is not supported (compact caches use 128)")
    if not (0 < scheme.tile_cols <= 8192 and 0 < scheme.tile_rows <= 8192):
        raise CacheError(f"{label}: tile size {scheme.tile_cols}x{scheme.tile_rows} is out of range")
    for lod in scheme.lods:
        if not (lod.resolution > 0):
            raise CacheError(f"{label}: level {lod.level} has resolution {lod.resolution}")


def band_count(value) -> int | None:
    """A stated band count if it is a small positive integer, else None (ignored, not an error)."""
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return n if 0 < n <= 1024 and not isinstance(value, bool) and float(value) == n else None


def lerc_error(value) -> float | None:
    """A stated LERC maxZError if it is a finite number >= 0, else None."""
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if f >= 0 and f != float("inf") else None

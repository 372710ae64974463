"""Opening a source cache (compatibility module: the readers live in `tilecrate.sources`).

`open_cache` opens any source (compact folder V1/V2, .tpk/.tpkx/.vtpk, exploded folder, MBTiles,
GeoPackage, PMTiles, XYZ/TMS folder); every source is a `Cache`.
"""
from __future__ import annotations

from tilecrate.errors import BundleError, CacheError
from tilecrate.sourcefiles import FileRange
from tilecrate.sources import open_cache
from tilecrate.sources.compact import MAX_POSITION, PATH_CHECK_SECONDS, RELIST_SECONDS, Cache
from tilecrate.sources.esri import normalize_storage_format, parse_conf_cdi, parse_conf_xml, parse_root_json
from tilecrate.sources.item import ItemInfo
from tilecrate.sources.model import COMPACT_V1, COMPACT_V2, EXPLODED, BundleData, BundleReader, BundleRef

__all__ = ["COMPACT_V1", "COMPACT_V2", "EXPLODED", "MAX_POSITION", "PATH_CHECK_SECONDS", "RELIST_SECONDS",
           "BundleData", "BundleError", "BundleReader", "BundleRef", "Cache", "CacheError", "FileRange",
           "ItemInfo", "normalize_storage_format", "open_cache", "parse_conf_cdi", "parse_conf_xml",
           "parse_root_json"]

"""What the compact-cache sources take from the ArcGIS metadata files: the readers live with their
writers in tilecrate.esri (conf_xml, root_json, mapserver_json, iteminfo); this module re-exports
them under the names the sources use and holds the sources' own rule (which storage formats they read)."""
from __future__ import annotations

from tilecrate.errors import CacheError
from tilecrate.esri.common import COMPACT_V1, COMPACT_V2, CacheMeta, ServiceExtents
from tilecrate.esri.conf_xml import normalize_storage_format, parse_conf_cdi, parse_conf_xml
from tilecrate.esri.iteminfo import ITEM_FILES, parse_item_extent
from tilecrate.esri.mapserver_json import MAPSERVER_JSON, parse_mapserver_json
from tilecrate.esri.root_json import parse_root_json, root_json_extents

__all__ = ["ITEM_FILES", "MAPSERVER_JSON", "SERVICE_LIMIT", "CacheMeta", "ServiceExtents", "normalize_storage_format",
           "parse_conf_cdi", "parse_conf_xml", "parse_item_extent", "parse_mapserver_json", "parse_root_json",
           "root_json_extents"]

SERVICE_LIMIT = 4 << 20   # a service description or item file larger than this is not read for extents
_Meta = CacheMeta          # the name sources.compact and sources.folders use


def _check_storage(meta: CacheMeta, label: str) -> None:
    meta.storage_format = normalize_storage_format(meta.storage_format)
    if meta.storage_format not in (COMPACT_V1, COMPACT_V2):
        raise CacheError(f"{label}: storage format {meta.storage_format} is not supported yet "
                         "(tilecrate reads compact V1 and V2 caches)")

"""root.json of a .tpkx, of a V2 cache folder and of a .vtpk (`p12/root.json`): reader and writer
side by side (tests/test_esri_files.py writes, reads back and compares).

The writer's keys follow Esri's Usa.tpkx (FORMATS.md §7.2), `tileBundlesPath` within the first
bytes for GDAL's sniffing; `tileImageInfo` carries `bandCount` and `lercError` when the source
states them (an elevation cache), as ArcGIS writes them for elevation tile packages.
"""
from __future__ import annotations

import json
from typing import Sequence

from tilecrate.errors import CacheError
from tilecrate.esri.common import (
    COMPACT_V2,
    CacheMeta,
    ServiceExtents,
    band_count,
    check_scheme,
    extent_json,
    json_doc,
    lerc_error,
    native_extent,
    read_extent_json,
    sr_json,
)
from tilecrate.tiling import LOD, PACKET, Extent, SpatialRef, TileScheme

MIN_SIZE = 512      # GDAL identifies root.json only in files of at least 512 bytes


def parse_root_json(data: bytes, label: str = "root.json") -> tuple[CacheMeta, str]:
    """Read a .tpkx/.vtpk root.json; returns the metadata and tileBundlesPath."""
    root = json_doc(data, label)
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
    check_scheme(scheme, label)
    tii = root.get("tileImageInfo") if isinstance(root.get("tileImageInfo"), dict) else {}
    fmt = tii.get("format") or ti.get("format") or "MIXED"
    quality = tii.get("compressionQuality", ti.get("compressionQuality", 0)) or 0
    meta = CacheMeta(scheme, storage, str(fmt), int(quality),
                     read_extent_json(root.get("fullExtent"), sr), read_extent_json(root.get("initialExtent"), sr),
                     root.get("name") or None, band_count(tii.get("bandCount")), lerc_error(tii.get("lercError")))
    return meta, str(root.get("tileBundlesPath", "./tile"))


def root_json_extents(meta: CacheMeta) -> ServiceExtents:
    """The extents a root.json states (parse_root_json read them into `meta`), where they are in the
    tiling scheme's coordinates."""
    sr = meta.scheme.spatial_ref
    keep = [e if e is not None and native_extent(e.to_json(), sr) is not None else None
            for e in (meta.full_extent, meta.initial_extent)]
    return ServiceExtents(keep[0], keep[1])


def tile_image_info(meta: CacheMeta) -> dict:
    """The `tileImageInfo` object: format and quality, and the band count and LERC error where stated."""
    out: dict = {"format": meta.tile_format, "compressionQuality": meta.quality}
    if meta.band_count is not None:
        out["bandCount"] = meta.band_count
    if meta.lerc_error is not None:
        out["lercError"] = meta.lerc_error
    return out


def write_root_json(meta: CacheMeta, min_lod: int, max_lod: int, min_scale: float, max_scale: float) -> bytes:
    """root.json of a .tpkx stating `meta` (its full and initial extents when it has a full one), keys
    as ArcGIS writes them; padded to MIN_SIZE bytes."""
    s = meta.scheme
    sr = sr_json(s.spatial_ref)
    root = {
        "tileImageInfo": tile_image_info(meta),
        "tileBundlesPath": "./tile",
        "name": meta.name,
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
    if meta.full_extent is not None:
        root["initialExtent"] = extent_json(meta.initial_extent)
        root["fullExtent"] = extent_json(meta.full_extent)
    data = json.dumps(root, ensure_ascii=False, indent=1).encode("utf-8")
    return data if len(data) >= MIN_SIZE else data + b" " * (MIN_SIZE - len(data))


def restate_root_json(root: dict, levels: Sequence[int], first_scale: float | None, extent: Extent | None) -> bytes:
    """A package's own root.json (a .vtpk's `p12/root.json`) restated for an export of `levels`, in
    place: minLOD/maxLOD, minScale of the first level when levels above it are left out (`first_scale`,
    None if the scheme lacks it), and `extent` as initial and full extent keeping the spatialReference
    object the package wrote; compact JSON, as the package's other keys stay."""
    if levels:
        first = root.get("minLOD")
        root["minLOD"], root["maxLOD"] = levels[0], levels[-1]
        if isinstance(first, (int, float)) and levels[0] > first and first_scale is not None:
            # no tiles above the first exported level: clients should not ask for them
            root["minScale"] = first_scale
    if extent is not None:
        ext = extent.to_json()
        for key in ("initialExtent", "fullExtent"):
            old = root.get(key)
            if isinstance(old, dict) and isinstance(old.get("spatialReference"), dict):
                ext = dict(ext, spatialReference=old["spatialReference"])
            root[key] = ext
    return json.dumps(root, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

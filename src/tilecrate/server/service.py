"""A served MapServer: the cache behind it and the JSON ArcGIS clients read (FORMATS.md §4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from tilecrate.cache import BundleRef, Cache, open_cache
from tilecrate.sources.compact import WOULD_BLOCK
from tilecrate.errors import CacheError
from tilecrate.server.config import ConfigError, ServiceConfig
from tilecrate.tiling import PACKET, Extent, TileScheme, bundle_origin, sniff_image

CURRENT_VERSION = 11.1  # >= 10.9: Runtime offers .tpkx; >= 10.7: Setup Map Area sends `polygon`
_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                  "gzip": "application/x-protobuf", "lerc": "application/octet-stream"}
MAX_TILEMAP = 256  # largest tilemap window side we answer; bigger requests get an adjusted window


@dataclass
class Service:
    """A configured service with its open cache and the JSON computed once at start."""

    config: ServiceConfig
    cache: Cache
    full_extent: Extent | None
    initial_extent: Extent | None
    kind: ClassVar[str] = "MapServer"  # the service type in URLs (server/vector.py, server/image.py)

    @property
    def name(self) -> str:
        """The service name used in URLs."""
        return self.config.name

    @property
    def item(self) -> dict:
        """What the service says about itself: the config's words first, else the source's item
        (title, summary, tags, description, credits), so a re-served package keeps its attribution."""
        item = getattr(self.cache, "item", None)
        cfg = self.config
        return {
            "title": (item and item.title) or self.name,
            "summary": cfg.summary or (item and item.summary) or "",
            "description": cfg.description or (item and (item.description or item.summary)) or "",
            "credits": cfg.copyright or (item and item.credits) or "",
            "tags": list(cfg.tags if cfg.tags is not None else (item.tags if item else ())),
        }

    def document_info(self) -> dict:
        """The `documentInfo` object of the service JSON, from `item`."""
        it = self.item
        return {"Title": it["title"], "Author": "", "Comments": it["summary"], "Subject": it["summary"],
                "Category": "", "AntialiasingMode": "None", "TextAntialiasingMode": "Force",
                "Keywords": ",".join(it["tags"])}

    def close(self) -> None:
        """Close the cache."""
        self.cache.close()

    def root_json(self) -> dict:
        """`<name>/MapServer` JSON: every field tile and export clients read."""
        cache, scheme = self.cache, self.cache.scheme
        lods = scheme.lods
        levels = cache.levels or [lod.level for lod in lods]
        sr = scheme.spatial_ref.to_json()
        item = self.item
        out: dict = {
            "currentVersion": CURRENT_VERSION,
            "cimVersion": "3.1.0",
            "serviceDescription": item["description"],
            "mapName": "Layers",
            "description": item["description"],
            "copyrightText": item["credits"],
            "supportsDynamicLayers": False,
            "layers": [self._layer_summary()],
            "tables": [],
            "spatialReference": sr,
            "singleFusedMapCache": True,
            "tileInfo": scheme.tile_info_json(cache.tile_format, cache.compression_quality),
            "storageInfo": {"storageFormat": cache.storage_format, "packetSize": PACKET},
        }
        if self.initial_extent is not None:
            out["initialExtent"] = self.initial_extent.to_json()
        if self.full_extent is not None:
            out["fullExtent"] = self.full_extent.to_json()
        out.update({
            "minScale": lods[0].scale if lods else 0,
            "maxScale": lods[-1].scale if lods else 0,
            "minLOD": min(levels) if levels else 0,
            "maxLOD": max(levels) if levels else 0,
            "resampling": False,
            "units": scheme.spatial_ref.units,
            "supportedImageFormatTypes": cache.tile_format,
            "documentInfo": self.document_info(),
            "capabilities": "Map,Tilemap",
            "supportedQueryFormats": "JSON",
            "exportTilesAllowed": bool(self.config.export_tiles_allowed),
            "maxExportTilesCount": int(self.config.max_export_tiles_count),
            "maxRecordCount": 0,
            "maxImageHeight": 4096,
            "maxImageWidth": 4096,
            "supportedExtensions": "",
            "tileServers": [],
        })
        return out

    def _layer_summary(self) -> dict:
        return {"id": 0, "name": self.name, "parentLayerId": -1, "defaultVisibility": True,
                "subLayerIds": None, "minScale": 0, "maxScale": 0, "type": "Raster Layer",
                "geometryType": None}

    def layers_json(self) -> dict:
        """`MapServer/layers` JSON."""
        return {"layers": [self.layer_json(0)], "tables": []}

    def layer_json(self, layer_id: int) -> dict:
        """`MapServer/<layerId>` JSON (a cache is one raster layer, id 0)."""
        out = {"currentVersion": CURRENT_VERSION, "id": layer_id, "name": self.name, "type": "Raster Layer",
               "description": self.item["description"], "geometryType": None,
               "copyrightText": self.item["credits"], "parentLayer": None, "subLayers": [],
               "minScale": 0, "maxScale": 0, "defaultVisibility": True, "hasAttachments": False,
               "htmlPopupType": "esriServerHTMLPopupTypeNone", "displayField": "", "typeIdField": None,
               "fields": None, "relationships": [], "canModifyLayer": False, "canScaleSymbols": False,
               "hasLabels": False, "capabilities": "Map", "supportsStatistics": False,
               "supportsAdvancedQueries": False, "supportedQueryFormats": "JSON"}
        if self.full_extent is not None:
            out["extent"] = self.full_extent.to_json()
        return out

    def tile(self, level: int, row: int, col: int) -> tuple[bytes, str] | None:
        """(bytes as stored, the header value `tile_header` names) of a tile, or None where the cache has
        none (runs off the event loop)."""
        if row < 0 or col < 0 or level not in self.cache.levels:
            return None
        data = self.cache.tile(level, row, col)
        if not data:
            return None
        return data, self.tile_header(data)

    def tile_nowait(self, level: int, row: int, col: int) -> tuple[bytes, str] | None | object:
        """`tile()` from memory and the page cache only, on the event loop (the cache's
        `tile_cached`); WOULD_BLOCK where it would wait or the cache cannot say without reading."""
        cached = getattr(self.cache, "tile_cached", None)
        if cached is None:
            return WOULD_BLOCK
        data = cached(level, row, col)
        if data is WOULD_BLOCK:
            return data
        if not data:
            return None
        return data, self.tile_header(data)

    def tile_header(self, data: bytes) -> str:
        """The content type the tile route sends with a tile's bytes."""
        return _CONTENT_TYPES.get(sniff_image(data), "application/octet-stream")

    def tilemap(self, level: int, row: int, col: int, width: int, height: int) -> dict:
        """The tilemap resource: 0/1 presence of tiles in a window, row-major (FORMATS.md §4.3)."""
        adjusted = width > MAX_TILEMAP or height > MAX_TILEMAP
        width, height = min(width, MAX_TILEMAP), min(height, MAX_TILEMAP)
        grid = np.zeros((height, width), dtype=np.uint8)
        if level in self.cache.levels:
            r0, c0 = bundle_origin(max(row, 0), max(col, 0))
            for br in range(r0, row + height, PACKET):
                for bc in range(c0, col + width, PACKET):
                    ref = BundleRef(level, br, bc)
                    if not self.cache.has_bundle(ref):
                        continue
                    _, sizes = self.cache.index(ref)
                    present = (np.asarray(sizes).reshape(PACKET, PACKET) > 0).astype(np.uint8)
                    # overlap of this bundle with the window, in absolute rows/cols
                    ar0, ar1 = max(br, row), min(br + PACKET, row + height)
                    ac0, ac1 = max(bc, col), min(bc + PACKET, col + width)
                    if ar0 >= ar1 or ac0 >= ac1:
                        continue
                    grid[ar0 - row:ar1 - row, ac0 - col:ac1 - col] = present[ar0 - br:ar1 - br, ac0 - bc:ac1 - bc]
        return {"adjusted": adjusted, "location": {"left": col, "top": row, "width": width, "height": height},
                "data": grid.ravel().tolist()}


def open_service(cfg: ServiceConfig) -> Service:
    """Open a service's cache and compute its extents; ConfigError with the reason if it cannot serve."""
    try:
        cache = open_cache(cfg.source)
    except CacheError as e:
        raise ConfigError(f"service {cfg.name}: {e}") from None
    cls = _service_class(cfg, cache)
    try:
        full, initial = served_extents(cache)
        return cls(cfg, cache, full, initial)
    except BaseException:
        cache.close()
        raise


def scheme_extent(scheme: TileScheme) -> Extent:
    """The extent the tiling scheme covers: the grid symmetric about (0, 0) that an origin up and to
    the left of it implies (Web Mercator's and WGS 84's worlds), else the coarsest level's first tile."""
    x0, y1 = scheme.origin_x, scheme.origin_y
    if x0 < 0 < y1:
        return Extent(x0, -y1, -x0, y1, scheme.spatial_ref)
    lod = scheme.lods[0]
    bx0, by0, bx1, by1 = scheme.tile_bounds(lod.level, 0, 0)
    return Extent(bx0, by0, bx1, by1, scheme.spatial_ref)


def served_extents(cache: Cache) -> tuple[Extent, Extent]:
    """(fullExtent, initialExtent) a service states: the package's own service extents where it states
    them (mapserver.json of a .tpk, root.json of a .tpkx / .vtpk, as ArcGIS wrote them), else the data
    envelope (conf.cdi, or the bounds of the tiles present), else the tiling scheme's extent."""
    stated = getattr(cache, "service_extents", None)
    full = stated.full if stated is not None else None
    initial = stated.initial if stated is not None else None
    if full is None:
        try:
            full = initial or cache.data_extent()
        except CacheError:
            full = scheme_extent(cache.scheme)
    return full, initial or cache.initial_extent or full


def _service_class(cfg: ServiceConfig, cache: Cache) -> type[Service]:
    """MapServer, VectorTileServer (vector tiles) or ImageServer (LERC, or `type = "ImageServer"`)."""
    from tilecrate.server.image import ImageService  # these import the app, which imports this module
    from tilecrate.server.vector import VectorService

    vector = cache.kind == "vtpk" or cache.tile_format.lower() == "pbf"
    kind = cfg.type or ("VectorTileServer" if vector else "ImageServer" if cache.tile_format.upper() == "LERC"
                        else "MapServer")
    if vector != (kind == "VectorTileServer"):
        cache.close()
        raise ConfigError(f"service {cfg.name}: {cfg.source} holds {'vector' if vector else 'raster'} tiles; "
                          f"it cannot be served as a {kind}")
    return {"VectorTileServer": VectorService, "ImageServer": ImageService}.get(kind, Service)

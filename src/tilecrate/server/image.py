"""ImageServer: a raster image cache (elevation in LERC, or JPEG/PNG imagery) served as a tiled
ImageServer, with the root JSON elevation and imagery clients read (FORMATS.md §1.6, §19).

Tiles pass through byte for byte (LERC is never re-encoded); tilemap, exportTiles and
estimateExportTilesSize are the MapServer handlers, so jobs share the store, admission and limits.
`minValues`/`maxValues` come from the LERC1 headers of the coarsest level's tiles (the block minima
and the stored maximum; no decoding), which is what Cesium reads as the height range.
"""
from __future__ import annotations

import logging
import struct

from aiohttp import web

from tilecrate.cache import Cache
from tilecrate.errors import TilecrateError
from tilecrate.package.metadata import tile_image_facts
from tilecrate.server import app as core
from tilecrate.server.config import ServiceConfig
from tilecrate.server.errors import EsriError
from tilecrate.server.service import CURRENT_VERSION, Service
from tilecrate.server.vector import root_reply, submit_handler

log = logging.getLogger("tilecrate.server")

KIND = "ImageServer"
_RANGE_TILES = 64          # tiles of the coarsest level read for minValues/maxValues at most


def lerc1_range(blob: bytes) -> tuple[float, float] | None:
    """(min, max) of a LERC1 (`CntZImage`) blob from its block headers, or None if it is not one.

    The max is the z part's stored maximum; the min the smallest block offset (a block's minimum)
    or raw value. Every offset and size is checked against the blob's length.
    """
    n = len(blob)
    if n < 66 or blob[:10] != b"CntZImage ":
        return None
    rows, cols = struct.unpack_from("<II", blob, 18)
    pos = 34
    _, _, mask_bytes, _ = struct.unpack_from("<IIIf", blob, pos)
    pos += 16 + mask_bytes
    if pos + 16 > n or rows == 0 or cols == 0:
        return None
    nby, nbx, z_bytes, zmax = struct.unpack_from("<IIIf", blob, pos)
    pos += 16
    end = pos + z_bytes
    if end > n or nby == 0 or nbx == 0 or nby > rows or nbx > cols or nby * nbx > z_bytes:
        return None  # every block takes at least its flag byte: a bigger count is a lie
    bh, bw = rows // nby, cols // nbx
    heights = [bh] * nby + ([rows - nby * bh] if rows - nby * bh else [])
    widths = [bw] * nbx + ([cols - nbx * bw] if cols - nbx * bw else [])
    lo = float("inf")
    for h in heights:
        for w in widths:
            if pos >= end:
                return None
            flag = blob[pos]
            enc, otype = flag & 63, flag >> 6
            pos += 1
            if enc == 2:
                lo = min(lo, 0.0)
                continue
            if enc == 0:
                count = h * w
                if pos + 4 * count > end:
                    return None
                lo = min(lo, min(struct.unpack_from(f"<{count}f", blob, pos)))
                pos += 4 * count
                continue
            fmt, size = {0: ("<f", 4), 1: ("<h", 2), 2: ("<b", 1)}.get(otype, ("", 0))
            if enc not in (1, 3) or not size or pos + size > end:
                return None
            lo = min(lo, float(struct.unpack_from(fmt, blob, pos)[0]))
            pos += size
            if enc == 1:
                if pos + 1 > end:
                    return None
                b = blob[pos]
                bits, ctype = b & 63, b >> 6
                csize = {0: 4, 1: 2, 2: 1}.get(ctype, 0)
                if not csize or pos + 1 + csize > end:
                    return None
                count = int.from_bytes(blob[pos + 1:pos + 1 + csize], "little")
                pos += 1 + csize + (count * bits + 7) // 8
    if lo == float("inf") or pos > end:
        return None
    return lo, float(zmax)


class ImageService(Service):
    """A tiled raster cache served as an ImageServer."""

    kind = KIND

    def __init__(self, config: ServiceConfig, cache: Cache, full, initial):
        super().__init__(config, cache, full, initial)
        self._range = self._value_range() if cache.tile_format.upper() == "LERC" else None
        # what an exported .tpkx's root.json states too (package.metadata.tile_image_facts)
        self._bands, self._lerc_error = tile_image_facts(cache)

    def _value_range(self) -> tuple[float, float] | None:
        levels = self.cache.levels
        if not levels:
            return None
        lo, hi = float("inf"), float("-inf")
        try:
            for seen, (_, _, _, data) in enumerate(self.cache.iter_tiles(min(levels))):
                if seen >= _RANGE_TILES:
                    break
                got = lerc1_range(bytes(data))
                if got is not None:
                    lo, hi = min(lo, got[0]), max(hi, got[1])
        except TilecrateError as e:  # a damaged bundle costs the height range, not the service
            log.warning("%s: no minValues/maxValues: %s", self.name, e)
            return None
        return (lo, hi) if lo <= hi else None

    def root_json(self) -> dict:
        """`<name>/ImageServer` JSON: what elevation (JS, Cesium) and imagery (Python) clients read."""
        cache, scheme = self.cache, self.cache.scheme
        lods = scheme.lods
        levels = cache.levels or [lod.level for lod in lods]
        sr = scheme.spatial_ref.to_json()
        lerc = cache.tile_format.upper() == "LERC"
        finest = min((lod.resolution for lod in lods if lod.level in levels), default=0.0)
        out: dict = {
            "currentVersion": CURRENT_VERSION,
            "serviceDescription": self.item["description"],
            "name": self.name,
            "description": self.item["description"],
            "copyrightText": self.item["credits"],
            "spatialReference": sr,
            "singleFusedMapCache": True,
            "tileInfo": scheme.tile_info_json(cache.tile_format, cache.compression_quality),
            "storageInfo": {"storageFormat": cache.storage_format, "packetSize": 128},
            "bandCount": self._bands if self._bands is not None else (1 if lerc else 3),
            "pixelType": "F32" if lerc else "U8",
            "pixelSizeX": finest,
            "pixelSizeY": finest,
            "serviceDataType": "esriImageServiceDataTypeElevation" if lerc else "esriImageServiceDataTypeRGB",
            "minScale": lods[0].scale if lods else 0,
            "maxScale": lods[-1].scale if lods else 0,
            "minLOD": min(levels) if levels else 0,
            "maxLOD": max(levels) if levels else 0,
            "capabilities": "Image,Tilemap",
            "exportTilesAllowed": bool(self.config.export_tiles_allowed),
            "maxExportTilesCount": int(self.config.max_export_tiles_count),
        }
        if lerc:
            # the cache's tileImageInfo as its .tpkx root.json states it (format, bands, LERC maxZError)
            image_info = {"format": cache.tile_format, "compressionQuality": cache.compression_quality,
                          "bandCount": out["bandCount"]}
            if self._lerc_error is not None:
                image_info["lercError"] = self._lerc_error
            out["tileImageInfo"] = image_info
        if self._range is not None:
            out["minValues"], out["maxValues"] = [self._range[0]], [self._range[1]]
        elif not lerc:
            out["minValues"], out["maxValues"] = [0, 0, 0], [255, 255, 255]
        if self.full_extent is not None:
            out["extent"] = out["fullExtent"] = self.full_extent.to_json()
        if self.initial_extent is not None:
            out["initialExtent"] = self.initial_extent.to_json()
        return out


def _image(request: web.Request) -> ImageService:
    svc = core._service(request)
    if not isinstance(svc, ImageService):
        raise EsriError(404, f"Service {svc.name}/{KIND} not found", message="Service not found")
    return svc


async def h_root(request: web.Request) -> web.Response:
    """`<name>/ImageServer` (JSON also without f; Python POSTs it, Cesium asks `/?f=pjson`)."""
    return await root_reply(request, _image(request))


def routes(root: str, shared: dict) -> list[tuple[str, object]]:
    """(path, handler) of every ImageServer route; `shared` holds app.py's tile/job/export handlers."""
    svc = root + "/services/{service}/" + KIND
    ops = "{op:(?i:exportTiles|estimateExportTilesSize)}"
    submit = submit_handler(shared, _image, all_levels=False)
    out: list[tuple[str, object]] = [(svc + "/tile/{level}/{row}/{col}", shared["tile"])]
    for prefix in (svc + "/" + ops + "/jobs/{job}", svc + "/jobs/{job}"):
        out += [(prefix, shared["job"]), (prefix + "/", shared["job"]), (prefix + "/cancel", shared["cancel"]),
                (prefix + "/results/{param}", shared["result"]), (prefix + "/inputs/{param}", shared["input"])]
    out += [
        (svc, h_root), (svc + "/", h_root),
        (svc + "/tilemap/{level}/{row}/{col}/{width}/{height}", shared["tilemap"]),
        (svc + "/" + ops, submit), (svc + "/" + ops + "/submitJob", submit),
    ]
    return out

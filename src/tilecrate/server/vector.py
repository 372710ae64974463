"""VectorTileServer: a served .vtpk (or extracted one), its routes and the JSON clients read (FORMATS.md §18).

The root JSON is the package's own `root.json` with the service fields added (export settings,
capabilities TilesOnly,Tilemap, currentVersion). Tiles are served as stored: gzip'd MVT with
`Content-Encoding: gzip`, so browsers inflate them. Resources (styles, sprites, fonts, info) are
read from the package in place; the style's sprite and glyph URLs and its vector source URL are
rewritten to this server, so MapLibre (which wants absolute glyph URLs) and Esri clients agree.
Exports and their jobs are the MapServer handlers (same job store, admission, limits, downloads):
the runner writes a .vtpk for a vector source whatever tilePackage says, as ArcGIS does.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from urllib.parse import quote

from aiohttp import web

from tilecrate.cache import Cache
from tilecrate.errors import ExportError
from tilecrate.package import vtpk
from tilecrate.request import ExportRequest
from tilecrate.selection import select
from tilecrate.server import app as core
from tilecrate.server.config import ConfigError, ServiceConfig
from tilecrate.server.errors import EsriError
from tilecrate.server.service import CURRENT_VERSION, WOULD_BLOCK, Service

KIND = "VectorTileServer"
MAX_RESOURCE = vtpk.WHOLE          # a resource (font range, sprite sheet, style) served at most this big
_TYPES = {"pbf": "application/x-protobuf", "json": "application/json; charset=utf-8", "png": "image/png",
          "webp": "image/webp"}
_PBF_HEADERS = {"Content-Type": "application/x-protobuf", "Cache-Control": "max-age=3600"}
_GZIP_PBF_HEADERS = {**_PBF_HEADERS, "Content-Encoding": "gzip"}
_RECHECK = 1.0                     # seconds between checks that the package file is still the one open
log = logging.getLogger("tilecrate.server")


def _identity(path: str) -> tuple | None:
    """What tells one version of a package file from the next (None for a folder: read per request)."""
    try:
        st = os.stat(os.path.join(path, "root.json") if os.path.isdir(path) else path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class VectorService(Service):
    """A vector tile package served as a VectorTileServer."""

    kind = KIND

    def __init__(self, config: ServiceConfig, cache: Cache, full, initial):
        super().__init__(config, cache, full, initial)
        self._lock = threading.Lock()  # _Source keeps one descriptor; reads of it are serialised
        self._checked = time.monotonic()
        try:
            self._source, self._root, self._identity = self._open()
        except (ExportError, ValueError) as e:
            raise ConfigError(f"service {config.name}: {cache.path}: cannot serve this vector tile package ({e})") from None
        self._tilemap: bytes | None = None

    def _open(self) -> tuple[vtpk._Source, dict, tuple | None]:
        identity = _identity(self.cache.path)
        source = vtpk._Source(self.cache)
        try:
            root = json.loads(source.root_json)
            if not isinstance(root, dict):
                raise ValueError("root.json is not an object")
        except BaseException:
            source.close()
            raise
        return source, root, identity

    def _refresh(self) -> None:
        """A package replaced under us (a new version renamed over it) is reopened, at most once a second,
        so its resources, root and tilemap follow the tiles (which the cache already follows)."""
        now = time.monotonic()
        if now - self._checked < _RECHECK:
            return
        self._checked = now
        if _identity(self.cache.path) == self._identity:
            return
        try:
            source, root, identity = self._open()
        except (ExportError, ValueError) as e:  # half-written: keep serving the open version
            log.warning("%s: %s changed and cannot be read yet (%s)", self.name, self.cache.path, e)
            return
        old, self._source, self._root, self._identity, self._tilemap = self._source, source, root, identity, None
        old.close()

    def close(self) -> None:
        """Close the package and the cache."""
        self._source.close()
        super().close()

    def root_json(self) -> dict:
        """`<name>/VectorTileServer` JSON: the package's root.json with the service's fields."""
        out = dict(self._root)
        scheme = self.cache.scheme
        out.update({
            "currentVersion": CURRENT_VERSION,
            "name": out.get("name") or self.name,
            "capabilities": "TilesOnly,Tilemap",
            "type": out.get("type", "indexedVector"),
            "tileMap": "tilemap",
            "defaultStyles": "resources/styles",
            "tiles": ["tile/{z}/{y}/{x}.pbf"],
            "exportTilesAllowed": bool(self.config.export_tiles_allowed),
            "maxExportTilesCount": int(self.config.max_export_tiles_count),
        })
        if "tileInfo" not in out:
            out["tileInfo"] = scheme.tile_info_json("pbf", 0)
        for key, ext in (("initialExtent", self.initial_extent), ("fullExtent", self.full_extent)):
            if not isinstance(out.get(key), dict) and ext is not None:
                out[key] = ext.to_json()
        levels = self.cache.levels
        if levels:
            out.setdefault("minLOD", min(levels))
            out.setdefault("maxLOD", max(levels))
        return out

    def tile_header(self, data: bytes) -> str:
        """The content encoding ("gzip" or "") the tile route sends with a tile's bytes (always pbf)."""
        return "gzip" if data[:2] == b"\x1f\x8b" else ""

    def resource(self, path: str) -> bytes | None:
        """The bytes of `resources/<path>` in the package, or None (runs off the event loop)."""
        with self._lock:
            self._refresh()
            f = self._source.files.get(vtpk.ROOT + "resources/" + path)
            if f is None or f.size > MAX_RESOURCE:
                return None
            data, _ = self._source.read_whole(f)
        return bytes(data)

    def has_resource(self, path: str) -> bool:
        """Whether `resources/<path>` exists."""
        return (vtpk.ROOT + "resources/" + path) in self._source.files

    def font(self, stack: str, rng: str) -> bytes | None:
        """A glyph range of the first font of a comma-separated stack that the package has."""
        for name in stack.split(","):
            name = name.strip()
            if name and "/" not in name and name not in (".", ".."):
                path = f"fonts/{name}/{rng}.pbf"
                if self.has_resource(path):
                    return self.resource(path)
        return None

    def style(self, svc_url: str) -> dict:
        """The default style with its sprite, glyphs and source URLs pointing at this service."""
        data = self.resource("styles/root.json")
        if data is None:
            raise EsriError(404, f"{self.name}: the package has no resources/styles/root.json", http_status=404)
        try:
            style = json.loads(data)
        except ValueError:
            raise EsriError(400, f"{self.name}: the package's style is not JSON") from None
        except RecursionError:  # else answered as "a parameter is nested too deeply": the client's fault
            raise EsriError(400, f"{self.name}: the package's style is nested too deeply to be read") from None
        if not isinstance(style, dict):
            raise EsriError(400, f"{self.name}: the package's style is not a JSON object")
        if isinstance(style.get("sprite"), str) and "://" not in style["sprite"]:
            style["sprite"] = f"{svc_url}/resources/sprites/sprite"
        if isinstance(style.get("glyphs"), str) and "://" not in style["glyphs"]:
            style["glyphs"] = f"{svc_url}/resources/fonts/{{fontstack}}/{{range}}.pbf"
        for src in (style.get("sources") or {}).values():
            if isinstance(src, dict) and src.get("type") == "vector" and isinstance(src.get("url"), str) \
                    and "://" not in src["url"]:
                src["url"] = svc_url
        return style

    def tilemap_index(self) -> bytes:
        """The package's `tilemap/root.json`, or one built from the tiles the bundles hold."""
        with self._lock:
            self._refresh()
        if self._tilemap is None:
            with self._lock:
                data = self._package_tilemap()
            if data is None:
                sel = select(self.cache, ExportRequest(levels=tuple(self.cache.levels)))
                data = vtpk.tilemap_index(vtpk.present_tiles(sel))
            self._tilemap = data
        return self._tilemap

    def _package_tilemap(self) -> bytes | None:
        src = self._source
        if src._is_zip:
            names = [n for n in src._infos if n.endswith("tilemap/root.json")]
            if not names:
                return None
            return src._read_zip(src._infos[min(names, key=len)])
        path = os.path.join(self.cache.path, "tilemap", "root.json")
        return src._read_path(path) if os.path.isfile(path) else None


# ------------------------------------------------------------------------------------------
# routes


def _vector(request: web.Request) -> VectorService:
    svc = core._service(request)
    if not isinstance(svc, VectorService):
        raise EsriError(404, f"Service {svc.name}/{KIND} not found", message="Service not found")
    return svc


def svc_url(request: web.Request, svc: Service) -> str:
    """The absolute URL of a VectorTileServer."""
    return f"{core.base_url(request)}{core.ROOT}/services/{quote(svc.name)}/{KIND}"


async def root_reply(request: web.Request, svc: Service) -> web.Response:
    """A service root: HTML, or its JSON made at most once a second (clients read it before every map)."""
    f = core.fmt_of(await core.params_of(request), default="json")
    if f == "html":
        return await core.reply(request, svc.root_json(), default="json")
    cache, key, now = request.app[core.JSON_CACHE], (svc.kind, svc.name, f), time.monotonic()
    hit = cache.get(key)
    if hit is None or hit[0] < now:
        hit = cache[key] = (now + core._JSON_TTL, core.json_response(svc.root_json(), f).body)
    return web.Response(body=hit[1], headers=core._JSON_HEADERS)


async def h_root(request: web.Request) -> web.Response:
    """`<name>/VectorTileServer` (JSON also without f, as clients read it)."""
    return await root_reply(request, _vector(request))


async def h_tile(request: web.Request) -> web.StreamResponse:
    """`tile/{z}/{y}/{x}.pbf`: the tile as stored, or 404."""
    svc = _vector(request)
    m = request.match_info
    level, row, col = core._int(m["level"], "level"), core._int(m["row"], "row"), core._int(m["col"], "column")
    found = svc.tile_nowait(level, row, col)  # from the page cache on the loop, as app.h_tile does
    if found is WOULD_BLOCK:
        found = await core.read_cache(request, (svc.name, level, row >> 7, col >> 7), svc.tile, level, row, col)
    if found is None:
        raise EsriError(404, f"no tile at level {level}, row {row}, column {col}", message="Tile not found",
                        http_status=404)
    data, enc = found
    return web.Response(body=data, headers=_GZIP_PBF_HEADERS if enc else _PBF_HEADERS)


async def h_tilemap_index(request: web.Request) -> web.Response:
    """`tilemap`: the quadtree index (clients fetch it without f)."""
    svc = _vector(request)
    data = svc._tilemap if time.monotonic() - svc._checked < _RECHECK else None  # fresh: stay on the loop
    if data is None:
        data = await core.read_cache(request, (svc.name, "tilemap"), svc.tilemap_index)
    return web.Response(body=data, headers={"Content-Type": "application/json; charset=utf-8"})


async def h_style(request: web.Request) -> web.Response:
    """`resources/styles` and `resources/styles/root.json` (the same document)."""
    svc = _vector(request)
    url = svc_url(request, svc)
    # made at most once a second per URL it names (the Host header is checked: a bounded set)
    cache, key, now = request.app[core.JSON_CACHE], ("style", svc.name, url), time.monotonic()
    hit = cache.get(key)
    if hit is None or hit[0] < now:
        style = await core.read_cache(request, (svc.name, "resources"), svc.style, url)
        hit = cache[key] = (now + core._JSON_TTL, core.json_response(style).body)
    return web.Response(body=hit[1], headers=core._JSON_HEADERS)


async def h_info(request: web.Request) -> web.Response:
    """`resources/info` and `resources/info/root.json`."""
    svc = _vector(request)
    data = await core.read_cache(request, (svc.name, "resources"), svc.resource, "info/root.json")
    if data is None:
        raise EsriError(404, f"{svc.name}: the package has no resources/info", http_status=404)
    return web.Response(body=data, headers={"Content-Type": _TYPES["json"]})


async def h_font(request: web.Request) -> web.Response:
    """`resources/fonts/{stack}/{range}.pbf`: the first font of the stack the package has."""
    svc = _vector(request)
    stack, rng = request.match_info["stack"], request.match_info["range"]
    a, _, b = rng.partition("-")
    if not (a.isascii() and a.isdigit() and b.isascii() and b.isdigit() and len(rng) <= 13):
        raise EsriError(400, f"a glyph range is START-END, not {rng[:30]!r}")
    data = await core.read_cache(request, (svc.name, "resources"), svc.font, stack[:1000], rng)
    if data is None:
        raise EsriError(404, f"no glyphs {rng} for {stack[:100]!r}", http_status=404)
    return web.Response(body=data, headers={"Content-Type": _TYPES["pbf"], "Cache-Control": "max-age=86400"})


async def h_sprite(request: web.Request) -> web.Response:
    """`resources/sprites/sprite[@2x].json|png|webp`."""
    svc = _vector(request)
    name = request.match_info["name"]
    ext = name.rsplit(".", 1)[-1].lower()
    if ext not in ("json", "png", "webp") or "/" in name or name.startswith("."):
        raise EsriError(404, f"no sprite {name[:60]!r}", http_status=404)
    data = await core.read_cache(request, (svc.name, "resources"), svc.resource, f"sprites/{name}")
    if data is None:
        raise EsriError(404, f"no sprite {name[:60]!r}", http_status=404)
    return web.Response(body=data, headers={"Content-Type": _TYPES[ext], "Cache-Control": "max-age=86400"})


def submit_handler(shared: dict, kind_check, all_levels: bool):
    """exportTiles / estimateExportTilesSize for a VectorTileServer or ImageServer: the MapServer handler,
    after `kind_check(request)`; with `all_levels`, `levels` absent means every level (the ArcGIS API for
    Python's VectorTileLayer.export_tiles leaves it out when not given, FORMATS.md §18.7). The bare
    operation URL in a browser shows the service JSON (the MapServer form page is MapServer's)."""
    async def h_submit(request: web.Request) -> web.StreamResponse:
        svc = kind_check(request)
        params = await core.params_of(request)
        f = core.fmt_of(params)
        if core.param(params, "levels") is None:
            if f == "html":
                return await core.reply(request, svc.root_json())
            if all_levels and svc.cache.levels:
                params["levels"] = f"{min(svc.cache.levels)}-{max(svc.cache.levels)}"
        return await shared["submit"](request)
    h_submit.acts = True  # no HEAD: a link checker's HEAD must not submit a job
    return h_submit


def routes(root: str, shared: dict) -> list[tuple[str, object]]:
    """(path, handler) of every VectorTileServer route; `shared` holds app.py's job/export handlers."""
    svc = root + "/services/{service}/" + KIND
    ops = "{op:(?i:exportTiles|estimateExportTilesSize)}"
    submit = submit_handler(shared, _vector, all_levels=True)
    out: list[tuple[str, object]] = [
        (svc + "/tile/{level}/{row}/{col:[0-9]+}.pbf", h_tile),
        (svc + "/tile/{level}/{row}/{col:[0-9]+}", h_tile),
    ]
    for prefix in (svc + "/" + ops + "/jobs/{job}", svc + "/jobs/{job}"):
        out += [(prefix, shared["job"]), (prefix + "/", shared["job"]), (prefix + "/cancel", shared["cancel"]),
                (prefix + "/results/{param}", shared["result"]), (prefix + "/inputs/{param}", shared["input"])]
    out += [
        (svc, h_root), (svc + "/", h_root),
        (svc + "/tilemap", h_tilemap_index), (svc + "/tilemap/", h_tilemap_index),
        (svc + "/tilemap/{level}/{row}/{col}/{width}/{height}", shared["tilemap"]),
        (svc + "/resources/styles", h_style), (svc + "/resources/styles/", h_style),
        (svc + "/resources/styles/root.json", h_style),
        (svc + "/resources/info", h_info), (svc + "/resources/info/root.json", h_info),
        (svc + "/resources/fonts/{stack}/{range}.pbf", h_font),
        (svc + "/resources/sprites/{name}", h_sprite),
        (svc + "/" + ops, submit), (svc + "/" + ops + "/submitJob", submit),
    ]
    return out


for _h in (h_tile, h_font, h_sprite):
    _h.binary = True  # byte resources: errors travel with real HTTP statuses (server/errors.py)

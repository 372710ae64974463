"""The aiohttp application: ArcGIS REST routes under /arcgis/rest for every configured service.

Every route's handler is wrapped (`guarded`): it answers every failure as Esri error JSON (or an
HTML page with f=html), adds CORS headers, and checks the token when one is configured. Handlers
only read and route: cache reads (tiles, tilemaps, previews) run through a ReadGate
(server/reads.py: bounded, timed out, a hanging file quarantined), so reads stuck on a file cannot
take the threads job submission and cancel use (the default executor) nor every read thread; a
tile already in the page cache is read on the loop without waiting (`Service.tile_nowait`). LMDB
reads (microseconds) run on the loop. Job status is answered from the store's ready-made JSON bytes.

Routes are one table (`add_routes`); a new service kind adds its handlers there.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import re
import time
import warnings
from typing import Any, Awaitable, Callable
from urllib.parse import quote

from aiohttp import web

from tilecrate.errors import RequestError, TilecrateError
from tilecrate.geometry import GeometryLimits
from tilecrate.jobs import AdmissionRefused, JobError, JobRunner, JobService, JobStore
from tilecrate.jobs.runner import Budget
from tilecrate.jobs.store import QuotaExceeded, Quota, StoreError
from tilecrate.jobs.model import ESTIMATE, EXPORT, SUCCEEDED, Job, is_job_id
from tilecrate.server import html
from tilecrate.server.config import ServerConfig
from tilecrate.server.connections import HTTP_LOG, ConnectionGuard, default_max_connections
from tilecrate.server.errors import EsriError
from tilecrate.server.reads import ReadGate
from tilecrate.server.service import CURRENT_VERSION, WOULD_BLOCK, Service, open_service
from tilecrate.server.tilemap import TilemapCache

log = logging.getLogger("tilecrate.server")

ROOT = "/arcgis/rest"
OUTPUT = f"{ROOT}/directories/arcgisoutput"
_SVC = ROOT + "/services/{service}/MapServer"
_OPS = {"exporttiles": EXPORT, "estimateexporttilessize": ESTIMATE}
MAX_REQUEST_LINE = 1024 * 1024  # at most; never more than [limits] max_body_bytes
_MAX_DETAIL = 2000  # characters of an error detail answered (a message may quote a whole parameter)
_SWEEP_INTERVAL = 2.0  # seconds between runner sweeps (job ends to record, orphaned jobs)
_MAX_INT_TEXT = 12  # digits accepted in a level/row/col path segment
# ArcGIS requests carry a few dozen parameters; every lookup (param()) scans them all, names being
# case-insensitive, so 100 000 names in one query string held the event loop for each lookup
MAX_PARAMS = 1000
_CORS = {"Access-Control-Allow-Origin": "*",
         "Access-Control-Expose-Headers": "Content-Length, Content-Range, Retry-After, Content-Disposition"}
_PREFLIGHT = {"Access-Control-Allow-Methods": "GET, POST, HEAD, OPTIONS",
              "Access-Control-Allow-Headers": "Authorization, X-Esri-Authorization, Content-Type, Range",
              "Access-Control-Max-Age": "86400"}

CFG = web.AppKey("cfg", ServerConfig)
SERVICES = web.AppKey("services", dict)
RUNNER = web.AppKey("runner", JobRunner)
STORE = web.AppKey("store", JobStore)
PREVIEWS = web.AppKey("previews", dict)
CLEANER = web.AppKey("cleaner", asyncio.Task)
READS = web.AppKey("reads", ReadGate)
PROCESS = web.AppKey("process", tuple)
JSON_CACHE = web.AppKey("json_cache", dict)
TILEMAPS = web.AppKey("tilemaps", TilemapCache)
CONNECTIONS = web.AppKey("connections", ConnectionGuard)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)   # aiohttp discourages subclasses

    class _Application(web.Application):
        """An application whose server counts its connections (tilecrate.server.connections): aiohttp
        has no other hook that sees a connection before its request headers are complete."""

        def _make_handler(self, **kwargs: Any):  # type: ignore[override]
            server = super()._make_handler(**kwargs)
            guard = self.get(CONNECTIONS)
            if guard is not None:
                guard.install(server)
            return server
_JSON_TTL = 1.0  # seconds a service's JSON is reused (its cache may change under us)
_JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}
_TILE_HEADERS: dict[str, dict[str, str]] = {}  # per content type, made once

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_site_middleware: Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]  # auth's, set by create_app


class _WithCors(web.Response):
    """A 200 response whose headers already hold the CORS ones (the guard adds nothing)."""


_JSON_CORS = {**_JSON_HEADERS, **_CORS}


# ------------------------------------------------------------------------------------------
# parameters, formats, responses


async def params_of(request: web.Request) -> dict[str, str]:
    """Query and form parameters merged (form wins), keys as sent; read once per request."""
    cached = request.get("tc_params")
    if cached is not None:
        return cached
    _check_count(request, request.query_string.count("&") + 1)
    out: dict[str, str] = {}
    for k, v in request.query.items():
        out[k] = v
    if request.method == "POST" and request.body_exists:
        ctype = request.content_type
        if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
            seconds = request.app[CFG].limits.body_seconds
            try:
                # a body trickled in (or never sent) must not hold the connection and handler for ever
                form = await asyncio.wait_for(request.post(), seconds)
            except asyncio.TimeoutError:
                request["tc_close"] = True  # the rest of the body is not worth waiting for
                raise EsriError(408, f"the request body did not arrive within {seconds:g} seconds "
                                     f"([limits] body_seconds)", message="Request Timeout", http_status=408) from None
            except web.HTTPException:
                raise
            except Exception as e:  # malformed bodies are the client's problem, reported as such
                raise EsriError(400, f"the request body cannot be read as a form ({type(e).__name__})") from None
            _check_count(request, len(out) + len(form))
            for k, v in form.items():
                if not isinstance(v, str):
                    raise EsriError(400, f"parameter {k[:60]!r} must be text, not an uploaded file")
                out[k] = v
    request["tc_params"] = out
    return out


def _json_only(request: web.Request) -> dict[str, str] | None:
    """{"f": "json"} when that is the request's only parameter, in a query string (a GET or HEAD: no
    form body to read), as status polls and map clients send it: no parsing then; else None. (An
    error answer reads the same from the query.)"""
    if request.query_string != "f=json" or request.method == "POST":
        return None
    return {"f": "json"}


def _check_count(request: web.Request, count: int) -> None:
    if count > MAX_PARAMS:
        request["tc_params"] = {"f": "json"}  # the error answer must not read them either
        raise EsriError(400, f"the request has {count} parameters; this server accepts at most {MAX_PARAMS} "
                             f"parameters", message="Invalid or missing input parameters.")


def param(params: dict[str, str], name: str) -> str | None:
    """A parameter by case-insensitive name; empty strings count as absent."""
    low = name.lower()
    for k, v in params.items():
        if k.lower() == low and v.strip():
            return v
    return None


def fmt_of(params: dict[str, str], default: str = "html") -> str:
    """The `f` parameter: json, pjson or html (any case); an unknown value is an error."""
    f = (param(params, "f") or default).strip().lower()
    if f not in ("json", "pjson", "html"):
        raise EsriError(400, f"Invalid format {f[:40]!r}: use f=json, f=pjson or f=html")
    return f


def json_response(obj: object, f: str = "json", status: int = 200, headers: dict | None = None) -> web.Response:
    """JSON (compact for json, indented for pjson)."""
    text = json.dumps(obj, indent=2 if f == "pjson" else None, separators=None if f == "pjson" else (",", ":"),
                      allow_nan=False, default=str)
    return web.Response(text=text, status=status, content_type="application/json", charset="utf-8",
                        headers=headers)


def html_response(text: str, status: int = 200) -> web.Response:
    """An HTML page."""
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


async def reply(request: web.Request, obj: dict, render: Callable[[], str] | None = None,
                default: str = "html") -> web.Response:
    """Answer a resource in the format asked for."""
    f = fmt_of(await params_of(request), default)
    if f == "html":
        return html_response(render() if render else html.page(request.path, html.json_block(obj)))
    return json_response(obj, f)


def base_url(request: web.Request) -> str:
    """Scheme and host clients reach us at: public_url when configured, else the Host header when it
    names us (a configured host name, the address the request came in on, or localhost), else that
    address. A forged Host header is never written into a URL we hand out."""
    cfg = request.app[CFG]
    if cfg.public_url:
        return cfg.public_url.rstrip("/")
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not sock:
        return f"{request.scheme}://{cfg.host}:{cfg.port}"
    addr, port = sock[0], sock[1]
    bound = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    allowed = {bound, f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    allowed.update(h.lower() for h in cfg.host_names)
    host = (request.headers.get("Host") or "").strip().lower()
    if request.scheme == "http" and port == 80 or request.scheme == "https" and port == 443:
        allowed.update({"localhost", "127.0.0.1", "[::1]", addr if ":" not in addr else f"[{addr}]"})
    return f"{request.scheme}://{host if host in allowed else bound}"


def client_of(request: web.Request) -> str:
    """Who is asking, for the per-client quotas and job ownership: `user:NAME` when signed in, else
    the peer address (tilecrate.server.auth)."""
    who = request.get("tc_principal")
    return who.client if who is not None else (request.remote or "")


def token_of(params: dict[str, str], request: web.Request) -> str | None:
    """The token sent as a parameter or as a Bearer header."""
    tok = param(params, "token")
    if tok:
        return tok.strip()
    for header in ("X-Esri-Authorization", "Authorization"):
        value = request.headers.get(header, "")
        if value.lower().startswith("bearer "):
            return value[7:].strip()
    return None


def _is_binary(request: web.Request) -> bool:
    """Tiles and the output directory are byte resources: their errors carry real HTTP statuses."""
    handler = getattr(request.match_info.handler, "inner", None)
    return handler in (h_tile, h_output) or getattr(handler, "binary", False)


def _error_response(request: web.Request, err: EsriError) -> web.Response:
    err.details = [d if len(d) <= _MAX_DETAIL else d[:_MAX_DETAIL] + " …" for d in err.details]
    binary = _is_binary(request)
    status = err.http_status(binary)
    params = request.get("tc_params") or dict(request.query)
    f = (param(params, "f") or "").strip().lower()
    if f == "html" and not binary:
        resp = html_response(html.error_page(err.to_json()), status)
    else:
        resp = json_response(err.to_json(), "pjson" if f == "pjson" else "json", status)
    resp.headers.update(err.headers)
    return resp


def guarded(handler: Handler, app: web.Application) -> Handler:
    """The handler with what every route answers around it: tokens, the site's checks, CORS headers,
    and Esri error JSON for everything that goes wrong.

    Each route's handler is wrapped once, when the routes are made, rather than run through an
    aiohttp middleware: aiohttp builds and runs the middleware chain (and one more layer of its
    own) on every request, about a tenth of a status poll's cost. Requests no route takes
    (unknown paths, methods a route does not take, CORS preflights) reach `h_unmatched`, guarded
    the same way. What the wrapper reads on every request (the configuration, the settings
    refresh) is looked up once, here, for the application the route belongs to."""
    from tilecrate.server.admin import refresher  # admin imports this module

    cfg = app[CFG]
    fresh = refresher(app)
    # a job's status depends on no site setting: polls skip the check (the periodic sweep and
    # every other request apply an edit; `_clean_periodically`)
    settings_free = getattr(handler, "settings_free", False)

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            qs = request.query_string
            if qs and qs.count("&") >= MAX_PARAMS:  # also where no handler reads them (tiles)
                _check_count(request, qs.count("&") + 1)
            if cfg.token is not None and not cfg.users and request.path.startswith(ROOT):  # users: auth.py
                sent = token_of(await params_of(request), request)
                if not sent:
                    raise EsriError(499, "This server requires a token: pass token=... or an "
                                         "X-Esri-Authorization: Bearer header.")
                # header bytes that are not UTF-8 arrive as surrogates: encode those too, never fail
                if not hmac.compare_digest(sent.encode("utf-8", "surrogatepass"), cfg.token.encode()):
                    raise EsriError(498, "The token is not valid.")
            if cfg.users:  # the site's checks: settings refresh, users, permissions
                resp = await _site_middleware(request, handler)
            else:  # all that auth.site_middleware does on a site without users
                if not settings_free:
                    fresh()
                resp = await handler(request)
        except EsriError as e:
            resp = _error_response(request, e)
        except RequestError as e:  # a parameter a handler could not read: the message says which
            resp = _error_response(request, EsriError(400, str(e), message="Invalid or missing input parameters."))
        except TilecrateError as e:  # e.g. a corrupt bundle behind a tile: the reader's message says which
            log.warning("%s %s: %s", request.method, request.path[:300], e)
            resp = _error_response(request, EsriError(400, "the cache cannot be read here; the server log has "
                                                           "the details"))
        except RecursionError:
            resp = _error_response(request, EsriError(400, "a parameter is nested too deeply to be read",
                                                      message="Invalid or missing input parameters."))
        except web.HTTPException as e:
            if e.status < 400:  # redirects
                e.headers.update(_CORS)
                raise
            code = e.status if e.status in (404, 405, 413) else 400
            detail = {404: f"no resource at {request.path}", 405: f"{request.method} is not supported here",
                      413: "the request is too large"}.get(code, e.reason)
            resp = _error_response(request, EsriError(code, detail, http_status=code if code != 400 else None))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path[:300])  # no query: tokens
            resp = _error_response(request, EsriError(400, "The server could not complete this request; "
                                                           "the server log has the details."))
        if type(resp) is _WithCors:
            return resp  # made with its headers whole (hot routes)
        if not resp.prepared:
            resp.headers.update(_CORS)
            if resp.status >= 400 and request.get("tc_close"):  # set only with an error answer (a body timeout)
                resp.force_close()
        return resp

    answer.__dict__.update(getattr(handler, "__dict__", {}))  # `binary`, `acts`
    answer.__name__ = answer.__qualname__ = getattr(handler, "__name__", "handler")
    answer.__doc__ = handler.__doc__
    answer.inner = handler  # type: ignore[attr-defined]
    return answer


async def h_unmatched(request: web.Request) -> web.StreamResponse:
    """What no route takes: a CORS preflight (any path) is answered; else 405 where the path is a
    resource that does not take this method, 404 where it is none."""
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={**_CORS, **_PREFLIGHT})
    if request.method != "GET":  # the path exists when a GET of it finds a route other than this one
        found = await request.app.router.resolve(request.clone(method="GET"))
        if getattr(getattr(found.route, "handler", None), "inner", None) is not h_unmatched:
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD", "POST"])
    raise web.HTTPNotFound()


# ------------------------------------------------------------------------------------------
# helpers for handlers


def _service(request: web.Request) -> Service:
    route = request.match_info.route.resource
    if type(route) is _NamedServiceResource:  # its name and kind are known: one lookup
        svc = route.services.get(route.service)
        if svc is not None and svc.kind == route.kind:
            return svc
    name = request.match_info["service"]
    svc = request.app[SERVICES].get(name)
    # one name, one type: a VectorTileServer is not also reachable as a MapServer
    if svc is None or route is None or f"/{svc.kind}" not in route.canonical:
        kind = next((k for k in ("VectorTileServer", "ImageServer") if route and f"/{k}" in route.canonical),
                    "MapServer")
        raise EsriError(404, f"Service {name[:100]}/{kind} not found", message="Service not found")
    return svc


def _int(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_INT_TEXT:  # not '²' or '١'
        raise EsriError(400, f"{what} must be a whole number, not {text[:30]!r}")
    return int(text)


def _no_job(job_id: str) -> EsriError:
    return EsriError(400, f"Job '{job_id[:60]}' does not exist or is inaccessible.", message="Invalid URL")


def _job(request: web.Request, inputs: bool = False) -> tuple[Service, Job]:
    svc = _service(request)
    job_id = request.match_info["job"]
    job = request.app[STORE].get(job_id, inputs=inputs) if is_job_id(job_id) else None
    if job is None or job.service != svc.name:
        raise _no_job(job_id)
    return svc, job


def _op_of(request: web.Request, job: Job | None = None) -> str:
    op = request.match_info.get("op")
    if op:
        return _OPS[op.lower()]
    return job.kind if job is not None else EXPORT


async def run_blocking(request: web.Request, fn, *args):
    """Run blocking work in the default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def read_cache(request: web.Request, key: tuple, fn, *args):
    """Run a cache read of the file `key` names on the read threads (tilecrate.server.reads):
    bounded, answered 503 when it takes longer than tile_read_timeout or that file hung before."""
    gate = request.app[READS]
    stuck = gate.stuck
    try:
        return await gate.run(key, fn, *args)
    finally:
        if gate.stuck > stuck:
            log.warning("%s: a cache read took more than %gs; %d read(s) blocked", request.path[:300],
                        gate.timeout, gate.stuck)


def output_listing(request: web.Request, rel: str, path: str) -> dict:
    """`{"folders": [...], "files": [{"name", "url", "size"}]}` of an arcgisoutput folder."""
    from tilecrate.server.auth import listable_job, viewable_output_folder

    url = f"{base_url(request)}{OUTPUT}" + (f"/{quote(rel)}" if rel else "")
    folders, files = [], []
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.is_symlink():
            continue  # temporary names of outputs still being written, and anything not ours
        if entry.is_dir():
            if not rel and not viewable_output_folder(request, entry.name):
                continue  # the folder of a service the caller may not view: its name is not theirs to know
            if rel.count("/") == 0 and rel and not listable_job(request, entry.name):
                continue  # a service folder: job folders are listed to their owner only (auth.py), else never
            folders.append(entry.name)
        elif entry.is_file():
            files.append({"name": entry.name, "url": f"{url}/{quote(entry.name)}", "size": entry.stat().st_size})
    return {"folders": folders, "files": files}


def no_output(request: web.Request, rel: str) -> EsriError:
    """The 404 of an arcgisoutput path that does not exist (or that the caller may not know of)."""
    return EsriError(404, f"no output at {rel[:200]} (outputs are removed after "
                          f"{request.app[CFG].max_file_age:.0f} seconds)", http_status=404)


def _output_path(request: web.Request, rel: str) -> str:
    root = request.app[RUNNER].output_root
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
        raise EsriError(404, f"no output at {rel[:200]}", http_status=404)
    path = os.path.join(root, *parts)
    real, real_root = os.path.realpath(path), os.path.realpath(root)  # the data dir may be a symlink
    if os.path.commonpath([real, real_root]) != real_root:
        raise EsriError(404, f"no output at {rel[:200]}", http_status=404)
    return path


# ------------------------------------------------------------------------------------------
# handlers


async def h_root(request: web.Request) -> web.StreamResponse:
    """`/` -> the services directory."""
    raise web.HTTPFound(f"{ROOT}/services?f=html")


async def h_info(request: web.Request) -> web.Response:
    """`/arcgis/rest/info`: version and how tokens are obtained."""
    from tilecrate.server.auth import auth_info

    obj = {"currentVersion": CURRENT_VERSION, "fullVersion": str(CURRENT_VERSION), "authInfo": auth_info(request)}
    return await reply(request, obj, default="json")


async def h_services(request: web.Request) -> web.Response:
    """The services directory (with users: the services the caller may view)."""
    from tilecrate.server.auth import visible

    names = visible(request, sorted(request.app[SERVICES]))
    obj = {"currentVersion": CURRENT_VERSION, "folders": [],
           "services": [{"name": n, "type": request.app[SERVICES][n].kind} for n in names]}
    kinds = {n: request.app[SERVICES][n].kind for n in names}
    tok = param(await params_of(request), "token")
    return await reply(request, obj, lambda: html.directory_page(ROOT, names, CURRENT_VERSION, kinds, tok))


async def h_service(request: web.Request) -> web.Response:
    """`<name>/MapServer`; its JSON is made at most once a second (clients read it before every map)."""
    svc = _service(request)
    params = _json_only(request)
    f = "json" if params is not None else fmt_of(params := await params_of(request))
    if f == "html":
        preview = await _preview(request, svc)
        return html_response(html.service_page(ROOT, svc.name, svc.root_json(), preview, param(params, "token")))
    cache = request.app[JSON_CACHE]
    key = (svc.name, f)
    now = time.monotonic()
    hit = cache.get(key)
    if hit is None or hit[0] < now:
        resp = json_response(svc.root_json(), f)
        hit = cache[key] = (now + _JSON_TTL, resp.body)
    return _WithCors(body=hit[1], headers=_JSON_CORS)


async def _preview(request: web.Request, svc: Service) -> tuple[int, list[int], list[int]] | None:
    previews = request.app[PREVIEWS]
    if svc.name not in previews:
        previews[svc.name] = await read_cache(request, (svc.name, "preview"), _compute_preview, svc)
    return previews[svc.name]


def _compute_preview(svc: Service) -> tuple[int, list[int], list[int]] | None:
    """The finest level whose tiles fit a 4 x 4 grid (else 4 x 4 tiles of the coarsest level)."""
    best = None
    for lv in svc.cache.levels:
        bounds = svc.cache.tile_range(lv)
        if bounds is None:
            continue
        r0, r1, c0, c1 = bounds
        if best is None or (r1 - r0 < 4 and c1 - c0 < 4):
            best = (lv, list(range(r0, min(r0 + 4, r1 + 1))), list(range(c0, min(c0 + 4, c1 + 1))))
        else:
            break
    return best


async def h_layers(request: web.Request) -> web.Response:
    """`MapServer/layers`."""
    return await reply(request, _service(request).layers_json())


async def h_layer(request: web.Request) -> web.Response:
    """`MapServer/<layerId>`: the cache is layer 0."""
    svc = _service(request)
    layer = _int(request.match_info["layer"], "layer id")
    if layer != 0:
        raise EsriError(400, f"Invalid layer ID: {layer}; this service has one layer, 0", message="Invalid URL")
    return await reply(request, svc.layer_json(0))


async def h_tile(request: web.Request) -> web.StreamResponse:
    """`tile/<level>/<row>/<col>`: the tile's bytes, or 404."""
    svc = _service(request)
    level = _int(request.match_info["level"], "level")
    row = _int(request.match_info["row"], "row")
    col = _int(request.match_info["col"], "column")
    # bytes already in memory or the page cache are answered here; the read threads (and their
    # hop there and back, most of a tile request's cost) only for what would wait for the disk
    found = svc.tile_nowait(level, row, col)
    if found is WOULD_BLOCK:
        found = await read_cache(request, (svc.name, level, row >> 7, col >> 7), svc.tile, level, row, col)
    if found is None:
        raise EsriError(404, f"no tile at level {level}, row {row}, column {col}", message="Tile not found",
                        http_status=404)
    data, ctype = found
    headers = _TILE_HEADERS.get(ctype)
    if headers is None:
        headers = _TILE_HEADERS[ctype] = {"Content-Type": ctype, "Cache-Control": "max-age=3600", **_CORS}
    return _WithCors(body=data, headers=headers)


async def h_tilemap(request: web.Request) -> web.Response:
    """`tilemap/<level>/<row>/<col>/<width>/<height>`."""
    svc = _service(request)
    m = request.match_info
    level, row, col = _int(m["level"], "level"), _int(m["row"], "row"), _int(m["col"], "column")
    width, height = _int(m["width"], "width"), _int(m["height"], "height")
    if not (1 <= width and 1 <= height):
        raise EsriError(400, "width and height must be at least 1")
    key = (svc.name, "tilemap", level, row >> 7, col >> 7)
    params = _json_only(request)
    if params is not None or fmt_of(await params_of(request), "json") == "json":
        body = await read_cache(request, key, request.app[TILEMAPS].body, svc, level, row, col, width, height)
        return _WithCors(body=body, headers=_JSON_CORS)
    obj = await read_cache(request, key, svc.tilemap, level, row, col, width, height)
    return await reply(request, obj, default="json")


async def h_submit(request: web.Request) -> web.StreamResponse:
    """exportTiles / estimateExportTilesSize: admit a job and answer its handle."""
    svc = _service(request)
    kind = _op_of(request)
    params = await params_of(request)
    f = fmt_of(params)
    if not svc.config.export_tiles_allowed:
        raise EsriError(400, f"{kind} is not allowed on {svc.name}/{svc.kind}: the service has "
                             f"exportTilesAllowed=false.", message="Export Tiles operation is not allowed for this service")
    if param(params, "levels") is None and f == "html" and request.method == "GET" and len(params) <= 2:
        # the operation page itself: the form
        info = svc.root_json()
        return html_response(html.service_page(ROOT, svc.name, info, None, param(params, "token")))
    runner = request.app[RUNNER]
    try:
        job = await run_blocking(request, runner.submit, kind, svc.name, params, client_of(request))
    except (RequestError, RecursionError) as e:
        text = str(e) if isinstance(e, RequestError) else "a parameter is nested too deeply to be read"
        raise EsriError(400, text, message="Invalid or missing input parameters.") from None
    except QuotaExceeded as e:  # one client's share: a real 429, so it is not retried as a 5xx
        raise EsriError(429, str(e), message="Too many jobs from this client", headers={"Retry-After": "60"},
                        http_status=429) from None
    except (AdmissionRefused, StoreError) as e:  # a full job store frees itself as jobs expire
        raise EsriError(503, str(e), message="Too many outstanding jobs", headers={"Retry-After": "300"}) from None
    except JobError as e:
        raise EsriError(400, str(e)) from None
    except TilecrateError as e:  # anything else the request made the checks raise: answered, not logged
        raise EsriError(400, str(e), message="Invalid or missing input parameters.") from None
    obj = {"jobId": job.id, "jobStatus": job.status}
    if f == "html":
        tok = param(params, "token")
        tq = f"&token={quote(tok)}" if tok else ""
        raise web.HTTPSeeOther(f"{ROOT}/services/{quote(svc.name)}/{svc.kind}/{kind}/jobs/{job.id}?f=html{tq}")
    return json_response(obj, f)


def _files_of(request: web.Request, job: Job) -> tuple[list[dict], list[str]] | None:
    if job.status != SUCCEEDED or not job.result or "folder" not in job.result:
        return None
    rel = job.result["folder"]
    path = _output_path(request, rel)
    if not os.path.isdir(path):
        return None
    listing = output_listing(request, rel, path)
    return listing["files"], listing["folders"]


async def h_job(request: web.Request) -> web.Response:
    """A job resource at any of its URLs; f=json is the stored JSON as it is (nothing parsed)."""
    params = _json_only(request)
    f = "json" if params is not None else fmt_of(params := await params_of(request))
    job_id = request.match_info["job"]
    if f == "json":
        app = request.app
        svc = _service(request)
        if not app[RUNNER].has_pending_end(job_id):
            body = app[STORE].public_body(job_id, svc.name)  # None for what is not a job id
            if body is None:
                raise _no_job(job_id)
            return _WithCors(body=body, headers=_JSON_CORS)
    svc, job = _job(request)
    job = request.app[RUNNER].get(job.id, inputs=False) or job  # with an end the store could not take yet
    obj = job.to_json()
    if f == "html":
        found = _files_of(request, job) or ([], [])
        estimate = (job.result or {}).get("value") if job.kind == ESTIMATE else None
        folder = (job.result or {}).get("folder") if job.kind == EXPORT else None
        return html_response(html.job_page(ROOT, svc.name, job.kind, obj, found[0], found[1], estimate,
                                           param(params, "token"), kind=svc.kind,
                                           folder_url=f"{OUTPUT}/{quote(folder)}" if folder else None))
    return json_response(obj, fmt_of(params))


h_job.settings_free = True  # type: ignore[attr-defined]


async def h_cancel(request: web.Request) -> web.StreamResponse:
    """`…/jobs/<id>/cancel`."""
    svc, job = _job(request)
    params = await params_of(request)
    f = fmt_of(params)
    try:
        job = await run_blocking(request, request.app[RUNNER].cancel, job.id)
    except JobError as e:
        raise EsriError(400, str(e), message="Invalid or missing input parameters.") from None
    if f == "html":
        tok = param(params, "token")
        tq = f"&token={quote(tok)}" if tok else ""
        raise web.HTTPSeeOther(f"{ROOT}/services/{quote(svc.name)}/{svc.kind}/{job.kind}/jobs/{job.id}?f=html{tq}")
    return json_response({"jobId": job.id, "jobStatus": job.status}, f)


async def h_result(request: web.Request) -> web.Response:
    """`…/jobs/<id>/results/out_service_url`."""
    svc, job = _job(request)
    name = request.match_info["param"]
    if name.lower() != "out_service_url":
        raise EsriError(400, f"this job has no result named {name[:60]!r}; its result is out_service_url",
                        message="Invalid URL")
    if job.status != SUCCEEDED or not job.result:
        raise EsriError(400, f"the job has no results: it is {job.status}", message="Unable to complete operation.")
    if job.kind == ESTIMATE:
        value = job.result["value"]
    else:
        if _files_of(request, job) is None:
            raise EsriError(400, "the output of this job has expired and was removed; submit the job again")
        value = f"{base_url(request)}{OUTPUT}/{quote(job.result['folder'])}"
    return await reply(request, {"paramName": "out_service_url", "dataType": "GPString", "value": value})


async def h_input(request: web.Request) -> web.Response:
    """`…/jobs/<id>/inputs/<name>`."""
    svc, job = _job(request, inputs=True)  # the only route that reads the stored parameters
    name = request.match_info["param"]
    found = job.input_value(name)
    if found is None:
        raise EsriError(400, f"this job has no input named {name[:60]!r}", message="Invalid URL")
    dtype, value = found
    if name.lower() == "service_url":  # `<name>:<type>` with the job's own service type
        value = f"{svc.name}:{svc.kind}"
    if dtype == "GPFeatureRecordSetLayer" and isinstance(value, str):
        try:
            parsed = json.loads(value)
            json.dumps(parsed, allow_nan=False)  # NaN or 1e400 cannot be answered as JSON: keep the text
            value = parsed
        except (ValueError, RecursionError):  # answered as the text it is
            pass
    return await reply(request, {"paramName": name, "dataType": dtype, "value": value})


async def h_output(request: web.Request) -> web.StreamResponse:
    """`directories/arcgisoutput/…`: folder JSON (also without f) or the file, with Range support."""
    rel = request.match_info.get("path", "").strip("/")
    path = _output_path(request, rel)
    if os.path.isdir(path):
        params = await params_of(request)
        listing = output_listing(request, rel, path)
        f = fmt_of(params, default="json")  # the ArcGIS API for Python reads this without f
        if f == "html":
            return html_response(html.folder_page(f"arcgisoutput/{rel}", listing, here=f"{OUTPUT}/{quote(rel)}",
                                                  token=param(params, "token"), home=f"{ROOT}/services?f=html"))
        return json_response(listing, f)
    if not os.path.isfile(path):
        raise no_output(request, rel)
    name = os.path.basename(path)
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream",
                                           "Content-Disposition": f'attachment; filename="{name}"'})


# ------------------------------------------------------------------------------------------
# the application


def add_routes(app: web.Application) -> None:
    """Register every route for GET and POST (and HEAD where GET has no side effect)."""
    ops = "{op:(?i:exportTiles|estimateExportTilesSize)}"
    # the router tries resources in this order: the hot routes (tiles, job status) come first
    routes: list[tuple[str, Handler]] = [(_SVC + "/tile/{level}/{row}/{col}", h_tile)]
    for prefix in (_SVC + "/" + ops + "/jobs/{job}", _SVC + "/jobs/{job}"):
        routes += [(prefix, h_job), (prefix + "/", h_job), (prefix + "/cancel", h_cancel),
                   (prefix + "/results/{param}", h_result), (prefix + "/inputs/{param}", h_input)]
    routes += [
        (_SVC + "/tilemap/{level}/{row}/{col}/{width}/{height}", h_tilemap),
        (_SVC, h_service), (_SVC + "/", h_service),
        ("/", h_root),
        (f"{ROOT}", h_root), (f"{ROOT}/", h_root),
        (f"{ROOT}/info", h_info),
        (f"{ROOT}/services", h_services), (f"{ROOT}/services/", h_services),
        (_SVC + "/layers", h_layers),
        (_SVC + "/{layer:[0-9]+}", h_layer),
        (_SVC + "/" + ops, h_submit), (_SVC + "/" + ops + "/submitJob", h_submit),
    ]
    routes += [(OUTPUT, h_output), (OUTPUT + "/", h_output), (OUTPUT + "/{path:.*}", h_output)]
    from tilecrate.server import image, vector  # they import this module

    shared = {"tile": h_tile, "tilemap": h_tilemap, "submit": h_submit, "job": h_job, "cancel": h_cancel,
              "result": h_result, "input": h_input}
    routes += vector.routes(ROOT, shared) + image.routes(ROOT, shared)
    from tilecrate.server import admin, auth  # users, tokens, the Administrator Directory

    routes += auth.routes() + admin.routes()
    # each configured service's routes first, under its own name: aiohttp's router tries, one after
    # the other, every resource filed under the path's longest literal prefix, and the generic
    # routes all share `/arcgis/rest/services` (a service root request failed a dozen patterns
    # before its own); the generic routes stay, after them, for the names no service has
    # (job status URLs with the operation as clients spell it get their own literal prefix too)
    named = [(_NamedServiceResource(path, {"service": name, **lit}, app[SERVICES]), handler)
             for name in app[CFG].services
             for path, handler in routes if _SERVICE_VAR in path
             for lit in ([{"op": "exportTiles"}, {"op": "estimateExportTilesSize"}, {}]
                         if _OP_VAR + "/jobs/" in path else [{}])]
    named.sort(key=lambda rh: "{" in rh[0].canonical)  # exact paths first, else the table's (hot first) order
    for resource, handler in named:
        app.router.register_resource(resource)
        _add_methods(app, resource, handler)
    for path, handler in routes:
        _add_methods(app, app.router.add_resource(path), handler)
    # last in the router's walk (its literal prefix is "/"): every method, every path no route took
    app.router.add_route("*", "/{_unmatched:.*}", guarded(h_unmatched, app))


_SERVICE_VAR = "/services/{service}/"
_OP_VAR = "{op:(?i:exportTiles|estimateExportTilesSize)}"


class _NamedServiceResource(web.DynamicResource):
    """A `…/services/{service}/…` route matching one service name only (and, where given, one
    spelling of other variables), filed in the router's index under that literal path (the variables
    stay in match_info, as the handlers read them)."""

    def __init__(self, path: str, literals: dict[str, str], services: dict | None = None):
        for var, value in literals.items():
            path = re.sub(r"\{%s(:[^{}]*(\{[^{}]*\}[^{}]*)*)?\}" % var, "{%s:%s}" % (var, re.escape(value)), path,
                          count=1)
        super().__init__(path)
        self.service = literals["service"]
        self.services = services if services is not None else {}  # the app's, filled at start-up
        self.kind = path.split("}/", 1)[1].split("/", 1)[0] if "{service:" in path else ""
        literal = self._formatter
        for var, value in literals.items():
            literal = literal.replace("{%s}" % var, value, 1)
        self._literal = literal
        self._fast = _segments(path, self._formatter, literals, literal)

    def _match(self, path: str) -> dict[str, str] | None:
        # the regular expression, its groupdict and an unquote per variable were a tenth of the
        # router's work on a status poll; the same test by string comparison where the route allows
        fast = self._fast
        if fast is None:
            return super()._match(path)
        prefix, count, fixed, variables, words = fast
        if not path.startswith(prefix):
            return None
        parts = path[len(prefix):].split("/")
        if len(parts) != count:
            return None
        for i, word in words:
            if parts[i] != word:
                return None
        out = fixed.copy()
        for i, name in variables:
            value = parts[i]
            if not value or "{" in value or "}" in value:  # what DynamicResource.GOOD refuses
                return None
            out[name] = value.replace("%2F", "/").replace("%25", "%") if "%" in value else value
        return out

    @property
    def canonical(self) -> str:
        """The path with the literal values in it (the router's index key comes from this)."""
        return self._literal


def _segments(path: str, formatter: str, literals: dict[str, str], literal: str) -> tuple | None:
    """How `_NamedServiceResource._match` compares a path without the regular expression: (literal
    prefix, segment count after it, the literal variables' values, (index, variable) pairs, (index,
    word) pairs), or None where only the expression says it right (a variable with its own pattern,
    text that is not plain ASCII, or percent signs)."""
    own = set(re.findall(r"\{([_a-zA-Z][_a-zA-Z0-9]*):", path)) - set(literals)
    plain = all(v.isascii() and not any(c in v for c in "%/{}") for v in literals.values())
    if own or not plain or not literal.isascii() or "%" in literal:
        return None
    head = literal.partition("{")[0]  # the literal variables' values stand in `literal`
    prefix = head[:head.rfind("/") + 1]
    segments = formatter.split("/")[prefix.count("/"):]
    variables, words = [], []
    for i, seg in enumerate(segments):
        if seg.startswith("{") and seg.endswith("}") and seg[1:-1] not in literals:
            variables.append((i, seg[1:-1]))
        elif seg.startswith("{") and seg.endswith("}"):
            words.append((i, literals[seg[1:-1]]))
        elif "{" in seg or "}" in seg:
            return None  # a variable inside a segment: the expression matches it
        else:
            words.append((i, seg))
    return prefix, len(segments), dict(literals), tuple(variables), tuple(words)


def _add_methods(app: web.Application, resource: web.Resource, handler: Handler) -> None:
    acts = handler in (h_submit, h_cancel) or getattr(handler, "acts", False)
    handler = guarded(handler, app)
    # HEAD comes with GET, except where a GET acts (a link checker's HEAD must not submit or cancel)
    if not acts:
        resource.add_route("HEAD", handler)
    resource.add_route("GET", handler)
    resource.add_route("POST", handler)


def create_app(cfg: ServerConfig, *, process_index: int = 0, site_lock: bool = True) -> web.Application:
    """The application; services, job store and runner are opened on startup and closed on cleanup.

    A multi-process server makes one per front-end process: `process_index` 0 runs expiry cleanup,
    and `site_lock=False` because the parent holds the data dir's lock for all of them.
    """
    # clients put whole areaOfInterest polygons in GET query strings (the ArcGIS API for Python
    # does): accept request lines far beyond aiohttp's 8 KiB default
    body = cfg.limits.max_body_bytes
    from tilecrate.server.admin import install
    from tilecrate.server.auth import site_middleware  # auth imports this module

    global _site_middleware
    _site_middleware = site_middleware
    app = _Application(client_max_size=body,
                          handler_args={"max_line_size": min(MAX_REQUEST_LINE, body) + 8192,
                                        "max_field_size": 65536, "logger": HTTP_LOG})
    app[CFG] = cfg
    app[CONNECTIONS] = ConnectionGuard(cfg.limits.max_connections or default_max_connections(),
                                       cfg.limits.max_connections_per_client)
    app[PROCESS] = (process_index, site_lock)
    app[SERVICES] = {}
    app[PREVIEWS] = {}
    app[JSON_CACHE] = {}
    app[TILEMAPS] = TilemapCache()
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    install(app)  # after _startup: the site settings apply to the services and runner it opens
    add_routes(app)  # after install: each route's guard holds the settings refresh of this app
    return app


async def _startup(app: web.Application) -> None:
    cfg = app[CFG]
    loop = asyncio.get_running_loop()

    def open_all() -> tuple[dict, JobStore, JobRunner]:
        services = {}
        try:
            for name, sc in cfg.services.items():
                services[name] = open_service(sc)
        except BaseException:
            for svc in services.values():
                svc.close()
            raise
        scheduler = None
        if cfg.cluster.scheduler:
            from tilecrate.runners.dask import DaskRunner  # distributed is imported only for a cluster

            scheduler = DaskRunner(cfg.cluster.scheduler, workers=cfg.cluster.workers)
        store = JobStore(cfg.store_dir)
        lim = cfg.limits
        runner = JobRunner(store, {n: JobService(n, s.cache, s.config.max_export_tiles_count, s.kind)
                                   for n, s in services.items()},
                           cfg.output_dir, workers=cfg.workers, max_outstanding=cfg.maximum_outstanding_jobs,
                           max_file_age=cfg.max_file_age, export_threads=cfg.export_threads,
                           quota=Quota(max_jobs_per_client=lim.max_jobs_per_client,
                                       max_outstanding_per_client=lim.max_outstanding_per_client,
                                       max_input_bytes_per_client=lim.max_input_bytes_per_client),
                           budget=Budget(max_input_bytes=lim.max_input_bytes,
                                         seconds=lim.job_seconds or None,
                                         memory_bytes=(lim.job_memory_mb << 20) or None,
                                         geometry=GeometryLimits.from_config(lim.geometry())),
                           scheduler=scheduler,
                           local_temp_folder=cfg.cluster.export_tiles_using_local_temp_folder,
                           site_lock=app[PROCESS][1])
        runner.recover()
        if app[PROCESS][0] == 0:
            runner.cleanup()
        return services, store, runner

    services, store, runner = await loop.run_in_executor(None, open_all)
    app[SERVICES].update(services)
    app[READS] = ReadGate(cfg.limits.tile_read_threads, cfg.limits.tile_read_timeout)
    app[STORE] = store
    app[RUNNER] = runner
    app[CLEANER] = asyncio.create_task(_clean_periodically(app))
    # what start-up made (modules, services, indexes) lives as long as the process: out of the
    # collector's reach, the collections requests trigger walk only what requests made (a
    # generation-2 pass over the whole start-up heap cost ~15 us a request on the status route)
    gc.collect()
    gc.freeze()


async def _clean_periodically(app: web.Application) -> None:
    """Sweep (job ends to record, orphaned jobs, the store's disk reserve) often; expire less often."""
    interval = max(0.5, min(30.0, app[CFG].max_file_age / 4))
    loop = asyncio.get_running_loop()
    next_cleanup = time.monotonic() + interval
    while True:
        await asyncio.sleep(min(interval, _SWEEP_INTERVAL))
        runner = app[RUNNER]
        try:
            _refresh_settings(app)  # applied here too when only status polls (which skip it) arrive
            await loop.run_in_executor(None, runner.sweep)
            _free_stale_readers(app)
            if app[PROCESS][0] == 0 and time.monotonic() >= next_cleanup:  # one process expires jobs
                next_cleanup = time.monotonic() + interval
                removed = await loop.run_in_executor(None, runner.cleanup, time.time())
                if removed:
                    log.info("removed %d expired job(s) and their output", len(removed))
        except TilecrateError as e:
            log.warning("cleanup failed: %s", e)
        except Exception:  # whatever it was, the next pass must still run: outputs must expire
            log.exception("cleanup failed")


def _free_stale_readers(app: web.Application) -> None:
    """Free the site settings' and sign-in counts' LMDB reader slots of processes killed inside a
    read transaction (the job store frees its own on the runner's sweep). Such a slot pins the
    snapshot it read, so the file grows with every write: some 5 500 failed sign-ins then filled the
    counts' 64 MB and every sign-in was refused (503) until all processes restarted."""
    from tilecrate.server.admin import SITE
    from tilecrate.server.auth import LIMITER

    for key in (SITE, LIMITER):
        env = getattr(app.get(key), "env", None)
        if env is not None:
            env.reader_check()


def _refresh_settings(app: web.Application) -> None:
    from tilecrate.server.admin import refresh  # admin imports this module

    if app.get(STORE) is not None:  # started
        refresh(app)


async def _cleanup(app: web.Application) -> None:
    task = app.get(CLEANER)
    if task is not None:
        task.cancel()
    runner = app.get(RUNNER)
    loop = asyncio.get_running_loop()
    if runner is not None:
        await loop.run_in_executor(None, runner.close)
        if runner.scheduler is not None:
            await loop.run_in_executor(None, runner.scheduler.close)
    store = app.get(STORE)
    if store is not None:
        store.close()
    reads = app.get(READS)
    if reads is not None:
        reads.close()  # a read stuck on a file must not hold up the exit (serve exits without it)
    for svc in app[SERVICES].values():
        svc.close()

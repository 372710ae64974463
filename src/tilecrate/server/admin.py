"""The Administrator Directory subset under /arcgis/admin (FORMATS.md §16), JSON and plain HTML forms.

Resources: the site root, `generateToken`, `services` (root folder and the `System` folder),
`services/<name>.<type>` with `edit` (exportTilesAllowed, maxExportTilesCount),
`services/System/CachingControllers.GPServer` with `edit` (maximumOutstandingJobs: -1 unlimited,
0 refuse every job, N at most N outstanding), `system/properties` with `update`
(exportTilesUsingLocalTempFolder). Every resource needs an administrator's token (from here or
from /arcgis/tokens); errors use the Admin shape `{"status":"error","messages":[…],"code":N}`.

Edits are validated whole before anything is written (tilecrate.admin.edits), stored in the site
settings (tilecrate.admin.settings, LMDB) and applied by every front-end process on its next
request (`refresh`, called by each route's guard and by the periodic sweep).
"""
from __future__ import annotations

import asyncio
import json
import os
from html import escape
from typing import Callable
from urllib.parse import quote

from aiohttp import web

from tilecrate.admin import edits
from tilecrate.admin.settings import UNLIMITED, ServiceSettings, SettingsError, SiteSettings, Snapshot
from tilecrate.server import html
from tilecrate.server.app import (CFG, JSON_CACHE, RUNNER, SERVICES, fmt_of, html_response, json_response, param,
                                  params_of)
from tilecrate.server.auth import LIMITER, authenticate, setup, sign_in, token_form
from tilecrate.server.config import SERVICE_TYPES, ServerConfig
from tilecrate.server.errors import EsriError
from tilecrate.server.service import CURRENT_VERSION, Service

ADMIN = "/arcgis/admin"
SITE = web.AppKey("site_settings", SiteSettings)
# [version applied here, the settings' txn id when read, that Snapshot, the SiteSettings once open]
APPLIED = web.AppKey("settings_applied", list)
CACHING = ("CachingControllers", "GPServer")


# ------------------------------------------------------------------------------------------
# settings: seeded from the TOML, applied to this process


def install(app: web.Application) -> None:
    """Open the settings store on startup (after the services and runner), close it on cleanup."""
    app[APPLIED] = [-1, -1, None, None]
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)


def initial_values(cfg: ServerConfig) -> tuple[dict[str, ServiceSettings], dict, int]:
    """The TOML's values of every setting the Directory edits."""
    services = {n: ServiceSettings(bool(s.export_tiles_allowed), int(s.max_export_tiles_count))
                for n, s in cfg.services.items()}
    system = {"exportTilesUsingLocalTempFolder": bool(cfg.cluster.export_tiles_using_local_temp_folder)}
    limit = UNLIMITED if cfg.maximum_outstanding_jobs is None else int(cfg.maximum_outstanding_jobs)
    return services, system, limit


async def _startup(app: web.Application) -> None:
    cfg = app[CFG]

    def open_settings() -> tuple[SiteSettings, bytes]:
        site = SiteSettings(os.path.join(cfg.data_dir, "site.lmdb"))
        try:
            site.seed(*initial_values(cfg))
            return site, site.secret()
        except BaseException:
            site.close()
            raise

    site, secret = await asyncio.get_running_loop().run_in_executor(None, open_settings)
    app[SITE] = site
    setup(app, secret)
    refresh(app)
    app[APPLIED][3] = site


async def _cleanup(app: web.Application) -> None:
    site = app.get(SITE)
    app[APPLIED][3] = None
    if site is not None:
        site.close()
    limiter = app.get(LIMITER)
    if limiter is not None:
        limiter.close()


def refresher(app: web.Application) -> Callable[[], Snapshot | None]:
    """`refresh(app)` for the routes' guards: the settings' transaction id compared, nothing else
    read, while no process has written the settings since they were last applied here."""
    applied = app[APPLIED]

    def fresh() -> Snapshot | None:
        site = applied[3]
        if site is not None and site.env.info()["last_txnid"] == applied[1]:
            return applied[2]
        return refresh(app)
    return fresh


def refresh(app: web.Application) -> Snapshot | None:
    """Apply the stored settings to this process if they changed since last time."""
    site = app.get(SITE)
    if site is None:
        return None
    applied = app[APPLIED]
    # the id of the last commit a read transaction sees now, taken before the snapshot is read: the
    # snapshot is at least that state. (`refresher` compares the environment's last committed id,
    # from its meta page, with it: a writer updates that page before the readers' table, so an id
    # read there could be one the snapshot does not hold yet.)
    with site.env.begin() as txn:
        txnid = txn.id()
    snap = site.snapshot()
    if applied[0] != snap.version:
        _apply(app, snap)
    applied[1], applied[2] = txnid, snap
    return snap


def _apply(app: web.Application, snap: Snapshot) -> None:
    runner = app.get(RUNNER)
    for name, svc in app[SERVICES].items():
        s = snap.services.get(name)
        if s is None:
            continue
        svc.config.export_tiles_allowed = s.export_tiles_allowed
        svc.config.max_export_tiles_count = s.max_export_tiles_count
        job_svc = runner.services.get(name) if runner is not None else None
        if job_svc is not None:
            job_svc.max_export_tiles_count = s.max_export_tiles_count
    if runner is not None:
        limit = snap.maximum_outstanding_jobs
        runner.max_outstanding = None if limit < 0 else limit
        runner.local_temp_folder = snap.local_temp_folder and runner.scheduler is not None
    app[JSON_CACHE].clear()  # service JSON shows exportTilesAllowed and maxExportTilesCount
    app[APPLIED][0] = snap.version


# ------------------------------------------------------------------------------------------
# answers


def _admin_error(request: web.Request, params: dict, err: EsriError) -> web.Response:
    messages = err.details or [err.message]
    obj = {"status": "error", "messages": messages, "code": err.code}
    f = (param(params, "f") or "").strip().lower()
    status = err.http_status(False)
    if f == "html" or (not f and request.method == "GET"):  # the Directory's pages default to HTML
        link = f'<p><a href="{ADMIN}/generateToken?f=html">Sign in</a></p>' if err.code in (498, 499) else ""
        resp = html_response(html.page("Error", html.json_block(obj) + link), status)
    else:
        resp = json_response(obj, "pjson" if f == "pjson" else "json", status)
    resp.headers.update(err.headers)
    return resp


def _admin_route(fn, acts: bool = False):
    async def handler(request: web.Request) -> web.StreamResponse:
        params: dict = {}
        try:
            params = await params_of(request)
            if fn is not h_generate_token:
                _require_admin(request, params)
            return await fn(request, params)
        except edits.EditError as e:
            return _admin_error(request, params, EsriError(400, str(e)))
        except SettingsError as e:  # e.g. a full disk: nothing was written
            return _admin_error(request, params, EsriError(400, f"{e}; nothing was changed"))
        except EsriError as e:
            return _admin_error(request, params, e)
    handler.acts = acts
    handler.__doc__ = fn.__doc__
    return handler


def _require_admin(request: web.Request, params: dict) -> None:
    if not request.app[CFG].users:
        raise EsriError(403, "The Administrator Directory needs an administrator: add a [users.NAME] table "
                             "with role = \"administrator\" to the configuration.")
    who = authenticate(request, params)
    if who is None:
        raise EsriError(499, "Token Required")
    if not who.is_admin:
        raise EsriError(403, "The Administrator Directory needs an administrator's token.")


def _answer(request: web.Request, params: dict, obj: dict, title: str, form: str = "") -> web.Response:
    f = fmt_of(params)
    if f == "html":
        return html_response(html.page(title, html.json_block(obj) + form,
                                       crumbs=[("Home", f"{ADMIN}?f=html{_tq(params)}")]))
    return json_response(obj, f)


def _tq(params: dict) -> str:
    tok = param(params, "token")
    return f"&token={quote(tok)}" if tok else ""


def _edit_form(action: str, field: str, obj: dict, params: dict) -> str:
    tok = param(params, "token")
    hidden = f'<input type="hidden" name="token" value="{escape(tok)}">' if tok else ""
    return (f'<h2>Edit</h2><form method="post" action="{escape(action)}">{hidden}'
            f'<input type="hidden" name="f" value="html">'
            f'<textarea name="{field}" rows="20" cols="100">{escape(json.dumps(obj, indent=2))}</textarea><br>'
            f'<input type="submit" value="Save"></form>')


def _require_post(request: web.Request) -> None:
    if request.method != "POST":
        raise EsriError(405, "this operation takes POST (the Directory's form posts it)", http_status=405)


def _success(request: web.Request, params: dict, back: str) -> web.StreamResponse:
    if fmt_of(params, default="json") == "html":
        raise web.HTTPSeeOther(f"{back}?f=html{_tq(params)}")
    return json_response({"status": "success"}, fmt_of(params, default="json"))


def _site(request: web.Request) -> tuple[SiteSettings, Snapshot]:
    site = request.app[SITE]
    return site, refresh(request.app) or site.snapshot()


# ------------------------------------------------------------------------------------------
# resources


async def h_root(request: web.Request, params: dict) -> web.Response:
    """The site root: which resources this Directory has."""
    obj = {"resources": ["services", "system"], "currentVersion": CURRENT_VERSION,
           "fullVersion": str(CURRENT_VERSION), "isServerLicensed": "true"}
    links = "".join(f'<li><a href="{ADMIN}/{r}?f=html{escape(_tq(params))}">{r}</a></li>'
                    for r in ("services", "system", "generateToken"))
    return _answer(request, params, obj, "Administrator Directory", f"<ul>{links}</ul>")


async def h_generate_token(request: web.Request, params: dict) -> web.Response:
    """`admin/generateToken`: a token for an administrator (form on GET with f=html)."""
    f = fmt_of(params, default="html" if request.method == "GET" else "json")
    if f == "html" and request.method == "GET":
        return html_response(html.page("Generate Token", token_form(f"{ADMIN}/generateToken")))
    obj = await sign_in(request, params, admin=True)
    return html_response(html.page("Token", html.json_block(obj))) if f == "html" else json_response(obj, f)


async def h_services(request: web.Request, params: dict) -> web.Response:
    """The root folder: every service, and the System folder."""
    services = [{"folderName": "/", "serviceName": n, "type": s.kind, "description": s.config.description}
                for n, s in sorted(request.app[SERVICES].items())]
    obj = {"folderName": "/", "description": "Root folder", "webEncrypted": False, "isDefault": False,
           "folders": ["System"],
           "foldersDetail": [{"folderName": "System", "description": "System services", "webEncrypted": False,
                              "isDefault": True}],
           "services": services}
    links = "".join(f'<li><a href="{ADMIN}/services/{quote(s["serviceName"])}.{s["type"]}?f=html'
                    f'{escape(_tq(params))}">{escape(s["serviceName"])}.{s["type"]}</a></li>' for s in services)
    links += f'<li><a href="{ADMIN}/services/System?f=html{escape(_tq(params))}">System/</a></li>'
    return _answer(request, params, obj, "Services", f"<ul>{links}</ul>")


async def h_system_folder(request: web.Request, params: dict) -> web.Response:
    """The System folder: CachingControllers."""
    obj = {"folderName": "System", "description": "System services",
           "services": [{"folderName": "System", "serviceName": CACHING[0], "type": CACHING[1],
                         "description": "Export tiles jobs"}]}
    link = f'<ul><li><a href="{ADMIN}/services/System/CachingControllers.GPServer?f=html{escape(_tq(params))}">' \
           f'CachingControllers.GPServer</a></li></ul>'
    return _answer(request, params, obj, "System", link)


def _named_service(request: web.Request) -> Service:
    text = request.match_info["svc"]
    name, _, kind = text.rpartition(".")
    svc = request.app[SERVICES].get(name)
    if svc is None or kind not in SERVICE_TYPES or svc.kind != kind:
        raise EsriError(404, f"Service '{text[:120]}' does not exist.")
    return svc


def service_json(svc: Service, settings: ServiceSettings) -> dict:
    """The admin service definition (properties as strings, as ArcGIS writes them)."""
    return {"serviceName": svc.name, "type": svc.kind, "description": svc.config.description,
            "capabilities": "Map,TilesOnly" if svc.kind == "MapServer" else "TilesOnly", "provider": "tilecrate",
            "clusterName": "default", "configuredState": "STARTED", "private": False, "isDefault": False,
            "properties": {"exportTilesAllowed": "true" if settings.export_tiles_allowed else "false",
                           "maxExportTilesCount": str(settings.max_export_tiles_count),
                           "isCached": "true", "cacheOnDemand": "false",
                           "virtualOutputDir": "/rest/directories/arcgisoutput"},
            "extensions": [], "datasets": []}


def _settings_of(snap: Snapshot, svc: Service) -> ServiceSettings:
    return snap.services.get(svc.name) or ServiceSettings(bool(svc.config.export_tiles_allowed),
                                                          int(svc.config.max_export_tiles_count))


async def h_service(request: web.Request, params: dict) -> web.Response:
    """`services/<name>.<type>`: the service definition."""
    svc = _named_service(request)
    _, snap = _site(request)
    obj = service_json(svc, _settings_of(snap, svc))
    return _answer(request, params, obj, f"{svc.name}.{svc.kind}",
                   _edit_form(f"{ADMIN}/services/{quote(svc.name)}.{svc.kind}/edit", "service", obj, params))


def _no_async(params: dict) -> None:
    if (param(params, "runAsync") or "").strip().lower() == "true":
        raise EsriError(400, "runAsync=true is not supported: tilecrate applies an edit at once; send it without runAsync")


async def h_service_edit(request: web.Request, params: dict) -> web.StreamResponse:
    """`services/<name>.<type>/edit`: exportTilesAllowed and maxExportTilesCount from the `service` JSON."""
    _require_post(request)
    svc = _named_service(request)
    _no_async(params)
    new = edits.service_edit(param(params, "service"), svc.name, svc.kind)
    site, _ = _site(request)
    await asyncio.get_running_loop().run_in_executor(None, site.set_service, svc.name, new)
    refresh(request.app)
    return _success(request, params, f"{ADMIN}/services/{quote(svc.name)}.{svc.kind}")


def caching_json(snap: Snapshot) -> dict:
    """The CachingControllers definition with maximumOutstandingJobs."""
    return {"serviceName": CACHING[0], "type": CACHING[1], "description": "Export tiles jobs",
            "provider": "tilecrate", "clusterName": "default", "configuredState": "STARTED",
            "properties": {"executionType": "Asynchronous", "maximumOutstandingJobs": str(snap.maximum_outstanding_jobs),
                           "virtualOutputDir": "/rest/directories/arcgisoutput"},
            "extensions": [], "datasets": []}


async def h_caching(request: web.Request, params: dict) -> web.Response:
    """`services/System/CachingControllers.GPServer`."""
    _, snap = _site(request)
    obj = caching_json(snap)
    return _answer(request, params, obj, "CachingControllers.GPServer",
                   _edit_form(f"{ADMIN}/services/System/CachingControllers.GPServer/edit", "service", obj, params))


async def h_caching_edit(request: web.Request, params: dict) -> web.StreamResponse:
    """`…/CachingControllers.GPServer/edit`: maximumOutstandingJobs."""
    _require_post(request)
    _no_async(params)
    limit = edits.caching_edit(param(params, "service"))
    site, _ = _site(request)
    await asyncio.get_running_loop().run_in_executor(None, site.set_maximum_outstanding_jobs, limit)
    refresh(request.app)
    return _success(request, params, f"{ADMIN}/services/System/CachingControllers.GPServer")


async def h_system(request: web.Request, params: dict) -> web.Response:
    """`system`: its resources."""
    link = f'<ul><li><a href="{ADMIN}/system/properties?f=html{escape(_tq(params))}">properties</a></li></ul>'
    return _answer(request, params, {"resources": ["properties"]}, "System", link)


async def h_properties(request: web.Request, params: dict) -> web.Response:
    """`system/properties`."""
    _, snap = _site(request)
    obj = dict(snap.system)
    return _answer(request, params, obj, "Server Properties",
                   _edit_form(f"{ADMIN}/system/properties/update", "properties", obj, params))


async def h_properties_update(request: web.Request, params: dict) -> web.StreamResponse:
    """`system/properties/update`: replaces every property with the `properties` JSON."""
    _require_post(request)
    props = edits.system_update(param(params, "properties"), request.app[CFG].cluster.scheduler is not None)
    site, _ = _site(request)
    await asyncio.get_running_loop().run_in_executor(None, site.set_system, props)
    refresh(request.app)
    return _success(request, params, f"{ADMIN}/system/properties")


def routes() -> list[tuple[str, object]]:
    """(path, handler) of every Directory route."""
    acting = {h_service_edit, h_caching_edit, h_properties_update, h_generate_token}
    table = [
        (ADMIN, h_root), (ADMIN + "/", h_root),
        (ADMIN + "/generateToken", h_generate_token),
        (ADMIN + "/services", h_services), (ADMIN + "/services/", h_services),
        (ADMIN + "/services/System", h_system_folder), (ADMIN + "/services/System/", h_system_folder),
        (ADMIN + "/services/System/CachingControllers.GPServer", h_caching),
        (ADMIN + "/services/System/CachingControllers.GPServer/edit", h_caching_edit),
        (ADMIN + "/services/{svc:[^/]+}", h_service),
        (ADMIN + "/services/{svc:[^/]+}/edit", h_service_edit),
        (ADMIN + "/system", h_system), (ADMIN + "/system/", h_system),
        (ADMIN + "/system/properties", h_properties), (ADMIN + "/system/properties/", h_properties),
        (ADMIN + "/system/properties/update", h_properties_update),
    ]
    return [(path, _admin_route(fn, acts=fn in acting)) for path, fn in table]

"""Sign-in and who may do what: the token service, the site middleware, job ownership, sign-in limits.

With `[users.NAME]` configured, every request under /arcgis/rest is answered for a principal: a user
signed in with a token from `/arcgis/tokens/generateToken` (HMAC-signed, expiring; presented as an
`X-Esri-Authorization: Bearer` header or a `token` parameter, FORMATS.md §17.3), the holder of the
shared `[server] token` (everything, as before users existed), or nobody (only what a service's
`view`/`export` lists open with "*"). A bad or expired token is 498, a missing one where one is
needed 499, a signed-in user without the right 403 (Esri error JSON; tiles get real HTTP statuses).
Jobs belong to who submitted them: other users get ArcGIS's "job does not exist" answer.

The middleware also applies the site settings the Administrator Directory edits (server/admin.py):
one LMDB read of their version per request, a re-read only when it moved.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time

from aiohttp import web

from tilecrate.admin.limiter import LimiterError, SharedFailureLimiter
from tilecrate.admin.passwords import dummy_verify, verify_password
from tilecrate.admin.tokens import TokenInvalid, TokenSigner, binding_matches
from tilecrate.admin.users import Principal, User, permitted
from tilecrate.jobs.model import is_job_id
from tilecrate.jobs.runner import service_of_folder
from tilecrate.server import html
from tilecrate.server.app import (CFG, OUTPUT, ROOT, SERVICES, STORE, base_url, fmt_of, html_response, json_response,
                                  no_output, param, params_of, token_of)
from tilecrate.server.errors import EsriError
from tilecrate.server.config import ServerConfig

log = logging.getLogger("tilecrate.server")

TOKENS = "/arcgis/tokens"
PRINCIPAL = "tc_principal"  # request key: the Principal, or None for a request without a token
SIGNER = web.AppKey("signer", TokenSigner)
LIMITER = web.AppKey("signin_limiter", SharedFailureLimiter)
KDF_GATE = web.AppKey("kdf_gate", list)  # [asyncio.Semaphore, waiting count]
_KDF_CONCURRENCY = 2     # password hashes computed at once (each ~16 MiB, ~50 ms)
_KDF_QUEUE = 32          # sign-ins waiting beyond this are refused at once (503)
_MAX_NAME = 200
_OPEN_PATHS = (ROOT + "/info", ROOT + "/info/")
_SHARED = Principal("", "shared", shared=True)


def users_configured(request: web.Request) -> bool:
    """Whether the site has users (token-based security)."""
    return bool(request.app[CFG].users)


def auth_info(request: web.Request) -> dict:
    """`authInfo` of /arcgis/rest/info (FORMATS.md §17.1): the token service when users exist."""
    cfg = request.app[CFG]
    if cfg.users:
        return {"isTokenBasedSecurity": True, "tokenServicesUrl": f"{base_url(request)}{TOKENS}/",
                "shortLivedTokenValidity": cfg.auth.token_expiration}
    return {"isTokenBasedSecurity": cfg.token is not None}


def authenticate(request: web.Request, params: dict[str, str]) -> Principal | None:
    """The principal a request's token names; None without a token; EsriError 498 for a bad one."""
    sent = token_of(params, request)
    if not sent:
        return None
    cfg = request.app[CFG]
    raw = sent.encode("utf-8", "surrogatepass")
    if cfg.token is not None and hmac.compare_digest(raw, cfg.token.encode()):
        return _SHARED
    signer = request.app.get(SIGNER)
    if signer is None:
        raise EsriError(498, "The token is not valid.")
    try:
        claims = signer.verify(sent)
    except TokenInvalid as e:
        raise EsriError(498, f"The token is not valid ({e}); sign in again.") from None
    user: User | None = cfg.users.get(claims.user)
    if user is None or not hmac.compare_digest(claims.fingerprint, signer.fingerprint(user.name, user.password_hash)):
        raise EsriError(498, "The token is not valid (its user or password changed); sign in again.")
    if not binding_matches(claims.binding, request.headers.get("Referer"), request.remote):
        raise EsriError(498, "The token is not valid from this client (it was issued for another "
                             "referer or address).")
    return Principal(user.name, user.role)


def visible(request: web.Request, names: list[str]) -> list[str]:
    """The services this request's principal may view (all of them without users)."""
    if not request.app[CFG].users:
        return names
    who = request.get(PRINCIPAL)
    services = request.app[SERVICES]
    return [n for n in names if permitted(who, services[n].config.view)]


def listable_job(request: web.Request, name: str) -> bool:
    """Whether a job folder appears in this request's arcgisoutput listing: with users, to its
    signed-in owner and to administrators; otherwise (and to anonymous callers) never."""
    who = request.get(PRINCIPAL)
    if not request.app[CFG].users or who is None or not is_job_id(name):
        return False
    if who.sees_all_jobs:
        return True
    job = request.app[STORE].get(name, inputs=False)
    return job is not None and job.client == who.client


def viewable_output_folder(request: web.Request, name: str) -> bool:
    """Whether an arcgisoutput service folder (`<service>_MapServer`, `_VectorTileServer`,
    `_ImageServer`) is named to this request: with users, only to who may view that service
    (administrators: every folder)."""
    if not request.app[CFG].users:
        return True
    who = request.get(PRINCIPAL)
    if who is not None and who.sees_all_jobs:
        return True
    found = service_of_folder(name)
    # by name whatever the type: a folder written before the service's type changed is still its own
    svc = request.app[SERVICES].get(found[0]) if found is not None else None
    return svc is not None and permitted(who, svc.config.view)


def owner_key(request: web.Request) -> str:
    """Who a job submitted by this request belongs to: `user:NAME`, "token", or the address."""
    who = request.get(PRINCIPAL)
    return who.client if who is not None else (request.remote or "")


def _not_found(job_id: str) -> EsriError:
    return EsriError(400, f"Job '{job_id[:60]}' does not exist or is inaccessible.", message="Invalid URL")


def _check_job(request: web.Request, job_id: str) -> None:
    who = request.get(PRINCIPAL)
    if who is not None and who.sees_all_jobs:
        return
    job = request.app[STORE].get(job_id, inputs=False) if is_job_id(job_id) else None
    if job is not None and job.client != owner_key(request):
        raise _not_found(job_id)  # the same answer as for an id that never existed


def _check_output(request: web.Request) -> None:
    who = request.get(PRINCIPAL)
    if who is not None and who.sees_all_jobs:
        return
    rel = request.match_info.get("path", "").strip("/")
    parts = [p for p in rel.split("/") if p]
    if parts and not viewable_output_folder(request, parts[0]):
        if who is None:  # told to sign in, as for any folder (one that never existed too)
            raise _denied(None, "Downloading an export")
        raise no_output(request, rel)  # what a folder that never existed answers
    if len(parts) < 2:
        return  # the root and service folders list no job folders
    job = request.app[STORE].get(parts[1], inputs=False) if is_job_id(parts[1]) else None
    if job is None or job.client != owner_key(request):
        if who is None:  # a client that did not sign in is told to (401 on a download)
            raise _denied(None, "Downloading an export")
        raise EsriError(404, f"no output at {'/'.join(parts)[:200]}", http_status=404)


def _denied(who: Principal | None, what: str, act: str = "") -> EsriError:
    """499 naming `what` needs a token; for a signed-in user, 403 "NAME may not `act`"."""
    if who is None:
        return EsriError(499, f"{what} needs a token: sign in at {TOKENS}/generateToken and pass token=... or "
                              f"an X-Esri-Authorization: Bearer header.")
    return EsriError(403, f"{who.name} may not {act or what[:1].lower() + what[1:]}.")


@web.middleware
async def site_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Settings refresh, then (with users) the principal, service permissions and job ownership."""
    from tilecrate.server.admin import refresh  # admin imports this module

    refresh(request.app)
    cfg = request.app[CFG]
    path = request.path
    if not cfg.users or not path.startswith(ROOT + "/") or path in _OPEN_PATHS:
        return await handler(request)
    params = await params_of(request)
    who = authenticate(request, params)
    request[PRINCIPAL] = who
    m = request.match_info
    name = m.get("service")
    if name is not None:
        svc = request.app[SERVICES].get(name)
        if svc is not None:
            if not permitted(who, svc.config.view):
                raise _denied(who, f"Viewing service {name[:100]}", f"view service {name[:100]}")
            if "op" in m and "job" not in m and not permitted(who, svc.config.export):
                raise _denied(who, f"Exporting tiles from service {name[:100]}",
                              f"export tiles from service {name[:100]}")
        if "job" in m:
            _check_job(request, m["job"])
    elif path.startswith(OUTPUT):
        _check_output(request)
    return await handler(request)


# ------------------------------------------------------------------------------------------
# the token service


def _expiration(params: dict[str, str], cfg: ServerConfig) -> int:
    text = param(params, "expiration")
    if text is None:
        return cfg.auth.token_expiration
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) < 1:
        raise EsriError(400, f"expiration must be a whole number of minutes, 1 or more, not {text[:30]!r}",
                        message="Unable to generate token.")
    return min(int(text), cfg.auth.max_token_expiration)  # longer asks get the server's maximum


def _binding(params: dict[str, str], request: web.Request) -> tuple[str, str] | None:
    client = (param(params, "client") or "").strip().lower()
    if not client:
        return None  # the JS API sends none for server tokens (FORMATS.md §17.2)
    if client in ("referer", "referrer"):
        value = param(params, "referer") or param(params, "referrer")
        if value is None:
            raise EsriError(400, "client=referer needs a referer parameter", message="Unable to generate token.")
        value = value.strip()
        if len(value) > 500 or not value.isascii():  # a URL; the token must stay under MAX_TOKEN_CHARS
            raise EsriError(400, "referer must be a URL of at most 500 ASCII characters",
                            message="Unable to generate token.")
        return ("referer", value)
    if client == "ip":
        value = param(params, "ip")
        if value is None:
            raise EsriError(400, "client=ip needs an ip parameter", message="Unable to generate token.")
        return ("ip", value.strip()[:100])
    if client == "requestip":
        return ("ip", request.remote or "")
    raise EsriError(400, f"client must be referer, ip or requestip, not {client[:30]!r}",
                    message="Unable to generate token.")


async def sign_in(request: web.Request, params: dict[str, str], *, admin: bool = False) -> dict:
    """Check the user name and password (rate limited) and issue a token: {"token", "expires", "ssl"}."""
    cfg = request.app[CFG]
    if not cfg.users:
        raise EsriError(400, "this server has no users: token sign-in is not configured ([users.NAME] in "
                             "the configuration)", message="Unable to generate token.")
    if request.method != "POST":
        raise EsriError(405, "generateToken takes POST only (credentials in a URL end up in logs)",
                        message="Unable to generate token.", http_status=405)
    username = (param(params, "username") or "")[:_MAX_NAME]
    password = param(params, "password") or ""
    if not username or not password:
        raise EsriError(400, "username and password are required", message="Unable to generate token.")
    minutes = _expiration(params, cfg)
    binding = _binding(params, request)
    limiter = request.app[LIMITER]
    keys = [f"u\0{username}", f"a\0{request.remote or ''}"]
    # counted as a failure before the (slow) check: a burst sent at once gets no more guesses than
    # max_failed_signins, as the same guesses sent one after another would
    try:
        wait, stamp = limiter.attempt(keys)
    except LimiterError as e:  # no count, no check: a guess must not pass uncounted
        raise EsriError(503, f"Sign-in is unavailable: {e}", message="Unable to generate token.",
                        headers={"Retry-After": "60"}) from None
    if wait:
        raise EsriError(429, f"Too many failed sign-ins for this user or from this address; try again in "
                             f"{wait} seconds.", message="Unable to generate token.", headers={"Retry-After": str(wait)})
    user = cfg.users.get(username)
    try:
        ok = await _verify(request, user, password)
    except BaseException:  # not checked (too many at once, cancelled): not a failure
        _forgive(limiter, keys, stamp)
        raise
    if not ok:
        raise EsriError(400, "Invalid username or password.", message="Unable to generate token.")
    _forgive(limiter, keys, stamp, succeeded=True)
    if admin and user.role != "administrator":
        raise EsriError(403, f"{username} is not an administrator.", message="Unable to generate token.")
    signer = request.app[SIGNER]
    expires = int(time.time() * 1000) + minutes * 60000
    token = signer.issue(user.name, signer.fingerprint(user.name, user.password_hash), expires, binding)
    return {"token": token, "expires": expires, "ssl": False}


def _forgive(limiter: SharedFailureLimiter, keys: list[str], stamp: float, succeeded: bool = False) -> None:
    try:
        limiter.forgive(keys, stamp)
        if succeeded:
            limiter.succeed(keys[:1])
    except LimiterError as e:  # the attempt stays counted: it errs on the side of fewer guesses
        log.warning("%s", e)


async def _verify(request: web.Request, user: User | None, password: str) -> bool:
    gate = request.app[KDF_GATE]
    if gate[1] >= _KDF_QUEUE:
        raise EsriError(503, "Too many sign-ins at once; try again in a few seconds.",
                        message="Unable to generate token.", headers={"Retry-After": "5"})
    gate[1] += 1
    try:
        async with gate[0]:
            loop = asyncio.get_running_loop()
            if user is None:
                return await loop.run_in_executor(None, dummy_verify, password)
            return await loop.run_in_executor(None, verify_password, password, user.password_hash)
    finally:
        gate[1] -= 1


async def h_generate_token(request: web.Request) -> web.Response:
    """`/arcgis/tokens[/generateToken]`: a form on GET with f=html, a token on POST."""
    params = await params_of(request)
    f = fmt_of(params, default="html" if request.method == "GET" else "json")
    if f == "html" and request.method == "GET":
        return html_response(html.page("Generate Token", token_form(f"{TOKENS}/generateToken")))
    obj = await sign_in(request, params)
    if f == "html":
        return html_response(html.page("Generate Token", html.json_block(obj)))
    return json_response(obj, f)


h_generate_token.acts = True  # a HEAD must not sign in


def token_form(action: str) -> str:
    """The plain HTML sign-in form of a generateToken page."""
    rows = "".join(f'<tr><td>{label}</td><td><input name="{name}" type="{kind}"></td></tr>'
                   for label, name, kind in (("Username", "username", "text"), ("Password", "password", "password"),
                                             ("Referer (client=referer)", "referer", "text"),
                                             ("Expiration (minutes)", "expiration", "text")))
    return (f'<form method="post" action="{action}"><table>{rows}<tr><td>Client</td><td><select name="client">'
            f'<option value="">none</option><option value="referer">referer</option>'
            f'<option value="requestip">requestip</option></select></td></tr>'
            f'<tr><td>Format</td><td><select name="f"><option>html</option><option>json</option><option>pjson</option>'
            f'</select></td></tr></table><input type="submit" value="Generate Token"></form>')


def routes() -> list[tuple[str, object]]:
    """The token service's routes."""
    return [(TOKENS, h_generate_token), (TOKENS + "/", h_generate_token), (TOKENS + "/generateToken", h_generate_token)]


def setup(app: web.Application, secret: bytes) -> None:
    """Per-process sign-in state (called on startup with the store's secret)."""
    cfg = app[CFG]
    app[SIGNER] = TokenSigner(secret)
    app[KDF_GATE] = [asyncio.Semaphore(_KDF_CONCURRENCY), 0]
    if not cfg.users:
        return  # nobody signs in: no counts to keep
    # one count for every front-end process of the data dir (else N processes allow N times the guesses)
    app[LIMITER] = SharedFailureLimiter(os.path.join(cfg.data_dir, "signins.lmdb"), cfg.auth.max_failed_signins,
                                        cfg.auth.signin_window)


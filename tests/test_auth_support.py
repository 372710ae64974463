"""Helpers for the users/tokens/admin tests: a config with [users.NAME] tables, sign-in, admin edits.
No tests live here."""
from __future__ import annotations

import json
from pathlib import Path

from test_server_support import Reply, Server, write_config

from tilecrate.admin.passwords import hash_password

PASSWORDS = {"admin": "admin-pass", "alice": "alice-pass", "bob": "bob-pass"}
ROLES = {"admin": "administrator", "alice": "user", "bob": "publisher"}
# cheap hashes (scrypt N=2^10): the server reads the parameters from the hash, tests stay fast
_HASHES = {name: hash_password(pw, log_n=10) for name, pw in PASSWORDS.items()}


def secured_config(path: Path, data: Path, services: dict, auth: dict | None = None, extra: str = "",
                   **server) -> Path:
    """write_config plus [auth] and a [users.NAME] table per user of PASSWORDS."""
    write_config(path, data, services, **server)
    text = path.read_text()
    if auth:
        text += "\n[auth]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in auth.items())
    for name in PASSWORDS:
        text += f'\n[users.{name}]\npassword_hash = "{_HASHES[name]}"\nrole = "{ROLES[name]}"\n'
    path.write_text(text + extra)
    return path


def sign_in(srv: Server, user: str, url: str | None = None, **extra) -> str:
    """POST username/password to the token service (as the JS API does); the token."""
    r = srv.post(url or "/arcgis/tokens/generateToken",
                 {"username": user, "password": PASSWORDS[user], "f": "json", **extra})
    body = r.json()
    assert r.status == 200 and "token" in body, body
    return body["token"]


def bearer(token: str) -> dict:
    """The header the ArcGIS API for Python sends."""
    return {"X-Esri-Authorization": f"Bearer {token}"}


def admin_get(srv: Server, path: str, token: str | None) -> Reply:
    """GET an admin resource with f=json (and the token as a header)."""
    return srv.get(f"/arcgis/admin/{path}", {"f": "json"}, headers=bearer(token) if token else None)


def admin_post(srv: Server, path: str, token: str | None, **fields) -> dict:
    """POST an admin operation as the Directory does: form fields, f=json, token as a form field."""
    data = {"f": "json", **fields}
    if token:
        data["token"] = token
    r = srv.post(f"/arcgis/admin/{path}", data)
    assert r.status == 200, (r.status, r.body[:300])
    return r.json()

"""Services Directory style pages (f=html): directory, service, forms, job and folder pages."""
from __future__ import annotations

import json
from html import escape
from urllib.parse import quote

_STYLE = """body{font:14px/1.4 sans-serif;margin:1em 2em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.4em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.crumbs{background:#eef;padding:4px 8px}pre{background:#f6f6f6;padding:8px;overflow:auto}
.preview img{width:128px;height:128px;display:block}.preview td{padding:0;border:0}
form td{border:0}.msg-esriJobMessageTypeError{color:#b00}.msg-esriJobMessageTypeWarning{color:#a60}"""


def page(title: str, body: str, *, crumbs: list[tuple[str, str]] = (), refresh: int | None = None) -> str:
    """A whole HTML document."""
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    trail = " &gt; ".join(f'<a href="{escape(url)}">{escape(name)}</a>' for name, url in crumbs)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{meta}<title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><div class=\"crumbs\">{trail}</div>"
            f"<h1>{escape(title)}</h1>{body}<p><small>tilecrate</small></p></body></html>")


def json_block(obj: object) -> str:
    """An object shown as pretty JSON."""
    return f"<pre>{escape(json.dumps(obj, indent=2))}</pre>"


def directory_page(root: str, services: list[str], version: float, kinds: dict[str, str] | None = None,
                   token: str | None = None) -> str:
    """The services directory (`kinds`: service type by name, MapServer when absent)."""
    kinds = kinds or {}
    items = ""
    for n in services:
        kind = kinds.get(n, "MapServer")
        url = with_token(f"{root}/services/{quote(n)}/{kind}?f=html", token)
        items += f'<li><a href="{escape(url)}">{escape(n)}</a> ({kind})</li>'
    body = f"<p>Current version: {version}</p><h2>Services</h2><ul>{items or '<li>none</li>'}</ul>"
    return page("Folder: /", body, crumbs=[("Home", with_token(f"{root}/services?f=html", token))])


def service_page(root: str, name: str, info: dict, preview: tuple[int, list[int], list[int]] | None,
                 token: str | None) -> str:
    """A MapServer page: properties, tiling scheme, a tile preview and the export forms."""
    base = f"{root}/services/{quote(name)}/MapServer"
    ti = info["tileInfo"]
    rows = [("Single fused map cache", info["singleFusedMapCache"]),
            ("Tile size", f'{ti["cols"]} x {ti["rows"]} px, {ti["dpi"]} dpi'),
            ("Format", f'{ti.get("format")} (compression quality {ti.get("compressionQuality")})'),
            ("Storage", info["storageInfo"]["storageFormat"]),
            ("Origin", f'{ti["origin"]["x"]}, {ti["origin"]["y"]}'),
            ("Spatial reference", json.dumps(info["spatialReference"])),
            ("Full extent", json.dumps(info.get("fullExtent"))),
            ("Export tiles allowed", info["exportTilesAllowed"]),
            ("Max export tiles count", info["maxExportTilesCount"]),
            ("Capabilities", info["capabilities"])]
    props = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    lods = "".join(f"<tr><td>{lod['level']}</td><td>{lod['resolution']}</td><td>{lod['scale']}</td></tr>"
                   for lod in ti["lods"])
    body = f"<p><a href=\"{escape(with_token(base + '?f=pjson', token))}\">JSON</a></p><table>{props}</table>"
    if preview is not None:
        level, prow, pcol = preview
        def img(r: int, c: int) -> str:
            src = escape(with_token(f"{base}/tile/{level}/{r}/{c}", token))
            return f'<td><img alt="" loading="lazy" src="{src}"></td>'
        cells = "".join("<tr>" + "".join(img(r, c) for c in pcol) + "</tr>" for r in prow)
        body += f"<h2>Preview (level {level})</h2><table class=\"preview\">{cells}</table>"
    body += f"<h2>Levels of detail</h2><table><tr><th>level</th><th>resolution</th><th>scale</th></tr>{lods}</table>"
    body += "<h2>Operations</h2>" + _form(base, "exportTiles", token) + _form(base, "estimateExportTilesSize", token)
    return page(f"{name} (MapServer)", body, crumbs=[("Home", with_token(f"{root}/services?f=html", token)),
                                                      (name, with_token(f"{base}?f=html", token))])


def _form(base: str, op: str, token: str | None) -> str:
    export = op == "exportTiles"
    hidden = f'<input type="hidden" name="token" value="{escape(token)}">' if token else ""
    extra = ""
    if export:
        extra = ('<tr><td>storageFormatType</td><td><select name="storageFormatType">'
                 '<option>esriMapCacheStorageModeCompactV2</option><option>esriMapCacheStorageModeCompact</option>'
                 '</select></td></tr>'
                 '<tr><td>optimizeTilesForSize</td><td><select name="optimizeTilesForSize"><option>false</option>'
                 '<option>true</option></select></td></tr>'
                 '<tr><td>compressionQuality</td><td><input name="compressionQuality" size="5"></td></tr>')
    return (f'<h3>{op}</h3><form method="get" action="{base}/{op}"><input type="hidden" name="f" value="html">'
            f'{hidden}<table>'
            '<tr><td>levels</td><td><input name="levels" value="0-2"></td></tr>'
            '<tr><td>exportBy</td><td><select name="exportBy"><option>LevelID</option><option>Scale</option>'
            '<option>Resolution</option></select></td></tr>'
            '<tr><td>exportExtent</td><td><input name="exportExtent" size="60" value="DEFAULT"></td></tr>'
            '<tr><td>areaOfInterest</td><td><textarea name="areaOfInterest" rows="3" cols="60"></textarea></td></tr>'
            f'<tr><td>tilePackage</td><td><select name="tilePackage"><option>{"true" if export else "false"}</option>'
            f'<option>{"false" if export else "true"}</option></select></td></tr>{extra}'
            f'</table><input type="submit" value="{op}"></form>')


def with_token(url: str, token: str | None) -> str:
    """`url` with `token=` added: a page reached with ?token= keeps working link by link (the token is
    already in that page's own URL, so the link shows nothing new; JSON answers never carry one)."""
    if not token:
        return url
    return f"{url}{'&' if '?' in url else '?'}token={quote(token, safe='')}"


def job_page(root: str, service: str, op: str, job: dict, files: list[dict] | None, folders: list[str] | None,
             estimate: dict | None, token: str | None, *, kind: str = "MapServer",
             folder_url: str | None = None) -> str:
    """A job: status, progress, messages; refreshes itself until the job has finished.

    `kind` is the service's type (every link stays under it); `folder_url` is the job's output
    folder, which the cache folders of a tilePackage=false export are linked under."""
    base = f"{root}/services/{quote(service)}/{kind}"
    status = job["jobStatus"]
    done = status in ("esriJobSucceeded", "esriJobFailed", "esriJobCancelled")
    job_url = f"{base}/{op}/jobs/{quote(job['jobId'])}"
    body = f"<p>Job <b>{escape(job['jobId'])}</b>: <b>{escape(status)}</b></p>"
    if job.get("progress"):
        p = job["progress"]
        body += f"<p>{escape(str(p.get('message', '')))} ({p.get('percent', 0)}%)</p>"
    if estimate is not None:
        body += (f"<p>Tiles to export: <b>{estimate['totalTilesToExport']}</b>, "
                 f"estimated size: <b>{estimate['totalSize']}</b> bytes</p>")
    for f in files or []:
        body += (f'<p>Download: <a href="{escape(with_token(f["url"], token))}">{escape(f["name"])}</a> '
                 f'({f.get("size", 0)} bytes)</p>')
    for name in folders or []:
        if folder_url:
            link = escape(with_token(f"{folder_url}/{quote(name)}?f=html", token))
            body += f'<p>Cache folder: <a href="{link}">{escape(name)}</a></p>'
        else:
            body += f"<p>Cache folder: {escape(name)}</p>"
    if not done:
        body += (f'<form method="post" action="{escape(with_token(job_url + "/cancel?f=html", token))}">'
                 '<input type="submit" value="Cancel"></form>')
    msgs = "".join(f'<li class="msg-{escape(m["type"])}">{escape(m["description"])}</li>' for m in job["messages"])
    body += f"<h2>Messages</h2><ul>{msgs}</ul>"
    body += f'<p><a href="{escape(with_token(job_url + "?f=pjson", token))}">JSON</a></p>'
    return page(f"{op} job", body, refresh=None if done else 2,
                crumbs=[("Home", with_token(f"{root}/services?f=html", token)),
                        (service, with_token(f"{base}?f=html", token))])


def folder_page(title: str, listing: dict, *, here: str | None = None, token: str | None = None,
                home: str | None = None) -> str:
    """An arcgisoutput folder: its files (downloads) and sub-folders (`here`: this folder's URL)."""
    items = "".join(f'<li><a href="{escape(with_token(f["url"], token))}">{escape(f["name"])}</a> '
                    f'({f["size"]} bytes)</li>' for f in listing.get("files", []))
    for name in listing.get("folders", []):
        if here is not None:
            link = escape(with_token(f"{here.rstrip('/')}/{quote(name)}?f=html", token))
            items += f'<li><a href="{link}">{escape(name)}/</a></li>'
        else:
            items += f"<li>{escape(name)}/</li>"
    crumbs = [("Home", with_token(home, token))] if home else []
    return page(title, f"<ul>{items}</ul>", crumbs=crumbs)


def error_page(err: dict) -> str:
    """An Esri error shown as a page."""
    e = err["error"]
    details = "".join(f"<li>{escape(str(d))}</li>" for d in e.get("details", []))
    return page(f"Error {e['code']}", f"<p>{escape(e['message'])}</p><ul>{details}</ul>")

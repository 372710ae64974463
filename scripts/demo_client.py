#!/usr/bin/env python3
"""Drive a tilecrate server the way an ArcGIS client does (stdlib only), download the package, check it.

Flow (as the ArcGIS API for Python 2.4.4): read the service JSON, estimate, submit exportTiles with
GET, poll the job with POST f=json, read results/out_service_url, GET the folder without f, download
the file, then verify it: a stored zip whose compact V2 bundles hold exactly the tiles and bytes the
estimate announced.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile


def call(url: str, params: dict | None = None, post: bool = False) -> dict:
    data = urllib.parse.urlencode(params or {})
    req = urllib.request.Request(url, data=data.encode()) if post else \
        urllib.request.Request(url + ("?" + data if data else ""))
    with urllib.request.urlopen(req, timeout=60) as r:
        obj = json.loads(r.read())
    if "error" in obj:
        raise SystemExit(f"server error from {url}: {obj['error']}")
    return obj


def wait_for_server(base: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            call(f"{base}/arcgis/rest/info", {"f": "json"})
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise SystemExit(f"no server answers at {base}")
            time.sleep(0.2)


def run_job(svc: str, op: str, params: dict) -> dict:
    job = call(f"{svc}/{op}", {"f": "json", **params})
    job_id, shown = job["jobId"], 0
    print(f"  {op}: job {job_id}")
    while job["jobStatus"] not in ("esriJobSucceeded", "esriJobFailed", "esriJobCancelled"):
        time.sleep(0.2)
        job = call(f"{svc}/{op}/jobs/{job_id}", {"f": "json"}, post=True)
        for m in job["messages"][shown:]:
            print(f"    {m['description']}")
        shown = len(job["messages"])
    if job["jobStatus"] != "esriJobSucceeded":
        raise SystemExit(f"{op} job ended {job['jobStatus']}")
    url = f"{svc}/{op}/jobs/{job_id}/{job['results']['out_service_url']['paramUrl']}"
    return call(url, {"f": "json"})["value"]


def count_tiles(path: str) -> int:
    """Tiles in a .tpkx, read straight from the zip: 64-byte header, 16384 index records (size << 40)."""
    n = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise SystemExit(f"{info.filename} is compressed: ArcGIS clients refuse that")
            if info.filename.endswith(".bundle"):
                recs = struct.unpack_from("<16384Q", zf.read(info), 64)
                n += sum(1 for r in recs if r >> 40)
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    ap.add_argument("--service", default="SampleWorld")
    ap.add_argument("--levels", default="0-5")
    ap.add_argument("--out", default="data/demo-download", help="folder to download into")
    ap.add_argument("--wait", type=float, default=60, help="seconds to wait for the server to come up")
    args = ap.parse_args()
    base = args.url.rstrip("/")
    wait_for_server(base, args.wait)
    svc = f"{base}/arcgis/rest/services/{args.service}/MapServer"
    info = call(svc, {"f": "json"})
    print(f"{args.service}: {info['tileInfo']['format']} tiles, {info['storageInfo']['storageFormat']}, "
          f"exportTilesAllowed={info['exportTilesAllowed']}, maxExportTilesCount={info['maxExportTilesCount']}")
    if not info["exportTilesAllowed"]:
        raise SystemExit("this service does not allow exportTiles")
    params = {"tilePackage": "True", "exportBy": "LevelID", "levels": args.levels, "storageFormat": "tpkx",
              "exportExtent": "DEFAULT"}
    est = run_job(svc, "estimateExportTilesSize", params)
    print(f"  estimate: {est['totalTilesToExport']} tiles, {est['totalSize']} bytes")
    folder = run_job(svc, "exportTiles", {**params, "optimizeTilesForSize": "False"})
    with urllib.request.urlopen(folder, timeout=60) as r:   # no f=json, as the Python API does
        listing = json.loads(r.read())
    os.makedirs(args.out, exist_ok=True)
    for f in listing["files"]:
        dest = os.path.join(args.out, f["name"])
        urllib.request.urlretrieve(f["url"], dest)
        size, tiles = os.path.getsize(dest), count_tiles(dest)
        print(f"  downloaded {dest}: {size} bytes, {tiles} tiles")
        if (size, tiles) != (est["totalSize"], est["totalTilesToExport"]):
            raise SystemExit(f"{dest} does not match the estimate ({est})")
    print("ok: the package holds the estimated number of tiles and has exactly the estimated size")
    return 0


if __name__ == "__main__":
    sys.exit(main())

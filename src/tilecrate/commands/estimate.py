"""`tilecrate estimate CACHE --levels ...`: exact tile count and package size of an export, per level."""
from __future__ import annotations

import argparse
import os

from tilecrate.cache import open_cache
from tilecrate.cli import emit_json, human_bytes
from tilecrate.errors import RequestError
from tilecrate.estimate import estimate
from tilecrate.presence import PresenceStore
from tilecrate.request import ExportRequest

NAME = "estimate"
HELP = "count the tiles an export would take and the exact size of the package it would write"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate estimate` (the exportTiles vocabulary)."""
    p.add_argument("cache", help="cache folder, .tpk, .tpkx or .vtpk")
    p.add_argument("--levels", required=True,
                   help="levels, e.g. 0-5 or '1-4, 7-9' (scales or resolutions with --export-by)")
    p.add_argument("--export-by", default="LevelID", help="LevelID (default), Scale or Resolution")
    p.add_argument("--extent", help="xmin,ymin,xmax,ymax, Envelope JSON or DEFAULT (the full extent)")
    p.add_argument("--aoi", help="area of interest: a file or inline JSON (Esri FeatureSet/Polygon/Envelope or "
                                 "GeoJSON); supersedes --extent")
    p.add_argument("--aoi-sr", help="spatial reference of --aoi/--extent when they carry none "
                                    "(e.g. 4326; default: the cache's for Esri JSON and extents, 4326 for GeoJSON)")
    p.add_argument("--storage-format", help="CompactV2 (.tpkx) or Compact (.tpk); default: the cache's own")
    p.add_argument("--tile-package", action=argparse.BooleanOptionalAction, default=True,
                   help="estimate a tile package (default) or, with --no-tile-package, a cache folder")
    p.add_argument("--presence-store", metavar="DIR",
                   help="an LMDB folder remembering which tiles each bundle holds (faster repeated estimates)")


def read_aoi(value: str | None) -> str | None:
    """The AOI argument as JSON text: inline JSON as is, otherwise the contents of the named file."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("{"):
        return text
    if not os.path.isfile(value):
        raise RequestError(f"--aoi {value!r} is neither JSON nor a readable file")
    try:
        with open(value, encoding="utf-8-sig") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError(f"cannot read --aoi {value}: {e}") from None


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The ExportRequest the shared options describe."""
    return ExportRequest(
        levels=args.levels,
        export_by=args.export_by,
        extent=args.extent,
        area_of_interest=read_aoi(args.aoi),
        aoi_sr=args.aoi_sr,
        tile_package=args.tile_package,
        storage_format=args.storage_format,
    )


def run(args: argparse.Namespace) -> int:
    """Print the estimate (table, or JSON with --json)."""
    request = request_from_args(args)
    with open_cache(args.cache) as cache:
        if args.presence_store:
            with PresenceStore(args.presence_store) as store:
                est = estimate(cache, request, presence=store)
        else:
            est = estimate(cache, request)
        scales = {lod.level: lod.scale for lod in cache.scheme.lods}
    if args.json:
        emit_json(est.to_json())
        return 0
    print(f"  {'level':>5} {'scale':>16} {'tiles':>12} {'tile bytes':>12} {'size':>12}")
    for lv, v in sorted(est.levels.items()):
        scale = f"{scales[lv]:.2f}" if lv in scales else "-"
        print(f"  {lv:>5} {scale:>16} {v['tiles']:>12,} {human_bytes(v['tileBytes']):>12} "
              f"{human_bytes(v['size']):>12}")
    print(f"  {'total':>5} {'':>16} {est.total_tiles:>12,} {'':>12} {human_bytes(est.total_size):>12}")
    print(f"  totalTilesToExport {est.total_tiles}, totalSize {est.total_size} bytes")
    return 0

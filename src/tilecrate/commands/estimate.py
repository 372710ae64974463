"""`tilecrate estimate CACHE --levels ...`: exact tile count and package size of an export, per level."""
from __future__ import annotations

import argparse

from tilecrate.cache import open_cache
from tilecrate.commands.output import emit_json, human_bytes
from tilecrate.estimate import estimate
from tilecrate.commands.requestargs import add_request_arguments, request_from_args

NAME = "estimate"
HELP = "count the tiles an export would take and the exact size of the package it would write"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate estimate` (the exportTiles vocabulary)."""
    p.add_argument("cache", help="cache folder, .tpk, .tpkx or .vtpk")
    add_request_arguments(p)
    p.add_argument("--format", choices=("mbtiles", "gpkg", "pmtiles", "xyz"), default=None,
                   help="estimate an open-format output instead of a package (MBTiles/GeoPackage sizes are "
                        "approximate: SQLite page overhead)")
    p.add_argument("--presence-store", metavar="DIR",
                   help="an LMDB folder remembering which tiles each bundle holds (faster repeated estimates)")


def run(args: argparse.Namespace) -> int:
    """Print the estimate (table, or JSON with --json)."""
    request = request_from_args(args)
    with open_cache(args.cache) as cache:
        if args.presence_store:
            from tilecrate.presence import PresenceStore     # lmdb: only when asked for

            with PresenceStore(args.presence_store) as store:
                est = estimate(cache, request, presence=store, format=args.format)
        else:
            est = estimate(cache, request, format=args.format)
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
    if est.approximate:
        print(f"  approximate: {est.approximate}")
    return 0

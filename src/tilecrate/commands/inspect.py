"""`tilecrate inspect PATH`: what a cache or package holds, per level."""
from __future__ import annotations

import argparse

from tilecrate.cache import open_cache
from tilecrate.commands.output import emit_json, human_bytes, progress_bar

NAME = "inspect"
HELP = "show a cache's or package's scheme, levels, bundles, tiles and bytes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate inspect`."""
    p.add_argument("path", help="cache folder, .tpk, .tpkx or .vtpk")


def describe(path: str, show_progress: bool = False) -> dict:
    """The inspect report as a JSON-ready dict (a progress bar over bundles when asked)."""
    with open_cache(path) as cache:
        with progress_bar(len(cache.bundles()), "inspect", unit="bundle", enabled=show_progress) as bar:
            levels = cache.level_summary(on_bundle=lambda ref: bar.update(1))
        scheme = cache.scheme
        extent = cache.full_extent
        return {
            "path": cache.path,
            "kind": cache.kind,
            "name": cache.name,
            "storageFormat": cache.storage_format,
            "tileFormat": cache.tile_format,
            "compressionQuality": cache.compression_quality,
            "tileSize": [scheme.tile_cols, scheme.tile_rows],
            "dpi": scheme.dpi,
            "origin": {"x": scheme.origin_x, "y": scheme.origin_y},
            "spatialReference": scheme.spatial_ref.to_json(),
            "schemeLevels": [lod.level for lod in scheme.lods],
            "extent": extent.to_json() if extent else None,
            "bundles": sum(v["bundles"] for v in levels.values()),
            "tiles": sum(v["tiles"] for v in levels.values()),
            "bytes": sum(v["bytes"] for v in levels.values()),
            "levels": {
                str(lv): {**v, "resolution": scheme.lod(lv).resolution if scheme.has_level(lv) else None,
                          "scale": scheme.lod(lv).scale if scheme.has_level(lv) else None}
                for lv, v in levels.items()
            },
        }


def run(args: argparse.Namespace) -> int:
    """Print the report (table, or JSON with --json)."""
    info = describe(args.path, show_progress=not (args.quiet or args.json))
    if args.json:
        emit_json(info)
        return 0
    sr = info["spatialReference"]
    print(f"{info['path']}")
    print(f"  {info['kind']}, {info['storageFormat']}, {info['tileFormat']} "
          f"(quality {info['compressionQuality']}), {info['tileSize'][0]}x{info['tileSize'][1]} px, "
          f"{info['dpi']} dpi, SR {sr.get('latestWkid') or sr.get('wkid') or 'WKT'}")
    ext = info["extent"]
    if ext:
        print(f"  extent {ext['xmin']:.6g}, {ext['ymin']:.6g}, {ext['xmax']:.6g}, {ext['ymax']:.6g}")
    print(f"  {'level':>5} {'scale':>16} {'bundles':>8} {'tiles':>10} {'bytes':>12}")
    for lv, v in info["levels"].items():
        scale = f"{v['scale']:.2f}" if v["scale"] is not None else "-"
        print(f"  {lv:>5} {scale:>16} {v['bundles']:>8} {v['tiles']:>10} {human_bytes(v['bytes']):>12}")
    print(f"  {'total':>5} {'':>16} {info['bundles']:>8} {info['tiles']:>10} {human_bytes(info['bytes']):>12}")
    return 0

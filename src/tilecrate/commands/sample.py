"""`tilecrate sample OUT`: write the deterministic sample cache."""
from __future__ import annotations

import argparse
import os

from tilecrate.cli import emit_json, human_bytes, progress_bar
from tilecrate.errors import RequestError
from tilecrate.request import parse_levels
from tilecrate.sample import FORMATS, MAX_SAMPLE_LEVEL, SampleSpec, _bundle_jobs, count_tiles, large_spec, make_sample

NAME = "sample"
HELP = "write a deterministic sample cache (Web Mercator; photo-like imagery, or LERC elevation)"


def _levels(text: str) -> tuple[int, ...]:
    """--levels as LevelIDs, in the exportTiles `levels` grammar ('0-5', '1-4, 7')."""
    try:
        items = parse_levels(text)
    except RequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if any(v != int(v) or not 0 <= v <= MAX_SAMPLE_LEVEL for item in items for v in item):
        raise argparse.ArgumentTypeError(f"sample levels are whole numbers within 0-{MAX_SAMPLE_LEVEL}")
    return tuple(sorted({lv for lo, hi in items for lv in range(int(min(lo, hi)), int(max(lo, hi)) + 1)}))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate sample`."""
    p.add_argument("out", help="folder to create")
    p.add_argument("--levels", type=_levels, default=None, help="level range, e.g. 0-5 (default 0-5)")
    p.add_argument("--format", choices=FORMATS, default="JPEG", type=str.upper, help="tile format")
    p.add_argument("--storage-format", choices=("Compact", "CompactV2"), default="CompactV2",
                   help="Compact (V1: .bundle + .bundlx) or CompactV2 (default)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality (default 75)")
    p.add_argument("--large", action="store_true",
                   help="benchmark preset: levels 0-10, ~128 000 tiles, about 1.8 GB")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes to render with")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    """Generate the sample and report what was written."""
    version = 1 if args.storage_format == "Compact" else 2
    spec = large_spec(version, args.format) if args.large else SampleSpec(tile_format=args.format, version=version)
    if args.levels is not None:
        spec = SampleSpec(levels=args.levels, tile_format=spec.tile_format, version=spec.version,
                          extent=spec.extent, quality=spec.quality)
    if args.quality != spec.quality:
        spec = SampleSpec(spec.levels, spec.tile_format, spec.version, spec.extent, args.quality, spec.seed)
    total = count_tiles(spec)
    done = {"tiles": 0, "bytes": 0}
    bar = progress_bar(total, "sample", enabled=not (args.quiet or args.json))

    def on_bundle(tiles: int, nbytes: int) -> None:
        done["tiles"] += tiles
        done["bytes"] += nbytes
        bar.update(tiles)

    with bar:
        path = make_sample(args.out, spec, workers=max(1, args.workers), on_bundle=on_bundle,
                           overwrite=args.force)
    result = {"path": os.path.abspath(path), "tiles": done["tiles"], "tileBytes": done["bytes"],
              "bundles": len(_bundle_jobs(spec)), "format": spec.tile_format,
              "storageFormat": "CompactV2" if spec.version == 2 else "Compact",
              "levels": list(spec.levels)}
    if args.json:
        emit_json(result)
    else:
        print(f"wrote {result['path']}: {result['tiles']} {spec.tile_format} tiles, "
              f"{human_bytes(result['tileBytes'])}, {result['storageFormat']}, levels "
              f"{spec.levels[0]}-{spec.levels[-1]}")
    return 0

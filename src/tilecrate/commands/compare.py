"""`tilecrate compare CACHE --qualities 90,75,60,40`: bytes, speed, PSNR and SSIM per quality and method."""
from __future__ import annotations

import argparse

from tilecrate.cache import open_cache
from tilecrate.commands.output import emit_json, progress_bar
from tilecrate.commands.requestargs import thread_count
from tilecrate.compare import compare, format_table, parse_methods, parse_qualities, plot_png, write_csv
from tilecrate.recompress import DEFAULT_DEADZONE

NAME = "compare"
HELP = "re-encode a sample of a cache's JPEG tiles at several qualities and compare size, speed and fidelity"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate compare`."""
    p.add_argument("cache", help="cache folder, .tpk or .tpkx")
    p.add_argument("--qualities", default="90,75,60,40", help="compressionQuality values (default 90,75,60,40)")
    p.add_argument("--levels", help="levels to sample, e.g. 0-5 or '3, 7-9' (default: all)")
    p.add_argument("--sample", type=int, default=200, metavar="N",
                   help="tiles to sample, spread evenly over the levels (default 200)")
    p.add_argument("--methods", default="dct,pixel",
                   help="re-encoding methods: dct (requantization), pixel (decode + encode); default both")
    p.add_argument("--threads", type=thread_count, default=0, help="threads for re-encoding (default: all cores)")
    p.add_argument("--deadzone", type=float, default=DEFAULT_DEADZONE, metavar="R",
                   help="DCT path: AC rounding offset, 0.5 = nearest, smaller = more zeros "
                        f"(default {DEFAULT_DEADZONE:.4g}: nearest, exact halves toward zero)")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="also draw size vs quality, one line per method, as PNG")


def run(args: argparse.Namespace) -> int:
    """Measure, then print the table (or JSON) and write the CSV and plot when asked."""
    qualities = parse_qualities(args.qualities)
    methods = parse_methods(args.methods)
    with open_cache(args.cache) as cache:
        with progress_bar(len(qualities) * len(methods), "compare", unit="setting",
                          enabled=not args.quiet and not args.json) as bar:
            result = compare(cache, qualities, methods, levels=args.levels, sample=args.sample,
                             threads=args.threads, deadzone=args.deadzone, progress=bar.update)
    if args.csv:
        write_csv(result, args.csv)
    if args.plot:
        plot_png(result, args.plot)
    if args.json:
        emit_json(result.to_json())
    else:
        print(format_table(result))
        for label, path in (("CSV", args.csv), ("plot", args.plot)):
            if path:
                print(f"{label}: {path}")
    return 0

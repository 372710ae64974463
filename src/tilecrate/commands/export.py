"""`tilecrate export CACHE -o OUT.tpkx|OUT.tpk|OUT.mbtiles|OUT.gpkg|OUT.pmtiles|OUTDIR --levels ...`: write a tile package, a cache folder or an open format."""
from __future__ import annotations

import argparse
import os
import threading

from tilecrate.commands.output import cancel_on_signals, emit_json, human_bytes, progress_bar
from tilecrate.commands.requestargs import add_request_arguments, output_path, thread_count
from tilecrate.commands.requestargs import request_from_args as shared_request
from tilecrate.errors import RequestError
from tilecrate.request import ExportRequest

NAME = "export"
HELP = "export tiles to a .tpkx, a .tpk, a .vtpk or a cache folder (the exportTiles job, from a shell)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate export` (the exportTiles vocabulary)."""
    p.add_argument("cache", help="source: cache folder, .tpk, .tpkx, or a .vtpk (or extracted one) for OUT.vtpk")
    p.add_argument("-o", "--output", required=True, type=output_path,
                   help="OUT.tpkx (compact V2), OUT.tpk (compact V1), OUT.vtpk from a vector source, OUT.mbtiles, "
                        "OUT.gpkg, OUT.pmtiles or, with --no-tile-package or --format xyz, a new folder")
    add_request_arguments(p)
    p.add_argument("--format", choices=("mbtiles", "gpkg", "pmtiles", "xyz"), default=None,
                   help="open-format output (tilecrate.sinks): implied by an OUT.mbtiles, OUT.gpkg or OUT.pmtiles "
                        "name; 'xyz' writes the new folder OUT as {z}/{x}/{y}.png|jpg")
    p.add_argument("--optimize-tiles-for-size", action="store_true",
                   help="re-encode JPEG tiles at --compression-quality")
    p.add_argument("--compression-quality", type=int, help="JPEG quality 0-100 for --optimize-tiles-for-size")
    p.add_argument("--threads", type=thread_count, default=None, help="worker threads (default: all cores)")
    p.add_argument("--scheduler", default=None,
                   help="run the bundle tasks on a Dask cluster: tcp://HOST:8786, or 'local' for a LocalCluster "
                        "of worker processes started for this export (default: in this process)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes of --scheduler local (default: one per core)")
    p.add_argument("--local-temp-folder", action="store_true",
                   help="with --scheduler: one worker builds the package in its own temp folder and moves it "
                        "into place (exportTilesUsingLocalTempFolder) instead of staging bundles next to -o")


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """The ExportRequest the options describe."""
    if args.compression_quality is not None and not args.optimize_tiles_for_size:
        raise RequestError("--compression-quality only applies with --optimize-tiles-for-size")
    return shared_request(args, optimize_tiles_for_size=args.optimize_tiles_for_size,
                          compression_quality=args.compression_quality)


def _scheduler(args: argparse.Namespace):
    """None (in-process), a scheduler address, or a DaskRunner for `--scheduler local --workers N`."""
    if args.scheduler is None:
        if args.workers is not None:
            raise RequestError("--workers only applies with --scheduler local")
        return None
    if args.scheduler == "local" and args.workers is not None:
        from tilecrate.runners.dask import DaskRunner

        most = 4 * (os.cpu_count() or 1)
        if not 1 <= args.workers <= most:
            raise RequestError(f"--workers must be from 1 to {most} (4 per core) for --scheduler local")
        return DaskRunner("local", workers=args.workers)
    return args.scheduler


def run(args: argparse.Namespace) -> int:
    """Run the export with a progress bar (tiles, bytes, rate, ETA); print the result."""
    from tilecrate.export import export

    request = request_from_args(args)
    cancel = threading.Event()
    state = {"tiles": 0, "bar": None}

    def on_progress(p) -> None:
        bar = state["bar"]
        if bar is None:       # made once the selection is known, so it starts with its total
            bar = state["bar"] = progress_bar(p.tiles_total, "export", unit="tile",
                                              enabled=not (args.quiet or args.json))
        bar.update(p.tiles_done - state["tiles"])
        state["tiles"] = p.tiles_done
        bar.set_postfix_str(f"L{p.level if p.level is not None else '-'} "
                            f"{human_bytes(p.bytes_done)}/{human_bytes(p.bytes_total)}", refresh=False)

    scheduler = _scheduler(args)
    try:
        with cancel_on_signals(cancel):     # Ctrl-C and SIGTERM: stop, remove the partial output
            result = export(args.cache, request, args.output, progress=on_progress, cancel=cancel,
                            threads=args.threads, scheduler=scheduler,
                            local_temp_folder=args.local_temp_folder, format=args.format)
    finally:
        if hasattr(scheduler, "close"):     # the LocalCluster started for --workers
            scheduler.close()
        if state["bar"] is not None:
            state["bar"].close()
    if args.json:
        emit_json(result.to_json())
        return 0
    rate = result.size / result.seconds if result.seconds > 0 else 0.0
    print(f"{result.path}: {result.kind}, {result.tiles:,} tiles, {human_bytes(result.size)} "
          f"in {result.seconds:.2f} s ({human_bytes(rate)}/s)")
    for lv, v in sorted(result.levels.items()):
        print(f"  L{lv:02d} {v['tiles']:>10,} tiles {human_bytes(v['size']):>12}")
    for w in result.warnings:
        print(f"  warning: {w}")
    if result.quality_used is not None:
        print(f"  compressionQuality {result.quality_used}")
    return 0

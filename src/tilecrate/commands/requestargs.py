"""The exportTiles vocabulary shared by `tilecrate estimate` and `tilecrate export`."""
from __future__ import annotations

import argparse
import os
import stat

from tilecrate.errors import RequestError
from tilecrate.request import ExportRequest

# an area file is read whole: past this size it cannot be within the geometry limits anyway
# (a million vertices, the most tilecrate.geometry admits, is about 40 MB of JSON)
MAX_AOI_BYTES = 128 << 20


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """--levels, --export-by, --extent, --aoi, --aoi-sr, --storage-format, --tile-package."""
    p.add_argument("--levels", required=True,
                   help="levels, e.g. 0-5 or '1-4, 7-9' (scales or resolutions with --export-by)")
    p.add_argument("--export-by", default="LevelID", help="LevelID (default), Scale or Resolution")
    p.add_argument("--extent", help="xmin,ymin,xmax,ymax, Envelope JSON or DEFAULT (the full extent)")
    p.add_argument("--aoi", help="area of interest: a file or inline JSON (Esri FeatureSet/Polygon/Envelope or "
                                 "GeoJSON); supersedes --extent")
    p.add_argument("--aoi-sr", help="spatial reference of --aoi/--extent when they carry none "
                                    "(e.g. 4326; default: the cache's for Esri JSON and extents, 4326 for GeoJSON)")
    p.add_argument("--storage-format",
                   help="CompactV2 (.tpkx) or Compact (.tpk); default: from the output's extension if there "
                        "is one, else the cache's own")
    p.add_argument("--tile-package", action=argparse.BooleanOptionalAction, default=True,
                   help="a tile package (default) or, with --no-tile-package, a cache folder "
                        "(conf.xml, conf.cdi, _alllayers)")


def output_path(value: str) -> str:
    """An -o/--output argument: a non-empty path naming a file or folder, not a folder's trailing slash."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the output path is empty")
    if "\0" in value:
        raise argparse.ArgumentTypeError("the output path holds a NUL character")
    name = os.path.basename(value.rstrip(os.sep)) if value.rstrip(os.sep) else ""
    if name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"{value!r} names no file or folder to create")
    try:
        mode = os.stat(value).st_mode
    except (OSError, ValueError):
        return value
    # the finished output is renamed over the path: never over a device, a FIFO or a socket
    # (`-o /dev/null` as root would replace the device node)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise argparse.ArgumentTypeError(f"{value} exists and is not a regular file or folder")
    return value


def thread_count(value: str) -> int:
    """A --threads argument: 0 (all cores) up to 8 threads per core (more only costs memory and switches)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    most = 8 * (os.cpu_count() or 1)
    if not 0 <= n <= most:
        raise argparse.ArgumentTypeError(f"{n} is not within 0 (all cores) and {most} (8 per core)")
    return n


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
        with open(value, "rb") as f:
            data = f.read(MAX_AOI_BYTES + 1)
    except OSError as e:
        raise RequestError(f"cannot read --aoi {value}: {e.strerror or e}") from None
    if len(data) > MAX_AOI_BYTES:
        raise RequestError(f"--aoi {value} is larger than {MAX_AOI_BYTES >> 20} MiB; simplify the area first")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RequestError(f"--aoi {value} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def request_from_args(args: argparse.Namespace, **more) -> ExportRequest:
    """The ExportRequest the shared options describe (plus any further fields given)."""
    return ExportRequest(
        levels=args.levels,
        export_by=args.export_by,
        extent=args.extent,
        area_of_interest=read_aoi(args.aoi),
        aoi_sr=args.aoi_sr,
        tile_package=args.tile_package,
        storage_format=args.storage_format,
        **more,
    )

"""The `tilecrate` command: one subcommand per module in tilecrate.commands, shared output helpers."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Sequence

from tilecrate.errors import TilecrateError

# each module defines NAME, HELP, add_arguments(parser) and run(args) -> int
COMMAND_MODULES = ["sample", "inspect", "estimate", "export", "serve", "compare"]


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout (the --json output of every command)."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def progress_bar(total: int | None, desc: str, unit: str = "tile", enabled: bool = True):
    """A tqdm bar on stderr (rate and ETA included); a silent stand-in when disabled."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=True)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def version_text() -> str:
    """`tilecrate --version`: our version and the PIL in use (pillow-simd is expected)."""
    from tilecrate import __version__

    try:
        import PIL
        from importlib import metadata

        names = []
        for d in ("pillow-simd", "Pillow"):
            name = _dist_name(metadata, d)
            if name and name not in names:
                names.append(name)
        pil = f"PIL {PIL.__version__} ({', '.join(names) or 'unknown distribution'})"
        if len(names) > 1:
            # both own the PIL folder: whichever installed last wins, file by file
            pil += "; WARNING: Pillow and pillow-simd are both installed, run scripts/install.sh"
    except ImportError:
        pil = "PIL not installed"
    return f"tilecrate {__version__}; {pil}"


def _dist_name(metadata, name: str) -> str | None:
    try:
        return metadata.distribution(name).metadata["Name"]
    except metadata.PackageNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="tilecrate", description="Export tiles from Esri compact caches.")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        mod = importlib.import_module(f"tilecrate.commands.{name}")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn every expected error into one line on stderr."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except TilecrateError as e:
        return _fail(args, str(e), 1)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(args, f"{where}{e.strerror or e}", 1)


def _fail(args, message: str, code: int) -> int:
    if getattr(args, "json", False):
        emit_json({"error": message})
    print(f"tilecrate: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

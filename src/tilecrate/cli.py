"""The `tilecrate` command: one subcommand per module in tilecrate.commands, imported only when chosen.

Exit codes: 0 done (also when stdout's reader stopped reading early, e.g. `| head`), 1 failed,
2 bad usage, 130 interrupted by Ctrl-C (SIGINT), 143 terminated (SIGTERM). Every failure is one line
`tilecrate: error: ...` on stderr (and `{"error": ...}` on stdout with --json); TILECRATE_DEBUG=1
adds the traceback of unexpected errors.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from typing import Any, NoReturn, Sequence

from tilecrate.commands import COMMANDS
from tilecrate.commands.output import (close_broken_stdout, emit_json, human_bytes, is_broken_stdout,
                                       progress_bar, stdout_closed)
from tilecrate.errors import Interrupted, TilecrateError

__all__ = ["main", "build_parser", "version_text", "emit_json", "progress_bar", "human_bytes"]

# kept for callers that list the commands; the table with their summaries is tilecrate.commands.COMMANDS
COMMAND_MODULES = list(COMMANDS)
MAX_MESSAGE = 1000          # an error line is cut here (a message may quote megabytes of input)


def version_text() -> str:
    """`tilecrate --version`: our version and the PIL in use (pillow-simd is expected)."""
    from tilecrate import __version__

    try:
        import PIL
    except ImportError:
        return f"tilecrate {__version__}; PIL not installed"
    names = []
    for d in ("pillow-simd", "Pillow"):
        name = _dist_name(d)
        if name and name not in names:
            names.append(name)
    pil = f"PIL {PIL.__version__} ({', '.join(names) or 'unknown distribution'})"
    if len(names) > 1:
        # both own the PIL folder: whichever installed last wins, file by file
        pil += "; WARNING: Pillow and pillow-simd are both installed, run scripts/install.sh"
    return f"tilecrate {__version__}; {pil}"


def _norm(name: str) -> str:
    return "".join("_" if c in "-_." else c for c in name.lower())


def _dist_name(name: str) -> str | None:
    """The `Name:` of an installed distribution, found on sys.path as importlib.metadata would.

    Read directly: importlib.metadata costs ~35 ms to import, three times Python's own start-up.
    """
    want = _norm(name)
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for d in listing:
            if not d.endswith(".dist-info"):
                continue
            if _norm(d[: -len(".dist-info")].split("-", 1)[0]) != want:
                continue
            try:
                with open(os.path.join(entry or ".", d, "METADATA"), encoding="utf-8", errors="replace") as f:
                    for line in f:
                        if line.startswith("Name:"):
                            return line[5:].strip()
                        if not line.strip():
                            break
            except OSError:
                continue
    return None


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it reads PIL's distribution metadata)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        _print(version_text())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (exit 2), like every other error of ours."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


class _UsageError(Exception):
    pass


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the chosen subcommand's module is imported (every one for --help)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = _chosen(argv)
    full = chosen is None and (not argv or "-h" in argv or "--help" in argv)
    parser = _Parser(prog="tilecrate", description="Export tiles from Esri compact caches.",
                     epilog="exit codes: 0 done, 1 failed, 2 bad usage, 130 interrupted (Ctrl-C), "
                            "143 terminated (SIGTERM); TILECRATE_DEBUG=1 shows tracebacks")
    parser.add_argument("--version", action=_VersionAction, help="show the version and the PIL in use")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, summary in COMMANDS.items():
        if name != chosen and not full:
            sub.add_parser(name, help=summary)     # named for the usage line, not loaded
            continue
        mod = importlib.import_module(f"tilecrate.commands.{name}")
        p = sub.add_parser(mod.NAME, help=summary, description=mod.HELP)
        p.add_argument("--json", action="store_true", help="print the result (or the error) as one JSON object")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn every error into one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_json = "--json" in argv
    previous = _on_sigterm_raise()
    try:
        try:
            parser = build_parser(argv)
            args = parser.parse_args(argv)
        except SystemExit as e:          # --help, --version
            _flush()
            return e.code if isinstance(e.code, int) else 0
        except _UsageError as e:
            return _fail(wants_json, str(e), 2)
        code = int(args._run(args) or 0)
        _flush()
        return code
    except BaseException as e:           # noqa: BLE001 - the last guard: one line whatever went wrong
        return _handle(e, wants_json)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _handle(e: BaseException, wants_json: bool) -> int:
    if isinstance(e, SystemExit):
        raise e
    if is_broken_stdout(e) or (stdout_closed() and isinstance(e, BrokenPipeError)):
        # the reader of our output went away (`| head`): the work is done, the rest is not wanted
        close_broken_stdout()
        return 0
    if isinstance(e, KeyboardInterrupt):
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        return _fail(wants_json, what, 128 + int(signum))
    if isinstance(e, TilecrateError):
        return _fail(wants_json, str(e), 1)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(wants_json, f"{where}{e.strerror or e}", 1)
    if isinstance(e, _UsageError):
        return _fail(wants_json, str(e), 2)
    if os.environ.get("TILECRATE_DEBUG"):
        import traceback

        traceback.print_exception(e)
    return _fail(wants_json, _unexpected(e), 1)


def _unexpected(e: BaseException) -> str:
    """A readable line for an error nothing below turned into a TilecrateError."""
    kind = type(e).__name__
    module = type(e).__module__ or ""
    detail = " ".join(str(e).split())
    if len(detail) > MAX_MESSAGE // 2:
        detail = detail[:MAX_MESSAGE // 2] + "…"
    if isinstance(e, RecursionError):
        text = "the input is nested too deeply"
    elif isinstance(e, MemoryError):
        text = "out of memory"
    elif module == "zlib":
        text = f"corrupt compressed data ({detail})"
    elif module.startswith("pyproj"):
        text = f"coordinate transformation failed ({detail})"
    else:
        text = f"unexpected {kind}: {detail}" if detail else f"unexpected {kind}"
    return text + " (TILECRATE_DEBUG=1 shows the traceback)"


def _fail(wants_json: bool, message: str, code: int) -> int:
    message = " ".join(message.split())
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "…"
    if wants_json:
        emit_json({"error": message})
    try:
        print(f"tilecrate: error: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass           # stderr is gone too: the exit code is all that is left
    return code


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except OSError as e:
        if not is_broken_stdout(e):
            raise
        close_broken_stdout()


def _flush() -> None:
    if stdout_closed():
        return
    try:
        sys.stdout.flush()
    except OSError as e:
        if not is_broken_stdout(e):
            raise
        close_broken_stdout()


def _on_sigterm_raise() -> Any:
    """SIGTERM raises Interrupted where Ctrl-C raises KeyboardInterrupt, so the same cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_sigterm(signum, frame) -> None:
        # later SIGTERMs must not interrupt the cleanup the first one started
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, on_sigterm)


if __name__ == "__main__":
    sys.exit(main())

"""The `tilecrate` argument parser: usage errors as one line, only the chosen subcommand's module imported."""
from __future__ import annotations

import argparse
import importlib
import sys

from tilecrate.commands import COMMANDS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn, Sequence


class UsageError(Exception):
    """A command line argparse refused; the message is one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors raised as one line instead of printed with the whole usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it reads PIL's distribution metadata)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> NoReturn:
        from tilecrate.cli import print_line, version_text

        print_line(version_text())
        parser.exit()


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if known."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the chosen subcommand's module is imported (every one for --help)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = chosen_command(argv)
    full = chosen is None and (not argv or "-h" in argv or "--help" in argv)
    parser = _Parser(prog="tilecrate", description="Export tiles from Esri compact caches.",
                     epilog="exit codes: 0 done (also when the reader of stdout stops early, as `| head` "
                            "does), 1 failed, 2 bad usage, 130 interrupted (Ctrl-C), 143 terminated "
                            "(SIGTERM), 129 hung up (SIGHUP); TILECRATE_DEBUG=1 shows the traceback of "
                            "unexpected errors")
    parser.add_argument("--version", action=_VersionAction, help="show the version and the PIL in use")
    # prog given: argparse would otherwise size the terminal (importing shutil) just to name it
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="tilecrate")
    sub.required = True
    for name, summary in COMMANDS.items():
        if name != chosen and not full:
            sub.add_parser(name, help=summary)     # named for the usage line and errors, not loaded
            continue
        mod = importlib.import_module(f"tilecrate.commands.{name}")
        p = sub.add_parser(mod.NAME, help=summary, description=mod.HELP)
        p.add_argument("--json", action="store_true", help="print the result (or the error) as one JSON object")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser

"""`tilecrate passwd`: read a password on standard input, print its `password_hash = "…"` line."""
from __future__ import annotations

import argparse
import sys

from tilecrate.errors import TilecrateError

NAME = "passwd"
HELP = ("read a password on standard input (one line) and print the password_hash line of a "
        "[users.NAME] table (scrypt, salted)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate passwd`."""
    p.add_argument("--user", metavar="NAME", help="also print the [users.NAME] header and a role line")
    p.add_argument("--role", default="user", choices=("user", "publisher", "administrator"),
                   help="the role written with --user (default: user)")


def run(args: argparse.Namespace) -> int:
    """Hash the first line of stdin; nothing is echoed and the password is never printed."""
    from tilecrate.admin.passwords import PasswordHashError, hash_password
    from tilecrate.cli import print_line

    line = sys.stdin.readline(4096)
    password = line[:-1] if line.endswith("\n") else line
    if password.endswith("\r"):
        password = password[:-1]
    try:
        stored = hash_password(password)
    except PasswordHashError as e:
        raise TilecrateError(f"no hash made: {e} (type the password on standard input)") from None
    if args.json:
        from tilecrate.commands.output import emit_json

        emit_json({"password_hash": stored, **({"user": args.user, "role": args.role} if args.user else {})})
        return 0
    if args.user:
        print_line(f"[users.{args.user}]")
    print_line(f'password_hash = "{stored}"')
    if args.user:
        print_line(f'role = "{args.role}"')
    return 0

"""Hidden temporary outputs next to the final path, named so that a later export can tell ours from a dead process.

An output is built as `.NAME.tmp-HOST-PID-START-RAND` next to `NAME` and renamed into place when
complete. HOST is a hash of this machine's name and pid namespace (an output folder may be shared
by several hosts or containers, whose pids mean nothing here), PID the writing process, START that process's start time (clock
ticks since boot, from /proc) so that a pid reused by an unrelated process is not mistaken for the
writer. A process killed with SIGKILL cannot remove its temp file; `sweep_stale_temps` removes the
ones whose writer is gone before a new export writes in the same folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid

_MARK = ".tmp-"
NAME_MAX = 255          # bytes in one file name (Linux file systems, and most others)


_HOST_TAG: list[str] = []


def _host_tag() -> str:
    if not _HOST_TAG:
        _HOST_TAG.append(_make_host_tag())
    return _HOST_TAG[0]


def _make_host_tag() -> str:
    # the pid namespace too: containers that share a host name still number their processes apart
    try:
        ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        ns = ""
    ident = f"{os.uname().nodename}/{ns}".encode("utf-8", "surrogateescape")
    return hashlib.blake2s(ident, digest_size=4).hexdigest()


def _hex8(s: str) -> bool:
    return len(s) == 8 and all(c in "0123456789abcdef" for c in s)


def _digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


def process_start(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot, None when it is not running (or unknown here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        return 0 if _pid_alive(pid) else None     # no /proc here: liveness only
    except OSError:
        return 0 if _pid_alive(pid) else None
    # the command name (field 2) may hold spaces and parentheses: count fields after the last ')'
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # alive, owned by someone else
        return True
    except (OSError, OverflowError):
        return True
    return True


def temp_path(out: str) -> str:
    """A fresh hidden temporary name next to `out` that names this host, process and its start time."""
    folder, base = os.path.split(os.path.abspath(out))
    pid = os.getpid()
    start = process_start(pid) or 0
    tail = f"{_MARK}{_host_tag()}-{pid}-{start}-{uuid.uuid4().hex[:8]}"
    # a legal output name (up to 255 bytes) must not make an illegal temp name: shorten the copy of
    # the name in it (the random part keeps temps apart; the sweep reads only the tail)
    room = NAME_MAX - 1 - len(tail.encode())
    encoded = os.fsencode(base)
    if len(encoded) > room:
        base = os.fsdecode(encoded[:room].decode("utf-8", "ignore").encode()) if room > 0 else ""
    return os.path.join(folder, f".{base}{tail}")


def _parse(name: str, base: str | None) -> tuple[str | None, int, int | None] | None:
    """(host tag or None for the older pid-only form, pid, start or None) of one of our temp names, else None."""
    if not name.startswith(".") or _MARK not in name:
        return None
    stem, _, tail = name.rpartition(_MARK)
    parts = tail.split("-")
    if len(parts) == 4 and _hex8(parts[0]) and _digits(parts[1]) and _digits(parts[2]) and _hex8(parts[3]):
        return parts[0], int(parts[1]), int(parts[2])
    if len(parts) == 2 and _digits(parts[0]) and _hex8(parts[1]) and base is not None and stem == "." + base:
        # the form written before hosts were named: only for the very output being written
        return None, int(parts[0]), None
    return None


def is_stale(name: str, base: str | None = None) -> bool:
    """True for a temp name of ours whose writer (on this host) is no longer running."""
    parsed = _parse(name, base)
    if parsed is None:
        return False
    host, pid, start = parsed
    if host is not None and host != _host_tag():
        return False              # another machine's process: its liveness cannot be judged here
    if pid <= 0:
        return False
    now = process_start(pid)
    if now is None:
        return True
    # the pid is in use: by the writer, or by an unrelated process that was given the pid since
    return start is not None and start != 0 and now != 0 and now != start


def sweep_stale_temps(out: str) -> list[str]:
    """Remove temp files and folders of ours next to `out` whose writer is gone; return the paths removed."""
    folder, base = os.path.split(os.path.abspath(out))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if not is_stale(name, base):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:                 # a file, or a link we unlink without following
                os.unlink(path)
        except FileNotFoundError:
            continue              # another export swept it first
        except OSError:
            continue              # not ours to remove after all (permissions): leave it
        removed.append(path)
    return removed

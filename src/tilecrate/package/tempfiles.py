"""Hidden temporary outputs next to the final path, named so that a later export can tell ours from a dead process.

An output is built as `.NAME.tmp-HOST-PID-START-RAND` next to `NAME` and renamed into place when
complete. HOST is a hash of this machine's name (an output folder may be shared by several hosts,
whose pids mean nothing here), PID the writing process, START that process's start time (clock
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


def _host_tag() -> str:
    return hashlib.blake2s(os.uname().nodename.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()


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
    return os.path.join(folder, f".{base}{_MARK}{_host_tag()}-{pid}-{start}-{uuid.uuid4().hex[:8]}")


def _parse(name: str, base: str | None) -> tuple[str | None, int, int | None] | None:
    """(host tag or None for the older pid-only form, pid, start or None) of one of our temp names, else None."""
    if not name.startswith(".") or _MARK not in name:
        return None
    stem, _, tail = name.rpartition(_MARK)
    parts = tail.split("-")
    if not all(p and p.isascii() for p in parts):
        return None
    try:
        if len(parts) == 4 and len(parts[0]) == 8 and len(parts[3]) == 8:
            int(parts[0], 16), int(parts[3], 16)
            return parts[0], int(parts[1]), int(parts[2])
        if len(parts) == 2 and len(parts[1]) == 8 and base is not None and stem == "." + base:
            # the form written before hosts were named: only for the very output being written
            int(parts[1], 16)
            return None, int(parts[0]), None
    except ValueError:
        return None
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

"""Output helpers every command shares: JSON on stdout, a progress bar on stderr, sizes, signals.

Kept free of heavy imports (tqdm is imported only when a bar is shown) so that importing a command
costs what the command itself needs.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import threading

from tilecrate.errors import Cancelled, Interrupted

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterator

# set once stdout's reader has gone away (`tilecrate ... --json | head -1`): later output is dropped
_stdout_closed = False


def stdout_closed() -> bool:
    """True once a write to stdout found its reader gone (the rest of the output is discarded)."""
    return _stdout_closed


def close_broken_stdout() -> None:
    """Point fd 1 at /dev/null after EPIPE, so later writes and the flush at exit cannot fail again."""
    global _stdout_closed
    _stdout_closed = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass          # stdout is not a real file (tests capture it): nothing is flushed at exit either


def is_broken_stdout(e: BaseException) -> bool:
    """Whether an error is stdout's reader having gone away (EPIPE on fd 1), not some other pipe of ours."""
    if not isinstance(e, BrokenPipeError) and not (isinstance(e, OSError) and e.errno == errno.EPIPE):
        return False
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):
        return False
    import select

    # the write end of a pipe whose reader closed polls as POLLERR
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def write_stdout(text: str) -> None:
    """Write `text` (nothing when empty) on stdout and flush; a reader that has gone away is not an error."""
    try:
        if text:
            sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        stdout_failed(e)


def stdout_failed(e: OSError) -> None:
    """After a write to stdout failed: a reader that has gone away closes stdout, anything else is raised
    naming stdout."""
    if not is_broken_stdout(e):
        raise stdout_error(e) from None
    close_broken_stdout()


def emit_json(obj: Any) -> None:
    """Print one JSON document on stdout (the --json output of every command); a closed reader is not an error."""
    if _stdout_closed:
        return
    write_stdout(json.dumps(obj, indent=2, default=str) + "\n")


def stdout_error(e: OSError) -> OSError:
    """The same error, naming stdout as the file that failed (`... > /dev/full`: no space left)."""
    return OSError(e.errno, e.strerror or str(e), "stdout")


def progress_bar(total: int | None, desc: str, unit: str = "tile", enabled: bool = True):
    """A tqdm bar on stderr (rate and ETA included) when stderr is a terminal; a silent stand-in otherwise."""
    show = enabled and _stderr_is_tty()
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                leave=True)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (OSError, ValueError, AttributeError):
        return False


class _NoBar:
    """The part of tqdm's interface the commands use, doing nothing (no tqdm import, nothing written)."""

    def update(self, n: float = 1) -> None:
        """Ignore progress."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Ignore the postfix."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        return None


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def cancel_on_signals(cancel: threading.Event) -> Iterator[threading.Event]:
    """SIGINT, SIGTERM and SIGHUP set `cancel` (the work stops cleanly and removes its partial output),
    then Interrupted is raised instead of the resulting Cancelled; a second signal interrupts at once.
    Signals the caller ignores (`nohup`, a background job's SIGINT) stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        if received:
            raise Interrupted(signum)
        received.append(signum)
        cancel.set()

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) != signal.SIG_IGN:
            previous[s] = signal.signal(s, on_signal)
    try:
        yield cancel
    except Cancelled:
        if received:
            raise Interrupted(received[0]) from None
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

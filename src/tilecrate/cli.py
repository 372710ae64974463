"""The `tilecrate` command: one subcommand per module in tilecrate.commands, imported only when chosen.

Exit codes: 0 done (also when stdout's reader stopped reading early, e.g. `| head`), 1 failed,
2 bad usage, 130 interrupted by Ctrl-C (SIGINT), 143 terminated (SIGTERM). Every failure is one line
`tilecrate: error: ...` on stderr (and `{"error": ...}` on stdout with --json); TILECRATE_DEBUG=1
adds the traceback of unexpected errors.

Start-up matters (every small job of a shell batch pays it): this module imports only what
`--version` needs; argparse, signals and the output helpers come with a command.
"""
from __future__ import annotations

import os
import sys

from tilecrate.commands import COMMANDS
from tilecrate.errors import Interrupted, TilecrateError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Sequence

__all__ = ["main", "build_parser", "version_text", "print_line", "emit_json", "progress_bar", "human_bytes"]

# kept for callers that list the commands; the table with their summaries is tilecrate.commands.COMMANDS
COMMAND_MODULES = list(COMMANDS)
MAX_MESSAGE = 1000          # an error line is cut here (a message may quote megabytes of input)


def __getattr__(name: str):
    """emit_json, progress_bar and human_bytes live in tilecrate.commands.output (imported on use)."""
    if name in ("emit_json", "progress_bar", "human_bytes"):
        from tilecrate.commands import output

        return getattr(output, name)
    raise AttributeError(f"module 'tilecrate.cli' has no attribute {name!r}")


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
            if not d.endswith(".dist-info") or _norm(d[: -len(".dist-info")].split("-", 1)[0]) != want:
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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the chosen subcommand's module is imported (every one for --help)."""
    from tilecrate.commands.parser import build_parser as build

    return build(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run, and turn every error into one line on stderr and an exit code."""
    if argv is None:
        # the process's own command line: OpenBLAS, loaded with numpy (which the compiled core needs),
        # starts a thread and allocates buffers per core at load: ~40 CPU-ms of a small export process
        # (bench_startup). No command multiplies matrices; a value the user set is kept.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        _arm_exit_now()
        import gc

        # the imports allocate objects by the hundred thousand, none of them garbage: the collector's
        # passes over them cost ~8 % of a small export process (bench_startup); back on once the
        # command's module is loaded (frozen: the passes then skip them)
        gc.disable()
    try:
        return _main(sys.argv[1:] if argv is None else list(argv), argv is None)
    finally:
        if argv is None:
            # the process's own command line: it ends next, and the shutdown's collections would walk
            # every object of every imported module (numpy, PIL...): ~0.1 s of a small export process
            # at load (benchmarks/bench_startup.py). Frozen objects are skipped; reference counting and
            # atexit still close files, join threads and remove temp files. Not done for a caller's
            # argv: a long-lived process calling main() keeps its collector.
            import gc

            gc.freeze()


def _main(argv: list[str], own: bool = False) -> int:
    if argv == ["--version"]:           # the common probe, answered without argparse
        try:
            print_line(version_text())
            return 0
        except BaseException as e:      # noqa: BLE001 - the same last guard as every command
            return _handle(e, False)
    import signal

    from tilecrate.commands.parser import UsageError

    wants_json = "--json" in argv
    previous = _stop_signals_raise()
    try:
        try:
            args = build_parser(argv).parse_args(argv)
        except SystemExit as e:          # --help, --version
            _flush()
            return e.code if isinstance(e.code, int) else 0
        except UsageError as e:
            return _fail(wants_json, str(e), 2)
        if own:
            import gc

            gc.freeze()
            gc.enable()
        code = int(args._run(args) or 0)
        _flush()
        if own and args.command == "export":
            # its output is closed and renamed, stdout flushed: nothing is left for the teardown to do
            global _exit_code
            _exit_code = code
        return code
    except BaseException as e:           # noqa: BLE001 - the last guard: one line whatever went wrong
        return _handle(e, wants_json)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_exit_code: int | None = None         # set when an `export` of the process's own command line finished


def _exit_now() -> None:
    """The last exit handler: end the process with the finished export's code without tearing down its
    modules (numpy, PIL and ours: 10-20 ms of a small export process); otherwise a normal exit."""
    if _exit_code is None:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:        # noqa: BLE001 - a stream that cannot flush: the normal exit reports it
        return
    os._exit(_exit_code)


def _arm_exit_now() -> None:
    """Register `_exit_now` when no exit handler is registered yet: it then runs after all (atexit runs
    last in, first out), so it never skips one (a coverage tool's, say, registered at start-up)."""
    import atexit

    count = getattr(atexit, "_ncallbacks", None)
    if count is not None and count() == 0:
        atexit.register(_exit_now)


def _handle(e: BaseException, wants_json: bool) -> int:
    from tilecrate.commands.output import close_broken_stdout, is_broken_stdout, stdout_closed

    if isinstance(e, SystemExit):
        raise e
    if is_broken_stdout(e) or (stdout_closed() and isinstance(e, BrokenPipeError)):
        # the reader of our output went away (`| head`): the work is done, the rest is not wanted
        close_broken_stdout()
        return 0
    if isinstance(e, KeyboardInterrupt):
        import signal

        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        return _fail(wants_json, signal_message(signum), 128 + int(signum))
    if isinstance(e, TilecrateError):
        return _fail(wants_json, str(e), 1)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(wants_json, f"{where}{e.strerror or e}", 1)
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
        from tilecrate.commands.output import emit_json

        try:
            emit_json({"error": message})
        except (OSError, ValueError):
            pass       # stdout cannot take it (a full disk under a redirect): stderr still says why
    try:
        print(f"tilecrate: error: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass           # stderr is gone too: the exit code is all that is left
    return code


def print_line(text: str) -> None:
    """Print one line on stdout now; a reader that has gone away is not an error."""
    try:
        print(text, flush=True)
    except OSError as e:
        from tilecrate.commands.output import stdout_failed   # only here: --version must not load it

        stdout_failed(e)


def _flush() -> None:
    from tilecrate.commands.output import stdout_closed, write_stdout

    if not stdout_closed():
        write_stdout("")


def signal_message(signum: int) -> str:
    """The error line of a process stopped by a signal: 'interrupted' for Ctrl-C, else the signal's name."""
    import signal

    if signum == signal.SIGINT:
        return "interrupted"
    try:
        return f"terminated ({signal.Signals(signum).name})"
    except ValueError:
        return f"terminated (signal {signum})"


def _stop_signals_raise() -> dict:
    """SIGTERM and SIGHUP raise Interrupted where Ctrl-C raises KeyboardInterrupt, so the same cleanup runs.

    A signal the caller set to be ignored stays ignored (`nohup` ignores SIGHUP). Returns the
    handlers replaced, to restore them.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame) -> None:
        # later signals must not interrupt the cleanup the first one started
        for s in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(s) is on_signal:
                signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {}
    for s in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) != signal.SIG_IGN:
            previous[s] = signal.signal(s, on_signal)
    return previous


if __name__ == "__main__":
    sys.exit(main())

"""`tilecrate serve [CONFIG] [--cache PATH] [--demo]`: the ArcGIS-compatible MapServer with export jobs."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from tilecrate.cli import emit_json
from tilecrate.errors import TilecrateError

NAME = "serve"
HELP = "serve caches as ArcGIS MapServer services with exportTiles and estimateExportTilesSize jobs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tilecrate serve`."""
    p.add_argument("config", nargs="?", help="TOML file naming the services (see examples/tilecrate.toml)")
    p.add_argument("--cache", metavar="PATH", help="serve this one cache (folder, .tpk or .tpkx) without a config")
    p.add_argument("--name", help="service name for --cache / --demo (default: from the path, or SampleWorld)")
    p.add_argument("--demo", action="store_true", help="serve the built-in sample cache (made on first use)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--data-dir", help="job store and arcgisoutput folder (default ./tilecrate-data)")
    p.add_argument("--token", help="require this token on every request")
    p.add_argument("--max-file-age", type=float, help="seconds before outputs are removed (default 600)")
    p.add_argument("--max-outstanding-jobs", type=int, help="refuse new jobs with 503 beyond this many")
    p.add_argument("--max-export-tiles", type=int, help="maxExportTilesCount for --cache / --demo (default 100000)")
    p.add_argument("--workers", type=int, help="jobs run at once per process (default 2)")
    p.add_argument("--processes", type=int, help="front-end processes sharing the port and the job store (default 1)")


def build_config(args: argparse.Namespace):
    """The ServerConfig from a file or from --cache / --demo, with command-line overrides applied."""
    from tilecrate.server.config import ConfigError, ServerConfig, ServiceConfig, check_name, load_config, validate

    chosen = sum(bool(x) for x in (args.config, args.cache, args.demo))
    if chosen != 1:
        raise ConfigError("give exactly one of CONFIG, --cache PATH or --demo")
    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = ServerConfig()
        cfg.data_dir = os.path.abspath(args.data_dir or "tilecrate-data")
        if args.demo:
            source = _demo_cache(cfg.data_dir)
            name = args.name or "SampleWorld"
        else:
            source = os.path.abspath(args.cache)
            stem = os.path.splitext(os.path.basename(source.rstrip(os.sep)))[0]
            name = args.name or "".join(c if c.isalnum() or c in "_-." else "_" for c in stem) or "Cache"
        cfg.services[check_name(name)] = ServiceConfig(
            name=name, source=source,
            max_export_tiles_count=args.max_export_tiles if args.max_export_tiles is not None else 100000)
    for attr, value in (("host", args.host), ("port", args.port), ("token", args.token),
                        ("max_file_age", args.max_file_age), ("workers", args.workers),
                        ("maximum_outstanding_jobs", args.max_outstanding_jobs),
                        ("processes", getattr(args, "processes", None))):
        if value is not None:
            setattr(cfg, attr, value)
    if args.data_dir and args.config:
        cfg.data_dir = os.path.abspath(args.data_dir)
    return validate(cfg)


def _demo_cache(data_dir: str) -> str:
    from tilecrate.sample import SampleSpec, make_sample

    path = os.path.join(data_dir, "demo-sample")
    if not os.path.isfile(os.path.join(path, "conf.xml")):
        print(f"tilecrate: making the demo sample cache in {path}", file=sys.stderr)
        make_sample(path, SampleSpec())
    return path


def run(args: argparse.Namespace) -> int:
    """Start the server and serve until interrupted."""
    from aiohttp import web

    from tilecrate.server.app import READS, create_app
    from tilecrate.server.connections import raise_descriptor_limit

    cfg = build_config(args)
    raise_descriptor_limit()        # before the front ends are forked: they inherit it
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.makedirs(cfg.data_dir, exist_ok=True)
    url = f"http://{_url_host(cfg.host)}:{cfg.port}/arcgis/rest/services"
    if cfg.processes > 1:
        return _run_processes(cfg, args, url)
    where: dict = {"host": cfg.host, "port": cfg.port}
    if cfg.port == 0:   # bound here to learn the port the kernel picks, for the announced URL and our URLs
        where = {"sock": listen_sockets(cfg.host, 0, 1)[0]}
        cfg.port = where["sock"].getsockname()[1]
        url = f"http://{_url_host(cfg.host)}:{cfg.port}/arcgis/rest/services"
    app = create_app(cfg)

    def announce(_aiohttp_banner: str) -> None:
        # run_app calls this once the socket is bound, so nothing is announced for a failed start
        _announce(cfg, args, url)

    try:
        web.run_app(app, **where, print=announce, access_log=None,
                    handle_signals=True, shutdown_timeout=5)
    except OSError as e:
        raise TilecrateError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    reads = app.get(READS)
    if reads is not None and reads.stuck:
        # a cache read is stuck on a file (the job store is closed and synced by now): the
        # interpreter would wait for that thread for ever at exit
        logging.getLogger("tilecrate.server").warning("exiting with a cache read still blocked")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _announce(cfg, args: argparse.Namespace, url: str) -> None:
    if args.json:
        emit_json({"url": url, "services": list(cfg.services), "dataDir": cfg.data_dir,
                   "processes": cfg.processes})
        sys.stdout.flush()
    more = f", {cfg.processes} processes" if cfg.processes > 1 else ""
    print(f"tilecrate: serving {', '.join(cfg.services)} on {url} (data in {cfg.data_dir}{more})",
          file=sys.stderr, flush=True)


RESPAWN_AFTER = 5.0   # seconds a front-end process must have run to be replaced when it ends


def _run_processes(cfg, args: argparse.Namespace, url: str) -> int:
    """N front-end processes on one port, each accepting on its own socket, sharing the LMDB job store
    (issue 10).

    The parent binds one SO_REUSEPORT socket per process slot and holds them all, and the data dir's
    lock; it forks the processes (before anything opens LMDB), passes SIGTERM/SIGINT/SIGHUP on to them
    and exits when they have. The kernel spreads new connections over the slots' sockets by hash: with
    one shared socket, the process that woke first accepted a whole burst (both together used one core).
    One that ends on its own after running a while is replaced on its slot's socket, so connections
    queued there meanwhile are served by the replacement (the jobs it drove are failed by the others'
    sweep); one that fails right after starting stops the others too, since a replacement would fail the
    same way. Process 0 expires old jobs; any answers any job.
    """
    import signal

    from tilecrate.jobs.runner import site_lock_file

    lock = site_lock_file(cfg.output_dir)
    try:
        socks = listen_sockets(cfg.host, cfg.port, cfg.processes)
    except TilecrateError:
        lock.close()
        raise
    if cfg.port == 0:   # the port the kernel chose, for the announced URL and the URLs we hand out
        cfg.port = socks[0].getsockname()[1]
        url = f"http://{_url_host(cfg.host)}:{cfg.port}/arcgis/rest/services"
    sys.stdout.flush()
    sys.stderr.flush()
    children: dict[int, tuple[int, float]] = {}

    parent = os.getpid()

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child process
            # the other slots' sockets closed here, so a slot the parent closes stops getting connections
            for other, s in enumerate(socks):
                if other != index and s is not None:
                    s.close()
            os._exit(_child(cfg, socks[index], index, parent))
        children[pid] = (index, time.monotonic())

    def retire(index: int) -> None:
        # nobody will accept on this slot's socket again: closed, the kernel hashes new connections
        # over the others only; connections already queued on it are reset (their clients see a
        # connection reset and may retry)
        if socks[index] is not None:
            socks[index].close()
            socks[index] = None

    for index in range(cfg.processes):
        spawn(index)
    _announce(cfg, args, url)
    got: list[int] = []

    def forward(signum, _frame) -> None:
        got.append(signum)
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGHUP else signum)
            except ProcessLookupError:
                pass
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    worst = 0
    log = logging.getLogger("tilecrate.server")
    while children:
        pid, status = os.wait()
        if pid not in children:
            continue
        index, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if got or worst:
            retire(index)
            continue
        if time.monotonic() - started >= RESPAWN_AFTER:
            log.error("front-end process %d (%d) ended with %d; starting another", index, pid, code)
            spawn(index)
            continue
        retire(index)
        if code != 0:
            log.error("front-end process %d ended with %d right after starting; stopping the others", pid, code)
            worst = 1
            forward(signal.SIGTERM, None)
    for index in range(len(socks)):
        retire(index)
    lock.close()
    return worst


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_sockets(host: str, port: int, count: int) -> list:
    """`count` listening TCP sockets on host:port sharing it with SO_REUSEPORT (port 0: one the kernel
    picks); a TilecrateError naming host:port when it cannot be had."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list = []
    try:
        # Linux lets any socket of the same user with SO_REUSEPORT join a group on the port, so a
        # second server started by mistake on our port would silently take a share of its traffic:
        # a plain socket (no SO_REUSEPORT) binds first, failing on any listener already there. It is
        # closed before ours bind (a listener started in between could still join: a narrow window).
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(1024)
    except OSError as e:
        for sock in socks:
            sock.close()
        raise TilecrateError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return socks


def _end_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the parent dies (a SIGKILLed parent leaves no front end
    behind holding the port); elsewhere nothing."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # it died before the request took effect
        os._exit(0)


def _child(cfg, sock, index: int, parent: int) -> int:  # pragma: no cover - runs in a forked process
    import signal

    from aiohttp import web

    from tilecrate.server.app import create_app

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    _end_with_parent(parent)
    try:
        app = create_app(cfg, process_index=index, site_lock=False)
        web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True, shutdown_timeout=5)
    except BaseException:
        logging.getLogger("tilecrate.server").exception("front-end process %d failed", index)
        return 1
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    return 0  # a read blocked on a file does not hold this up: the caller leaves with os._exit

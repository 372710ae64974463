"""Helpers for the site tests (issue 10): a real Dask scheduler and `dask worker` processes started
with the `dask` CLI of the distributed package, each worker with its own temp folder, and
`tilecrate serve --processes 2` pointed at them. No tests live here.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_dask import WIDE_LEVEL, widen  # noqa: F401  (one hard-linked wide cache for both modules)
from test_server_support import Server, free_port, write_config

DASK = str(Path(sys.executable).parent / "dask")


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s:\n{log.read_text()}")


@dataclass
class Site:
    """`dask scheduler` + N `dask worker` processes on 127.0.0.1."""

    root: Path
    workers: int = 2
    port: int = 0
    scheduler: subprocess.Popen | None = None
    nannies: list = field(default_factory=list)
    temps: list = field(default_factory=list)      # each worker's TMPDIR (its local temp folder)

    @property
    def address(self) -> str:
        """tcp://127.0.0.1:PORT"""
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> "Site":
        """Start the scheduler, then the workers; wait until all workers joined."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.root / "scheduler.log"
        with open(log, "ab") as f:
            self.scheduler = subprocess.Popen(
                [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, self.scheduler, log, 30)
        for i in range(self.workers):
            tmp = self.root / f"worker{i}-tmp"
            tmp.mkdir()
            self.temps.append(tmp)
            scratch = self.root / f"worker{i}-scratch"
            with open(self.root / f"worker{i}.log", "ab") as f:
                self.nannies.append(subprocess.Popen(
                    [DASK, "worker", self.address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
                     "--no-dashboard", "--local-directory", str(scratch)],
                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                    env=dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1")))
        with self.client() as c:
            c.wait_for_workers(self.workers, timeout=60)
        return self

    def client(self):
        """A distributed.Client of this test process (to look at the cluster, never to run exports)."""
        from distributed import Client

        return Client(self.address, set_as_default=False, timeout=20)

    def kill_scheduler(self) -> None:
        """SIGKILL the scheduler."""
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.send_signal(signal.SIGKILL)
            self.scheduler.wait(10)

    def stop(self) -> None:
        """Stop every process this site started (their own process groups: nannies and their workers)."""
        for p in [*self.nannies, self.scheduler]:
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in [*self.nannies, self.scheduler]:
            if p is None:
                continue
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def staging(self) -> list[str]:
        """Anything of ours left in a worker's temp folder."""
        return [str(t / n) for t in self.temps for n in os.listdir(t) if "tilecrate" in n or ".tmp-" in n]


def site_server(tmp_path: Path, name: str, site: Site, services: dict, local_temp: bool = False,
                processes: int = 2, **server) -> Server:
    """`tilecrate serve CONFIG --processes N` with `[cluster] scheduler = site.address` (not started)."""
    data = tmp_path / f"{name}-data"
    cfg = write_config(tmp_path / f"{name}.toml", data, services, processes=processes, **server)
    cfg.write_text(cfg.read_text() + f'\n[cluster]\nscheduler = "{site.address}"\n'
                   f"exportTilesUsingLocalTempFolder = {'true' if local_temp else 'false'}\n")
    return Server(cfg, data, free_port())


def bundle_files(path) -> dict[str, bytes]:
    """{relative name: bytes} of every bundle of a package or cache folder (what must be equal)."""
    path = Path(path)
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*.bundl*")}
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        return {n: z.read(n) for n in z.namelist() if n.lower().endswith((".bundle", ".bundlx"))}


def job_output(srv: Server, service: str, job: dict, dest: Path) -> Path:
    """A finished job's package (downloaded over HTTP as a client does) or its cache folder (on disk)."""
    value = srv.result(service, "exportTiles", job)
    listing = srv.get(value).json()
    if listing["files"]:
        _, paths = srv.download_all(value, dest)
        return paths[0]
    (folder,) = listing["folders"]
    return srv.data_dir / "arcgisoutput" / f"{service}_MapServer" / job["jobId"] / folder


@contextlib.contextmanager
def logs_on_failure(*paths: Path):
    """On a failure, print the logs of the processes (pytest shows them with the failure)."""
    try:
        yield
    except BaseException:
        for p in paths:
            for f in sorted(Path(p).rglob("*.log")):
                print(f"==== {f}\n{f.read_text(errors='replace')[-6000:]}")
        raise


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A running scheduler and two workers, for the tests of one module."""
    s = Site(tmp_path_factory.mktemp("site"))
    try:
        yield s.start()
    finally:
        s.stop()

"""`tilecrate serve --processes N`: one SO_REUSEPORT listening socket per process slot, so the kernel
spreads new connections over the processes (issue 10). With one shared socket, a burst of connections
went to whichever process woke first (the benchmark saw both processes use one core together).

Which process holds which connection is read from /proc: a process's socket inodes
(/proc/PID/fd -> socket:[INODE]) against the server side of established connections in
/proc/net/tcp{,6} (local port = the server's port)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from test_server_support import PYTHON, Server, child_pids, free_port, write_config

BURST = 32
ESTABLISHED, LISTEN = "01", "0A"


def _inodes(pid: int) -> set[int]:
    """Socket inodes a process has open."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _tcp(port: int, state: str) -> set[int]:
    """Inodes of the TCP sockets in `state` whose local port is `port` (IPv4 and IPv6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                    out.add(int(fields[9]))
    return out


def _burst(host: str, port: int, count: int = BURST, timeout: float = 20.0) -> list[http.client.HTTPConnection]:
    """Open `count` keep-alive connections at once, then one request on each; all must answer 200.
    The connections are returned open (the server keeps them: HTTP/1.1 keep-alive)."""
    conns = [http.client.HTTPConnection(host, port, timeout=timeout) for _ in range(count)]
    for c in conns:      # every handshake first, so they are all queued before any is served
        c.connect()
    for c in conns:
        c.request("GET", "/arcgis/rest/info?f=json")
    for c in conns:
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())
    return conns


def _held(pids: list[int], port: int) -> dict[int, int]:
    """Established server-side connections on `port` each process holds."""
    est = _tcp(port, ESTABLISHED)
    return {pid: len(_inodes(pid) & est) for pid in pids}


def _close(conns) -> None:
    for c in conns:
        c.close()


def _server(tmp_path, sample, processes: int = 2) -> Server:
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {"S": {"source": sample}}, workers=1)
    return Server(cfg, data, free_port(), extra_args=["--processes", str(processes)])


def _assert_burst_spread(pids: list[int], port: int) -> None:
    """A burst of BURST connections is held open, all accepted, at least 4 by each process."""
    conns = _burst("127.0.0.1", port)
    try:
        held = _held(pids, port)
        # 32 connections hashed over 2 sockets: fewer than 4 on one side has probability ~1e-6;
        # with one shared socket, the process that wakes first accepts the whole queue
        assert sum(held.values()) == BURST and min(held.values()) >= 4, held
    finally:
        _close(conns)


def test_a_burst_of_connections_is_spread_over_both_processes(tmp_path, sample_v2):
    srv = _server(tmp_path, sample_v2)
    try:
        srv.start()
        kids = child_pids(srv.proc.pid)
        assert len(kids) == 2
        # one listening socket per process, each held by the parent and by its own process only
        listening = _tcp(srv.port, LISTEN)
        assert len(listening) == 2 and listening <= _inodes(srv.proc.pid)
        assert all(len(_inodes(pid) & listening) == 1 for pid in kids)
        assert not _inodes(kids[0]) & _inodes(kids[1]) & listening
        _assert_burst_spread(kids, srv.port)
    finally:
        srv.stop()


def test_a_killed_process_is_replaced_on_its_socket_and_requests_keep_being_answered(tmp_path, sample_v2):
    from tilecrate.commands.serve import RESPAWN_AFTER

    srv = _server(tmp_path, sample_v2)
    try:
        srv.start()
        time.sleep(RESPAWN_AFTER + 1)
        kids = child_pids(srv.proc.pid)
        assert len(kids) == 2
        listening = _tcp(srv.port, LISTEN)
        victim, survivor = kids
        os.kill(victim, signal.SIGKILL)
        # connections the kernel hashes to the dead process's socket wait in its queue (the parent
        # holds it) until the replacement accepts them: every request is answered
        _close(_burst("127.0.0.1", srv.port, timeout=30))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            now = child_pids(srv.proc.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.1)
        assert len(now) == 2 and victim not in now and survivor in now, (kids, now)
        replacement = next(pid for pid in now if pid != survivor)
        assert _tcp(srv.port, LISTEN) == listening          # the same two sockets, no new one
        assert len(_inodes(replacement) & listening) == 1
        _assert_burst_spread(now, srv.port)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log.read_text()


def test_a_process_not_replaced_has_its_socket_closed(tmp_path, sample_v2):
    """A process that ends on its own right after starting (SIGTERM: exit 0) is not replaced; its
    socket must be closed, else the kernel keeps queueing half the new connections where nobody
    accepts them."""
    srv = _server(tmp_path, sample_v2)
    try:
        srv.start()
        kids = child_pids(srv.proc.pid)
        assert len(kids) == 2
        os.kill(kids[0], signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (kids[0] in child_pids(srv.proc.pid) or len(_tcp(srv.port, LISTEN)) != 1):
            time.sleep(0.05)
        assert child_pids(srv.proc.pid) == [kids[1]], "the process was replaced: it started too slowly for this test"
        assert len(_tcp(srv.port, LISTEN)) == 1
        t0 = time.monotonic()
        conns = _burst("127.0.0.1", srv.port, timeout=5)
        try:
            assert _held([kids[1]], srv.port) == {kids[1]: BURST}
        finally:
            _close(conns)
        assert time.monotonic() - t0 < 5
    finally:
        srv.stop()


@pytest.mark.parametrize("host,processes", [("127.0.0.1", 3), ("::1", 3), ("::1", 1)])
def test_port_0_binds_every_socket_to_the_one_port_chosen(tmp_path, sample_v2, host, processes):
    data = tmp_path / "data"
    proc = subprocess.Popen([PYTHON, "-m", "tilecrate.cli", "serve", "--cache", str(sample_v2), "--data-dir", str(data),
                             "--name", "S", "--host", host, "--port", "0", "--processes", str(processes), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = ""
        while not text.endswith("}\n"):     # the announcement: one JSON object, printed indented
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            text += line
        announced = json.loads(text)
        url = announced["url"]
        port = int(url.split("/arcgis")[0].rsplit(":", 1)[1])
        assert port != 0 and url.startswith(f"http://{'[::1]' if ':' in host else host}:{port}/"), url
        assert len(_tcp(port, LISTEN)) == processes
        deadline = time.monotonic() + 30
        while True:
            try:
                conns = _burst(host, port, count=48)
                break
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            held = _held(child_pids(proc.pid) if processes > 1 else [proc.pid], port)
            assert sum(held.values()) == 48 and min(held.values()) >= 2, held
            conns[0].request("GET", "/arcgis/rest/services/S/MapServer?f=json")
            assert conns[0].getresponse().status == 200
        finally:
            _close(conns)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert proc.returncode == 0


@pytest.mark.parametrize("reuseport,processes", [(False, 2), (True, 2), (True, 1)])
def test_a_port_another_program_listens_on_is_a_one_line_error(tmp_path, sample_v2, reuseport, processes):
    """A foreign listener makes `serve` fail with one line and exit code 1, also when it set
    SO_REUSEPORT itself (same user): our sockets must not join its group and share its traffic."""
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    port = other.getsockname()[1]
    try:
        r = subprocess.run([PYTHON, "-m", "tilecrate.cli", "serve", "--cache", str(sample_v2),
                            "--data-dir", str(tmp_path / "data"), "--port", str(port), "--processes", str(processes)],
                           capture_output=True, text=True, timeout=60)
    finally:
        other.close()
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_sigterm_stops_every_process_and_frees_the_port(tmp_path, sample_v2):
    srv = _server(tmp_path, sample_v2, processes=3)
    srv.start()
    kids = child_pids(srv.proc.pid)
    port = srv.port
    assert len(kids) == 3 and len(_tcp(port, LISTEN)) == 3
    srv.stop()
    assert not _tcp(port, LISTEN)
    with socket.socket() as s:     # a plain socket can take the port again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))

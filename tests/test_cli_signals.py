"""Signals, closed pipes and temp files, as a shell, `kill`, systemd or CI deliver them to the real CLI process.

A long export is simulated by a progress bar that sleeps on every update (the export itself is the
real one, in a real process): the test waits for the hidden temp output to appear, then signals.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from tilecrate.package.tempfiles import is_stale, sweep_stale_temps, temp_path

# runs `tilecrate ARGS...` with every progress update taking 0.3 s
SLOW = textwrap.dedent("""
    import sys, time
    import tilecrate.commands.output as output

    class SlowBar:
        def update(self, n=1):
            time.sleep(0.3)
        def set_postfix_str(self, s="", refresh=True):
            pass
        def close(self):
            pass
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return None

    output.progress_bar = lambda *a, **k: SlowBar()
    if __name__ == "__main__":        # Dask's worker processes are spawned: they import this file
        from tilecrate.cli import main
        sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("cli_signals") / "s"
    make_sample(out, SampleSpec())          # levels 0-5, 123 tiles
    return out


@pytest.fixture()
def slow(tmp_path) -> Path:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW)
    return script


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "tilecrate.cli", *map(str, args)]


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".tmp-" in p.name)


def start_slow_export(slow: Path, cache: Path, out: Path, *more) -> subprocess.Popen:
    """A slow export; returns once its hidden temp output exists (the export is mid-way)."""
    proc = subprocess.Popen([sys.executable, str(slow), "export", str(cache), "-o", str(out), "--levels", "0-5",
                             *more], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not temps(out.parent):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the export never started writing: {proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("folder", [False, True], ids=["tpkx", "folder"])
def test_signal_stops_export_and_removes_partial_output(cache, slow, tmp_path, sig, code, word, folder):
    out = tmp_path / "out" / ("o" if folder else "o.tpkx")
    out.parent.mkdir()
    proc = start_slow_export(slow, cache, out, *(["--no-tile-package"] if folder else []))
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr[-2000:]
    assert stderr.splitlines() == [f"tilecrate: error: {word}" + (" (SIGTERM)" if sig == signal.SIGTERM else "")]
    assert temps(out.parent) == [] and not out.exists()


def test_sigterm_stops_an_export_on_a_local_dask_cluster(cache, slow, tmp_path):
    """--scheduler local: SIGTERM cancels the tasks, removes staging and temp, and stops the worker processes."""
    proc = start_slow_export(slow, cache, tmp_path / "o.tpkx", "--scheduler", "local", "--workers", "2")
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.splitlines()[-1] == "tilecrate: error: terminated (SIGTERM)"
    assert temps(tmp_path) == [] and not (tmp_path / "o.tpkx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "worker processes outlived the export"


def test_sighup_stops_an_export_unless_ignored(cache, slow, tmp_path):
    """A closed terminal (SIGHUP) stops the export like SIGTERM; under `nohup` (SIGHUP ignored) it goes on."""
    proc = start_slow_export(slow, cache, tmp_path / "o.tpkx")
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 129 and stderr.splitlines() == ["tilecrate: error: terminated (SIGHUP)"]
    assert temps(tmp_path) == [] and not (tmp_path / "o.tpkx").exists()
    out = tmp_path / "n.tpkx"
    proc = subprocess.Popen([sys.executable, str(slow), "export", str(cache), "-o", str(out), "--levels", "0-2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    while not temps(tmp_path) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None


def test_write_failure_is_one_line_and_leaves_nothing(cache, tmp_path):
    """A write that fails midway (here: a 64 KiB file size limit, EFBIG) is one line and removes the temp."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # the write fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "o.tpkx"
    r = subprocess.run(cli("export", cache, "-o", out, "--levels", "0-5"), capture_output=True, text=True,
                       timeout=60, preexec_fn=limit)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr[-2000:]
    assert r.stderr.startswith("tilecrate: error: ") and "Traceback" not in r.stderr
    assert temps(tmp_path) == [] and not out.exists()


def test_sigterm_with_json_reports_the_error_as_json(cache, slow, tmp_path):
    proc = start_slow_export(slow, cache, tmp_path / "o.tpkx", "--json")
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143 and json.loads(stdout) == {"error": "terminated (SIGTERM)"}
    assert temps(tmp_path) == []


def test_sigkilled_export_temp_is_swept_by_the_next_export(cache, slow, tmp_path):
    out = tmp_path / "o.tpkx"
    proc = start_slow_export(slow, cache, out)
    proc.kill()
    proc.wait(timeout=30)
    left = temps(tmp_path)
    assert len(left) == 1 and is_stale(left[0].name, out.name)     # SIGKILL cannot clean up
    # temps that must survive: one of a live process (this one), one of another host, a stranger's file
    live = Path(temp_path(str(out)))
    live.write_bytes(b"live")
    other_host = tmp_path / (".o.tpkx.tmp-00000000-1-1-" + "ab" * 4)
    other_host.write_bytes(b"elsewhere")
    stranger = tmp_path / ".o.tpkx.tmp-notours"
    stranger.write_bytes(b"user file")
    r = subprocess.run(cli("export", cache, "-o", out, "--levels", "0-2", "--json"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not left[0].exists()
    assert live.exists() and other_host.exists() and stranger.exists()
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None


def test_sweep_removes_only_dead_writers_temps(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "x.tpkx"
    ours = Path(temp_path(str(out)))                         # this process: alive
    name = ours.name
    host, pid, start, rand = name.rsplit(".tmp-", 1)[1].split("-")
    assert int(pid) == os.getpid()
    dead_file = tmp_path / f".x.tpkx.tmp-{host}-{dead.pid}-{start}-{rand}"
    dead_dir = tmp_path / f".other.tpkx.tmp-{host}-{dead.pid}-1-{rand}"    # a folder output, another name
    reused = tmp_path / f".x.tpkx.tmp-{host}-{os.getpid()}-{int(start) + 1}-{rand}"   # our pid, earlier owner
    legacy = tmp_path / f".x.tpkx.tmp-{dead.pid}-{rand}"     # the form without host and start time
    legacy_other = tmp_path / f".y.tpkx.tmp-{dead.pid}-{rand}"     # same form, another output: not judged
    # near misses of the format are not ours: int() would read '1_0' and '+5', hex() upper case
    odd = [tmp_path / f".x.tpkx.tmp-{host}-1_0-{start}-{rand}", tmp_path / f".x.tpkx.tmp-{host}-+5-{start}-{rand}",
           tmp_path / f".x.tpkx.tmp-{host[:-1]}A-{dead.pid}-{start}-{rand}", tmp_path / f".x.tpkx.tmp-{dead.pid}-{rand}x"]
    for p in (ours, dead_file, reused, legacy, legacy_other, *odd):
        p.write_bytes(b"x")
    dead_dir.mkdir()
    (dead_dir / "_alllayers").mkdir()
    (dead_dir / "_alllayers" / "f").write_bytes(b"x")
    link_target = tmp_path / "target"
    link_target.mkdir()
    (link_target / "keep").write_bytes(b"x")
    dead_link = tmp_path / f".z.tpkx.tmp-{host}-{dead.pid}-1-{rand}"
    dead_link.symlink_to(link_target)
    removed = sweep_stale_temps(str(out))
    assert sorted(removed) == sorted(map(str, (dead_file, dead_dir, reused, legacy, dead_link)))
    assert ours.exists() and legacy_other.exists() and (link_target / "keep").exists()
    assert all(p.exists() for p in odd)
    assert sweep_stale_temps(str(tmp_path / "missing" / "x.tpkx")) == []


def test_closed_stdout_after_a_correct_export_exits_0(cache, tmp_path):
    out = tmp_path / "o.tpkx"
    proc = subprocess.Popen(cli("export", cache, "-o", out, "--levels", "0-3", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                      # the reader is gone before anything is written
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and stderr == ""
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None


@pytest.mark.parametrize("args", [["inspect", "{cache}", "--json"], ["inspect", "{cache}"],
                                  ["estimate", "{cache}", "--levels", "0-5"], ["--version"], ["--help"]])
def test_pipe_into_head_exits_0(cache, args):
    cmd = " ".join(f"'{a.format(cache=cache)}'" for a in args)
    # pipefail: the pipeline fails if tilecrate does; head stops reading after one line
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m tilecrate.cli {cmd} | head -c 1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    assert len(r.stdout) == 1


def test_error_with_closed_stdout_still_fails_with_its_line(tmp_path):
    proc = subprocess.Popen(cli("inspect", tmp_path / "nope", "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert stderr == f"tilecrate: error: {tmp_path / 'nope'}: no such file or folder\n"


def test_progress_bar_only_on_a_terminal(cache, tmp_path):
    """Piped stderr gets no bar (a bar never writes into a pipe or a log file)."""
    r = subprocess.run(cli("export", cache, "-o", tmp_path / "o.tpkx", "--levels", "0-3"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""


@pytest.mark.parametrize("command", [["inspect", "{cache}"], ["sample", "{out}", "--levels", "0-6", "--workers", "1"],
                                     ["compare", "{cache}", "--qualities", "50,40", "--sample", "20"]])
def test_sigterm_stops_other_commands_with_one_line(cache, slow, tmp_path, command):
    out = tmp_path / "made"
    args = [a.format(cache=cache, out=out) for a in command]
    proc = subprocess.Popen([sys.executable, str(slow), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(1.5)              # imported and inside the (slowed) work: the first update sleeps
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.splitlines() == ["tilecrate: error: terminated (SIGTERM)"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_sigterm_and_ctrl_c(cache, tmp_path, sig):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(cli("serve", "--cache", cache, "--port", port, "--data-dir", tmp_path / "d", "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving" in line, line + proc.stderr.read()[-2000:]
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("args", [["inspect", "{cache}", "--json"], ["inspect", "{cache}"], ["--version"]])
def test_stdout_on_a_full_disk_is_one_line(cache, args):
    """stdout redirected to a full disk (/dev/full): exit 1 and one line, not a traceback at exit."""
    with open("/dev/full", "w") as full:
        r = subprocess.run(cli(*(a.format(cache=cache) for a in args)), stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines() in (
        ["tilecrate: error: stdout: No space left on device"], ["tilecrate: error: No space left on device"]), r.stderr


def test_longest_legal_output_name_gets_a_legal_temp_name(cache, tmp_path):
    """A 255-byte output name: the temp name next to it is shortened to fit, the export succeeds."""
    name = "é" * 60 + "a" * 130 + ".tpkx"            # 255 bytes in UTF-8
    assert len(name.encode()) == 255
    tmp = Path(temp_path(str(tmp_path / name)))
    assert len(os.fsencode(tmp.name)) <= 255 and tmp.name.startswith(".é")
    tmp.write_bytes(b"x")                              # a legal name: the file system takes it
    r = subprocess.run(cli("export", cache, "-o", tmp_path / name, "--levels", "0-2", "--json"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["path"] == str(tmp_path / name)
    assert temps(tmp_path) == [tmp]                   # ours, alive: left alone

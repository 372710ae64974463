"""Every failure of the CLI is one line `tilecrate: error: ...` on stderr and an exit code, never a traceback.

Hostile inputs run the real command in a subprocess (with a timeout, so a hang fails the test);
the last guard for exceptions nothing below turned into a TilecrateError is tested in-process.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import real_path
from tilecrate.cli import main

DEEP = "[" * 20_000 + "]" * 20_000
DEEP_OBJ = '{"rings":' + DEEP + "}"
MARS_WKT = ('GEOGCS["Mars 2000",DATUM["D_Mars_2000",SPHEROID["Mars_2000_IAU_IAG",3396190.0,169.8944472236118]],'
            'PRIMEM["Reference_Meridian",0.0],UNIT["Degree",0.0174532925199433]]')


def run(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "tilecrate.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line(r, code=1):
    """Exit `code`, exactly one line on stderr in our format, no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("tilecrate: error: ") and "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    from tilecrate.sample import SampleSpec, make_sample

    out = tmp_path_factory.mktemp("cli_errors") / "s"
    make_sample(out, SampleSpec(levels=(0, 1, 2)))
    return out


@pytest.mark.parametrize("output", ["", " ", ".", "..", "/", "sub/.."])
def test_empty_or_nameless_output_is_a_usage_error(small, tmp_path, output):
    r = run("export", small, "-o", output, "--levels", "0-1")
    line = assert_one_line(r, 2)
    assert "-o/--output" in line
    assert not any(p.name.startswith(".") for p in tmp_path.parent.iterdir() if ".tmp-" in p.name)


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_output_over_a_device_or_fifo_is_refused(small, tmp_path, kind):
    """The finished output is renamed over -o: a device node or a FIFO there is refused, not replaced."""
    if kind == "fifo":
        target = tmp_path / "pipe.tpkx"
        os.mkfifo(target)
    else:
        target = Path(os.devnull)
    line = assert_one_line(run("export", small, "-o", target, "--levels", "0-1"), 2)
    assert "not a regular file" in line
    assert Path(os.devnull).is_char_device() and (kind != "fifo" or target.is_fifo())
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("command", ["export", "compare"])
@pytest.mark.parametrize("threads", ["-1", "100000", "two"])
def test_thread_counts_are_bounded(small, tmp_path, command, threads):
    """--threads 100000 would start that many threads (and OpenMP teams): refused before any work."""
    out = ["-o", tmp_path / "t.tpkx", "--levels", "0-1"] if command == "export" else []
    line = assert_one_line(run(command, small, *out, "--threads", threads), 2)
    assert "--threads" in line
    assert not (tmp_path / "t.tpkx").exists()


def test_usage_errors_are_one_line_and_json(small):
    line = assert_one_line(run("export", small, "--levels", "0-1"), 2)
    assert "-o/--output" in line and "tilecrate export --help" in line
    r = run("export", small, "--levels", "0-1", "--json")
    assert_one_line(r, 2)
    assert "-o/--output" in json.loads(r.stdout)["error"]
    assert "invalid choice" in assert_one_line(run("frobnicate"), 2)
    assert assert_one_line(run(), 2).endswith("(see `tilecrate --help`)")


@pytest.mark.parametrize("option", ["--levels", "--extent", "--aoi", "--aoi-sr"])
@pytest.mark.parametrize("command", ["estimate", "export"])
def test_deeply_nested_json(small, tmp_path, option, command):
    args = {"--levels": ["--levels", DEEP], "--extent": ["--levels", "0-1", "--extent", DEEP_OBJ],
            "--aoi": ["--levels", "0-1", "--aoi", DEEP_OBJ],
            "--aoi-sr": ["--levels", "0-1", "--extent=-10,30,10,50", "--aoi-sr", '{"wkt":' + DEEP + "}"]}[option]
    out = ["-o", tmp_path / "x.tpkx"] if command == "export" else []
    r = run(command, small, *out, *args)
    assert_one_line(r, r.returncode if r.returncode in (1, 2) else 1)
    assert not (tmp_path / "x.tpkx").exists()


def test_deeply_nested_aoi_file(small, tmp_path):
    f = tmp_path / "deep.json"
    f.write_text(DEEP_OBJ)
    assert_one_line(run("estimate", small, "--levels", "0-1", "--aoi", f))


def test_wkt_on_another_planet(small, tmp_path):
    r = run("export", small, "-o", tmp_path / "m.tpkx", "--levels", "0-1", "--extent=-10,30,10,50",
            "--aoi-sr", json.dumps({"wkt": MARS_WKT}))
    assert_one_line(r)
    assert not (tmp_path / "m.tpkx").exists()


def _deflated_copy(src: Path, dst: Path) -> str:
    """A copy of a .tpk with every bundle entry deflated; returns the name of the largest bundle."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith(".bundle") else zipfile.ZIP_STORED
            zout.writestr(info.filename, data, compress_type=kind)
        return max((i for i in zin.infolist() if i.filename.endswith(".bundle")), key=lambda i: i.file_size).filename


def test_corrupt_deflated_tpk_entry(tmp_path):
    pkg = tmp_path / "deflated.tpk"
    name = _deflated_copy(real_path("states_filled.tpk"), pkg)
    with zipfile.ZipFile(pkg) as z:
        info = z.getinfo(name)
    raw = bytearray(pkg.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 2, start + min(info.compress_size, 64)):
        raw[i] ^= 0x5A                    # garbage inside the deflate stream
    pkg.write_bytes(bytes(raw))
    for args in (["inspect", pkg], ["export", pkg, "-o", tmp_path / "o.tpkx", "--levels", "0-4"]):
        r = run(*args)
        assert_one_line(r)
    assert not (tmp_path / "o.tpkx").exists()


def test_mangled_central_directory(tmp_path):
    pkg = tmp_path / "mangled.tpk"
    shutil.copyfile(real_path("states_filled.tpk"), pkg)
    raw = bytearray(pkg.read_bytes())
    # every central directory entry's compression method becomes 99 (AES, which zipfile cannot read)
    at = raw.find(b"PK\x01\x02")
    assert at > 0
    while at >= 0:
        raw[at + 10:at + 12] = struct.pack("<H", 99)
        at = raw.find(b"PK\x01\x02", at + 4)
    pkg.write_bytes(bytes(raw))
    for args in (["inspect", pkg], ["export", pkg, "-o", tmp_path / "o.tpkx", "--levels", "0-4"]):
        assert_one_line(run(*args))


def test_bundle_name_beyond_any_integer(small, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(small, cache)
    level = cache / "_alllayers" / "L00"
    bundle = next(level.glob("*.bundle"))
    shutil.copyfile(bundle, level / "Rffffffffffffffffc0000.bundle")
    for args in (["inspect", cache], ["estimate", cache, "--levels", "0-2"],
                 ["export", cache, "-o", tmp_path / "o.tpkx", "--levels", "0-2"]):
        r = run(*args)
        # refused with one line, or read with the odd file left out (a warning is not a traceback)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-2000:]
        if r.returncode == 1:
            assert_one_line(r)


def test_fifo_named_like_a_bundle_does_not_hang(small, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(small, cache)
    os.mkfifo(cache / "_alllayers" / "L01" / "R0080C0080.bundle")
    for args in (["inspect", cache], ["export", cache, "-o", tmp_path / "o.tpkx", "--levels", "0-2"]):
        try:
            r = run(*args, timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`tilecrate {args[0]}` hung on a FIFO named like a bundle")
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
        if r.returncode != 0:
            assert_one_line(r)


def test_unexpected_errors_are_one_line(small, monkeypatch, capsys):
    """The last guard: an exception nothing below expected is one line, its traceback only on request."""
    import tilecrate.commands.inspect as inspect_cmd

    def boom(*a, **k):
        raise RuntimeError("something\nbroke " + "x" * 5000)

    monkeypatch.setattr(inspect_cmd, "describe", boom)
    assert main(["inspect", str(small)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tilecrate: error: unexpected RuntimeError: something broke")
    assert "TILECRATE_DEBUG=1" in err and len(err) < 1200
    monkeypatch.setenv("TILECRATE_DEBUG", "1")
    assert main(["inspect", str(small), "--json"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and captured.err.splitlines()[-1].startswith("tilecrate: error: ")
    assert json.loads(captured.out)["error"].startswith("unexpected RuntimeError")


@pytest.mark.parametrize("exc, code, text", [
    (RecursionError("maximum recursion depth exceeded"), 1, "nested too deeply"),
    (MemoryError(), 1, "out of memory"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (PermissionError(13, "Permission denied", "/some/file"), 1, "/some/file: Permission denied"),
])
def test_guard_names_the_kind_of_failure(small, monkeypatch, capsys, exc, code, text):
    import tilecrate.commands.inspect as inspect_cmd

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(inspect_cmd, "describe", fail)
    assert main(["inspect", str(small)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err


@pytest.mark.parametrize("kind", ["huge", "devzero", "fifo", "binary"])
def test_aoi_file_that_is_not_a_small_text_file(small, tmp_path, kind):
    """--aoi FILE: a 200 MiB file (sparse), /dev/zero, a FIFO nobody writes to, non-UTF-8 bytes: one line, at once."""
    path = tmp_path / "aoi.json"
    if kind == "huge":
        with open(path, "wb") as f:
            f.truncate(200 << 20)
    elif kind == "devzero":
        path = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b'{"rings": [[[0, 0], [1, 1]]], "name": "\xff\xfe"}')
    try:
        r = run("estimate", small, "--levels", "0-1", "--aoi", path, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"--aoi {kind} hung")
    line = assert_one_line(r)
    assert "--aoi" in line

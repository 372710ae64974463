"""Attacks on last round's package paths: vtpk `_locate_stored` / `read_many` (a lenient listing of a
package's stored resources), the zip writer's gathered writes and `kcopy.write_all` (short writes,
a full disk, more buffers than IOV_MAX). Real files and real kernel errors: /dev/full gives ENOSPC,
RLIMIT_FSIZE a short write followed by EFBIG, as a disk filling up mid-write does."""
from __future__ import annotations

import errno
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
from tilecrate import open_cache
from tilecrate.errors import ExportError
from tilecrate.export import export
from tilecrate.package import kcopy
from tilecrate.package.vtpk import _Source
from tilecrate.request import ExportRequest
from test_server_support import Server, free_port


@pytest.fixture(scope="module")
def fixture_vtpk(real_dir) -> str:
    return str(real_path("natural-earth.vtpk"))


def _headers_past_the_end(src: str, dst: Path) -> list[str]:
    """A copy of the package whose central directory places every resource's, metadata's and
    thumbnail's local header past the end of the file (the tiles' entries untouched)."""
    data = bytearray(Path(src).read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_off = struct.unpack_from("<II", data, eocd + 12)
    moved, p = [], cd_off
    while p < cd_off + cd_size:
        assert data[p:p + 4] == b"PK\x01\x02"
        nl, el, cl = struct.unpack_from("<HHH", data, p + 28)
        name = data[p + 46:p + 46 + nl].decode()
        if "/resources/" in name or name.endswith("metadata.json") or "thumbnail" in name:
            struct.pack_into("<I", data, p + 42, len(data) + 1000 + len(moved))
            moved.append(name)
        p += 46 + nl + el + cl
    dst.write_bytes(data)
    return moved


def test_resources_whose_headers_lie_past_the_end(fixture_vtpk, tmp_path):
    """Every stored resource placed past the end by the central directory: the listing ran its span
    backwards (a bare EINVAL from pread, no file named; the VectorTileServer could not start). Now
    the package opens, each such file fails with its name when copied or served, tiles are served."""
    bad = tmp_path / "bad.vtpk"
    moved = _headers_past_the_end(fixture_vtpk, bad)
    assert len(moved) > 100
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match=r"cannot copy .*(resources|thumbnail|metadata)"):
        export(str(bad), ExportRequest(levels="0-1"), str(out / "x.vtpk"))
    assert os.listdir(out) == []
    with open_cache(str(bad)) as cache:
        src = _Source(cache)
        try:
            font = next(f for f in src.files.values() if "/fonts/" in f.name)
            with pytest.raises(ExportError, match="fonts/"):
                src.read_whole(font)
            with pytest.raises(ExportError, match="fonts/"):
                src.read_many([f for f in src.files.values() if "/fonts/" in f.name][:5])
        finally:
            src.close()
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n[services.V]\nsource = "{bad}"\n')
    srv = Server(cfg, tmp_path / "data", free_port()).start()
    try:
        base = "/arcgis/rest/services/V/VectorTileServer"
        assert srv.get(base + "/tile/0/0/0.pbf").status == 200
        style = srv.get(base + "/resources/styles/root.json")
        assert style.json()["error"]["code"] == 400, style.body[:200]  # Esri JSON (HTTP 200, as ArcGIS)
        assert srv.proc.poll() is None
    finally:
        srv.stop()


_FSIZE = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the kernel's EFBIG instead of the signal
from tilecrate.export import export
from tilecrate.request import ExportRequest
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    export(sys.argv[1], ExportRequest(levels="0-3"), sys.argv[2])
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(3)
"""


@pytest.mark.parametrize("limit", [40_000, 700_000, 2_000_000])
def test_a_vtpk_export_that_runs_out_of_room(fixture_vtpk, tmp_path, limit):
    """A file size limit (the kernel writes up to it, then EFBIG, as a disk filling up does) at three
    points of a .vtpk export (resources gathered by writev, tiles, the end): one readable error and
    no partial package left behind, never a hang or a package cut short."""
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", _FSIZE, fixture_vtpk, str(out / "x.vtpk"), str(limit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert r.stdout.startswith("ExportError") and "cannot write the export (File too large)" in r.stdout, r.stdout
    assert os.listdir(out) == []


_FSIZE_TILES = _FSIZE.replace('ExportRequest(levels="0-3")', 'ExportRequest(levels="0-4")')


@pytest.mark.parametrize("ext", ["tpkx", "pmtiles"])
def test_an_export_that_runs_out_of_room_after_its_blocks_were_reserved(sample_v2, tmp_path, ext):
    """The .tpkx and .pmtiles writers reserve their blocks up front (fallocate); past a file size limit the
    kernel refuses the reservation (EFBIG): the export goes on without it and ends, as the disk fills, in one
    readable error with nothing left behind; under the limit, the file is cut to its exact size."""
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", _FSIZE_TILES, sample_v2, str(out / f"x.{ext}"), "300000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert r.stdout.startswith("ExportError") and "File too large" in r.stdout, r.stdout
    assert os.listdir(out) == []
    done = export(sample_v2, ExportRequest(levels="0-4"), str(out / f"y.{ext}"))
    assert done.size == (out / f"y.{ext}").stat().st_size


def test_preallocate_reserves_or_declines_and_a_full_disk_is_an_error(sample_v2, tmp_path, monkeypatch):
    """preallocate: blocks for a regular file, nothing for a pipe or a size of 0; a zip written after a
    reservation larger or smaller than it is cut to its own size and reads back; ENOSPC at the reservation
    is the export's "disk is full" error before a byte is written, with nothing left behind."""
    import zipfile

    from tilecrate._files import preallocate
    from tilecrate.package import zipstream

    path = tmp_path / "r"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert preallocate(fd, 1 << 20) and os.fstat(fd).st_size == 1 << 20
        assert not preallocate(fd, 0) and not preallocate(fd, -5)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        assert not preallocate(w, 4096)
    finally:
        os.close(r)
        os.close(w)
    for reserve, mode, before in ((1 << 20, "wb", b""), (10, "wb", b""), (1 << 20, "ab", b"P" * 1000),
                                  (1 << 20, "r+b", b"Q" * 1000)):
        z = tmp_path / f"z{reserve}{mode}.zip"
        z.write_bytes(before)
        with open(z, mode) as f:
            f.seek(len(before))
            writer = zipstream.ZipWriter(f, reserve=reserve)     # appending: nothing reserved past the end
            writer.add_bytes("a.txt", b"x" * 1000)
            size = writer.close()
            writer.close()
        assert z.stat().st_size == len(before) + size
        assert z.read_bytes()[:len(before)] == before
        assert zipfile.ZipFile(z).read("a.txt") == b"x" * 1000

    def full(fd, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipstream, "preallocate", full)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError, match="disk is full"):
        export(sample_v2, ExportRequest(levels="0-3"), str(out / "full.tpkx"))
    assert os.listdir(out) == []
    # the removed temp file is not held open by the failed writer (its blocks would stay taken)
    held = [os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{n}")]
    assert not [h for h in held if str(out) in h], held


def test_write_all_on_a_full_disk_and_past_iov_max(tmp_path):
    """More buffers than one writev takes land in order; /dev/full's ENOSPC is raised, not looped on."""
    parts = [bytes([i % 251]) * (1 + i % 7) for i in range(3 * kcopy.IOV_MAX + 5)]
    parts[10] = memoryview(b"..xyz..")[2:5]
    parts[kcopy.IOV_MAX] = bytearray(b"at the batch edge")
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        kcopy.write_all(fd, parts)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(bytes(p) for p in parts)
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            kcopy.write_all(fd, parts)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


_SHORT = r"""
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from tilecrate.package import kcopy
resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
try:
    kcopy.write_all(fd, [bytes([i % 256]) * 10 for i in range(2000)])
except OSError as e:
    print(e.errno)
"""


def test_write_all_after_a_short_write_raises_the_kernels_error(tmp_path):
    """The kernel writes what fits under the limit (a short writev), then refuses: the bytes written
    are the first ones in order and the error reaches the caller."""
    path = tmp_path / "f"
    r = subprocess.run([sys.executable, "-c", _SHORT, str(path)], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == str(errno.EFBIG), (r.stdout, r.stderr[-1000:])
    assert path.read_bytes() == b"".join(bytes([i % 256]) * 10 for i in range(500))


_SQLITE_UNDER_A_WRITER = r"""
import os, random, sqlite3, sys, threading, time
from tilecrate._sqlite import Reader, SqliteError
path = sys.argv[1]
db = sqlite3.connect(path)
db.execute("CREATE TABLE tiles (zoom_level, tile_column, tile_row, tile_data)")
rng = random.Random(7)
rows = [(1, i, i, rng.randbytes(rng.randrange(1, 40000))) for i in range(300)]
db.executemany("INSERT INTO tiles VALUES (?, ?, ?, ?)", rows)
db.commit()
db.close()
whole = open(path, "rb").read()
stop = threading.Event()

def writer():
    w = random.Random(1)
    while not stop.is_set():
        with open(path, "r+b") as f:                      # pages scribbled over in place
            f.seek(w.randrange(len(whole)))
            f.write(w.randbytes(w.randrange(1, 5000)))
        if w.random() < 0.1:
            os.truncate(path, w.randrange(len(whole)))     # cut short
        if w.random() < 0.2:
            open(path, "wb").write(whole)                 # whole again
        time.sleep(0.0005)

t = threading.Thread(target=writer)
t.start()
ok = errors = 0
end = time.monotonic() + float(sys.argv[2])
try:
    while time.monotonic() < end:
        try:
            r = Reader(path)
        except SqliteError:
            errors += 1
            continue
        for _ in range(5):
            try:
                keys, offs, buf = r.blobs("SELECT tile_column, tile_data FROM tiles ORDER BY tile_column", (),
                                          hint=100, max_bytes=20_000_000)
                assert len(offs) == len(keys) + 1 and offs[-1] == len(buf) and (offs[1:] >= offs[:-1]).all()
                ok += 1
            except (SqliteError, MemoryError):
                errors += 1
            try:
                r.ints3("SELECT tile_column, tile_row, length(tile_data) FROM tiles WHERE zoom_level = ?", (1,))
            except SqliteError:
                errors += 1
        r.close()
finally:
    stop.set()
    t.join()
print(ok, errors)
"""


def test_the_sqlite_reader_under_a_writer_scribbling_over_the_file(tmp_path):
    """_sqlite.Reader's C code on a file rewritten in place, truncated and restored while it queries
    (in a child process: a crash is a failure, not a lost test run): results whose offsets hold
    together, or SqliteError; never a crash, a hang or a connection that cannot close."""
    r = subprocess.run([sys.executable, "-c", _SQLITE_UNDER_A_WRITER, str(tmp_path / "t.db"), "2.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    ok, errors = map(int, r.stdout.split())
    assert errors > 0, (ok, errors)                       # the writer did reach the reader


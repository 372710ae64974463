"""A cache that changes while it is open: every read gives the file's current version or a clear error.

Bundles are replaced in place and by rename, truncated, added and removed under an open `Cache`;
names off the 128-tile grid and FIFOs named like bundles are refused; packages overwritten in
place and bundles truncated during an export fail clearly instead of killing the process
(those run in a subprocess, so a SIGBUS or a hang fails the test instead of the run).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import tilecrate
from tilecrate.sources import compact as cache_mod
from tilecrate.cache import BundleRef, open_cache
from tilecrate.errors import BundleError, CacheError
from tilecrate.presence import PresenceStore
from tilecrate.sample import SampleSpec, _v1_bundle, _v2_bundle, make_sample

PY = sys.executable


def tile_bytes(version: int, level: int, row: int, col: int) -> bytes:
    """A tile that says which version it belongs to; sizes differ between versions."""
    return f"v{version}/L{level}/{row}/{col}/".encode() + bytes([version % 251]) * (50 + 37 * version + row)


def version_tiles(version: int, level: int) -> dict[int, bytes]:
    """Row-major cell -> bytes of one version of the level's bundle R0000C0000 (cells vary by version)."""
    n = 1 << level
    cells = [r * 128 + c for r in range(n) for c in range(n) if (r + c + version) % 3 != 0 or version == 0]
    return {i: tile_bytes(version, level, i // 128, i % 128) for i in cells}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """conf.xml of a small generated cache (levels 0-2), without its bundles."""
    root = tmp_path_factory.mktemp("base") / "c"
    make_sample(root, SampleSpec(levels=(0, 1, 2)))
    return root


def make_cache(base: Path, dest: Path, version: int = 0) -> Path:
    shutil.copytree(base, dest)
    for level in (0, 1, 2):
        write_bundle(dest, level, version)
    return dest


def bundle_path(root: Path, level: int, name: str = "R0000C0000.bundle") -> Path:
    return root / "_alllayers" / f"L{level:02d}" / name


def write_bundle(root: Path, level: int, version: int, name: str = "R0000C0000.bundle") -> Path:
    p = bundle_path(root, level, name)
    p.write_bytes(_v2_bundle(version_tiles(version, level)))
    return p


def replace_by_rename(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# folder bundles changing under an open Cache


def test_bundle_replaced_in_place_is_read_again(base, tmp_path):
    root = make_cache(base, tmp_path / "c")
    with open_cache(root) as c:
        assert c.tile(2, 1, 0) == tile_bytes(0, 2, 1, 0)
        key0 = c.bundle_key(BundleRef(2, 0, 0))
        with open(bundle_path(root, 2), "r+b") as f:        # same inode, new content
            f.truncate(0)
            f.write(_v2_bundle(version_tiles(1, 2)))
        assert c.tile(2, 1, 0) == tile_bytes(1, 2, 1, 0)
        offsets, sizes = c.index(BundleRef(2, 0, 0))
        assert int(np.count_nonzero(sizes)) == len(version_tiles(1, 2))
        assert c.bundle_key(BundleRef(2, 0, 0)) != key0
        assert c.tile(2, 0, 2) is None                       # (0 + 2 + 1) % 3 == 0: absent in version 1


@pytest.fixture(autouse=True)
def _look_up_paths_every_read(monkeypatch):
    """Tests replace files and read at once: no PATH_CHECK_SECONDS grace (tested on its own below)."""
    monkeypatch.setattr(cache_mod, "PATH_CHECK_SECONDS", 0.0)


def test_bundle_replaced_by_rename_is_read_again(base, tmp_path):
    root = make_cache(base, tmp_path / "c")
    with open_cache(root) as c:
        for version in (1, 2, 3):
            replace_by_rename(bundle_path(root, 1), _v2_bundle(version_tiles(version, 1)))
            got = {(r, col): c.tile(1, r, col) for r in range(2) for col in range(2)}
            want = {(i // 128, i % 128): t for i, t in version_tiles(version, 1).items()}
            assert {k: v for k, v in got.items() if v is not None} == want
            with c.open_bundle(BundleRef(1, 0, 0)) as data:
                assert {int(i): data.tile(int(i) // 128, int(i) % 128) for i in np.flatnonzero(data.sizes)} \
                    == version_tiles(version, 1)


def test_rename_is_seen_within_the_path_check_interval(base, tmp_path, monkeypatch):
    root = make_cache(base, tmp_path / "c")
    monkeypatch.setattr(cache_mod, "PATH_CHECK_SECONDS", 0.2)
    with open_cache(root) as c:
        assert c.tile(1, 0, 0) == tile_bytes(0, 1, 0, 0)
        replace_by_rename(bundle_path(root, 1), _v2_bundle(version_tiles(1, 1)))
        got = c.tile(1, 0, 0)                       # the old file's bytes, whole, or already the new ones
        assert got in (tile_bytes(0, 1, 0, 0), tile_bytes(1, 1, 0, 0))
        time.sleep(0.25)
        assert c.tile(1, 0, 0) == tile_bytes(1, 1, 0, 0)
        with open(bundle_path(root, 1), "r+b") as f:  # in place: noticed on the very next read
            f.truncate(0)
            f.write(_v2_bundle(version_tiles(2, 1)))
        assert c.tile(1, 0, 0) == tile_bytes(2, 1, 0, 0)


def test_same_size_rewrite_with_a_new_mtime_is_read_again(base, tmp_path):
    """Identity is (device, inode, size, mtime_ns): a rewrite of the same length is still noticed."""
    root = make_cache(base, tmp_path / "c")
    p = bundle_path(root, 0)
    with open_cache(root) as c:
        old = c.tile(0, 0, 0)
        data = bytearray(p.read_bytes())
        tail = len(data) - len(old)
        data[tail:] = bytes(b ^ 0xFF for b in data[tail:])
        st = p.stat()
        p.write_bytes(bytes(data))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert c.tile(0, 0, 0) == bytes(b ^ 0xFF for b in old)


def test_same_size_rewrite_that_puts_the_old_mtime_back_is_read_again(base, tmp_path):
    """A rewrite of the same length whose mtime is set back (`cp -p`, `rsync -t`, `touch -r`) is noticed by
    the ctime, which no caller can set: the index and the tile are read again, never the old offsets."""
    root = make_cache(base, tmp_path / "c")
    p = bundle_path(root, 0)
    with open_cache(root) as c:
        old = c.tile(0, 0, 0)
        key = c.bundle_key(BundleRef(0, 0, 0))
        data = bytearray(p.read_bytes())
        tail = len(data) - len(old)
        data[tail:] = bytes(b ^ 0xFF for b in data[tail:])
        st = p.stat()
        time.sleep(0.01)                        # a ctime tick apart on coarse-clock file systems
        p.write_bytes(bytes(data))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = p.stat()
        assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
        assert now.st_ctime_ns != st.st_ctime_ns
        assert c.tile(0, 0, 0) == bytes(b ^ 0xFF for b in old)
        assert c.bundle_key(BundleRef(0, 0, 0)) != key


def test_truncated_bundle_is_a_clear_error_and_a_fixed_one_reads_again(base, tmp_path):
    root = make_cache(base, tmp_path / "c")
    p = bundle_path(root, 2)
    with open_cache(root) as c:
        assert c.tile(2, 3, 3) is not None
        for cut in (10, 64, 131136 + 20, p.stat().st_size - 1):
            data = _v2_bundle(version_tiles(0, 2))
            p.write_bytes(data[:cut])
            with pytest.raises(BundleError) as e:
                c.tile(2, 3, 3)
            assert "R0000C0000.bundle" in str(e.value) and "\n" not in str(e.value)
        write_bundle(root, 2, 4)
        assert c.tile(2, 3, 3) == version_tiles(4, 2).get(3 * 128 + 3)


def test_bundle_changed_during_a_read_is_an_error_naming_it(base, tmp_path):
    root = make_cache(base, tmp_path / "c")
    with open_cache(root) as c:
        with c.open_bundle(BundleRef(2, 0, 0)) as data:
            assert data.tile(0, 0) == tile_bytes(0, 2, 0, 0)
            with open(bundle_path(root, 2), "ab") as f:      # another process appends meanwhile
                f.write(b"x" * 100)
            with pytest.raises(BundleError, match=r"R0000C0000.bundle: the file changed while it was being read"):
                data.tile(0, 1)
        assert c.tile(2, 0, 1) == tile_bytes(0, 2, 0, 1)       # a new request reads the new version


def test_open_bundle_can_insist_on_the_version_selected(base, tmp_path):
    root = make_cache(base, tmp_path / "c")
    ref = BundleRef(2, 0, 0)
    with open_cache(root) as c:
        key, _, sizes = c.index_with_key(ref)
        with c.open_bundle(ref, expect=key) as data:
            assert (data.sizes == sizes).all()
        replace_by_rename(bundle_path(root, 2), _v2_bundle(version_tiles(1, 2)))
        with pytest.raises(BundleError, match="changed after its tiles were selected"):
            c.open_bundle(ref, expect=key)
        assert c.bundle_key(ref)[1] == c.index_with_key(ref)[0] != key


def test_new_and_removed_bundles_while_open(base, tmp_path, monkeypatch):
    root = make_cache(base, tmp_path / "c")
    monkeypatch.setattr(cache_mod, "RELIST_SECONDS", 0.0)
    with open_cache(root) as c:
        assert c.bundles(2) == [BundleRef(2, 0, 0)]
        new = bundle_path(root, 2, "R0000C0080.bundle")
        new.write_bytes(_v2_bundle({5: b"new tile"}))
        assert c.tile(2, 0, 133) == b"new tile"
        assert BundleRef(2, 0, 128) in c.bundles(2)
        (root / "_alllayers" / "L03").mkdir()                   # a new level
        bundle_path(root, 3).write_bytes(_v2_bundle({0: b"level three"}))
        assert 3 in c.levels and c.tile(3, 0, 0) == b"level three"
        new.unlink()
        assert c.tile(2, 0, 133) is None
        assert BundleRef(2, 0, 128) not in c.bundles(2)
        bundle_path(root, 1).unlink()
        assert c.tile(1, 0, 0) is None and 1 not in c.levels
        with pytest.raises(CacheError, match="no bundle"):
            c.index(BundleRef(1, 0, 0))


def test_missing_tiles_do_not_relist_per_request(base, tmp_path, monkeypatch):
    root = make_cache(base, tmp_path / "c")
    calls = []
    real = cache_mod._list_level
    monkeypatch.setattr(cache_mod, "_list_level", lambda *a: calls.append(a) or real(*a))
    with open_cache(root) as c:
        calls.clear()
        for i in range(2000):                                    # a flood of requests for missing bundles
            assert c.tile(2, 128 * (1 + i % 50), 0) is None
        assert len(calls) <= 1
        monkeypatch.setattr(cache_mod, "RELIST_SECONDS", 0.0)
        bundle_path(root, 2, "R0080C0000.bundle").write_bytes(_v2_bundle({0: b"late"}))
        assert c.tile(2, 128, 0) == b"late"


def test_v1_bundle_and_bundlx_replaced(tmp_path):
    root = tmp_path / "v1"
    make_sample(root, SampleSpec(levels=(0, 1), version=1))
    lv = root / "_alllayers" / "L01"
    with open_cache(root) as c:
        assert c.version == 1
        c.tile(1, 0, 0)
        for version in (1, 2):
            tiles = version_tiles(version, 1)
            bundle, bundlx = _v1_bundle(tiles, 0, 0)
            replace_by_rename(lv / "R0000C0000.bundle", bundle)
            replace_by_rename(lv / "R0000C0000.bundlx", bundlx)
            assert {i: c.tile(1, i // 128, i % 128) for i in tiles} == tiles


def test_presence_store_keys_follow_the_identity(base, tmp_path):
    root = make_cache(base, tmp_path / "c")
    ref = BundleRef(2, 0, 0)
    with open_cache(root) as c, PresenceStore(str(tmp_path / "p")) as store:
        first = store.sizes(c, ref).copy()
        store.flush()
        assert (store.sizes(c, ref) == first).all() and store.hits == 1
        replace_by_rename(bundle_path(root, 2), _v2_bundle(version_tiles(2, 2)))
        again = store.sizes(c, ref)
        assert store.misses == 2 and int(np.count_nonzero(again)) == len(version_tiles(2, 2))


# ------------------------------------------------------------------------------------------
# names that do not fit the grid, entries that are not files


@pytest.mark.parametrize("name", ["R0005C0007.bundle", "R7fffffffC7fffffff.bundle",
                                  "Rffffffffffffffffc0000.bundle", "R100000000000000000C0000.bundle"])
def test_bundle_names_off_the_grid_are_refused_with_a_warning(base, tmp_path, name):
    root = make_cache(base, tmp_path / "c")
    bundle_path(root, 2, name).write_bytes(_v2_bundle({0: b"stray"}))
    with open_cache(root) as c:
        assert c.bundles(2) == [BundleRef(2, 0, 0)]
        assert any(name in w and "128" in w for w in c.warnings)
        summary = c.level_summary()
        assert summary[2]["bundles"] == 1 and summary[2]["tiles"] == len(version_tiles(0, 2))
        assert all(t != b"stray" for *_, t in c.iter_tiles())
        out = tmp_path / "o.tpkx"
        tilecrate.export(c, tilecrate.ExportRequest(levels="0-2"), str(out))
    with zipfile.ZipFile(out) as z:
        names = [n for n in z.namelist() if n.endswith(".bundle")]
        assert sorted(names) == ["tile/L00/R0000C0000.bundle", "tile/L01/R0000C0000.bundle",
                                 "tile/L02/R0000C0000.bundle"]
        assert all(b"stray" not in z.read(n) for n in names)
    pkg = tmp_path / "p.tpkx"                                    # the same name inside a package
    with zipfile.ZipFile(out) as src, zipfile.ZipFile(pkg, "w") as dst:
        for i in src.infolist():
            dst.writestr(i, src.read(i))
        dst.writestr(f"tile/L02/{name}", _v2_bundle({0: b"stray"}))
    with open_cache(pkg) as c:
        assert c.bundles(2) == [BundleRef(2, 0, 0)] and any(name in w for w in c.warnings)


FIFO_SCRIPT = r"""
import os, sys
import tilecrate
from tilecrate.cache import BundleRef
root = sys.argv[1]
with tilecrate.open_cache(root) as c:
    print("warnings", [w for w in c.warnings if "regular file" in w])
    print("bundles", c.bundles(2))
    print("tile", c.tile(2, 0, 128 + 1))
    try:
        print("tiles", sum(1 for _ in c.iter_tiles(0)))
        c.tile(1, 0, 0)
    except tilecrate.CacheError as e:
        print("error", e)
"""


def test_fifo_named_like_a_bundle_never_blocks(base, tmp_path):
    root = make_cache(base, tmp_path / "c")
    os.mkfifo(bundle_path(root, 2, "R0000C0080.bundle"))
    bundle_path(root, 2, "R0080C0080.bundle").mkdir()           # a folder named like a bundle too
    v1 = tmp_path / "v1"
    make_sample(v1, SampleSpec(levels=(0, 1), version=1))
    bx = v1 / "_alllayers" / "L01" / "R0000C0000.bundlx"
    bx.unlink()
    os.mkfifo(bx)                                               # a FIFO as the .bundlx of a real bundle
    for where in (root, v1):
        proc = subprocess.run([PY, "-c", FIFO_SCRIPT, str(where)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        if where == root:
            assert "R0000C0080.bundle: not a regular file; skipped" in proc.stdout
            assert "R0080C0080.bundle: not a regular file" in proc.stdout
            assert "bundles [BundleRef(level=2, row0=0, col0=0)]" in proc.stdout
            assert "tile None" in proc.stdout
        else:
            assert "error" in proc.stdout and "R0000C0000.bundlx: not a regular file" in proc.stdout
    fifo_pkg = tmp_path / "pipe.tpkx"                             # a FIFO given as the package itself
    os.mkfifo(fifo_pkg)
    proc = subprocess.run([PY, "-c", "import sys, tilecrate\ntry:\n    tilecrate.open_cache(sys.argv[1])\n"
                           "except tilecrate.CacheError as e:\n    print(e)", str(fifo_pkg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == f"{fifo_pkg}: not a regular file", (proc.stdout, proc.stderr)
    out = tmp_path / "o.tpkx"                                     # the CLI export finishes too
    proc = subprocess.run([str(Path(PY).parent / "tilecrate"), "export", str(root), "-o", str(out), "--levels", "0-2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()


# ------------------------------------------------------------------------------------------
# packages


def _package(tmp_path: Path, base: Path, version: int, name: str = "p.tpkx") -> bytes:
    folder = make_cache(base, tmp_path / f"src{version}-{name}", version)
    out = tmp_path / f"built{version}-{name}"
    tilecrate.export(str(folder), tilecrate.ExportRequest(levels="0-2"), str(out))
    return out.read_bytes()


PACKAGE_SCRIPT = r"""
import os, sys
import tilecrate
path, other = sys.argv[1], sys.argv[2]
c = tilecrate.open_cache(path)
before = [c.tile(2, r, col) for r in range(4) for col in range(4)]
print("before", sum(t is not None for t in before))
data = open(other, "rb").read()
for step in ("half", "zero", "other"):
    with open(path, "r+b") as f:          # overwritten in place: same inode
        if step == "half":
            f.truncate(os.path.getsize(path) // 2)
        elif step == "zero":
            f.truncate(0)
        else:
            f.truncate(0); f.write(data)
    try:
        got = [c.tile(2, r, col) for r in range(4) for col in range(4)]
        print(step, "tiles", sum(t is not None for t in got), got == before)
    except tilecrate.CacheError as e:
        print(step, "error", type(e).__name__, str(e).count("\n"))
print("done", "ok")
"""


def test_package_overwritten_in_place_while_open(base, tmp_path):
    v0, v1 = _package(tmp_path, base, 0), _package(tmp_path, base, 1)
    pkg, other = tmp_path / "live.tpkx", tmp_path / "other.tpkx"
    pkg.write_bytes(v0)
    other.write_bytes(v1)
    proc = subprocess.run([PY, "-c", PACKAGE_SCRIPT, str(pkg), str(other)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != -signal.SIGBUS, "SIGBUS"
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert lines["half"].startswith("error") and lines["zero"].startswith("error")
    assert lines["half"].endswith(" 0") and lines["zero"].endswith(" 0")          # one-line messages
    n1 = sum(1 for i in version_tiles(1, 2))
    assert lines["other"] == f"tiles {n1} False"             # the new package, read again
    assert "done" in lines


def test_package_replaced_by_rename_is_read_again(base, tmp_path):
    pkg = tmp_path / "live.tpkx"
    pkg.write_bytes(_package(tmp_path, base, 0))
    with open_cache(pkg) as c:
        assert c.tile(2, 1, 1) == tile_bytes(0, 2, 1, 1)
        replace_by_rename(pkg, _package(tmp_path, base, 2))
        assert c.tile(2, 1, 1) == tile_bytes(2, 2, 1, 1)
        assert {t for *_, t in c.iter_tiles(2)} == set(version_tiles(2, 2).values())


def test_corrupt_packages_give_one_line_errors(base, tmp_path, sample_v2):
    good = _package(tmp_path, base, 0)
    deflated = tmp_path / "d.tpk"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sample_v2.rglob("*"):
            if p.is_file():
                z.write(p, "v101/Layers/" + p.relative_to(sample_v2).as_posix())
    with zipfile.ZipFile(deflated) as z:
        info = z.getinfo("v101/Layers/_alllayers/L05/R0000C0000.bundle")
    raw = bytearray(deflated.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(0, 2000, 7):                                   # corrupt the deflate stream
        raw[start + 100 + k] ^= 0x5A
    bad_deflate = tmp_path / "bad_deflate.tpk"
    bad_deflate.write_bytes(bytes(raw))
    with open_cache(bad_deflate) as c:
        assert c.tile(0, 0, 0) is not None
        with pytest.raises(BundleError, match=r"R0000C0000.bundle: the deflated entry is corrupt") as e:
            c.index(BundleRef(5, 0, 0))
        assert "\n" not in str(e.value)
    eocd = good.rfind(b"PK\x05\x06")
    cd = int.from_bytes(good[eocd + 16:eocd + 20], "little")
    cases = {
        "truncated": good[: len(good) // 2],
        "cd_garbage": good[:cd] + bytes(b ^ 0x33 for b in good[cd:eocd]) + good[eocd:],
        "cd_method": good[:cd + 10] + b"\x63\x00" + good[cd + 12:],          # compression method 99
        "cd_offset": good[:eocd + 16] + (len(good) + 10).to_bytes(4, "little") + good[eocd + 20:],
        "eocd_count": good[:eocd + 8] + b"\xff\xff\xff\xff" + good[eocd + 12:],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.tpkx"
        p.write_bytes(data)
        try:
            with open_cache(p) as c:
                for ref in c.bundles():
                    try:
                        c.index(ref)
                    except CacheError as e:
                        assert "\n" not in str(e) and str(p) in str(e), (name, e)
        except CacheError as e:
            assert "\n" not in str(e) and str(p) in str(e), (name, e)


EXPORT_TRUNCATE_SCRIPT = r"""
import os, sys
import tilecrate
from tilecrate.sources import compact as cache_mod
src, out, when = sys.argv[1], sys.argv[2], sys.argv[3]
victims = [os.path.join(dp, f) for dp, _, fs in os.walk(src) for f in fs if f.endswith(".bundle")]
state = {"n": 0}

def truncate_all(size=65596 + 10):
    for v in victims:
        os.truncate(v, size)            # the source is re-seeded under the running export

def progress(p):
    state["n"] += 1
    if state["n"] == 2:
        truncate_all()

if when == "during-index-read":
    # another process truncates the bundles at the moment their V1 index is being read
    core = cache_mod._bundle
    class Hooked:
        def __getattr__(self, name):
            real = getattr(core, name)
            if not name.startswith("parse_v1"):
                return real
            def hooked(*a, **kw):
                if state["n"] >= 2:
                    truncate_all(70)
                return real(*a, **kw)
            return hooked
    cache_mod._bundle = Hooked()
try:
    tilecrate.export(src, tilecrate.ExportRequest(levels="0-5"), out, progress=progress, threads=1)
    print("finished")
except tilecrate.TilecrateError as e:
    print("error", type(e).__name__, any(w in str(e) for w in ("changed", "past the end", "truncated")))
    print(e, file=sys.stderr)
"""


@pytest.mark.parametrize("when", ["between-bundles", "during-index-read"])
def test_folder_bundle_truncated_during_an_export(sample_v1, sample_v2, tmp_path, when):
    src = tmp_path / "src"
    shutil.copytree(sample_v1 if when == "during-index-read" else sample_v2, src)
    out = tmp_path / "o.tpkx"
    proc = subprocess.run([PY, "-c", EXPORT_TRUNCATE_SCRIPT, str(src), str(out), when], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != -signal.SIGBUS, "SIGBUS"
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "error BundleError True", (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and ".bundle" in proc.stderr
    assert not out.exists()

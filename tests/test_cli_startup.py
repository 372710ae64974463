"""Start-up: `import tilecrate` and `tilecrate --version` load none of the heavy libraries, and each command
loads only what it needs. Checked on the modules a fresh process holds afterwards, not on timings
(those are in benchmarks/bench_startup.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tilecrate.commands import COMMANDS

HEAVY = ("numpy", "pyproj", "shapely", "aiohttp", "tqdm", "lmdb", "PIL.Image", "importlib.metadata",
         "urllib.request", "tilecrate.cache", "tilecrate._bundle")

# run the CLI's main (or any statement) in a fresh process, then list the modules it imported
PROBE = """
import json, sys
code = 0
{body}
sys.stdout.flush()
with open({out!r}, "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def modules_after(tmp_path, body: str) -> tuple[set[str], subprocess.CompletedProcess]:
    out = tmp_path / "modules.json"
    r = subprocess.run([sys.executable, "-c", PROBE.format(body=body, out=str(out))], capture_output=True,
                       text=True, timeout=120)
    assert out.exists(), r.stderr[-2000:]
    return set(json.loads(out.read_text())), r


def test_import_tilecrate_is_light(tmp_path):
    mods, r = modules_after(tmp_path, "import tilecrate")
    assert r.returncode == 0, r.stderr
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert "argparse" not in mods


def test_public_names_load_on_first_use(tmp_path):
    body = ("import tilecrate, inspect\n"
            "assert 'numpy' not in sys.modules\n"
            "import tilecrate.export\n"           # the submodule import must not hide the function
            "assert inspect.isfunction(tilecrate.export) and inspect.isfunction(tilecrate.estimate)\n"
            "from tilecrate import export, estimate, open_cache, Cache, ExportRequest, BundleRef, _bundle\n"
            "assert inspect.isfunction(export) and inspect.ismodule(_bundle)\n"
            "assert set(tilecrate.__all__) <= set(dir(tilecrate))\n"
            "try:\n    tilecrate.nope\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n")
    mods, r = modules_after(tmp_path, body)
    assert r.returncode == 0, r.stderr
    assert "numpy" in mods and "tilecrate.cache" in mods


def test_version_loads_nothing_heavy(tmp_path):
    mods, r = modules_after(tmp_path, "from tilecrate.cli import main\ncode = main(['--version'])")
    assert r.returncode == 0 and r.stdout.startswith("tilecrate ")
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert "argparse" not in mods and "tilecrate.commands.output" not in mods


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_loads_only_itself(tmp_path, name):
    mods, r = modules_after(tmp_path, f"from tilecrate.cli import main\ncode = main([{name!r}, '--help'])")
    assert r.returncode == 0 and f"usage: tilecrate {name}" in r.stdout, r.stderr
    others = {f"tilecrate.commands.{n}" for n in COMMANDS if n != name}
    assert f"tilecrate.commands.{name}" in mods and not mods & others
    if name != "serve":
        assert "aiohttp" not in mods and "tilecrate.server" not in mods


def test_top_level_help_lists_every_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tilecrate.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())          # argparse wraps long summaries
    for name, summary in COMMANDS.items():
        assert f" {name} " in text and " ".join(summary.split()) in text
    assert "143" in r.stdout and "TILECRATE_DEBUG" in r.stdout


def test_inspect_does_not_load_the_server(tmp_path, sample_v2):
    mods, r = modules_after(tmp_path, f"from tilecrate.cli import main\ncode = main(['inspect', {str(sample_v2)!r}, '--json'])")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tiles"] == 123
    assert not mods & {"aiohttp", "tilecrate.server", "lmdb", "tqdm"}, sorted(mods & {"aiohttp", "lmdb", "tqdm"})


# what a fresh `tilecrate export` of a Web Mercator cache to a package must not import: the server, the
# job store, projections, Dask, a progress bar off a TTY, and the chains xml.sax.saxutils and PIL's
# preinit used to pull in (urllib.request -> http.client -> email; the BMP, GIF, PPM readers), SQLite (open formats)
NOT_FOR_EXPORT = ("pyproj", "shapely", "aiohttp", "tqdm", "lmdb", "dask", "distributed", "importlib.metadata",
                  "urllib.request", "http.client", "email", "xml.sax", "tilecrate.server", "tilecrate.jobs",
                  "tilecrate.runners.dask", "tilecrate.admin", "sqlite3", "tilecrate.package.vtpk")
PIL_READERS = {"sample_v2": "PIL.JpegImagePlugin", "sample_png": "PIL.PngImagePlugin"}


@pytest.mark.parametrize("source,suffix", [("sample_v2", "tpkx"), ("sample_png", "tpk")])
def test_export_process_loads_only_what_it_needs(tmp_path, request, source, suffix):
    src = request.getfixturevalue(source)
    out = tmp_path / f"x.{suffix}"
    args = ["export", str(src), "-o", str(out), "--levels", "0-3"]
    body = f"from tilecrate.cli import main\ncode = main({args!r})"
    mods, r = modules_after(tmp_path, body)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0 and "tiles" in r.stdout
    loaded = {m for m in mods if m.split(".")[0] in {n.split(".")[0] for n in NOT_FOR_EXPORT}}
    unwanted = {m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_FOR_EXPORT)}
    assert not unwanted, sorted(unwanted)
    readers = {m for m in mods if m.startswith("PIL.") and m.endswith("ImagePlugin")}
    assert readers == {PIL_READERS[source]}, sorted(readers)    # the thumbnail opens only its tiles' format
    assert "numpy" in mods and "tilecrate._bundle" in mods      # the compiled core's, measured in bench_startup


def _encoded(fmt: str, size: tuple[int, int], color=(200, 30, 40)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def test_thumbnail_decodes_tiles_by_signature():
    from tilecrate.package.thumbnail import _decode

    for fmt in ("JPEG", "PNG", "BMP"):        # BMP: no signature of ours, PIL's own detection still reads it
        tile = _decode(_encoded(fmt, (256, 256)), 256, 256)
        assert tile is not None and tile.size == (256, 256), fmt
        r, g, b = tile.convert("RGB").getpixel((128, 128))
        assert abs(r - 200) < 8 and abs(g - 30) < 8 and abs(b - 40) < 8, (fmt, r, g, b)
    assert _decode(b"\xff\xd8\xff" + b"\0" * 100, 256, 256) is None           # truncated JPEG
    assert _decode(b"\x89PNG\r\n\x1a\n" + b"\0" * 100, 256, 256) is None      # damaged PNG
    assert _decode(b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 40, 256, 256) is None    # damaged WebP
    assert _decode(b"not an image", 256, 256) is None
    # a tile far larger than the scheme's is refused from its header, before any decoding
    assert _decode(_encoded("PNG", (600, 200)), 256, 256) is None
    assert _decode(_png_header_only(20000, 20000), 256, 256) is None


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with a few bytes of image data (decoding it would take GBs)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def test_thumbnail_shows_the_tiles(tmp_path, sample_v2):
    import io
    import zipfile

    from PIL import Image

    from tilecrate.cli import main

    out = tmp_path / "t.tpkx"
    assert main(["export", str(sample_v2), "-o", str(out), "--levels", "0-2", "--quiet"]) == 0
    with zipfile.ZipFile(out) as z:
        thumb = Image.open(io.BytesIO(z.read("thumbnail.png"))).convert("RGB")
    colors = thumb.getcolors(maxcolors=1 << 16)
    assert colors is None or len(colors) > 16, "the thumbnail is blank: no tile was decoded"


def test_thumbnail_decoded_smaller_matches_full_size(sample_v2, sample_png, monkeypatch):
    """Tiles decoded at 1/2-1/8 (libjpeg's DCT scaling, a box filter for PNG) give the full-size thumbnail."""
    import io

    import numpy as np
    from PIL import Image

    from tilecrate.cache import open_cache
    from tilecrate.package import thumbnail
    from tilecrate.plan import make_plan
    from tilecrate.request import ExportRequest

    assert thumbnail._reduction(256, 256, (768, 768)) == 2 and thumbnail._reduction(256, 256, (200, 133)) == 1
    assert thumbnail._reduction(256, 256, (6400, 6400)) == 8 and thumbnail._reduction(100, 100, (6400, 6400)) == 4
    reduced = 0
    for src in (sample_v2, sample_png):
        for levels in ("0-5", "2"):
            with open_cache(str(src)) as cache:
                plan = make_plan(cache, ExportRequest(levels=levels), "x.tpkx")
                fast = thumbnail.render_thumbnail(cache, plan.selection, plan.info)
                with monkeypatch.context() as m:
                    m.setattr(thumbnail, "_reduction", lambda *a: 1)
                    full = thumbnail.render_thumbnail(cache, plan.selection, plan.info)
            a, b = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.int16) for x in (fast, full))
            assert len(fast) == len(full) == thumbnail.thumbnail_size()
            assert np.abs(a - b).mean() < 3, (src, levels, np.abs(a - b).mean())
            assert (a != 255).any()         # not blank
            reduced += fast != full
    assert reduced == 2             # levels 0-5 took the reduced path; level 2 alone (2 x 2 tiles) full size


def test_process_exit_skips_the_collector_only_for_the_own_command_line(tmp_path, sample_v2):
    """main() on the process's argv freezes the collector's objects before the shutdown walks them all
    (bench_startup: ~0.1 s of a small export process at load); main(argv) from a caller never does."""
    out = tmp_path / "g.tpkx"
    args = ["export", str(sample_v2), "-o", str(out), "--levels", "0-2", "--quiet"]
    _, r = modules_after(tmp_path, f"import gc\nsys.argv[1:] = {args!r}\nfrom tilecrate.cli import main\n"
                               f"code = main()\nassert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
                               f"assert gc.isenabled()")     # off only while the command's modules load
    assert r.returncode == 0 and out.stat().st_size > 0, r.stderr
    out.unlink()
    _, r = modules_after(tmp_path, f"import gc\nfrom tilecrate.cli import main\n"
                               f"code = main({args!r})\nassert gc.get_freeze_count() == 0 and gc.isenabled()")
    assert r.returncode == 0 and out.stat().st_size > 0, r.stderr


def test_own_command_line_loads_openblas_with_one_thread(tmp_path, sample_v2):
    """main() on the process's argv sets OPENBLAS_NUM_THREADS=1 before numpy loads (~40 CPU-ms of a small export
    process, bench_startup), keeping a value the user set; main(argv) from a caller leaves the environment alone."""
    out = tmp_path / "b.tpkx"
    args = ["export", str(sample_v2), "-o", str(out), "--levels", "0-1", "--quiet"]
    probe = ("import os\n{pre}sys.argv[1:] = {args!r}\nfrom tilecrate.cli import main\ncode = main({call})\n"
             "assert os.environ.get('OPENBLAS_NUM_THREADS') == {want!r}, os.environ.get('OPENBLAS_NUM_THREADS')\n")
    cases = [("os.environ.pop('OPENBLAS_NUM_THREADS', None)\n", "", "1"),
             ("os.environ['OPENBLAS_NUM_THREADS'] = '2'\n", "", "2"),
             ("os.environ.pop('OPENBLAS_NUM_THREADS', None)\n", repr(args), None)]
    for pre, call, want in cases:
        if out.exists():
            out.unlink()
        mods, r = modules_after(tmp_path, probe.format(pre=pre, args=args, call=call, want=want))
        assert r.returncode == 0 and out.stat().st_size > 0, (pre, call, r.stderr)
        assert "numpy" in mods


def test_export_process_skips_the_teardown_but_no_exit_handler(tmp_path, sample_v2):
    """A finished `export` of the process's own command line ends with os._exit from the last exit handler
    (the modules' teardown skipped: 10-20 ms), armed only when no handler was registered before main(), so
    every other handler still runs; stdout is complete and the exit status main()'s."""
    out = tmp_path / "e.tpkx"
    args = ["export", str(sample_v2), "-o", str(out), "--levels", "0-2", "--json"]
    probe = ("import atexit, sys\n{pre}"
             "names, register = [], atexit.register\n"
             "def spy(f, *a, **k):\n    names.append(getattr(f, '__name__', ''))\n    return register(f, *a, **k)\n"
             "atexit.register = spy\n"
             "sys.argv[1:] = {args!r}\nimport tilecrate.cli as cli\ncode = cli.main()\n"
             "print('_exit_now' in names, cli._exit_code, file=sys.stderr)\n"
             "atexit.register(lambda: open({later!r}, 'w').close())\nsys.exit(code)\n")
    before = tmp_path / "before"
    cases = (("", "True 0"), (f"atexit.register(lambda: open({str(before)!r}, 'w').close())\n", "False 0"))
    for pre, armed in cases:
        later = tmp_path / "later"
        for p in (out, later, before):
            if p.exists():
                p.unlink()
        r = subprocess.run([sys.executable, "-c", probe.format(pre=pre, args=args, later=str(later))],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["tiles"] > 0 and out.stat().st_size > 0      # stdout complete
        assert r.stderr.split() == armed.split() and later.exists()
        assert before.exists() == bool(pre)     # a handler registered before main() ran too
    failing = ["export", str(tmp_path / "none"), "-o", str(out), "--levels", "0"]
    r = subprocess.run([sys.executable, "-c", probe.format(pre="", later=str(tmp_path / "later"), args=failing)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "tilecrate: error:" in r.stderr and "True None" in r.stderr

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

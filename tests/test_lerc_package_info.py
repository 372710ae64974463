"""An elevation (LERC) export states its tiles' band count and LERC error as ArcGIS does (issue 13;
FORMATS.md §7.2 `tileImageInfo {format, compressionQuality, bandCount, lercError}`; conf.xml
TileImageInfo BandCount / LERCError, ArcObjects ITileImageInfo3): `tilecrate sample --format LERC`
→ `tilecrate export` → root.json / conf.xml carry them, checked against Esri's `lerc` reading of
every tile; a re-read package states the same, and a real `tilecrate serve` ImageServer of the
source and of the package serves the same values. Other sources' metadata gains nothing."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import lerc  # test dependency: a missing decoder fails the module, never skips
import pytest

from test_server_support import Server, free_port, write_config
from tilecrate.cache import open_cache
from tilecrate.sample import LERC_MAX_Z_ERROR

SVC = "/arcgis/rest/services/{}/ImageServer"


def _cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "tilecrate.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _blob_facts(blob: bytes) -> tuple[int, float]:
    """(bands, maxZError) of a LERC blob as Esri's decoder reports them."""
    info = lerc.getLercBlobInfo(blob)
    assert info[0] == 0, info
    return info[6], info[12]


def _tiles(package: Path) -> list[bytes]:
    """Every tile of a .tpkx, read from its V2 bundles by the FORMATS.md §6.3 reader."""
    from test_server_support import read_v2_bundle

    out = []
    with zipfile.ZipFile(package) as z:
        for n in z.namelist():
            if n.endswith(".bundle"):
                out += list(read_v2_bundle(z.read(n)).values())
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lercinfo")
    _cli("sample", "--format", "LERC", "--levels", "0-2", "--quiet", str(d / "elev"))
    _cli("export", str(d / "elev"), "-o", str(d / "elev.tpkx"), "--levels", "0-2", "--quiet")
    _cli("export", str(d / "elev"), "-o", str(d / "elev.tpk"), "--levels", "1-2", "--quiet")
    # a LERC cache whose conf.xml states neither: the facts come from the tiles' LERC1 headers
    bare = d / "bare"
    _cli("sample", "--format", "LERC", "--levels", "0-1", "--quiet", str(bare))
    conf = (bare / "conf.xml").read_text()
    stripped = conf.replace(f"<BandCount>1</BandCount><LERCError>{LERC_MAX_Z_ERROR!r}</LERCError>", "")
    assert stripped != conf
    (bare / "conf.xml").write_text(stripped)
    _cli("export", str(bare), "-o", str(d / "bare.tpkx"), "--levels", "0-1", "--quiet")
    return {"folder": d / "elev", "tpkx": d / "elev.tpkx", "tpk": d / "elev.tpk", "bare": bare,
            "bare_tpkx": d / "bare.tpkx", "dir": d}


def test_tpkx_root_json_states_band_count_and_lerc_error(exported):
    with zipfile.ZipFile(exported["tpkx"]) as z:
        root = json.loads(z.read("root.json"))
    tii = root["tileImageInfo"]
    assert tii == {"format": "LERC", "compressionQuality": 0, "bandCount": 1, "lercError": LERC_MAX_Z_ERROR}
    # what every tile says, read by Esri's decoder
    facts = {_blob_facts(t) for t in _tiles(exported["tpkx"])}
    assert facts == {(tii["bandCount"], tii["lercError"])}


def test_tpk_conf_xml_states_them(exported):
    with zipfile.ZipFile(exported["tpk"]) as z:
        tii = ET.fromstring(z.read("v101/Layers/conf.xml")).find("TileImageInfo")
    assert tii.findtext("CacheTileFormat") == "LERC"
    assert int(tii.findtext("BandCount")) == 1 and float(tii.findtext("LERCError")) == LERC_MAX_Z_ERROR


def test_a_reread_package_states_the_same(exported):
    for key in ("folder", "tpkx", "tpk"):
        with open_cache(exported[key]) as c:
            assert (c.band_count, c.lerc_error) == (1, LERC_MAX_Z_ERROR), key
    # re-exported from the .tpkx: root.json → root.json unchanged
    out = exported["dir"] / "again.tpkx"
    _cli("export", str(exported["tpkx"]), "-o", str(out), "--levels", "1-2", "--quiet")
    with zipfile.ZipFile(out) as z:
        tii = json.loads(z.read("root.json"))["tileImageInfo"]
    assert (tii["bandCount"], tii["lercError"]) == (1, LERC_MAX_Z_ERROR)


def test_unstated_facts_come_from_the_tile_headers(exported):
    with open_cache(exported["bare"]) as c:
        assert (c.band_count, c.lerc_error) == (None, None)
    with zipfile.ZipFile(exported["bare_tpkx"]) as z:
        tii = json.loads(z.read("root.json"))["tileImageInfo"]
    assert (tii["bandCount"], tii["lercError"]) == _blob_facts(_tiles(exported["bare_tpkx"])[0])
    assert tii["lercError"] == LERC_MAX_Z_ERROR


def test_image_sources_other_than_lerc_gain_nothing(sample_v2, tmp_path):
    out = tmp_path / "jpeg.tpkx"
    _cli("export", str(sample_v2), "-o", str(out), "--levels", "0-1", "--quiet")
    with zipfile.ZipFile(out) as z:
        assert set(json.loads(z.read("root.json"))["tileImageInfo"]) == {"format", "compressionQuality"}


def test_image_server_serves_the_same_values(exported, tmp_path):
    with zipfile.ZipFile(exported["tpkx"]) as z:
        want = json.loads(z.read("root.json"))["tileImageInfo"]
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "tilecrate.toml", data, {
        "Folder": {"source": exported["folder"]}, "Package": {"source": exported["tpkx"]},
        "Bare": {"source": exported["bare"]}})
    srv = Server(cfg, data, free_port())
    srv.start()
    try:
        for name in ("Folder", "Package", "Bare"):
            info = srv.get(SVC.format(name), {"f": "json"}).json()
            assert info["tileInfo"]["format"] == "LERC", name
            assert info["bandCount"] == want["bandCount"], name
            assert info["tileImageInfo"] == want, name
    finally:
        srv.stop()


def test_lerc1_max_z_error_reads_only_lerc1_headers():
    import struct

    import numpy as np

    from tilecrate import lerc1
    from tilecrate.package.metadata import lerc1_max_z_error

    z = np.arange(257 * 257, dtype=np.float32).reshape(257, 257) / 7.0
    blob = lerc1.encode(z, 0.25)
    assert lerc1_max_z_error(blob) == _blob_facts(blob)[1] == 0.25
    result, _, lerc2 = lerc.encode(z, 1, False, None, 0.25, 1)
    assert result == 0 and lerc1_max_z_error(bytes(lerc2)) is None      # LERC2 states it elsewhere
    assert lerc1_max_z_error(blob[:33]) is None and lerc1_max_z_error(b"") is None
    for bad in (float("nan"), float("inf"), -1.0):
        assert lerc1_max_z_error(blob[:26] + struct.pack("<d", bad) + blob[34:]) is None

"""The item metadata tpkutils' own test_metadata checks travels through a tilecrate re-export into a
.tpk's iteminfo.xml and a .tpkx's iteminfo.json (issue 12). tpkutils' whole suite needs its tests/,
which are not on PyPI: scripts/tpkutils_suite.py runs it where a checkout exists (23 of 23 pass)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile

import tilecrate
from tilecrate.request import ExportRequest

from conftest import real_path


def test_item_travels_into_tpkx_and_tpk(real_dir, tmp_path):
    src = real_path("states_filled.tpk")
    for ext in ("tpkx", "tpk"):
        out = tmp_path / f"states.{ext}"
        tilecrate.export(str(src), ExportRequest("0-4"), str(out))
        with zipfile.ZipFile(out) as z:
            if ext == "tpkx":
                item = json.loads(z.read("iteminfo.json"))
                got = (item["title"], item["summary"], item["tags"], item["accessInformation"], item["description"])
            else:
                root = ET.fromstring(z.read("esriinfo/iteminfo.xml"))
                got = tuple(root.find(k).text for k in ("title", "summary", "tags", "accessinformation"))
                got += (root.find("description").text or "",)
        assert got == ("states_filled", "states", "states", "US Census Bureau", ""), ext

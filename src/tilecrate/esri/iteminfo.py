"""The item files of a package: esriinfo/iteminfo.xml and esriinfo/item.pkinfo (.tpk) and
iteminfo.json (.tpkx). The writers, the item's extent reader and the Stamp (what differs between
two runs of one export) sit here; sources.item reads the item's texts.

Everything variable between two runs of the same export (the GUID, the creation time) has a fixed
width, so the package size can be predicted exactly from the same writers.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from tilecrate.errors import CacheError
from tilecrate.esri.common import compact_json, escape, fmt_num, geo_extent, json_doc, xml_root, xml_text
from tilecrate.tiling import Extent

ITEM_FILES = ("esriinfo/iteminfo.xml", "iteminfo.json", "esriinfo/iteminfo.json")   # where packages hold it
CREATOR = "tilecrate"


@dataclass(frozen=True)
class Stamp:
    """What differs between two runs of one export: item GUID and creation time (fixed widths)."""

    guid: str          # 36 characters, upper case, no braces (as ArcGIS writes it)
    created_ms: int    # milliseconds since 1970 (13 digits until the year 2286)

    @classmethod
    def now(cls) -> "Stamp":
        """A fresh GUID and the current time."""
        return cls(str(uuid.uuid4()).upper(), int(time.time() * 1000))

    @classmethod
    def placeholder(cls) -> "Stamp":
        """Same widths as `now()`, for predicting sizes."""
        return cls("0" * 8 + "-" + "0" * 4 + "-" + "0" * 4 + "-" + "0" * 4 + "-" + "0" * 12, 10**12)

    @property
    def iso(self) -> str:
        """Creation time as `YYYY-MM-DDTHH:MM:SS` UTC (19 characters)."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.created_ms / 1000))


def parse_item_extent(data: bytes, name: str) -> Extent | None:
    """The geographic extent of an iteminfo.xml (`<extent><xmin>…`) or iteminfo.json (`extent`);
    None if it states none or cannot be read (sources.item reports a broken item file)."""
    if name.lower().endswith(".json"):
        try:
            doc = json_doc(data, name)
        except CacheError:
            return None
        return geo_extent(doc.get("extent")) if isinstance(doc, dict) else None
    try:
        root = xml_root(data, name)
    except CacheError:
        return None
    el = root.find("extent")
    if el is None:
        return None
    return geo_extent({k: xml_text(el, k) for k in ("xmin", "ymin", "xmax", "ymax")})


def write_iteminfo_json(name: str, texts: dict, extent: Extent, stamp: Stamp) -> bytes:
    """iteminfo.json of a .tpkx (type and typeKeywords as the tile package spec requires); `texts`
    holds title, summary, tags, description, credits, licence; `extent` is WGS 84."""
    item = {
        "creator": CREATOR,
        "name": name,
        "guid": stamp.guid,
        "version": 1.0,
        "created": stamp.created_ms,
        "snippet": "",
        "description": texts["description"],
        "summary": texts["summary"],
        "title": texts["title"],
        "tags": texts["tags"],
        "accessInformation": texts["credits"],
        "licenseInfo": texts["licence"],
        "type": "Compact Tile Package",
        "typeKeywords": ["Compact Tile Package", "Tile Package", "tpkx"],
        "thumbnail": "./thumbnail.png",
        "extent": {"xmin": extent.xmin, "ymin": extent.ymin, "xmax": extent.xmax, "ymax": extent.ymax,
                   "spatialReference": {"wkid": 4326, "latestWkid": 4326}},
    }
    return compact_json(item)


def write_iteminfo_xml(name: str, texts: dict, extent: Extent, sr_name: str, stamp: Stamp) -> bytes:
    """esriinfo/iteminfo.xml of a .tpk, with every element tpkutils dereferences."""
    t = {k: escape(v) for k, v in texts.items()}
    keywords = "".join(f"<typekeyword>{k}</typekeyword>\n"
                       for k in ("Data", "Tile Package", "ArcMap", "ArcGlobe", "tpk"))
    text = (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<ESRI_ItemInformation Culture='en-US'>\n"
        f"<name>{escape(name)}</name>\n<guid>{stamp.guid}</guid>\n<catalogpath></catalogpath>\n"
        f"<snippet>{t['summary']}</snippet>\n<description>{t['description']}</description>\n"
        f"<summary>{t['summary']}</summary>\n"
        f"<title>{t['title']}</title>\n<tags>{t['tags']}</tags>\n<type>Tile Package</type>\n"
        f"<typekeywords>\n{keywords}</typekeywords>\n<thumbnail>thumbnail/thumbnail.png</thumbnail>\n"
        f"<documentation></documentation>\n<url></url>\n<datalastmodifiedtime>{stamp.iso}</datalastmodifiedtime>\n"
        f"<extent>\n<xmin>{fmt_num(extent.xmin)}</xmin>\n<ymin>{fmt_num(extent.ymin)}</ymin>\n"
        f"<xmax>{fmt_num(extent.xmax)}</xmax>\n<ymax>{fmt_num(extent.ymax)}</ymax>\n</extent>\n"
        f"<spatialreference>{escape(sr_name)}</spatialreference>\n"
        f"<accessinformation>{t['credits']}</accessinformation>\n<licenseinfo>{t['licence']}</licenseinfo>\n"
        "</ESRI_ItemInformation>\n"
    )
    return text.encode("utf-8")


def write_item_pkinfo(name: str, stamp: Stamp) -> bytes:
    """esriinfo/item.pkinfo of a .tpk."""
    text = (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<pkinfo Culture='en-US'>\n"
        f"<ID>{stamp.guid}</ID>\n<name>{escape(name)}</name>\n<version>10.3</version>\n"
        f"<size>-1</size>\n<created>{stamp.iso}</created>\n<type>Tile Package</type>\n"
        "<servable>false</servable>\n<packagelocation></packagelocation>\n<pkinfolocation></pkinfolocation>\n"
        "</pkinfo>\n"
    )
    return text.encode("utf-8")

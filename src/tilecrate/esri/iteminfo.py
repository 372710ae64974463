"""The item files of a package: esriinfo/iteminfo.xml and esriinfo/item.pkinfo (.tpk) and
iteminfo.json (.tpkx): their readers (the item's texts as ItemInfo, its extent) and writers side by
side, and the Stamp (what differs between two runs of one export). sources.item finds the files.

Everything variable between two runs of the same export (the GUID, the creation time) has a fixed
width, so the package size can be predicted exactly from the same writers.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, replace

from tilecrate.errors import CacheError
from tilecrate.esri.common import compact_json, escape, fmt_num, geo_extent, json_doc, xml_root, xml_text
from tilecrate.tiling import Extent

ITEM_FILES = ("esriinfo/iteminfo.xml", "iteminfo.json", "esriinfo/iteminfo.json")   # where packages hold it
CREATOR = "tilecrate"
FIELD_LIMIT = 64 << 10       # one field is cut to this many characters


@dataclass(frozen=True)
class ItemInfo:
    """What a source says about itself; None (or no tags) where it says nothing."""

    name: str | None = None
    title: str | None = None
    summary: str | None = None
    tags: tuple[str, ...] = ()
    description: str | None = None
    credits: str | None = None       # accessInformation / attribution
    licence: str | None = None       # licenseInfo / use constraints

    def as_dict(self) -> dict:
        """The fields as JSON-ready values (tags as a list)."""
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    def merged(self, other: "ItemInfo") -> "ItemInfo":
        """This item with its empty fields filled from `other`."""
        return replace(self, **{k: v for k, v in asdict(other).items() if v and not getattr(self, k)})

    @property
    def empty(self) -> bool:
        """Whether no field is set."""
        return not any(asdict(self).values())


def clean_text(value) -> str | None:
    """A field's text, stripped and cut to FIELD_LIMIT; None for nothing, objects and lists."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text[:FIELD_LIMIT] or None


def split_tags(value) -> tuple[str, ...]:
    """Tags from a comma-separated string or a list, stripped, empty ones dropped, order kept."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    out: list[str] = []
    for t in items:
        t = clean_text(t)
        if t and t not in out:
            out.append(t)
    return tuple(out[:1000])


def parse_iteminfo_xml(data: bytes, label: str = "iteminfo.xml") -> ItemInfo:
    """Fields of an ESRI_ItemInformation document; an unreadable one is a CacheError."""
    root = xml_root(data, label)

    def text(tag: str) -> str | None:
        el = root.find(tag)
        if el is None:
            el = next((c for c in root if c.tag.lower() == tag), None)
        return clean_text(el.text) if el is not None else None

    tags = root.find("tags")
    tag_list = [t.text for t in tags.findall("tag")] if tags is not None and len(tags) else text("tags")
    return ItemInfo(text("name"), text("title"), text("summary") or text("snippet"), split_tags(tag_list),
                    text("description"), text("accessinformation"), text("licenseinfo"))


def parse_iteminfo_json(data: bytes, label: str = "iteminfo.json") -> ItemInfo:
    """Fields of an iteminfo.json (tpkx, vtpk, portal items); an unreadable one is a CacheError."""
    obj = json_doc(data, label)
    if not isinstance(obj, dict):
        raise CacheError(f"{label}: not a JSON object")
    return ItemInfo(clean_text(obj.get("name")), clean_text(obj.get("title")),
                    clean_text(obj.get("summary")) or clean_text(obj.get("snippet")), split_tags(obj.get("tags")),
                    clean_text(obj.get("description")), clean_text(obj.get("accessInformation")),
                    clean_text(obj.get("licenseInfo")))



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
    return _pkinfo(name, stamp, "10.3", "Tile Package", "")


def _pkinfo(name: str, stamp: Stamp, version: str, kind: str, tail: str) -> bytes:
    """An item.pkinfo as ArcGIS writes it for a package of `kind` (`tail`: what goes before </pkinfo>)."""
    text = (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<pkinfo Culture='en-US'>\n"
        f"<ID>{stamp.guid}</ID>\n<name>{escape(name)}</name>\n<version>{version}</version>\n"
        f"<size>-1</size>\n<created>{stamp.iso}</created>\n<type>{kind}</type>\n"
        "<servable>false</servable>\n<packagelocation></packagelocation>\n<pkinfolocation></pkinfolocation>\n"
        f"{tail}</pkinfo>\n"
    )
    return text.encode("utf-8")


# ------------------------------------------------------------------------------------------
# the item of a .vtpk (esriinfo/, as ArcGIS writes it: natural-earth.vtpk)

VTPK_TEXT_KEYS = ("name", "title", "snippet", "description", "summary", "tags", "accessinformation",
                  "licenseinfo")


def vtpk_item_texts(data: bytes | None, name: str) -> dict[str, str]:
    """The texts of a source .vtpk's iteminfo.xml by element name (VTPK_TEXT_KEYS), copied as written;
    `name` as name and title where it has none. CacheError if `data` is not XML."""
    texts = dict.fromkeys(VTPK_TEXT_KEYS, "")
    texts["name"] = texts["title"] = name
    if data:
        root = xml_root(data, "esriinfo/iteminfo.xml")
        for key in texts:
            el = root.find(key)
            if el is not None and el.text is not None:
                texts[key] = el.text.strip()
    return texts


def write_vtpk_iteminfo_xml(texts: dict[str, str], extent: Extent | None, sr_name: str, scales: dict,
                            stamp: Stamp) -> bytes:
    """esriinfo/iteminfo.xml of a .vtpk (item type "Vector Tile Package"); `extent` WGS 84, `scales`
    the minScale/maxScale to state."""
    g = extent
    ext = (f"<extent>\n<xmin>{fmt_num(g.xmin)}</xmin>\n<ymin>{fmt_num(g.ymin)}</ymin>\n"
           f"<xmax>{fmt_num(g.xmax)}</xmax>\n<ymax>{fmt_num(g.ymax)}</ymax>\n</extent>\n") if g is not None else "<extent></extent>\n"
    e = {k: escape(v) for k, v in texts.items()}
    scale_xml = "".join(f"<{k}>{fmt_num(v)}</{k}>\n" for k, v in scales.items())
    text = (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?>\n<ESRI_ItemInformation Culture='en-US'>\n"
        f"<name>{e['name']}</name>\n<guid>{stamp.guid}</guid>\n<version>1.0</version>\n"
        f"<created>{stamp.iso}</created>\n<modified>{stamp.iso}</modified>\n<catalogpath></catalogpath>\n"
        f"<snippet>{e['snippet']}</snippet>\n<description>{e['description']}</description>\n"
        f"<summary>{e['summary']}</summary>\n<title>{e['title']}</title>\n<tags>{e['tags']}</tags>\n"
        "<type>Vector Tile Package</type>\n<typekeywords>\n<typekeyword>Data</typekeyword>\n"
        "<typekeyword>Vector Tile Package</typekeyword>\n<typekeyword>vtpk</typekeyword>\n</typekeywords>\n"
        "<thumbnail>thumbnail/thumbnail.png</thumbnail>\n<documentation></documentation>\n<url></url>\n"
        f"{ext}<spatialreference>{escape(sr_name)}</spatialreference>\n{scale_xml}"
        f"<datalastModifiedTime>{stamp.iso}</datalastModifiedTime>\n"
        f"<accessinformation>{e['accessinformation']}</accessinformation>\n"
        f"<licenseinfo>{e['licenseinfo']}</licenseinfo>\n</ESRI_ItemInformation>\n"
    )
    return text.encode("utf-8")


def write_vtpk_item_pkinfo(name: str, stamp: Stamp) -> bytes:
    """esriinfo/item.pkinfo of a .vtpk."""
    return _pkinfo(name, stamp, "11.2", "Vector Tile Package",
                   "<documenttypes>\n<documenttype>Lyr</documenttype>\n</documenttypes>\n")

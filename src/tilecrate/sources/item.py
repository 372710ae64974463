"""A source's item metadata (title, summary, tags, description, credits, licence), read from
iteminfo.xml / iteminfo.json of ArcGIS caches and packages and from the metadata of open formats,
so outputs and the service JSON keep what the source's licence requires (its credits)."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace

from tilecrate.errors import CacheError

_ITEM_LIMIT = 4 << 20        # an item file larger than this is not metadata: ignored
_FIELD_LIMIT = 64 << 10      # one field is cut to this many characters


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


def _clean(value) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text[:_FIELD_LIMIT] or None


def split_tags(value) -> tuple[str, ...]:
    """Tags from a comma-separated string or a list, stripped, empty ones dropped, order kept."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
    out: list[str] = []
    for t in items:
        t = _clean(t)
        if t and t not in out:
            out.append(t)
    return tuple(out[:1000])


def parse_iteminfo_xml(data: bytes, label: str = "iteminfo.xml") -> ItemInfo:
    """Fields of an ESRI_ItemInformation document; an unreadable one is a CacheError."""
    try:
        root = ET.fromstring(data.lstrip(b"\xef\xbb\xbf").strip())
    except ET.ParseError as e:
        raise CacheError(f"{label}: not valid XML ({e})") from None

    def text(tag: str) -> str | None:
        el = root.find(tag)
        if el is None:
            el = next((c for c in root if c.tag.lower() == tag), None)
        return _clean(el.text) if el is not None else None

    tags = root.find("tags")
    tag_list = [t.text for t in tags.findall("tag")] if tags is not None and len(tags) else text("tags")
    return ItemInfo(text("name"), text("title"), text("summary") or text("snippet"), split_tags(tag_list),
                    text("description"), text("accessinformation"), text("licenseinfo"))


def parse_iteminfo_json(data: bytes, label: str = "iteminfo.json") -> ItemInfo:
    """Fields of an iteminfo.json (tpkx, vtpk, portal items); an unreadable one is a CacheError."""
    try:
        obj = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{label}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{label}: not a JSON object")
    return ItemInfo(_clean(obj.get("name")), _clean(obj.get("title")),
                    _clean(obj.get("summary")) or _clean(obj.get("snippet")), split_tags(obj.get("tags")),
                    _clean(obj.get("description")), _clean(obj.get("accessInformation")),
                    _clean(obj.get("licenseInfo")))


def from_metadata(meta: dict) -> ItemInfo:
    """Fields of MBTiles / PMTiles metadata (name, description, attribution, ...)."""
    return ItemInfo(_clean(meta.get("name")), _clean(meta.get("name")), _clean(meta.get("summary")),
                    split_tags(meta.get("tags") or meta.get("keywords")), _clean(meta.get("description")),
                    _clean(meta.get("attribution")), _clean(meta.get("license") or meta.get("licence")))


def _parse(name: str, data: bytes, label: str) -> ItemInfo:
    if name.lower().endswith(".json"):
        return parse_iteminfo_json(data, label)
    return parse_iteminfo_xml(data, label)


def read_item_folder(root: str, label: str, warn=None) -> ItemInfo:
    """Item info next to a cache folder (iteminfo.json / esriinfo/iteminfo.xml, here or one level
    up); ItemInfo() when there is none. A broken item file is a warning, not a failure to open."""
    from tilecrate.sourcefiles import read_regular
    here = os.path.normpath(root)
    for folder in (here, os.path.dirname(here)):
        for rel in ("iteminfo.json", "iteminfo.xml", os.path.join("esriinfo", "iteminfo.xml")):
            p = os.path.join(folder, rel)
            try:
                if not os.path.isfile(p) or os.path.getsize(p) > _ITEM_LIMIT:
                    continue
                return _parse(rel, read_regular(p, p), p)
            except (CacheError, OSError) as e:
                if warn is not None:
                    warn(f"{p}: item information not read ({e})")
    return ItemInfo()


def read_item_package(store, tiles_prefix: str, path: str, warn=None) -> ItemInfo:
    """Item info inside a package: esriinfo/iteminfo.xml (.tpk) or iteminfo.json (.tpkx, .vtpk)."""
    names = {n.lower(): n for n in store.infos}
    base = tiles_prefix.split("/", 1)[0] + "/" if "/" in tiles_prefix.strip("/") else ""
    for rel in ("esriinfo/iteminfo.xml", "iteminfo.json", "esriinfo/iteminfo.json",
                base + "iteminfo.json", base + "esriinfo/iteminfo.xml"):
        n = names.get(rel.lower())
        if n is None:
            continue
        try:
            if store.infos[n].file_size > _ITEM_LIMIT:
                continue
            return _parse(n, store.read_small(n), f"{path}!{n}")
        except CacheError as e:
            if warn is not None:
                warn(f"{path}!{n}: item information not read ({e})")
    return ItemInfo()

"""A source's item metadata (title, summary, tags, description, credits, licence), read from
iteminfo.xml / iteminfo.json of ArcGIS caches and packages (the parsers sit with the writers in
tilecrate.esri.iteminfo) and from the metadata of open formats, so outputs and the service JSON
keep what the source's licence requires (its credits)."""
from __future__ import annotations

import os

from tilecrate.errors import CacheError
from tilecrate.esri.iteminfo import ItemInfo, clean_text, parse_iteminfo_json, parse_iteminfo_xml, split_tags

__all__ = ["ItemInfo", "from_metadata", "parse_iteminfo_json", "parse_iteminfo_xml", "read_item_folder",
           "read_item_package", "split_tags"]

_ITEM_LIMIT = 4 << 20        # an item file larger than this is not metadata: ignored
_clean = clean_text


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

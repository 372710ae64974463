"""An export or estimate request: validated, normalised parameters, and lenient REST parsing.

Parsing follows what real clients send (FORMATS.md §1.2): booleans and enums in any case,
`storageFormat` / `esriMapCacheStorageMode` as aliases of `storageFormatType`, `polygon` as an
alias of `areaOfInterest`, and empty strings meaning "absent". Geometry is only checked for
being present here; tilecrate.geometry reads it, because that needs the cache's coordinates.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Mapping

from tilecrate.cache import COMPACT_V1, COMPACT_V2
from tilecrate.cache import normalize_storage_format as cache_storage_format
from tilecrate.errors import RequestError
from tilecrate.geometry import load_json, show

EXPORT_BY = {"levelid": "LevelID", "scale": "Scale", "resolution": "Resolution"}

_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_ITEM_RE = re.compile(rf"^\s*({_NUMBER})\s*(?:-\s*({_NUMBER})\s*)?$")
MAX_LEVEL_ITEMS = 10_000    # distinct items of `levels`


def _text(value: object, name: str) -> str:
    """A scalar parameter as text; RequestError for lists, objects and the like (never str() of them)."""
    if isinstance(value, (str, int, float)):
        return str(value)
    raise RequestError(f"{name} must be a single value, not {show(value)}")


def normalize_storage_format(value: str | None) -> str | None:
    """The long storage format name for any accepted spelling, None for absent; RequestError otherwise."""
    if value is None:
        return None
    text = _text(value, "storageFormatType").strip()
    if not text:
        return None
    found = cache_storage_format(text)
    if found not in (COMPACT_V1, COMPACT_V2):
        raise RequestError(
            f"unknown storage format {show(text)}: use esriMapCacheStorageModeCompactV2 (.tpkx) "
            f"or esriMapCacheStorageModeCompact (.tpk); CompactV2, Compact, tpkx and tpk also work")
    return found


def normalize_export_by(value: str | None) -> str:
    """'LevelID', 'Scale' or 'Resolution' for any casing; absent means LevelID."""
    if value is None or not _text(value, "exportBy").strip():
        return "LevelID"
    found = EXPORT_BY.get(_text(value, "exportBy").strip().lower())
    if found is None:
        raise RequestError(f"unknown exportBy {show(value)}: use LevelID, Scale or Resolution")
    return found


def parse_bool(value: object, name: str, default: bool) -> bool:
    """A boolean parameter in any of the spellings clients use; empty or None means default."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = _text(value, name).strip().lower()
    if not text:
        return default
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(f"{name} must be true or false, not {show(value)}")


def parse_quality(value: object) -> int | None:
    """compressionQuality as an int 0-100, or None when absent (empty string included)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RequestError(f"compressionQuality must be a whole number from 0 to 100, not {show(value)}")
    if isinstance(value, float):
        if not value.is_integer():
            raise RequestError(f"compressionQuality must be a whole number from 0 to 100, not {show(value)}")
        value = int(value)
    text = _text(value, "compressionQuality").strip()
    if not text:
        return None
    if len(text) > 12 or not re.fullmatch(r"[+-]?\d+(?:\.0*)?", text):
        raise RequestError(f"compressionQuality must be a whole number from 0 to 100, not {show(text)}")
    q = int(float(text))
    if not 0 <= q <= 100:
        raise RequestError(f"compressionQuality must be from 0 to 100, not {q}")
    return q


def parse_levels(levels: str | tuple | list | int | float) -> list[tuple[float, float]]:
    """`levels` as (low, high) items, in the order given: '1-4, 7' -> [(1, 4), (7, 7)].

    A number is (v, v); a range keeps the order written (scale ranges run either way).
    """
    if isinstance(levels, bool):
        raise RequestError(f"levels must be numbers or ranges such as 0-5 or 1-4,7-9, not {show(levels)}")
    if isinstance(levels, numbers.Real):
        items = [levels]
    elif isinstance(levels, (tuple, list, range)):
        items = list(levels)
    elif isinstance(levels, str):
        text = levels.strip()
        if text.startswith("["):  # a JSON list, as some clients send
            try:
                items = load_json(text, "levels list")
            except RequestError as e:
                raise RequestError(f"levels is not a valid list: {e}") from None
            if not isinstance(items, list):
                raise RequestError(f"levels is not a valid list: {show(levels)}")
        else:
            # each distinct item once: a 256 KiB parameter of "5,5,5,..." was 128 000 regular
            # expression matches and LOD lookups, three times per request (~1 s of CPU per request)
            items = list(dict.fromkeys(t.strip() for t in text.split(",")))
            if len(items) == 1 and not items[0]:
                items = []
    else:
        raise RequestError(f"levels must be a string such as '0-5' or a tuple of numbers, not {type(levels).__name__}")
    if len(items) > MAX_LEVEL_ITEMS:
        raise RequestError(f"levels has {len(items)} items; at most {MAX_LEVEL_ITEMS} different ones are read "
                           f"(a cache has a few dozen levels: use ranges such as 0-5)")
    out: list[tuple[float, float]] = []
    for item in items:
        if isinstance(item, bool):
            raise RequestError(f"bad level {show(item)}: expected a number")
        if isinstance(item, numbers.Real):
            lo = hi = float(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            lo, hi = (_number(v, levels) for v in item)
        elif isinstance(item, str):
            if not item.strip():
                raise RequestError(f"levels has an empty item: {show(levels)}")
            m = _ITEM_RE.match(item)
            if not m:
                raise RequestError(
                    f"bad level item {show(item.strip())} in {show(levels)}: use numbers and ranges such as 0-5 or 1-4,7-9")
            lo = float(m.group(1))
            hi = float(m.group(2)) if m.group(2) is not None else lo
        else:
            raise RequestError(f"bad level item {show(item)}: expected a number or a range")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RequestError(f"levels must be finite numbers, got {show(item)}")
        out.append((lo, hi))
    if not out:
        raise RequestError("no levels given: pass levels such as 0-5 or 1-4,7-9")
    return list(dict.fromkeys(out))


def _number(v: object, whole: object) -> float:
    if isinstance(v, bool):
        raise RequestError(f"bad level {show(v)} in {show(whole)}: expected a number")
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"bad level {show(v)} in {show(whole)}: expected a number") from None


@dataclass(frozen=True)
class ExportRequest:
    """What to export: levels, area and output format (names follow the REST parameters)."""

    levels: str | tuple
    export_by: str = "LevelID"
    extent: str | dict | None = None
    area_of_interest: str | dict | None = None
    aoi_sr: int | str | None = None
    tile_package: bool = True
    storage_format: str | None = None
    optimize_tiles_for_size: bool = False
    compression_quality: int | None = None

    def __post_init__(self) -> None:
        # normalise in place so every consumer sees one spelling
        object.__setattr__(self, "export_by", normalize_export_by(self.export_by))
        object.__setattr__(self, "storage_format", normalize_storage_format(self.storage_format))
        object.__setattr__(self, "compression_quality", parse_quality(self.compression_quality))
        object.__setattr__(self, "tile_package", parse_bool(self.tile_package, "tilePackage", True))
        object.__setattr__(self, "optimize_tiles_for_size",
                           parse_bool(self.optimize_tiles_for_size, "optimizeTilesForSize", False))
        if isinstance(self.levels, (list, range)):
            object.__setattr__(self, "levels", tuple(self.levels))
        # refuse bad syntax early (matching to LODs needs the cache); kept, as level_items reads it
        object.__setattr__(self, "_items", parse_levels(self.levels))
        for name in ("extent", "area_of_interest"):
            v = getattr(self, name)
            if isinstance(v, str) and not v.strip():
                object.__setattr__(self, name, None)
        if isinstance(self.aoi_sr, str) and not self.aoi_sr.strip():
            object.__setattr__(self, "aoi_sr", None)

    @property
    def level_items(self) -> list[tuple[float, float]]:
        """The parsed `levels` items (see parse_levels)."""
        return list(self._items)

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> "ExportRequest":
        """Build from REST parameters (any key casing); tilePackage defaults to false as in REST."""
        low: dict[str, str] = {}
        for k, v in params.items():
            if v is None:
                continue
            if isinstance(v, (list, tuple)):  # multi-dicts: the last value wins
                if not v:
                    continue
                v = v[-1]
            v = v if isinstance(v, (dict, list)) else str(v)
            if isinstance(v, str) and not v.strip():
                continue
            low[str(k).lower()] = v

        def get(*names: str):
            for n in names:
                if n.lower() in low:
                    return low[n.lower()]
            return None

        levels = get("levels")
        if levels is None:
            raise RequestError("levels is required: pass levels such as 0-5 or 1-4,7-9")
        extent = get("exportExtent", "extent")
        if isinstance(extent, str) and extent.strip().upper() == "DEFAULT":
            extent = None
        tile_package = parse_bool(get("tilePackage"), "tilePackage", False)
        storage_format = get("storageFormatType", "storageFormat", "esriMapCacheStorageMode")
        if tile_package and storage_format is None:
            # ArcGIS's Export Cache task defaults to Compact (FORMATS.md §1.2), and a client that
            # does not name a format predates .tpkx (storageFormatType came with 10.7): give it a .tpk
            storage_format = COMPACT_V1
        return cls(
            levels=levels,
            export_by=get("exportBy"),
            extent=extent,
            area_of_interest=get("areaOfInterest", "polygon"),
            aoi_sr=get("aoiSR", "inSR"),
            tile_package=tile_package,
            storage_format=storage_format,
            optimize_tiles_for_size=parse_bool(get("optimizeTilesForSize"), "optimizeTilesForSize", False),
            compression_quality=get("compressionQuality"),
        )

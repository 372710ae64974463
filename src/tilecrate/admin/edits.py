"""What the Administrator Directory posts, read and validated into settings (nothing is stored here).

Service definitions carry their `properties` as strings ("true", "100000", FORMATS.md §16.4);
newer clients send real booleans and numbers: both are accepted, and answered as strings.
An edit is a full replacement, as in ArcGIS: a property left out takes its ArcGIS default.
"""
from __future__ import annotations

import json

from tilecrate.admin.settings import UNLIMITED, ServiceSettings
from tilecrate.errors import TilecrateError

MAX_EDIT_CHARS = 256 * 1024
MAX_TILES_LIMIT = 1 << 40          # more tiles than any cache holds; bigger numbers are typos
MAX_OUTSTANDING_LIMIT = 1 << 20
DEFAULT_EXPORT_ALLOWED = False       # ArcGIS's defaults for an omitted property
DEFAULT_MAX_TILES = 100000
SYSTEM_PROPERTIES = ("exportTilesUsingLocalTempFolder",)


class EditError(TilecrateError):
    """An edit the Directory cannot apply; the message says which value and why."""


def parse_json_object(text: str | None, field: str) -> dict:
    """A form field holding a JSON object."""
    if text is None or not text.strip():
        raise EditError(f"the {field!r} parameter is required: a JSON object")
    if len(text) > MAX_EDIT_CHARS:
        raise EditError(f"the {field!r} parameter is longer than {MAX_EDIT_CHARS} characters")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise EditError(f"the {field!r} parameter is nested too deeply") from None
    except ValueError as e:
        raise EditError(f"the {field!r} parameter is not valid JSON ({str(e)[:100]})") from None
    if not isinstance(obj, dict):
        raise EditError(f"the {field!r} parameter must be a JSON object, not {type(obj).__name__}")
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_bool(value: object, name: str) -> bool:
    """true/false as JSON booleans or strings in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise EditError(f"{name} must be true or false, not {_show(value)}")


def parse_int(value: object, name: str, low: int, high: int) -> int:
    """A whole number (JSON number or numeric string) within [low, high]."""
    if isinstance(value, bool):
        raise EditError(f"{name} must be a whole number, not {_show(value)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        body = text[1:] if text[:1] in "+-" else text
        if not (body.isascii() and body.isdigit() and len(body) <= 15):
            raise EditError(f"{name} must be a whole number, not {_show(value)}")
        value = int(text)
    if not isinstance(value, int):
        raise EditError(f"{name} must be a whole number, not {_show(value)}")
    if not low <= value <= high:
        raise EditError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _show(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _properties(obj: dict) -> dict:
    props = obj.get("properties", {})
    if not isinstance(props, dict):
        raise EditError("the service's properties must be a JSON object")
    return props


def _same_identity(obj: dict, name: str, kind: str) -> None:
    for key, want in (("serviceName", name), ("type", kind)):
        got = obj.get(key, want)
        if got != want:
            raise EditError(f"{key} cannot be changed by edit ({_show(got)} is not {want!r}); "
                            f"renaming is not supported")


def service_edit(text: str | None, name: str, kind: str) -> ServiceSettings:
    """The `service` field of `<name>.<kind>/edit` → the service's export settings."""
    obj = parse_json_object(text, "service")
    _same_identity(obj, name, kind)
    props = _properties(obj)
    allowed = props.get("exportTilesAllowed", DEFAULT_EXPORT_ALLOWED)
    count = props.get("maxExportTilesCount", DEFAULT_MAX_TILES)
    return ServiceSettings(parse_bool(allowed, "exportTilesAllowed"),
                           parse_int(count, "maxExportTilesCount", 0, MAX_TILES_LIMIT))


def caching_edit(text: str | None) -> int:
    """The `service` field of `System/CachingControllers.GPServer/edit` → maximumOutstandingJobs."""
    obj = parse_json_object(text, "service")
    _same_identity(obj, "CachingControllers", "GPServer")
    value = _properties(obj).get("maximumOutstandingJobs", UNLIMITED)
    return parse_int(value, "maximumOutstandingJobs", UNLIMITED, MAX_OUTSTANDING_LIMIT)


def system_update(text: str | None, has_cluster: bool) -> dict:
    """The `properties` field of `system/properties/update` → every system property (a replacement)."""
    obj = parse_json_object(text, "properties")
    unknown = sorted(k for k in obj if k not in SYSTEM_PROPERTIES)
    if unknown:
        raise EditError(f"unknown system propert{'y' if len(unknown) == 1 else 'ies'} "
                        f"{', '.join(_show(k) for k in unknown[:5])}; tilecrate supports "
                        f"{', '.join(SYSTEM_PROPERTIES)}")
    out = {}
    if "exportTilesUsingLocalTempFolder" in obj:
        value = parse_bool(obj["exportTilesUsingLocalTempFolder"], "exportTilesUsingLocalTempFolder")
        if value and not has_cluster:
            raise EditError("exportTilesUsingLocalTempFolder=true needs a Dask cluster ([cluster] scheduler in "
                            "the configuration): exports running in the server already build in its data dir")
        out["exportTilesUsingLocalTempFolder"] = value
    return out

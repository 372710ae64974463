"""ExportRequest: lenient REST parsing (FORMATS.md §1.2) and clear errors."""
from __future__ import annotations

import pytest

from tilecrate.errors import RequestError
from tilecrate.request import COMPACT_V1, COMPACT_V2, ExportRequest, normalize_storage_format, parse_levels


@pytest.mark.parametrize("text, expected", [
    ("1-4,7-9", [(1, 4), (7, 9)]),
    ("1-4, 7-9", [(1, 4), (7, 9)]),
    (" 0 - 5 ", [(0, 5)]),
    ("1,2,3", [(1, 1), (2, 2), (3, 3)]),
    ("18489297.737236-9244648.868618", [(18489297.737236, 9244648.868618)]),
    ("[0, 1, 2]", [(0, 0), (1, 1), (2, 2)]),
    ((0, 1, 2), [(0, 0), (1, 1), (2, 2)]),
    (3, [(3, 3)]),
])
def test_levels_grammar(text, expected):
    assert parse_levels(text) == expected


@pytest.mark.parametrize("bad", ["", " ", "1-", "a", "1,,2", "1-2-3", "-", (), "1;2", True])
def test_bad_levels_are_refused_with_a_message(bad):
    with pytest.raises(RequestError, match="level"):
        parse_levels(bad)


@pytest.mark.parametrize("value, expected", [
    ("esriMapCacheStorageModeCompactV2", COMPACT_V2), ("CompactV2", COMPACT_V2), ("COMPACT_V2", COMPACT_V2),
    ("tpkx", COMPACT_V2), ("compactv2", COMPACT_V2),
    ("esriMapCacheStorageModeCompact", COMPACT_V1), ("Compact", COMPACT_V1), ("COMPACT", COMPACT_V1),
    ("tpk", COMPACT_V1), ("", None), (None, None),
])
def test_storage_format_aliases(value, expected):
    assert normalize_storage_format(value) == expected


def test_unknown_storage_format():
    with pytest.raises(RequestError, match="storage format"):
        normalize_storage_format("Exploded")


def test_from_params_lenient():
    req = ExportRequest.from_params({
        "f": "json", "LEVELS": "1-4, 7-9", "exportby": "levelId", "tilePackage": "True",
        "storageFormat": "tpkx", "optimizeTilesForSize": "TRUE", "compressionQuality": "60",
        "exportExtent": "DEFAULT", "areaOfInterest": "",
    })
    assert req.levels == "1-4, 7-9"
    assert req.export_by == "LevelID"
    assert req.tile_package is True
    assert req.storage_format == COMPACT_V2
    assert req.optimize_tiles_for_size is True
    assert req.compression_quality == 60
    assert req.extent is None and req.area_of_interest is None
    assert req.level_items == [(1, 4), (7, 9)]


def test_from_params_defaults_and_aliases():
    poly = '{"rings":[[[0,0],[0,1],[1,1],[0,0]]]}'
    req = ExportRequest.from_params({"levels": "0-2", "polygon": poly, "compressionQuality": "",
                                     "storageFormatType": "", "exportBy": ""})
    assert req.tile_package is False           # REST default
    assert req.area_of_interest == poly
    assert req.compression_quality is None
    assert req.storage_format is None
    assert req.export_by == "LevelID"
    req = ExportRequest.from_params({"levels": "5", "esriMapCacheStorageMode": "Compact", "exportBy": "SCALE",
                                     "tilePackage": "false", "exportExtent": "1,2,3,4"})
    assert req.storage_format == COMPACT_V1 and req.export_by == "Scale" and req.tile_package is False
    assert req.extent == "1,2,3,4"
    # areaOfInterest wins over polygon when both are sent
    req = ExportRequest.from_params({"levels": "1", "areaOfInterest": "{\"a\":1}", "polygon": "{\"b\":2}"})
    assert req.area_of_interest == "{\"a\":1}"


@pytest.mark.parametrize("params, message", [
    ({}, "levels is required"),
    ({"levels": ""}, "levels is required"),
    ({"levels": "0-2", "exportBy": "zoom"}, "exportBy"),
    ({"levels": "0-2", "tilePackage": "maybe"}, "tilePackage"),
    ({"levels": "0-2", "compressionQuality": "abc"}, "compressionQuality"),
    ({"levels": "0-2", "compressionQuality": "101"}, "compressionQuality"),
    ({"levels": "0-2", "compressionQuality": "7.5"}, "compressionQuality"),
    ({"levels": "x"}, "level"),
])
def test_from_params_errors(params, message):
    with pytest.raises(RequestError, match=message):
        ExportRequest.from_params(params)


def test_direct_construction_normalises():
    req = ExportRequest((0, 1, 2), export_by="resolution", storage_format="Compact", compression_quality="75",
                        extent="  ", aoi_sr="")
    assert req.export_by == "Resolution"
    assert req.storage_format == COMPACT_V1
    assert req.compression_quality == 75
    assert req.tile_package is True
    assert req.extent is None and req.aoi_sr is None
    assert ExportRequest([0, 1]).levels == (0, 1)
    hash(ExportRequest("0-5"))  # frozen and hashable

"""Shared fixtures: the real caches of ../shared/fixtures/real and generated sample caches."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tilecrate.sample import SampleSpec, make_sample

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("TILECRATE_FIXTURES", ROOT.parent / "shared" / "fixtures" / "real"))

# every real source, with what PROVENANCE.md says it holds: (path, kind, tiles per level)
REAL_SOURCES = {
    "states_filled.tpk": ("tpkutils/tests/data/states_filled.tpk", {0: 1, 1: 1, 2: 2, 3: 4, 4: 16}),
    "nonstandard_zoom_levels.tpk": ("tpkutils/tests/data/nonstandard_zoom_levels.tpk", {0: 2, 1: 4, 2: 16}),
    "alt_root_name.tpk": ("tpkutils/tests/data/alt_root_name.tpk", {0: 1, 1: 1}),
    "sample_v3.tpk": ("geotools/modules/unsupported/tpk/src/test/resources/org/geotools/tpk/sample_v3.tpk", {0: 1}),
    "sample_v1.tpk": ("geotools/modules/unsupported/tpk/src/test/resources/org/geotools/tpk/sample_v1.tpk", {1: 4, 2: 16}),
    "sample_v2.tpkx": ("geotools/modules/unsupported/tpk/src/test/resources/org/geotools/tpk/sample_v2.tpkx", {0: 1, 1: 4, 2: 16}),
    "Usa.tpkx": ("tile-package-spec/Sample TPKX Files/Usa.tpkx", {0: 1, 1: 1, 2: 4, 3: 9, 4: 30, 5: 99}),
    "Usa_extracted": ("tile-package-spec/Sample TPKX Files/Sample_of_extracted_TPKX _file", {0: 1}),
    "googlemaps.tpkx": ("TPK2GPKG/sample/googlemaps.tpkx", {0: 2, 1: 6, 2: 24, 3: 88, 4: 336, 5: 1280}),
    "wgs84.tpkx": ("TPK2GPKG/sample/wgs84.tpkx", {0: 2, 1: 6, 2: 15, 3: 45, 4: 153, 5: 561}),
    "raster-tiles-compactcache": ("raster-tiles-compactcache/sample_cache", {0: 1, 1: 4, 2: 16}),
    "gwc-compactcache": ("geowebcache/geowebcache/arcgiscache/src/test/resources/compactcache", {5: 28, 6: 84}),
    "gwc-compactcacheV2": ("geowebcache/geowebcache/arcgiscache/src/test/resources/compactcacheV2", {4: 8, 5: 28}),
    "tiler-sample": ("tiler-arcgis-bundle/test/sample", {2: 70}),
    "tiler-newbundle": ("tiler-arcgis-bundle/test/newbundle", {10: 4}),
    "mbtiles2compactcache": ("python-mbtiles2compactcache/sample_cache", {0: 1, 1: 4, 2: 16}),
    "natural-earth.vtpk": ("maplibre-tilepackage-protocol/example/natural-earth.vtpk", {0: 1, 1: 4, 2: 16, 3: 39, 4: 43, 5: 8}),
}


def real_path(key: str) -> Path:
    """Absolute path of a real fixture by its key in REAL_SOURCES."""
    return REAL / REAL_SOURCES[key][0]


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not REAL.is_dir():
        pytest.fail(f"real fixtures not found at {REAL} (set TILECRATE_FIXTURES)")
    return REAL


def _sample(tmp_path_factory, name: str, spec: SampleSpec) -> Path:
    out = tmp_path_factory.mktemp("samples") / name
    make_sample(out, spec)
    return out


@pytest.fixture(scope="session")
def sample_v2(tmp_path_factory) -> Path:
    """JPEG, compact V2, levels 0-5 (123 tiles)."""
    return _sample(tmp_path_factory, "jpeg_v2", SampleSpec())


@pytest.fixture(scope="session")
def sample_v1(tmp_path_factory) -> Path:
    """JPEG, compact V1, levels 0-5."""
    return _sample(tmp_path_factory, "jpeg_v1", SampleSpec(version=1))


@pytest.fixture(scope="session")
def sample_png(tmp_path_factory) -> Path:
    """PNG, compact V2, levels 0-4."""
    return _sample(tmp_path_factory, "png_v2", SampleSpec(levels=tuple(range(5)), tile_format="PNG"))


@pytest.fixture(scope="session")
def sample_mixed(tmp_path_factory) -> Path:
    """MIXED (JPEG inside, PNG on the edges), compact V1, levels 0-5."""
    return _sample(tmp_path_factory, "mixed_v1", SampleSpec(tile_format="MIXED", version=1))

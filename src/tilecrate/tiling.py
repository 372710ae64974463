"""Tile schemes: origin, tile size, levels of detail; map <-> tile arithmetic; bundle naming."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

PACKET = 128  # tiles per bundle side; the only packet size compact caches use
WEB_MERCATOR_HALF = 20037508.342787  # as ArcGIS writes the origin (FORMATS.md §4.4)
INCHES_PER_METRE = 39.37  # ArcGIS's constant: scale = resolution * dpi * 39.37

_BUNDLE_RE = re.compile(r"^R([0-9a-fA-F]+)C([0-9a-fA-F]+)\.bundle$", re.IGNORECASE)
_LEVEL_RE = re.compile(r"^L(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class LOD:
    """One level of detail: its LevelID, map units per pixel and scale denominator."""

    level: int
    resolution: float
    scale: float

    def to_json(self) -> dict:
        """The `lods[]` entry of a tileInfo JSON."""
        return {"level": self.level, "resolution": self.resolution, "scale": self.scale}


@dataclass(frozen=True)
class SpatialRef:
    """A spatial reference as ArcGIS names it: wkid, latestWkid and/or WKT."""

    wkid: int | None = None
    latest_wkid: int | None = None
    wkt: str | None = None

    @property
    def code(self) -> int | None:
        """The EPSG/ESRI code to use (latestWkid first, as GDAL does)."""
        return self.latest_wkid or self.wkid

    @property
    def is_geographic(self) -> bool:
        """True for longitude/latitude systems (degrees), judged from the code or WKT."""
        if self.code in (4326, 4269, 4258, 4283, 4167, 4490, 4610, 4214):
            return True
        if self.wkt:
            return self.wkt.lstrip().upper().startswith("GEOGCS")
        return False

    @property
    def units(self) -> str:
        """The `units` value of service and package JSON: esriDecimalDegrees or esriMeters."""
        return "esriDecimalDegrees" if self.is_geographic else "esriMeters"

    def to_json(self) -> dict:
        """`spatialReference` JSON: wkid/latestWkid when known, else wkt."""
        out: dict = {}
        if self.wkid is not None:
            out["wkid"] = self.wkid
        if self.latest_wkid is not None:
            out["latestWkid"] = self.latest_wkid
        if not out and self.wkt:
            out["wkt"] = self.wkt
        return out

    @classmethod
    def from_json(cls, obj: dict | None) -> "SpatialRef":
        """Read `{"wkid", "latestWkid", "wkt"}` (any subset; keys case-insensitive)."""
        if not obj:
            return cls()
        low = {str(k).lower(): v for k, v in obj.items()}

        def as_int(v):
            try:
                code = int(v) if v is not None and v != "" else None
            except (TypeError, ValueError, OverflowError):
                return None
            return code if code is None or 0 < code < 2**31 else None

        return cls(as_int(low.get("wkid")), as_int(low.get("latestwkid")), low.get("wkt") or None)


WEB_MERCATOR = SpatialRef(102100, 3857)


@dataclass(frozen=True)
class Extent:
    """An envelope in some spatial reference."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    spatial_ref: SpatialRef = field(default_factory=SpatialRef)

    def to_json(self) -> dict:
        """Esri Envelope JSON."""
        out = {"xmin": self.xmin, "ymin": self.ymin, "xmax": self.xmax, "ymax": self.ymax}
        sr = self.spatial_ref.to_json()
        if sr:
            out["spatialReference"] = sr
        return out

    def intersects(self, other: "Extent") -> bool:
        """Whether the two envelopes overlap or touch (same spatial reference assumed)."""
        return not (other.xmin > self.xmax or other.xmax < self.xmin
                    or other.ymin > self.ymax or other.ymax < self.ymin)

    @property
    def is_valid(self) -> bool:
        """Finite and not inverted."""
        vals = (self.xmin, self.ymin, self.xmax, self.ymax)
        return all(math.isfinite(v) for v in vals) and self.xmin <= self.xmax and self.ymin <= self.ymax


@dataclass(frozen=True)
class TileScheme:
    """The tiling scheme of a cache: where tile (0, 0) starts and how big tiles are per level."""

    origin_x: float
    origin_y: float
    tile_cols: int
    tile_rows: int
    dpi: int
    lods: tuple[LOD, ...]
    spatial_ref: SpatialRef
    packet_size: int = PACKET

    def lod(self, level: int) -> LOD:
        """The LOD with this LevelID (KeyError if the scheme has none)."""
        for lod in self.lods:
            if lod.level == level:
                return lod
        raise KeyError(level)

    def has_level(self, level: int) -> bool:
        """Whether the scheme defines this LevelID."""
        return any(lod.level == level for lod in self.lods)

    def tile_span(self, level: int) -> tuple[float, float]:
        """Width and height of one tile in map units at this level."""
        res = self.lod(level).resolution
        return res * self.tile_cols, res * self.tile_rows

    def tile_bounds(self, level: int, row: int, col: int) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of a tile in map units."""
        w, h = self.tile_span(level)
        xmin = self.origin_x + col * w
        ymax = self.origin_y - row * h
        return xmin, ymax - h, xmin + w, ymax

    def tile_at(self, level: int, x: float, y: float) -> tuple[int, int]:
        """(row, col) of the tile containing map point (x, y)."""
        w, h = self.tile_span(level)
        return math.floor((self.origin_y - y) / h), math.floor((x - self.origin_x) / w)

    def tile_range(self, level: int, extent: Extent) -> tuple[int, int, int, int]:
        """Inclusive (row_min, row_max, col_min, col_max) of tiles touching an extent."""
        w, h = self.tile_span(level)
        col0 = math.floor((extent.xmin - self.origin_x) / w)
        col1 = math.floor((extent.xmax - self.origin_x) / w)
        row0 = math.floor((self.origin_y - extent.ymax) / h)
        row1 = math.floor((self.origin_y - extent.ymin) / h)
        return row0, row1, col0, col1

    def tile_info_json(self, tile_format: str | None = None, quality: int | None = None) -> dict:
        """The `tileInfo` object of MapServer / root.json JSON."""
        out: dict = {"rows": self.tile_rows, "cols": self.tile_cols, "dpi": self.dpi}
        if tile_format is not None:
            out["format"] = tile_format
        if quality is not None:
            out["compressionQuality"] = quality
        out["origin"] = {"x": self.origin_x, "y": self.origin_y}
        out["spatialReference"] = self.spatial_ref.to_json()
        out["lods"] = [lod.to_json() for lod in self.lods]
        return out


def web_mercator_scheme(levels: int = 24, tile_size: int = 256, dpi: int = 96) -> TileScheme:
    """The ArcGIS Online / Google Web Mercator scheme, levels 0..levels-1."""
    res0 = 2 * WEB_MERCATOR_HALF / tile_size
    lods = tuple(
        LOD(z, res0 / 2**z, res0 / 2**z * dpi * INCHES_PER_METRE) for z in range(levels)
    )
    return TileScheme(-WEB_MERCATOR_HALF, WEB_MERCATOR_HALF, tile_size, tile_size, dpi, lods, WEB_MERCATOR)


def bundle_origin(row: int, col: int) -> tuple[int, int]:
    """Top-left (row0, col0) of the bundle holding a tile."""
    return (row // PACKET) * PACKET, (col // PACKET) * PACKET


def bundle_name(row0: int, col0: int) -> str:
    """`RrrrrCcccc.bundle`: lower-case hex, at least 4 digits (FORMATS.md §5.2)."""
    return f"R{row0:04x}C{col0:04x}.bundle"


def parse_bundle_name(name: str) -> tuple[int, int] | None:
    """(row0, col0) from a bundle file name, or None if it is not one (`.bundlx` included)."""
    m = _BUNDLE_RE.match(name)
    if not m:
        return None
    return int(m.group(1), 16), int(m.group(2), 16)


def level_dir(level: int) -> str:
    """`Lnn`: the level folder name, at least two decimal digits."""
    return f"L{level:02d}"


def parse_level_dir(name: str) -> int | None:
    """The LevelID of a `Lnn` folder name, or None."""
    m = _LEVEL_RE.match(name)
    return int(m.group(1)) if m else None


def sniff_image(data: bytes) -> str:
    """What a tile's bytes are, by their magic: 'jpeg', 'png', 'gzip', 'webp', 'lerc' or 'unknown'."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:8] in (b"CntZImag", b"Lerc2 \x00\x00") or data[:6] == b"Lerc2 ":
        return "lerc"
    return "unknown"

"""A deterministic sample cache: Web Mercator, 256 px, photo-like imagery or elevation, compact V1 or V2.

The imagery is continuous across tiles and levels (fractal value noise in world coordinates,
coloured like terrain, with hill shading and fine texture), so JPEG tiles have real sizes
(10-40 KB at quality 75) and thumbnails look like a map. Every JPEG tile carries a comment naming
its level/row/col, so no two tiles share bytes and a tile put in the wrong place is caught.
Writing uses plain Python file I/O on purpose: the sample is test input, built independently
of tilecrate's own bundle writers.

The LERC format is an elevation cache as ArcGIS elevation services serve it (FORMATS.md §19): the
same world terrain in metres, 257 x 257 float32 samples per 256 px tile sitting on the tile edges
(neighbours share their edge samples exactly), encoded as LERC1 with maxZError 0.1 m by
tilecrate.lerc1 (checked against Esri's own decoder in the tests).
"""
from __future__ import annotations

import io
import math
import os
import shutil
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from tilecrate import lerc1
from tilecrate.errors import TilecrateError
from tilecrate.tiling import PACKET, WEB_MERCATOR_HALF, bundle_name, level_dir, web_mercator_scheme

TILE = 256
DEFAULT_EXTENT = (-25.0, -35.0, 45.0, 62.0)      # lon/lat: Europe and Africa
LARGE_EXTENT = (-30.0, -40.0, 60.0, 65.0)
FORMATS = ("JPEG", "PNG", "MIXED", "LERC")
LERC_MAX_Z_ERROR = 0.1                           # metres, what the LERC sample's tiles guarantee
LERC_SAMPLES = TILE + 1                          # samples per side of an elevation tile (§19.2)
SEA_LEVEL = 0.46                                 # terrain value drawn as 0 m (the imagery's coast)
RELIEF_M = 15000.0                               # metres per unit of the terrain value
MAX_SAMPLE_LEVEL = 20


@dataclass(frozen=True)
class SampleSpec:
    """What to generate."""

    levels: tuple[int, ...] = tuple(range(0, 6))
    tile_format: str = "JPEG"
    version: int = 2
    extent: tuple[float, float, float, float] = DEFAULT_EXTENT
    quality: int = 75
    seed: int = 7


def large_spec(version: int = 2, tile_format: str = "JPEG") -> SampleSpec:
    """The benchmark preset: levels 0-10 over a wide extent, ~128 000 tiles, about 1.8 GB."""
    return SampleSpec(levels=tuple(range(0, 11)), tile_format=tile_format, version=version, extent=LARGE_EXTENT)


def lonlat_to_mercator(lon: float, lat: float) -> tuple[float, float]:
    """EPSG:4326 degrees to EPSG:3857 metres (spherical formulas, as the scheme uses)."""
    lat = max(min(lat, 85.05112878), -85.05112878)
    x = lon * WEB_MERCATOR_HALF / 180.0
    y = math.log(math.tan((90 + lat) * math.pi / 360.0)) * 6378137.0
    return x, y


def _mercator_extent(spec: SampleSpec) -> tuple[float, float, float, float]:
    x0, y0 = lonlat_to_mercator(spec.extent[0], spec.extent[1])
    x1, y1 = lonlat_to_mercator(spec.extent[2], spec.extent[3])
    return x0, y0, x1, y1


def tiles_of_level(spec: SampleSpec, level: int) -> tuple[int, int, int, int]:
    """Inclusive (row0, row1, col0, col1) of the tiles the sample has at a level."""
    x0, y0, x1, y1 = _mercator_extent(spec)
    span = 2 * WEB_MERCATOR_HALF / 2**level
    n = 2**level - 1
    col0 = min(max(math.floor((x0 + WEB_MERCATOR_HALF) / span), 0), n)
    col1 = min(max(math.floor((x1 + WEB_MERCATOR_HALF) / span - 1e-9), 0), n)
    row0 = min(max(math.floor((WEB_MERCATOR_HALF - y1) / span), 0), n)
    row1 = min(max(math.floor((WEB_MERCATOR_HALF - y0) / span - 1e-9), 0), n)
    return row0, row1, col0, col1


def count_tiles(spec: SampleSpec) -> int:
    """How many tiles the spec produces."""
    total = 0
    for lv in spec.levels:
        r0, r1, c0, c1 = tiles_of_level(spec, lv)
        total += (r1 - r0 + 1) * (c1 - c0 + 1)
    return total


# ------------------------------------------------------------------------------------------
# imagery

_RAMP = np.array([  # height -> colour, like a shaded relief map with sea
    (0.00, (10, 40, 90)), (0.38, (30, 90, 150)), (0.45, (70, 140, 170)), (0.47, (210, 200, 150)),
    (0.52, (90, 140, 60)), (0.65, (50, 100, 40)), (0.78, (120, 100, 70)), (0.90, (170, 160, 150)),
    (1.00, (250, 250, 250)),
], dtype=object)


def _lut() -> np.ndarray:
    xs = np.array([p[0] for p in _RAMP], dtype=np.float64)
    cs = np.array([p[1] for p in _RAMP], dtype=np.float64)
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, xs, cs[:, k]) for k in range(3)], axis=1).astype(np.float32)


_LUT = _lut()


def _hash2(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    h = (ix.astype(np.uint64) * np.uint64(0x9E3779B1) + iy.astype(np.uint64) * np.uint64(0x85EBCA77)
         + np.uint64(seed * 0xC2B2AE3D + 1))
    h ^= h >> np.uint64(15)
    h *= np.uint64(0x2C1B3C6D)
    h ^= h >> np.uint64(12)
    h *= np.uint64(0x297A2D39)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(0xFFFFFF)


def _value_noise(u: np.ndarray, v: np.ndarray, freq: float, seed: int) -> np.ndarray:
    x, y = u * freq, v * freq
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    a, b = _hash2(ix, iy, seed), _hash2(ix + 1, iy, seed)
    c, d = _hash2(ix, iy + 1, seed), _hash2(ix + 1, iy + 1, seed)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _height(level: int, row: int, col: int, seed: int, grid: int = 33) -> np.ndarray:
    """Terrain height in [0, 1] on a grid x grid lattice spanning the tile, continuous in the world."""
    t = np.linspace(0.0, 1.0, grid)
    n = 2.0**level
    u = (col + t[None, :]) / n
    v = (row + t[:, None]) / n
    u, v = np.broadcast_to(u, (grid, grid)), np.broadcast_to(v, (grid, grid))
    total = np.zeros((grid, grid))
    amp, norm, freq = 1.0, 0.0, 3.0
    max_freq = n * (grid - 1) / 2.0            # finest octave still resolved by the lattice
    k = 0
    while freq <= max_freq and k < 24:
        total += amp * _value_noise(u, v, freq, seed + k)
        norm += amp
        amp *= 0.55
        freq *= 2.0
        k += 1
    return total / norm


_TEXTURES: dict[int, np.ndarray] = {}


def elevation(level: int, row: int, col: int, seed: int = 7) -> np.ndarray:
    """Float32 heights in metres (257 x 257) of a tile of the sample terrain, edge-aligned samples."""
    h = _height(level, row, col, seed, grid=LERC_SAMPLES)
    return ((h - SEA_LEVEL) * RELIEF_M).astype(np.float32)


def _texture(key: int) -> np.ndarray:
    """Fine ground texture (one of 16), the detail that makes JPEG sizes realistic."""
    key %= 16
    tex = _TEXTURES.get(key)
    if tex is None:
        rng = np.random.default_rng(1000 + key)
        raw = rng.normal(0.0, 1.0, (TILE // 2 + 2, TILE // 2 + 2)).astype(np.float32)
        img = Image.fromarray(raw, mode="F").resize((TILE, TILE), Image.BICUBIC)
        fine = rng.normal(0.0, 0.5, (TILE, TILE)).astype(np.float32)
        tex = np.asarray(img, dtype=np.float32) + fine
        _TEXTURES[key] = tex
    return tex


def render_tile(level: int, row: int, col: int, seed: int = 7) -> np.ndarray:
    """RGB uint8 pixels (256 x 256 x 3) of a tile of the sample imagery."""
    h = _height(level, row, col, seed).astype(np.float32)
    hi = np.asarray(Image.fromarray(h, mode="F").resize((TILE, TILE), Image.BICUBIC), dtype=np.float32)
    hi = np.clip(hi, 0.0, 1.0)
    colour = _LUT[(hi * 255).astype(np.uint8)]
    gy, gx = np.gradient(hi)
    shade = 1.0 + np.clip((gx - gy) * (2.0**min(level, 12)) * 6.0, -0.35, 0.35)
    tex = _texture(level * 7919 + row * 104729 + col)
    land = (hi > 0.46).astype(np.float32)
    rgb = colour * shade[..., None] + (tex * (9.0 + 11.0 * land))[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _coverage(spec: SampleSpec, level: int, row: int, col: int) -> np.ndarray | None:
    """Alpha mask of the data extent within a tile; None where the tile is fully inside."""
    x0, y0, x1, y1 = _mercator_extent(spec)
    span = 2 * WEB_MERCATOR_HALF / 2**level
    tx0 = -WEB_MERCATOR_HALF + col * span
    ty1 = WEB_MERCATOR_HALF - row * span
    px = span / TILE
    c0 = int(np.clip(math.floor((x0 - tx0) / px), 0, TILE))
    c1 = int(np.clip(math.ceil((x1 - tx0) / px), 0, TILE))
    r0 = int(np.clip(math.floor((ty1 - y1) / px), 0, TILE))
    r1 = int(np.clip(math.ceil((ty1 - y0) / px), 0, TILE))
    if c0 == 0 and r0 == 0 and c1 == TILE and r1 == TILE:
        return None
    mask = np.zeros((TILE, TILE), dtype=np.uint8)
    mask[r0:r1, c0:c1] = 255
    return mask


def _jpeg_with_comment(img: Image.Image, quality: int, comment: bytes) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    com = b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment
    return data[:2] + com + data[2:]


def encode_tile(spec: SampleSpec, level: int, row: int, col: int) -> bytes:
    """The bytes the sample stores for one tile (JPEG, PNG or LERC per the spec's format)."""
    if spec.tile_format == "LERC":
        return lerc1.encode(elevation(level, row, col, spec.seed), LERC_MAX_Z_ERROR)
    rgb = render_tile(level, row, col, spec.seed)
    cover = _coverage(spec, level, row, col)
    tag = f"tilecrate sample L{level} R{row} C{col}".encode()
    fmt = spec.tile_format
    if fmt == "JPEG" or (fmt == "MIXED" and cover is None):
        if cover is not None:  # outside the data: the light grey ArcGIS fills JPEG tiles with
            rgb = rgb.copy()
            rgb[cover == 0] = (230, 230, 230)
        return _jpeg_with_comment(Image.fromarray(rgb, "RGB"), spec.quality, tag)
    # PNG (and MIXED edge tiles): posterized map colours with transparency outside the data
    poster = (rgb // 24) * 24 + 12 if fmt == "PNG" else rgb
    alpha = cover if cover is not None else np.full((TILE, TILE), 255, np.uint8)
    img = Image.fromarray(np.dstack([poster, alpha]), "RGBA")
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------
# bundles, written from the byte layouts of FORMATS.md §6 independently of tilecrate.package


def _v2_bundle(tiles: dict[int, bytes]) -> bytes:
    index = np.full(PACKET * PACKET, 4, dtype="<u8")   # ArcGIS's empty record: offset 4, size 0
    body = io.BytesIO()
    pos = 64 + 8 * PACKET * PACKET
    max_size = 0
    for i in sorted(tiles):
        data = tiles[i]
        body.write(struct.pack("<I", len(data)))
        index[i] = (pos + 4) | (len(data) << 40)
        body.write(data)
        pos += 4 + len(data)
        max_size = max(max_size, len(data))
    header = struct.pack("<4I3Q6I", 3, PACKET * PACKET, max_size, 5, 0, pos, 40,
                         20 + 8 * PACKET * PACKET, 3, 16, PACKET * PACKET, 5, 8 * PACKET * PACKET)
    return header + index.tobytes() + body.getvalue()


def _v1_bundle(tiles: dict[int, bytes], row0: int, col0: int) -> tuple[bytes, bytes]:
    n = PACKET * PACKET
    offsets = [60 + 4 * i for i in range(n)]             # empty cells point into the zero table
    body = io.BytesIO()
    pos = 60 + 4 * n
    max_size = 0
    for i in sorted(tiles):                              # i = row-major; bundlx is column-major
        r, c = divmod(i, PACKET)
        data = tiles[i]
        offsets[c * PACKET + r] = pos
        body.write(struct.pack("<I", len(data)))
        body.write(data)
        pos += 4 + len(data)
        max_size = max(max_size, len(data))
    header = struct.pack("<4I3Q5I", 3, n, max_size, 5, 4 * len(tiles), pos, 40, 16,
                         row0, row0 + PACKET - 1, col0, col0 + PACKET - 1)
    bundle = header + bytes(4 * n) + body.getvalue()
    bundlx = struct.pack("<4I", 3, 16, n, 5) + b"".join(o.to_bytes(5, "little") for o in offsets) \
        + struct.pack("<4I", 0, 16, 16, 0)
    return bundle, bundlx


def _conf_xml(spec: SampleSpec) -> str:
    scheme = web_mercator_scheme(24)
    lods = "".join(
        f"<LODInfo xsi:type='typens:LODInfo'><LevelID>{l.level}</LevelID><Scale>{l.scale!r}</Scale>"
        f"<Resolution>{l.resolution!r}</Resolution></LODInfo>" for l in scheme.lods
    )
    fmt_quality = spec.quality if spec.tile_format in ("JPEG", "MIXED") else 0
    # an elevation cache says how many bands its tiles hold and the LERC error they were written with
    lerc = (f"<BandCount>1</BandCount><LERCError>{LERC_MAX_Z_ERROR!r}</LERCError>"
            if spec.tile_format == "LERC" else "")
    storage = "esriMapCacheStorageModeCompactV2" if spec.version == 2 else "esriMapCacheStorageModeCompact"
    return (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?><CacheInfo xsi:type='typens:CacheInfo' "
        "xmlns:xsi='http://www.w3.org/2001/XMLSchema-instance' xmlns:xs='http://www.w3.org/2001/XMLSchema' "
        "xmlns:typens='http://www.esri.com/schemas/ArcGIS/10.3'><TileCacheInfo xsi:type='typens:TileCacheInfo'>"
        "<SpatialReference xsi:type='typens:ProjectedCoordinateSystem'><WKT>PROJCS[&quot;WGS_1984_Web_Mercator_Auxiliary_Sphere&quot;,"
        "GEOGCS[&quot;GCS_WGS_1984&quot;,DATUM[&quot;D_WGS_1984&quot;,SPHEROID[&quot;WGS_1984&quot;,6378137.0,298.257223563]],"
        "PRIMEM[&quot;Greenwich&quot;,0.0],UNIT[&quot;Degree&quot;,0.0174532925199433]],PROJECTION[&quot;Mercator_Auxiliary_Sphere&quot;],"
        "PARAMETER[&quot;False_Easting&quot;,0.0],PARAMETER[&quot;False_Northing&quot;,0.0],PARAMETER[&quot;Central_Meridian&quot;,0.0],"
        "PARAMETER[&quot;Standard_Parallel_1&quot;,0.0],PARAMETER[&quot;Auxiliary_Sphere_Type&quot;,0.0],UNIT[&quot;Meter&quot;,1.0],"
        "AUTHORITY[&quot;EPSG&quot;,3857]]</WKT><WKID>102100</WKID><LatestWKID>3857</LatestWKID></SpatialReference>"
        f"<TileOrigin xsi:type='typens:PointN'><X>{-WEB_MERCATOR_HALF}</X><Y>{WEB_MERCATOR_HALF}</Y></TileOrigin>"
        f"<TileCols>{TILE}</TileCols><TileRows>{TILE}</TileRows><DPI>96</DPI><PreciseDPI>96</PreciseDPI>"
        f"<LODInfos xsi:type='typens:ArrayOfLODInfo'>{lods}</LODInfos></TileCacheInfo>"
        f"<TileImageInfo xsi:type='typens:TileImageInfo'><CacheTileFormat>{spec.tile_format}</CacheTileFormat>"
        f"<CompressionQuality>{fmt_quality}</CompressionQuality><Antialiasing>false</Antialiasing>{lerc}</TileImageInfo>"
        f"<CacheStorageInfo xsi:type='typens:CacheStorageInfo'><StorageFormat>{storage}</StorageFormat>"
        "<PacketSize>128</PacketSize></CacheStorageInfo></CacheInfo>"
    )


def _conf_cdi(spec: SampleSpec) -> str:
    x0, y0, x1, y1 = _mercator_extent(spec)
    return (
        "<?xml version=\"1.0\" encoding=\"utf-8\" ?><EnvelopeN xsi:type='typens:EnvelopeN' "
        "xmlns:xsi='http://www.w3.org/2001/XMLSchema-instance' xmlns:xs='http://www.w3.org/2001/XMLSchema' "
        "xmlns:typens='http://www.esri.com/schemas/ArcGIS/10.3'>"
        f"<XMin>{x0!r}</XMin><YMin>{y0!r}</YMin><XMax>{x1!r}</XMax><YMax>{y1!r}</YMax>"
        "<SpatialReference xsi:type='typens:ProjectedCoordinateSystem'><WKID>102100</WKID>"
        "<LatestWKID>3857</LatestWKID></SpatialReference></EnvelopeN>"
    )


def _bundle_jobs(spec: SampleSpec) -> list[tuple[int, int, int]]:
    jobs = []
    for lv in spec.levels:
        r0, r1, c0, c1 = tiles_of_level(spec, lv)
        for br in range(r0 // PACKET, r1 // PACKET + 1):
            for bc in range(c0 // PACKET, c1 // PACKET + 1):
                jobs.append((lv, br * PACKET, bc * PACKET))
    return jobs


def _write_bundle(args: tuple[SampleSpec, str, int, int, int]) -> tuple[int, int]:
    spec, layers, level, row0, col0 = args
    r0, r1, c0, c1 = tiles_of_level(spec, level)
    tiles = {}
    for row in range(max(r0, row0), min(r1, row0 + PACKET - 1) + 1):
        for col in range(max(c0, col0), min(c1, col0 + PACKET - 1) + 1):
            tiles[(row - row0) * PACKET + (col - col0)] = encode_tile(spec, level, row, col)
    folder = os.path.join(layers, "_alllayers", level_dir(level))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, bundle_name(row0, col0))
    if spec.version == 2:
        with open(path, "wb") as f:
            f.write(_v2_bundle(tiles))
    else:
        bundle, bundlx = _v1_bundle(tiles, row0, col0)
        with open(path, "wb") as f:
            f.write(bundle)
        with open(path[:-1] + "x", "wb") as f:
            f.write(bundlx)
    return len(tiles), sum(len(t) for t in tiles.values())


def make_sample(out: str | os.PathLike, spec: SampleSpec = SampleSpec(), *, workers: int = 1,
                on_bundle: Callable[[int, int], None] | None = None, overwrite: bool = False) -> str:
    """Write the sample cache folder (conf.xml, conf.cdi, _alllayers) and return its path."""
    out = os.fspath(out)
    if spec.tile_format not in FORMATS:
        raise TilecrateError(f"sample format must be one of {', '.join(FORMATS)}, not {spec.tile_format}")
    if spec.version not in (1, 2):
        raise TilecrateError("sample version must be 1 (compact V1) or 2 (compact V2)")
    if not spec.levels or min(spec.levels) < 0 or max(spec.levels) > MAX_SAMPLE_LEVEL:
        raise TilecrateError(f"sample levels must lie within 0-{MAX_SAMPLE_LEVEL}")
    if os.path.exists(out):
        if not overwrite and os.listdir(out):
            raise TilecrateError(f"{out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "_alllayers"))
    with open(os.path.join(tmp, "conf.xml"), "w", encoding="utf-8") as f:
        f.write(_conf_xml(spec))
    with open(os.path.join(tmp, "conf.cdi"), "w", encoding="utf-8") as f:
        f.write(_conf_cdi(spec))
    jobs = [(spec, tmp, lv, r, c) for lv, r, c in _bundle_jobs(spec)]
    results: Iterable[tuple[int, int]]
    if workers > 1 and len(jobs) > 1:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_write_bundle, jobs, chunksize=1)
    else:
        pool = None
        results = map(_write_bundle, jobs)
    try:
        for tiles, nbytes in results:
            if on_bundle is not None:
                on_bundle(tiles, nbytes)
    finally:
        if pool is not None:
            pool.shutdown()
    os.replace(tmp, out)
    return out

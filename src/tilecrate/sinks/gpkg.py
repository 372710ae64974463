"""GeoPackage tiles output (OGC 12-128r18): SRS, contents, tile matrix set and one matrix per level.

Tile rows count from the top as ArcGIS rows do, so (level, row, col) go in unchanged. The tile
matrix set's corner is the scheme's origin; its size covers every exported tile (a Web Mercator
scheme of whole zooms gets the whole world and 2^z matrices, as GDAL and other readers expect).
"""
from __future__ import annotations

import math
import re
from typing import Callable

from tilecrate.cache import Cache
from tilecrate.errors import ExportError
from tilecrate.plan import ExportPlan
from tilecrate.results import CancelFlag, check_cancel
from tilecrate.sinks.common import (_HALF_WORLD, WEB_MERCATOR_CODES, SourceMeta, Tally, bundle_tiles,
                                    commit_when_full, inside_grid, iter_bundles, open_sqlite, tile_kind,
                                    web_mercator_zooms)

APPLICATION_ID = 0x47504B47          # "GPKG"
USER_VERSION = 10300                 # 1.3.0

_WGS84_WKT = ('GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],'
              'AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree",'
              '0.0174532925199433,AUTHORITY["EPSG","9122"]],AXIS["Latitude",NORTH],AXIS["Longitude",EAST],'
              'AUTHORITY["EPSG","4326"]]')
_MERCATOR_WKT = ('PROJCS["WGS 84 / Pseudo-Mercator",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
                 '298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]],PRIMEM["Greenwich",0,'
                 'AUTHORITY["EPSG","8901"]],UNIT["degree",0.0174532925199433,AUTHORITY["EPSG","9122"]],'
                 'AUTHORITY["EPSG","4326"]],PROJECTION["Mercator_1SP"],PARAMETER["central_meridian",0],'
                 'PARAMETER["scale_factor",1],PARAMETER["false_easting",0],PARAMETER["false_northing",0],'
                 'UNIT["metre",1,AUTHORITY["EPSG","9001"]],AXIS["Easting",EAST],AXIS["Northing",NORTH],'
                 'EXTENSION["PROJ4","+proj=merc +a=6378137 +b=6378137 +lat_ts=0 +lon_0=0 +x_0=0 +y_0=0 +k=1 '
                 '+units=m +nadgrids=@null +wktext +no_defs"],AUTHORITY["EPSG","3857"]]')

_SCHEMA = """
CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT NOT NULL, srs_id INTEGER NOT NULL PRIMARY KEY,
  organization TEXT NOT NULL, organization_coordsys_id INTEGER NOT NULL, definition TEXT NOT NULL,
  description TEXT);
CREATE TABLE gpkg_contents (table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT NULL,
  identifier TEXT UNIQUE, description TEXT DEFAULT '',
  last_change DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE,
  srs_id INTEGER, CONSTRAINT fk_gc_r_srs_id FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys(srs_id));
CREATE TABLE gpkg_tile_matrix_set (table_name TEXT NOT NULL PRIMARY KEY, srs_id INTEGER NOT NULL,
  min_x DOUBLE NOT NULL, min_y DOUBLE NOT NULL, max_x DOUBLE NOT NULL, max_y DOUBLE NOT NULL,
  CONSTRAINT fk_gtms_table_name FOREIGN KEY (table_name) REFERENCES gpkg_contents(table_name),
  CONSTRAINT fk_gtms_srs FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys (srs_id));
CREATE TABLE gpkg_tile_matrix (table_name TEXT NOT NULL, zoom_level INTEGER NOT NULL,
  matrix_width INTEGER NOT NULL, matrix_height INTEGER NOT NULL, tile_width INTEGER NOT NULL,
  tile_height INTEGER NOT NULL, pixel_x_size DOUBLE NOT NULL, pixel_y_size DOUBLE NOT NULL,
  CONSTRAINT pk_ttm PRIMARY KEY (table_name, zoom_level),
  CONSTRAINT fk_tmm_table_name FOREIGN KEY (table_name) REFERENCES gpkg_contents(table_name));
"""


def table_name(meta: SourceMeta) -> str:
    """A tile table name made from the source's name (letters, digits and underscores)."""
    name = re.sub(r"\W+", "_", meta.name, flags=re.ASCII).strip("_").lower()
    if not name or name[0].isdigit() or name.startswith("gpkg"):
        name = "tiles_" + name if name else "tiles"
    return name[:60]


def srs_row(cache: Cache) -> tuple[str, int, str, int, str, str]:
    """The gpkg_spatial_ref_sys row of the source's spatial reference (EPSG code and WKT)."""
    sr = cache.scheme.spatial_ref
    code = sr.code
    if code in WEB_MERCATOR_CODES:
        return ("WGS 84 / Pseudo-Mercator", 3857, "EPSG", 3857, _MERCATOR_WKT, "Web Mercator")
    if code == 4326:
        return ("WGS 84 geodetic", 4326, "EPSG", 4326, _WGS84_WKT, "longitude/latitude WGS 84")
    if code is not None:
        try:
            from pyproj import CRS
            from pyproj.enums import WktVersion

            crs = CRS.from_user_input(code)
            wkt = crs.to_wkt(WktVersion.WKT1_GDAL)
            if wkt:
                auth = crs.to_authority() or ("EPSG", str(code))
                org, org_id = auth[0], int(auth[1])
                return (crs.name, org_id if org == "EPSG" else code, org, org_id, wkt, crs.name)
        except Exception:            # an unknown code: fall back to the scheme's WKT below
            pass
    if sr.wkt:
        return ("custom", 99999 if code is None else code, "NONE", 99999 if code is None else code, sr.wkt, "")
    raise ExportError(f"{cache.path}: its spatial reference has neither a known code nor a WKT; a GeoPackage needs one")


def matrices(cache: Cache, plan: ExportPlan) -> tuple[tuple[float, float, float, float], list[tuple]]:
    """The tile matrix set's bbox and the (level, width, height, tile w, tile h, px, py) of each exported level."""
    scheme = cache.scheme
    levels = [lv for lv in plan.selection.levels if lv.tiles > 0]
    tw, th = scheme.tile_cols, scheme.tile_rows
    try:
        zooms = web_mercator_zooms(scheme, [lv.level for lv in levels])
    except ExportError:
        zooms = None
    if zooms is not None:
        bbox = (-_HALF_WORLD, -_HALF_WORLD, _HALF_WORLD, _HALF_WORLD)
        out = []
        for lv in levels:
            n = 1 << zooms[lv.level]
            res = 2 * _HALF_WORLD / (n * tw)
            out.append((lv.level, n, n, tw, th, res, res))
        return bbox, out
    width = height = 0.0
    for lv in levels:
        rng = lv.tile_range()
        if rng is None:
            continue
        sx, sy = scheme.tile_span(lv.level)
        width = max(width, (rng[3] + 1) * sx)
        height = max(height, (rng[1] + 1) * sy)
    bbox = (scheme.origin_x, scheme.origin_y - height, scheme.origin_x + width, scheme.origin_y)
    out = []
    for lv in levels:
        sx, sy = scheme.tile_span(lv.level)
        res = scheme.lod(lv.level).resolution
        out.append((lv.level, max(1, math.ceil(width / sx - 1e-9)), max(1, math.ceil(height / sy - 1e-9)),
                    tw, th, res, res))
    return bbox, out


def write_gpkg(plan: ExportPlan, cache: Cache, tmp: str, meta: SourceMeta, *,
               progress: Callable[[int, int, int | None], None] | None = None,
               cancel: CancelFlag | None = None) -> tuple[int, dict[int, dict], list[str]]:
    """Write the plan's tiles as a GeoPackage tile pyramid to `tmp`; (tiles, {level: {tiles, size}}, warnings)."""
    kind = tile_kind(cache, plan.policy is not None)
    if kind not in ("png", "jpg"):
        raise ExportError(f"{cache.path}: a GeoPackage holds PNG or JPEG tiles, not {cache.tile_format}")
    srs = srs_row(cache)
    bbox, mats = matrices(cache, plan)
    # Web Mercator: the matrices are the world's 2^z tiles; tiles past them cannot be stored
    grid = {m[0]: m[1] for m in mats} if bbox[0] == -_HALF_WORLD and bbox[3] == _HALF_WORLD else {}
    table = table_name(meta)
    ext = plan.info.extent
    cbox = bbox
    if ext is not None:       # the data's extent, inside the matrix set (a cache's extent can pass the world's)
        cbox = (max(ext.xmin, bbox[0]), max(ext.ymin, bbox[1]), min(ext.xmax, bbox[2]), min(ext.ymax, bbox[3]))
        if cbox[0] >= cbox[2] or cbox[1] >= cbox[3]:
            cbox = bbox
    description = meta.description
    if meta.attribution:
        description = f"{description}\n\nAttribution: {meta.attribution}".strip()
    db = open_sqlite(tmp, APPLICATION_ID)
    warnings: list[str] = []
    tally = Tally()
    try:
        db.execute(f"PRAGMA user_version={USER_VERSION}")
        db.execute("BEGIN")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        base = [("Undefined cartesian SRS", -1, "NONE", -1, "undefined", "undefined cartesian coordinate reference system"),
                ("Undefined geographic SRS", 0, "NONE", 0, "undefined", "undefined geographic coordinate reference system"),
                ("WGS 84 geodetic", 4326, "EPSG", 4326, _WGS84_WKT, "longitude/latitude WGS 84")]
        rows = {r[1]: r for r in base}
        rows[srs[1]] = srs
        db.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", list(rows.values()))
        db.execute(f'CREATE TABLE "{table}" (id INTEGER PRIMARY KEY AUTOINCREMENT, zoom_level INTEGER NOT NULL, '
                   "tile_column INTEGER NOT NULL, tile_row INTEGER NOT NULL, tile_data BLOB NOT NULL, "
                   "UNIQUE (zoom_level, tile_column, tile_row))")
        db.execute("INSERT INTO gpkg_contents (table_name, data_type, identifier, description, min_x, min_y, max_x, "
                   "max_y, srs_id) VALUES (?, 'tiles', ?, ?, ?, ?, ?, ?, ?)",
                   (table, meta.name, description, *cbox, srs[1]))
        db.execute("INSERT INTO gpkg_tile_matrix_set VALUES (?, ?, ?, ?, ?, ?)", (table, srs[1], *bbox))
        db.executemany("INSERT INTO gpkg_tile_matrix VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [(table, *m) for m in mats])
        insert = f'INSERT INTO "{table}" (zoom_level, tile_column, tile_row, tile_data) VALUES (?, ?, ?, ?)'
        pending = 0
        for bsel in iter_bundles(plan):
            rws, cols, tiles, found = bundle_tiles(cache, plan, bsel, cancel)
            warnings.extend(found)
            level = bsel.ref.level
            if level in grid:
                rws, cols, tiles = inside_grid(rws, cols, tiles, grid[level], cache.bundle_label(bsel.ref), warnings)
            db.executemany(insert, zip([level] * len(tiles), cols.tolist(), rws.tolist(), tiles))
            pending = commit_when_full(db, pending + tally.add(level, tiles))
            check_cancel(cancel)
            if progress is not None:
                progress(tally.tiles, tally.size, level)
        db.execute("COMMIT")
    finally:
        db.close()
    return tally.tiles, tally.levels, warnings

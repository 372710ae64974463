"""XYZ folder output: {z}/{x}/{y}.png|jpg|webp and a metadata.json (TileJSON-like) with the source's metadata.

Zooms are XYZ zooms for a Web Mercator scheme of whole zooms; any other scheme keeps its level
numbers, columns as x and rows (from the top) as y, which metadata.json says.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from tilecrate.cache import Cache
from tilecrate.errors import ExportError
from tilecrate.plan import ExportPlan
from tilecrate.results import CancelFlag, check_cancel
from tilecrate.sinks.common import (SourceMeta, Tally, bundle_tiles, image_ext, inside_grid, iter_bundles, tile_kind,
                                    web_mercator_zooms, wgs84_bounds)


def metadata_json(plan: ExportPlan, meta: SourceMeta, fmt: str, zooms: dict[int, int], mercator: bool) -> dict:
    """TileJSON-like facts of the folder: name, description, attribution, format, bounds, zooms, scheme."""
    exported = sorted(zooms[lv.level] for lv in plan.selection.levels if lv.tiles > 0) or [0]
    out = {"tilejson": "3.0.0", "name": meta.name, "description": meta.description,
           "attribution": meta.attribution, "format": fmt, "scheme": "xyz",
           "tiles": [f"{{z}}/{{x}}/{{y}}.{fmt}"], "minzoom": exported[0], "maxzoom": exported[-1]}
    if mercator:
        out["bounds"] = list(wgs84_bounds(plan))
    else:
        out["tilingScheme"] = "the source's own levels (not Web Mercator XYZ zooms); y counts rows from the top"
    return out


def write_xyz(plan: ExportPlan, cache: Cache, tmp: str, meta: SourceMeta, *,
              progress: Callable[[int, int, int | None], None] | None = None,
              cancel: CancelFlag | None = None) -> tuple[int, dict[int, dict], list[str]]:
    """Write the plan's tiles as {z}/{x}/{y}.ext files under the new folder `tmp`."""
    fmt = tile_kind(cache, plan.policy is not None)
    levels_in = [lv.level for lv in plan.selection.levels]
    try:
        zooms, mercator = web_mercator_zooms(cache.scheme, levels_in), True
    except ExportError:
        zooms, mercator = {lv: lv for lv in levels_in}, False
    os.mkdir(tmp)
    warnings: list[str] = []
    tally = Tally()
    made: set[str] = set()
    for bsel in iter_bundles(plan):
        rows, cols, tiles, found = bundle_tiles(cache, plan, bsel, cancel)
        warnings.extend(found)
        z = zooms[bsel.ref.level]
        if mercator:
            rows, cols, tiles = inside_grid(rows, cols, tiles, 1 << z, cache.bundle_label(bsel.ref), warnings)
        for x, y, blob in zip(cols.tolist(), rows.tolist(), tiles):
            folder = os.path.join(tmp, str(z), str(x))
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            with open(os.path.join(folder, f"{y}.{image_ext(blob, fmt)}"), "wb") as f:
                f.write(blob)
        tally.add(bsel.ref.level, tiles)
        check_cancel(cancel)
        if progress is not None:
            progress(tally.tiles, tally.size, bsel.ref.level)
    with open(os.path.join(tmp, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(metadata_json(plan, meta, fmt, zooms, mercator), f, ensure_ascii=False, indent=1)
    return tally.tiles, tally.levels, warnings

"""The exact size of what export() writes, predicted from the selection alone (no tile data read).

The prediction replays the export's own layout (tilecrate.package.layout) through the zip writer
in dry-run mode, with bundle sizes from the selection's counts (header + index + 4-byte prefix
per tile + tile bytes) and metadata built by the same functions, stamped with a GUID and time of
the same width. The one thing it cannot know is re-encoding (optimizeTilesForSize): as ArcGIS's
estimate does, it counts the source tiles' bytes.
"""
from __future__ import annotations

from tilecrate import _plan
from tilecrate.cache import Cache
from tilecrate.package.layout import Layout, entries, resolve_layout
from tilecrate.package.metadata import PackageInfo, Stamp, package_info
from tilecrate.package.thumbnail import thumbnail_size
from tilecrate.package.zipstream import ZIP64_LIMIT, ZipWriter
from tilecrate.recompress import policy_for


def bundle_file_sizes(tiles: int, tile_bytes: int, version: int) -> tuple[int, int]:
    """(.bundle bytes, .bundlx bytes) of an output bundle holding `tiles` tiles of `tile_bytes` bytes."""
    if tiles <= 0:
        return 0, 0
    if version == 2:
        return _plan.V2_DATA_START + 4 * tiles + tile_bytes, 0
    return _plan.V1_DATA_START + 4 * tiles + tile_bytes, _plan.BUNDLX_SIZE


def metadata_quality(cache: Cache, request) -> int | None:
    """The compressionQuality the package metadata will state (the re-encoding quality when one applies)."""
    if not getattr(request, "optimize_tiles_for_size", False):
        return None
    policy = policy_for(cache, request)
    return policy.quality_used if policy is not None else None


def predict_package_size(cache: Cache, selection, request, *, layout: Layout | None = None,
                         out: str | None = None, zip64_limit: int = ZIP64_LIMIT,
                         info: PackageInfo | None = None) -> tuple[int, dict[int, int]]:
    """(total bytes of the package file or cache folder, bytes per level) without reading tile data.

    For callers holding a selection but no plan; an ExportPlan's `predicted()` calls predict_size."""
    layout = layout or resolve_layout(cache, request, out)
    if info is None:
        info = package_info(cache, selection, layout.version, metadata_quality(cache, request))
    return predict_size(layout, info, selection, zip64_limit=zip64_limit)


def predict_size(layout: Layout, info: PackageInfo, selection, *,
                 zip64_limit: int = ZIP64_LIMIT) -> tuple[int, dict[int, int]]:
    """(total bytes, bytes per level) of a resolved output: the layout replayed through a dry-run zip writer."""
    files = layout.metadata_files(info, Stamp.placeholder())
    per_level: dict[int, int] = {lv.level: 0 for lv in selection.levels}
    writer = ZipWriter(None, zip64_limit=zip64_limit, dry_run=True) if layout.is_package else None
    total = 0
    for name, data in files:
        if writer is not None:
            writer.add_size(name, len(data))
        total += len(data)
    for kind, name, bsel in entries(layout, selection):
        if kind == "dir":
            if writer is not None:
                writer.add_dir(name)
            continue
        bundle, bundlx = bundle_file_sizes(bsel.tiles, bsel.tile_bytes, layout.version)
        per_level[bsel.ref.level] = per_level.get(bsel.ref.level, 0) + bundle + bundlx
        total += bundle + bundlx
        if writer is not None:
            writer.add_size(name, bundle)
            if bundlx:
                writer.add_size(name[:-1] + "x", bundlx)
    if layout.thumbnail_path is not None:
        total += thumbnail_size()
        if writer is not None:
            writer.add_size(layout.thumbnail_path, thumbnail_size())
    if writer is not None:
        total = writer.close()
    return total, per_level

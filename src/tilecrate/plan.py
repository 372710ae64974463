"""ExportRequest -> ExportPlan: the request resolved once (source, levels, area, layout, policy, selection).

Everything downstream (the estimate, the in-process writer, a Dask worker, a job runner) consumes
the plan and never re-reads the request: the output layout and re-encoding policy are chosen
here, the levels matched and the area rasterized into one 128x128 mask per source bundle. A plan
is plain data and pickles small (masks travel bit-packed), so it can be sent to another process.
Its per-bundle parts (`BundleTask`) carry what one output bundle needs and nothing else.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from tilecrate.cache import BundleRef, Cache, open_cache
from tilecrate.errors import ExportError
from tilecrate.package.layout import Layout, entries, resolve_layout
from tilecrate.package.metadata import PackageInfo, package_info
from tilecrate.package.sizing import predict_size
from tilecrate.package.zipstream import ZIP64_LIMIT
from tilecrate.recompress import RecompressPolicy, policy_for
from tilecrate.request import ExportRequest
from tilecrate.selection import BundleSelection, LevelSelection, Selection, select
from tilecrate.tiling import PACKET

if TYPE_CHECKING:
    from tilecrate.presence import PresenceStore


@dataclass(frozen=True)
class SourceRef:
    """How a worker opens the source: its absolute path and kind (folder, tpk, tpkx)."""

    path: str
    kind: str


def pack_mask(mask: np.ndarray) -> bytes:
    """A 128x128 0/1 mask as 2 048 bytes (what travels to workers)."""
    return np.packbits(np.asarray(mask, dtype=np.uint8).reshape(-1) != 0).tobytes()


def unpack_mask(packed: bytes) -> np.ndarray:
    """The uint8 (128, 128) mask of `pack_mask`; a wrong length is refused."""
    if len(packed) != PACKET * PACKET // 8:
        raise ValueError(f"a packed bundle mask has {PACKET * PACKET // 8} bytes, not {len(packed)}")
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))
    return np.ascontiguousarray(bits.reshape(PACKET, PACKET), dtype=np.uint8)


@dataclass(frozen=True)
class BundleTask:
    """One output bundle to make: which source bundle, which of its tiles, in which format, where to."""

    source: SourceRef
    index: int                     # position among the plan's bundles (writing order)
    name: str                      # path of the output .bundle inside the package or folder
    ref: BundleRef
    packed_mask: bytes             # pack_mask of the selection
    tiles: int
    tile_bytes: int
    source_size: int               # the source bundle's size when planned (a changed file is an error)
    version: int                   # output bundle version, 1 or 2
    policy: RecompressPolicy | None   # an active re-encoding policy, or None to copy tiles
    staging: str | None = None     # folder the output is written into (name relative to it)

    @property
    def mask(self) -> np.ndarray:
        """The selection mask, uint8 (128, 128)."""
        return unpack_mask(self.packed_mask)


@dataclass
class ExportPlan:
    """An export resolved once; picklable. Build it with `make_plan`."""

    source: SourceRef
    request: ExportRequest
    out: str | None                # absolute output path (None for an estimate)
    layout: Layout
    policy: RecompressPolicy | None   # None: tiles are copied (no re-encoding asked, or nothing to gain)
    quality_used: int | None       # compressionQuality the metadata states (re-encoding asked for)
    selection: Selection
    info: PackageInfo
    source_sizes: dict[BundleRef, int] = field(repr=False, default_factory=dict)
    zip64_limit: int = ZIP64_LIMIT
    _predicted: tuple[int, dict[int, int]] | None = field(default=None, repr=False)

    @property
    def tiles(self) -> int:
        """Tiles the export writes."""
        return self.selection.tiles

    @property
    def bundles(self) -> int:
        """Output bundles the export writes (one task each)."""
        return sum(1 for b in self.selection.bundles() if b.tiles > 0)

    def predicted(self) -> tuple[int, dict[int, int]]:
        """(exact bytes of the output, bytes per level), replayed through the dry-run zip writer."""
        if self._predicted is None:
            self._predicted = predict_size(self.layout, self.info, self.selection, zip64_limit=self.zip64_limit)
        return self._predicted

    def entries(self) -> Iterator[tuple[str, str, BundleSelection | None]]:
        """The output's ("dir", path, None) and ("bundle", path, selection) entries in writing order."""
        return entries(self.layout, self.selection)

    def tasks(self, staging: str | None = None) -> Iterator[BundleTask]:
        """One BundleTask per output bundle, in writing order."""
        index = 0
        for kind, name, bsel in self.entries():
            if kind != "bundle":
                continue
            yield BundleTask(self.source, index, name, bsel.ref, pack_mask(bsel.mask), bsel.tiles,
                             bsel.tile_bytes, self.source_sizes.get(bsel.ref, -1), self.layout.version,
                             self.policy, staging)
            index += 1

    def dirs(self) -> list[str]:
        """Every folder the output holds (relative, with a trailing slash), parents first."""
        out: list[str] = []
        for kind, name, _ in self.entries():
            parts = name.split("/")[:-1] if kind == "bundle" else name.rstrip("/").split("/")
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i]) + "/"
                if d not in out:
                    out.append(d)
        return out

    # masks travel bit-packed: 2 KB per bundle instead of 16 KB
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["selection"] = [(lv.level, lv.tiles, lv.tile_bytes,
                               [(b.ref, pack_mask(b.mask), b.tiles, b.tile_bytes) for b in lv.bundles])
                              for lv in self.selection.levels]
        state["whole_area"] = self.selection.whole_area
        return state

    def __setstate__(self, state: dict) -> None:
        levels = [LevelSelection(level, [BundleSelection(BundleRef(*ref), unpack_mask(m), t, nb)
                                         for ref, m, t, nb in bundles], tiles, tile_bytes)
                  for level, tiles, tile_bytes, bundles in state["selection"]]
        state["selection"] = Selection(levels, sum(lv.tiles for lv in levels),
                                       sum(lv.tile_bytes for lv in levels), state.pop("whole_area", False))
        self.__dict__.update(state)


def check_source(cache: Cache) -> None:
    """Refuse sources a raster export cannot take (vector tile packages)."""
    if cache.kind == "vtpk" or cache.tile_format.lower() == "pbf":
        raise ExportError(f"{cache.path}: vector tile packages cannot be exported as raster tile packages or "
                          "caches (their tiles are gzipped vector data, not images)")


def make_plan(cache: Cache | str | os.PathLike, request: ExportRequest, out: str | os.PathLike | None = None, *,
              cancel: threading.Event | None = None, selection: Selection | None = None,
              presence: "PresenceStore | None" = None, zip64_limit: int = ZIP64_LIMIT) -> ExportPlan:
    """Resolve a request against a source once: layout, policy, levels, area and per-bundle masks."""
    if not isinstance(cache, Cache):
        with open_cache(os.fspath(cache)) as opened:
            return make_plan(opened, request, out, cancel=cancel, selection=selection, presence=presence,
                             zip64_limit=zip64_limit)
    out = os.path.abspath(os.fspath(out)) if out is not None else None
    layout = resolve_layout(cache, request, out)
    if selection is None:
        selection = select(cache, request, cancel=cancel, presence=presence)
    policy = policy_for(cache, request) if request.optimize_tiles_for_size else None
    quality_used = policy.quality_used if policy is not None else None
    active = policy if policy is not None and policy.active else None
    info = package_info(cache, selection, layout.version, quality_used)
    sizes = {b.ref: cache.bundle_file_size(b.ref) for b in selection.bundles() if b.tiles > 0}
    return ExportPlan(SourceRef(cache.path, cache.kind), request, out, layout, active, quality_used,
                      selection, info, sizes, int(zip64_limit))

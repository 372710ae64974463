"""What an export writes, file by file: the output kind, the metadata files and the bundle paths.

One list, used both to write a package and to predict its size, so the two cannot drift apart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from tilecrate.cache import COMPACT_V2, BundleRef, Cache
from tilecrate.errors import RequestError
from tilecrate.package import metadata
from tilecrate.package.metadata import PackageInfo, Stamp
from tilecrate.tiling import bundle_name, level_dir

TPKX, TPK, FOLDER = "tpkx", "tpk", "folder"
EXTENSIONS = {TPKX: ".tpkx", TPK: ".tpk", FOLDER: ""}


@dataclass(frozen=True)
class Layout:
    """The output's kind (tpkx, tpk, folder) and bundle version (2 or 1)."""

    kind: str
    version: int

    @property
    def is_package(self) -> bool:
        """True for .tpk / .tpkx (a zip), False for a cache folder."""
        return self.kind != FOLDER

    @property
    def root(self) -> str:
        """Folder of conf.xml / root.json inside the output."""
        return "v101/Layers/" if self.kind == TPK else ""

    @property
    def tiles_dir(self) -> str:
        """Folder holding the Lnn folders."""
        return "tile/" if self.kind == TPKX else self.root + "_alllayers/"

    def bundle_path(self, ref: BundleRef) -> str:
        """Path of an output .bundle (the .bundlx sits next to it, last letter 'x')."""
        return f"{self.tiles_dir}{level_dir(ref.level)}/{bundle_name(ref.row0, ref.col0)}"

    def level_dir(self, level: int) -> str:
        """Path of a level folder, with a trailing slash."""
        return f"{self.tiles_dir}{level_dir(level)}/"

    def metadata_files(self, info: PackageInfo, stamp: Stamp) -> list[tuple[str, bytes]]:
        """(path, bytes) of the metadata files, written first (the thumbnail comes last: see thumbnail_path)."""
        if self.kind == TPKX:
            return [("iteminfo.json", metadata.iteminfo_json(info, stamp)),
                    ("root.json", metadata.root_json(info))]
        if self.kind == TPK:
            return [("esriinfo/item.pkinfo", metadata.item_pkinfo(info, stamp)),
                    ("esriinfo/iteminfo.xml", metadata.iteminfo_xml(info, stamp)),
                    ("servicedescriptions/mapserver/mapserver.json", metadata.mapserver_json(info)),
                    (self.root + "conf.xml", metadata.conf_xml(info)),
                    (self.root + "conf.cdi", metadata.conf_cdi(info)),
                    (self.root + "conf.properties", metadata.conf_properties())]
        return [("conf.xml", metadata.conf_xml(info, up_to_exported=True)), ("conf.cdi", metadata.conf_cdi(info))]

    @property
    def thumbnail_path(self) -> str | None:
        """Where the thumbnail goes; it is the package's last entry, rendered while the bundles are written."""
        return {TPKX: "thumbnail.png", TPK: "esriinfo/thumbnail/thumbnail.png"}.get(self.kind)

    @property
    def explicit_dirs(self) -> bool:
        """Whether the zip lists directory entries (the Esri .tpkx sample does)."""
        return self.kind == TPKX


def resolve_layout(cache: Cache, request, out: str | os.PathLike | None = None) -> Layout:
    """The output of a request: storageFormatType if given, else the `out` extension, else the source's format."""
    requested = getattr(request, "storage_format", None)
    ext = os.path.splitext(os.fspath(out))[1].lower() if out is not None else ""
    if not request.tile_package:
        version = 2 if (requested or cache.storage_format) == COMPACT_V2 else 1
        return Layout(FOLDER, version)
    by_ext = {".tpkx": 2, ".tpk": 1}.get(ext)
    if requested is not None:
        version = 2 if requested == COMPACT_V2 else 1
        if by_ext is not None and by_ext != version:
            want = ".tpkx" if version == 2 else ".tpk"
            raise RequestError(f"{os.fspath(out)}: storage format {requested} makes a {want} package, "
                               f"not a {ext} one; rename the output or change the storage format")
    elif by_ext is not None:
        version = by_ext
    else:
        version = 2 if cache.storage_format == COMPACT_V2 else 1
    return Layout(TPKX if version == 2 else TPK, version)


def entries(layout: Layout, selection):
    """The output's directory and bundle entries in writing order: ("dir", path, None) / ("bundle", path, BundleSelection)."""
    if layout.explicit_dirs and any(b.tiles > 0 for b in selection.bundles()):
        yield "dir", layout.tiles_dir, None
    for lv in selection.levels:
        chosen = [b for b in lv.bundles if b.tiles > 0]
        if not chosen:
            continue
        if layout.explicit_dirs or not layout.is_package:
            yield "dir", layout.level_dir(lv.level), None
        for b in chosen:
            yield "bundle", layout.bundle_path(b.ref), b


def is_vector_source(cache: Cache) -> bool:
    """Whether a cache holds vector tiles (a .vtpk or an extracted one): its export is a .vtpk."""
    return cache.kind == "vtpk" or cache.tile_format.lower() == "pbf"

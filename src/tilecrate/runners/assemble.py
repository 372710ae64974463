"""The package (or cache folder) made from staged bundle files, in the plan's order.

Bundle tasks that ran elsewhere (Dask workers) leave their output bundles in a staging folder laid
out like the output itself, with size and CRC-32 known. A zip output copies each staged file into
its entry in the kernel (ZipWriter.add_file: copy_file_range) with that CRC, never recomputed, and
drops the staged file at once, so staging holds only the bundles not yet assembled; a cache
folder output *is* the staging folder, so nothing is copied there at all. A pass-through bundle
into a zip is a recipe: the worker stages only its header block (and a V1 .bundlx), and the tiles'
ranges are copied in the kernel straight from the source, with the CRC-32 the worker computed.
"""
from __future__ import annotations

import os

from tilecrate.package.kcopy import CopyRange, check_unchanged, open_source
from tilecrate.package.zipstream import ZipWriter
from tilecrate.runners.tasks import BundleOutput, BundleRecipe

class Assembler:
    """Writes metadata, directories and staged bundles into a zip (`f` open) or a folder (`root`)."""

    def __init__(self, *, writer: ZipWriter | None = None, root: str | None = None):
        if (writer is None) == (root is None):
            raise ValueError("an Assembler writes either a zip or a folder")
        self.writer = writer
        self.root = root
        self.size = 0
        self._head_file: tuple[str, int] | None = None     # (path, fd) of the group being copied

    @property
    def position(self) -> int:
        """Bytes written so far."""
        return self.writer.position if self.writer is not None else self.size

    def add_bytes(self, name: str, data: bytes) -> None:
        """A whole file from memory (metadata, thumbnail)."""
        if self.writer is not None:
            self.writer.add_bytes(name, data)
            return
        path = os.path.join(self.root, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        self.size += len(data)

    def add_dir(self, name: str) -> None:
        """A directory entry (folders exist already in a staged cache folder)."""
        if self.writer is not None:
            self.writer.add_dir(name)

    def add_output(self, out: BundleOutput) -> None:
        """A task's staged .bundle (and .bundlx): copied into the zip with its CRC, or left in place."""
        if self.writer is None:
            self.size += out.size + (out.bundlx_size if out.bundlx_path else 0)
            return
        self.writer.add_file(out.name, out.path, out.size, out.crc32)
        os.unlink(out.path)
        if out.bundlx_path is not None:
            self.writer.add_file(out.name[:-1] + "x", out.bundlx_path, out.bundlx_size, out.bundlx_crc32)
            os.unlink(out.bundlx_path)

    def add_recipe(self, recipe: BundleRecipe) -> None:
        """A pass-through bundle straight from its source: the header block (carried in the recipe, or
        in its group's staged file), then the source ranges, copied in the kernel with the worker's
        CRC-32 (no tile bytes staged, nothing read here)."""
        if self.writer is None:
            raise ValueError("recipes are for zip outputs (a cache folder is written by the tasks)")
        heads = self._heads(recipe.head_path)
        fd = open_source(recipe.file, recipe.file_size, recipe.file, recipe.file_id)
        try:
            first = recipe.aux if heads < 0 else CopyRange(heads, recipe.head_offset, recipe.head_size, recipe.head_path)
            parts = [first] + [CopyRange(fd, off, length, recipe.file) for off, length in recipe.ranges]
            self.writer.add_parts(recipe.name, recipe.size, parts, recipe.crc32)
            check_unchanged(fd, recipe.file_size, recipe.file, recipe.file_id)
        finally:
            os.close(fd)
        if recipe.bundlx is not None:
            self.writer.add_bytes(recipe.name[:-1] + "x", recipe.bundlx)
        elif heads >= 0 and recipe.bundlx_size:
            self.writer.add_parts(recipe.name[:-1] + "x", recipe.bundlx_size,
                                  [CopyRange(heads, recipe.bundlx_offset, recipe.bundlx_size, recipe.head_path)],
                                  recipe.bundlx_crc32)

    def _heads(self, path: str | None) -> int:
        """The open staged header file of a recipe's group (-1: none); the previous group's is done
        (recipes come in order, a group's together), so it is closed and removed."""
        if path is None:
            return -1
        if self._head_file is not None and self._head_file[0] == path:
            return self._head_file[1]
        self._drop_heads()
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._head_file = (path, fd)
        return fd

    def _drop_heads(self) -> None:
        if self._head_file is not None:
            path, fd = self._head_file
            self._head_file = None
            os.close(fd)
            os.unlink(path)

    def close(self) -> int:
        """Finish the output; its size in bytes."""
        self._drop_heads()
        if self.writer is not None:
            return self.writer.close()
        return self.size

"""A cache folder as output (tilePackage=false): conf.xml, conf.cdi and _alllayers/Lnn/*.bundle(x).

A bundle's runs of source tiles are read ahead by a helper thread (size prefixes checked and
fixed) while this thread copies the previous run in the kernel, or writes it from the buffer
when it is short or was fixed (`package.kcopy`); plans without a source file (re-encoded or
inflated tiles) are written from the plan's buffer.
"""
from __future__ import annotations

import os

from tilecrate.package import kcopy
from tilecrate.package.bundles import BundlePlan
from tilecrate.package.kcopy import (METHODS, WRITE_MODES, KernelCopier, RunScanner, check_unchanged,
                                     open_source_id, plan_parts, write_all, write_parts)

_BUFFER = 1 << 16          # larger writes bypass the buffer: no extra copy
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


class FolderSink:
    """Writes files under `root` (created); counts the bytes written."""

    def __init__(self, root: str, copy_method: str | None = None):
        self.copy_method = copy_method or kcopy.COPY_METHOD
        if self.copy_method not in WRITE_MODES:
            raise ValueError(f"unknown copy method {self.copy_method!r} (one of {', '.join(WRITE_MODES)})")
        self.root = root
        self.size = 0
        self._scanner: RunScanner | None = None
        os.makedirs(root, exist_ok=False)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def add_dir(self, name: str) -> None:
        """Create a folder (and its parents)."""
        os.makedirs(self._path(name.rstrip("/")), exist_ok=True)

    def add_bytes(self, name: str, data: bytes) -> None:
        """A whole file from memory."""
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        self.size += len(data)

    def add_bundle(self, name: str, plan: BundlePlan) -> None:
        """The .bundle of a plan (and its .bundlx for V1)."""
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not self._add_kernel(path, plan):
            with open(path, "wb", buffering=_BUFFER) as f:
                for chunk in plan.chunks():
                    f.write(chunk)
                del chunk
        self.size += plan.size
        if plan.bundlx is not None:
            self.add_bytes(name[:-1] + "x", plan.bundlx)

    def _add_kernel(self, path: str, plan: BundlePlan) -> bool:
        if plan.file is None or self.copy_method == "chunks":
            return False
        src, file_id = open_source_id(plan.file, plan.file_size, plan.file, getattr(plan, "file_id", None))
        try:
            # runs remembered with right prefixes for this file version are copied without a read
            parts = plan_parts(plan, src, plan.file, file_id)
            if parts is None:
                return False
            if self._scanner is None:
                self._scanner = RunScanner()
            out = os.open(path, _FLAGS, 0o666)
            try:
                auto = self.copy_method == "auto"
                copier = KernelCopier(out, METHODS[0] if auto else self.copy_method) \
                    if (auto or self.copy_method in METHODS) else None
                _, written = write_parts(parts, lambda b: write_all(out, b), copier, self._scanner, False,
                                         kernel_min=kcopy.KERNEL_MIN if auto else 0)
            finally:
                os.close(out)
            if written != plan.size:
                raise ValueError(f"{path}: {written} bytes written, {plan.size} planned")
            check_unchanged(src, plan.file_size, plan.file, file_id)
            return True
        finally:
            os.close(src)

    def close(self) -> int:
        """Total bytes written."""
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None
        return self.size

    def __del__(self):
        scanner = getattr(self, "_scanner", None)
        if scanner is not None:
            scanner.close()

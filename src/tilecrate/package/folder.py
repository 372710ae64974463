"""A cache folder as output (tilePackage=false): conf.xml, conf.cdi and _alllayers/Lnn/*.bundle(x)."""
from __future__ import annotations

import os

from tilecrate.package.bundles import BundlePlan

_BUFFER = 1 << 16          # larger writes bypass the buffer: no extra copy


class FolderSink:
    """Writes files under `root` (created); counts the bytes written."""

    def __init__(self, root: str):
        self.root = root
        self.size = 0
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
        with open(path, "wb", buffering=_BUFFER) as f:
            for chunk in plan.chunks():
                f.write(chunk)
            del chunk
        self.size += plan.size
        if plan.bundlx is not None:
            self.add_bytes(name[:-1] + "x", plan.bundlx)

    def close(self) -> int:
        """Total bytes written."""
        return self.size

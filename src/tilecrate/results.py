"""What every export writer shares, below them all (the runners' tile packages and cache folders, the
open-format sinks, the .vtpk writer): progress and result records, the cancel check, the error for a
failed write."""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Protocol

from tilecrate.errors import Cancelled, ExportError


@dataclass
class ExportProgress:
    """Where an export is: tiles and output bytes written so far, of the totals, and the current level."""

    tiles_done: int
    tiles_total: int
    bytes_done: int
    bytes_total: int
    level: int | None


@dataclass
class ExportResult:
    """What an export wrote."""

    path: str                      # the package file, or the cache folder when tile_package is False
    tiles: int
    size: int                      # bytes written (file size or folder total)
    levels: dict[int, dict] = field(default_factory=dict)   # {level: {"tiles": n, "size": bytes}}
    warnings: list[str] = field(default_factory=list)
    quality_used: int | None = None
    kind: str = ""                 # tpkx | tpk | folder | vtpk | an open format
    storage_format: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        """JSON-ready form (the CLI's --json output)."""
        return {
            "path": self.path, "kind": self.kind, "storageFormat": self.storage_format,
            "tiles": self.tiles, "size": self.size,
            "levels": {str(k): dict(v) for k, v in sorted(self.levels.items())},
            "warnings": list(self.warnings), "qualityUsed": self.quality_used,
            "seconds": round(self.seconds, 3),
        }


class CancelFlag(Protocol):
    """Anything with is_set(): a threading.Event in-process, a Dask Event on a cluster."""

    def is_set(self) -> bool:
        """True once the export must stop."""


def check_cancel(cancel: CancelFlag | None) -> None:
    """Raise Cancelled when the flag is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("the export was cancelled")


def os_error(e: OSError, out: str) -> ExportError:
    """An ExportError for an OSError met while writing `out` (a full disk is named as such)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ExportError(f"{out}: the disk is full (no space left while writing the export)")
    where = e.filename or out
    return ExportError(f"{where}: cannot write the export ({e.strerror or e})")

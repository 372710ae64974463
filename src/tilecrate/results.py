"""What an export reports: its progress and its result, the same records for every writer (the
runners' tile packages and cache folders, the open-format sinks, the .vtpk writer)."""
from __future__ import annotations

from dataclasses import dataclass, field


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

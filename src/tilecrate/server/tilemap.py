"""Tilemap answers kept ready-made per version of the bundles they cover.

A map client asks for the same tilemap windows again and again; building one (every covered
bundle's index read, a presence grid, its JSON) cost ~10x what checking that nothing changed costs.
So the f=json body of a window is kept with the identities (`index_with_key`: the file's identity
as the index was read) of the bundles present under it; a request re-reads those identities (an
fstat of each bundle, on a read thread like any cache read) and answers the kept bytes only when
every one is unchanged and no bundle appeared or went. Anything else builds the window again.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

from tilecrate.cache import BundleRef
from tilecrate.server.service import MAX_TILEMAP, Service
from tilecrate.tiling import PACKET, bundle_origin

MAX_ENTRIES = 512  # windows kept per server (an 8 x 8 window's body is ~150 bytes, 256 x 256 ~130 KB)
MAX_BYTES = 16 << 20  # and at most this many body bytes in all


def _versions(svc: Service, level: int, row: int, col: int, width: int, height: int) -> tuple | None:
    """(bundle origin, identity) of every bundle present under the window, or None where the cache
    cannot say (no such level, or a source without per-bundle identities)."""
    cache = svc.cache
    if level not in cache.levels or not hasattr(cache, "index_with_key"):
        return None
    width, height = min(width, MAX_TILEMAP), min(height, MAX_TILEMAP)
    r0, c0 = bundle_origin(max(row, 0), max(col, 0))
    out = []
    for br in range(r0, row + height, PACKET):
        for bc in range(c0, col + width, PACKET):
            ref = BundleRef(level, br, bc)
            if cache.has_bundle(ref):
                out.append((br, bc, cache.index_with_key(ref)[0]))
    return tuple(out)


class TilemapCache:
    """f=json tilemap bodies of one server, checked against the bundles' identities on every use."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lru: OrderedDict[tuple, tuple[tuple, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0  # answers given from kept bytes (for tests and benchmarks)

    def body(self, svc: Service, level: int, row: int, col: int, width: int, height: int) -> bytes:
        """The compact JSON of `svc.tilemap(...)` as the cache is now (runs on a read thread)."""
        key = (svc.name, level, row, col, width, height)
        versions = _versions(svc, level, row, col, width, height)
        if versions is not None:
            with self._lock:
                hit = self._lru.get(key)
                if hit is not None and hit[0] == versions:
                    self._lru.move_to_end(key)
                    self.hits += 1
                    return hit[1]
        # identities first, then the window: a bundle changed in between makes the kept identities
        # older than the bytes, so the next request builds it again (never the other way round)
        body = json.dumps(svc.tilemap(level, row, col, width, height), separators=(",", ":")).encode()
        if versions is not None and len(body) <= self.max_bytes // 4:
            with self._lock:
                old = self._lru.pop(key, None)
                if old is not None:
                    self._bytes -= len(old[1])
                self._lru[key] = (versions, body)
                self._bytes += len(body)
                while len(self._lru) > self.max_entries or self._bytes > self.max_bytes:
                    _, (_, dropped) = self._lru.popitem(last=False)
                    self._bytes -= len(dropped)
        return body

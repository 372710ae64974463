"""Site settings the Administrator Directory edits, in their own LMDB environment (`site.lmdb`).

Every front-end process opens the same environment; a reader asks for the 8-byte `version` key
(one read transaction, microseconds) and re-reads the settings only when it changed, so an edit
made through any process is seen by the next request to every process, with no restart.

Precedence: the TOML file gives each setting's value until an administrator edits it; from then
on the edited value is kept across restarts whatever the TOML says (a record carries `edited`).
To return to the TOML's values, stop the server and delete `<data_dir>/site.lmdb` (that also ends
every token: the signing secret is kept there too).
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field

import lmdb

from tilecrate.errors import TilecrateError

_MAP_SIZE = 64 << 20
_VERSION = b"version"
_SECRET = b"secret"
_SYSTEM = b"system"
_CACHING = b"caching"
_SERVICE = b"service:"
UNLIMITED = -1


class SettingsError(TilecrateError):
    """The settings store cannot be opened or written."""


@dataclass(frozen=True)
class ServiceSettings:
    """A service's export properties."""

    export_tiles_allowed: bool
    max_export_tiles_count: int


@dataclass(frozen=True)
class Snapshot:
    """Every setting at one version."""

    version: int
    services: dict[str, ServiceSettings] = field(default_factory=dict)
    system: dict = field(default_factory=dict)
    maximum_outstanding_jobs: int = UNLIMITED  # -1 unlimited, 0 refuse every job, N at most N

    @property
    def local_temp_folder(self) -> bool:
        """system property exportTilesUsingLocalTempFolder."""
        return bool(self.system.get("exportTilesUsingLocalTempFolder", False))


class SiteSettings:
    """The settings store of one data dir."""

    def __init__(self, path: str):
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            self.env = lmdb.open(path, map_size=_MAP_SIZE, subdir=True, max_dbs=0, sync=True)
        except (OSError, lmdb.Error) as e:
            raise SettingsError(f"cannot open the settings store {path}: {e}") from None
        self._lock = threading.Lock()
        self._snap: Snapshot | None = None

    def close(self) -> None:
        """Close the environment."""
        self.env.close()

    # reading ------------------------------------------------------------------------------

    def version(self) -> int:
        """The settings' version (bumped by every change)."""
        with self.env.begin() as txn:
            raw = txn.get(_VERSION)
        return struct.unpack(">Q", raw)[0] if raw else 0

    def snapshot(self) -> Snapshot:
        """The settings now; re-read only when the version moved."""
        snap = self._snap
        if snap is not None and snap.version == self.version():
            return snap
        with self.env.begin() as txn:
            raw = txn.get(_VERSION)
            version = struct.unpack(">Q", raw)[0] if raw else 0
            services = {}
            for key, value in txn.cursor().iternext():
                if key.startswith(_SERVICE):
                    rec = json.loads(value)
                    services[key[len(_SERVICE):].decode()] = ServiceSettings(
                        bool(rec["exportTilesAllowed"]), int(rec["maxExportTilesCount"]))
            system = json.loads(txn.get(_SYSTEM) or b'{"properties":{}}')["properties"]
            caching = json.loads(txn.get(_CACHING) or b'{"maximumOutstandingJobs":-1}')
        snap = Snapshot(version, services, system, int(caching["maximumOutstandingJobs"]))
        self._snap = snap
        return snap

    def secret(self) -> bytes:
        """The token signing secret: 32 random bytes made once per store."""
        with self.env.begin() as txn:
            found = txn.get(_SECRET)
        if found:
            return bytes(found)
        try:
            with self._write() as txn:
                found = txn.get(_SECRET)
                if found:  # another process made it first
                    return bytes(found)
                secret = os.urandom(32)
                txn.put(_SECRET, secret)
            return secret
        except lmdb.Error as e:
            raise SettingsError(f"cannot write the settings store: {e}") from None

    # writing ------------------------------------------------------------------------------

    def _write(self):
        try:
            return self.env.begin(write=True)
        except lmdb.Error as e:
            raise SettingsError(f"cannot write the settings store: {e}") from None

    @staticmethod
    def _bump(txn) -> None:
        raw = txn.get(_VERSION)
        txn.put(_VERSION, struct.pack(">Q", (struct.unpack(">Q", raw)[0] if raw else 0) + 1))

    def _put(self, txn, key: bytes, record: dict, edited: bool) -> bool:
        """Write a record (unless it is unchanged, or seeding over an administrator's edit)."""
        old = txn.get(key)
        if old is not None:
            old_rec = json.loads(old)
            if not edited and old_rec.get("edited"):
                return False
            if {**old_rec, "edited": None} == {**record, "edited": None} and old_rec.get("edited") == edited:
                return False
        txn.put(key, json.dumps({**record, "edited": edited}, separators=(",", ":")).encode())
        return True

    def _change(self, key: bytes, record: dict, edited: bool) -> None:
        try:
            with self._write() as txn:
                if self._put(txn, key, record, edited):
                    self._bump(txn)
        except lmdb.Error as e:
            raise SettingsError(f"cannot write the settings store: {e}") from None

    def seed(self, services: dict[str, ServiceSettings], system: dict, maximum_outstanding_jobs: int) -> None:
        """The TOML's values, for every setting an administrator has not edited."""
        try:
            with self._write() as txn:
                changed = False
                for name, s in services.items():
                    changed |= self._put(txn, _SERVICE + name.encode(), _service_record(s), False)
                changed |= self._put(txn, _SYSTEM, {"properties": system}, False)
                changed |= self._put(txn, _CACHING, {"maximumOutstandingJobs": maximum_outstanding_jobs}, False)
                if changed or txn.get(_VERSION) is None:
                    self._bump(txn)
        except lmdb.Error as e:
            raise SettingsError(f"cannot write the settings store: {e}") from None

    def set_service(self, name: str, settings: ServiceSettings) -> None:
        """An administrator's edit of a service."""
        self._change(_SERVICE + name.encode(), _service_record(settings), True)

    def set_system(self, properties: dict) -> None:
        """An administrator's system/properties/update (replaces every property)."""
        self._change(_SYSTEM, {"properties": properties}, True)

    def set_maximum_outstanding_jobs(self, limit: int) -> None:
        """An administrator's CachingControllers edit."""
        self._change(_CACHING, {"maximumOutstandingJobs": int(limit)}, True)


def _service_record(s: ServiceSettings) -> dict:
    return {"exportTilesAllowed": bool(s.export_tiles_allowed), "maxExportTilesCount": int(s.max_export_tiles_count)}

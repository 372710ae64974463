"""JobStore: job records in one LMDB environment, with an index by status and expiry records.

Sub-databases: `jobs` (id -> JSON), `status` (status NUL id -> ''), `expiry` (zero-padded
expiry time NUL id -> ''). Every change is one short write transaction, so the index never
disagrees with the records, also after a kill -9 (LMDB commits are atomic and durable).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterable

import lmdb

from tilecrate.errors import TilecrateError
from tilecrate.jobs.model import OUTSTANDING, Job

_MAP_SIZE = 8 << 30  # sparse on Linux: the file only grows as records are written
# new jobs are refused (as a full store) once live records fill this share of the map: the rest is
# kept for the progress and end of the jobs already admitted, which must never fail to be recorded
_ADMIT_SHARE = 0.5


_FULL = "The job store is full; finished jobs are removed after maxFileAge, try again later."


class StoreError(TilecrateError):
    """The job store cannot be opened or written."""


class AdmissionRefused(TilecrateError):
    """maximumOutstandingJobs is reached; the job was not stored."""

    def __init__(self, outstanding: int, limit: int):
        super().__init__(f"The server is busy: {outstanding} export jobs are already submitted or executing "
                         f"(maximumOutstandingJobs is {limit}). Try again in a few minutes.")
        self.outstanding = outstanding
        self.limit = limit


def _status_key(status: str, job_id: str) -> bytes:
    return f"{status}\0{job_id}".encode()


def _expiry_key(when: float, job_id: str) -> bytes:
    return f"{when:017.3f}\0{job_id}".encode()


class JobStore:
    """Durable job records; safe to use from the event loop and from worker threads."""

    def __init__(self, path: str, map_size: int = _MAP_SIZE):
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, map_size=map_size, max_dbs=4, subdir=True, sync=True,
                                 metasync=True, max_readers=256)
        except lmdb.Error as e:
            raise StoreError(f"cannot open the job store at {path}: {e}") from None
        self._jobs = self.env.open_db(b"jobs")
        self._status = self.env.open_db(b"status")
        self._expiry = self.env.open_db(b"expiry")
        self._admit_limit = int(map_size * _ADMIT_SHARE)

    def close(self) -> None:
        """Close the environment."""
        self.env.close()

    # reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self.env.begin(db=self._jobs) as txn:
            data = txn.get(job_id.encode())
        return Job.from_bytes(data) if data is not None else None

    def ids_by_status(self, *statuses: str) -> list[str]:
        """Ids of the jobs in any of these states."""
        out = []
        with self.env.begin(db=self._status) as txn:
            for status in statuses:
                out.extend(self._scan_status(txn, status))
        return out

    def count(self, *statuses: str) -> int:
        """How many jobs are in any of these states."""
        return len(self.ids_by_status(*statuses))

    def all_ids(self) -> list[str]:
        """Every stored job id."""
        with self.env.begin(db=self._jobs) as txn:
            return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def expired(self, now: float) -> list[str]:
        """Ids whose expiry time has passed."""
        out = []
        with self.env.begin(db=self._expiry) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                when, _, job_id = key.decode().partition("\0")
                if float(when) > now:
                    break
                out.append(job_id)
        return out

    def _scan_status(self, txn, status: str) -> Iterable[str]:
        prefix = f"{status}\0".encode()
        cur = txn.cursor(db=self._status)
        if cur.set_range(prefix):
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                yield key[len(prefix):].decode()

    # writes ----------------------------------------------------------------------------------

    def _write(self, txn, job: Job, old: Job | None) -> None:
        if old is not None and old.status != job.status:
            txn.delete(_status_key(old.status, job.id), db=self._status)
        txn.put(_status_key(job.status, job.id), b"", db=self._status)
        txn.put(job.id.encode(), job.to_bytes(), db=self._jobs)

    def put(self, job: Job) -> None:
        """Insert or replace a job record."""
        with self._begin_write() as txn:
            old = txn.get(job.id.encode(), db=self._jobs)
            self._write(txn, job, Job.from_bytes(old) if old is not None else None)

    def admit(self, job: Job, limit: int | None) -> None:
        """Store a new job unless `limit` jobs are outstanding (AdmissionRefused); one transaction.

        A store past its admission share is full for new jobs (StoreError), so that the jobs already
        admitted can always record their progress and their end.
        """
        with self._begin_write() as txn:
            if self._live_bytes(txn) + 2 * len(job.to_bytes()) > self._admit_limit:
                raise StoreError(_FULL)
            if limit is not None:
                outstanding = sum(1 for s in OUTSTANDING for _ in self._scan_status(txn, s))
                if outstanding >= limit:
                    raise AdmissionRefused(outstanding, limit)
            self._write(txn, job, None)

    def update(self, job_id: str, change: Callable[[Job], bool | None],
               expire_at: Callable[[Job], float | None] | None = None) -> Job | None:
        """Read-modify-write one job atomically; `change` returns False to leave it as it was.

        `expire_at(job)` (after the change) gives an expiry time to record in the same transaction.
        """
        with self._begin_write() as txn:
            data = txn.get(job_id.encode(), db=self._jobs)
            if data is None:
                return None
            old = Job.from_bytes(data)
            job = Job.from_bytes(data)
            if change(job) is False:
                return old  # nothing written: the commit is empty
            self._write(txn, job, old)
            when = expire_at(job) if expire_at is not None else None
            if when is not None:
                txn.put(_expiry_key(when, job.id), b"", db=self._expiry)
            return job

    def set_expiry(self, job_id: str, when: float) -> None:
        """Record when a finished job and its output are to be removed."""
        with self._begin_write() as txn:
            txn.put(_expiry_key(when, job_id), b"", db=self._expiry)

    def delete(self, *job_ids: str) -> None:
        """Remove job records, their index entries and their expiry records, in one transaction.

        The expiry records are found in one pass however many jobs go: cleanup removes expired
        jobs in batches, and a pass per job made it quadratic in the number of stored jobs.
        """
        ids = set(job_ids)
        if not ids:
            return
        with self._begin_write() as txn:
            for job_id in ids:
                data = txn.get(job_id.encode(), db=self._jobs)
                if data is not None:
                    txn.delete(_status_key(Job.from_bytes(data).status, job_id), db=self._status)
                    txn.delete(job_id.encode(), db=self._jobs)
            cur = txn.cursor(db=self._expiry)
            stale = [k for k in cur.iternext(keys=True, values=False) if k.decode().partition("\0")[2] in ids]
            for k in stale:
                txn.delete(k, db=self._expiry)

    def _live_bytes(self, txn) -> int:
        """Bytes of the pages the records and indexes use now (free pages not counted)."""
        total = 0
        for db in (self._jobs, self._status, self._expiry):
            st = txn.stat(db)
            total += (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
        return total

    @contextlib.contextmanager
    def _begin_write(self):
        """A write transaction; LMDB failures (map full, disk errors) become StoreError."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.MapFullError:
            raise StoreError(_FULL) from None
        except lmdb.Error as e:
            raise StoreError(f"the job store cannot be written: {e}") from None

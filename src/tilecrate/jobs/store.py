"""JobStore: job records in one LMDB environment, with indexes, quotas and a disk-space reserve.

Sub-databases:
  `jobs`     id -> the hot record (JSON, small: state, messages, progress, result)
  `public`   id -> service NUL kind NUL the Esri job JSON, ready to send (status polls parse nothing)
  `inputs`   id -> the request parameters (JSON; possibly a large area of interest), read when the
             job starts and by the inputs route only
  `status`   status NUL id -> ''
  `owners`   client NUL id -> stored input bytes (8 bytes, big-endian): per-client quotas
  `pending`  client NUL id -> '' while the job is outstanding: per-client outstanding quota
  `expiry`   zero-padded expiry time NUL id -> ''
Every change is one short write transaction, so the indexes never disagree with the records, also
after a kill -9 (LMDB commits are atomic and durable). Admission, with every quota, is one write
transaction too, so front-end processes sharing the store never admit more than the limits together.

A full disk: LMDB's data file grows as pages are written, and on a full disk that write fails. The
store keeps a reserve file next to its data; a write that records a job's end (`essential`) that
fails for lack of space deletes the reserve and tries again, so the end lands. Until the reserve is
back (`restore_reserve`, tried by the runner's sweep), new jobs are refused.
"""
from __future__ import annotations

import contextlib
import json
import errno
import logging
import fcntl
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import lmdb

from tilecrate.errors import TilecrateError
from tilecrate.jobs.model import OUTSTANDING, Job, is_job_id

log = logging.getLogger("tilecrate.jobs")

_MAP_SIZE = 8 << 30  # sparse on Linux: the file only grows as records are written
# new jobs are refused (as a full store) once live records fill this share of the map: the rest is
# kept for the progress and end of the jobs already admitted, which must never fail to be recorded
_ADMIT_SHARE = 0.5
RESERVE_BYTES = 8 << 20  # disk kept free for the records of jobs' ends (a few pages each)
_RESERVE_NAME = "reserve.bin"
COMPACT_OVER = 64 << 20  # free pages in the data file beyond which opening the store compacts it
_OPEN_LOCK = "open.lock"
_KEPT_BODIES = 4096  # public bodies kept between commits (a few hundred bytes each)

_FULL = "The job store is full; finished jobs are removed after maxFileAge, try again later."
_DISK_FULL = ("The disk of the job store is full; new jobs are refused until space is freed "
              "(finished jobs are removed after maxFileAge).")


class StoreError(TilecrateError):
    """The job store cannot be opened or written."""


class AdmissionRefused(TilecrateError):
    """maximumOutstandingJobs is reached; the job was not stored."""

    def __init__(self, outstanding: int, limit: int):
        super().__init__(f"The server is busy: {outstanding} export jobs are already submitted or executing "
                         f"(maximumOutstandingJobs is {limit}). Try again in a few minutes.")
        self.outstanding = outstanding
        self.limit = limit


class QuotaExceeded(TilecrateError):
    """One client holds as many jobs (or stored bytes) as it may; the job was not stored."""


@dataclass(frozen=True)
class Quota:
    """Per-client limits checked at admission (None: no limit)."""

    max_jobs_per_client: int | None = 500  # stored jobs, finished ones included until they expire
    max_outstanding_per_client: int | None = 16  # submitted, executing or cancelling
    max_input_bytes_per_client: int | None = 32 << 20  # stored parameters of its jobs together
    large_input: int = 16 << 10  # parameters above this size make a "large" job ...
    large_share: float = 0.5  # ... admitted only while the store is under this share of its room


def _status_key(status: str, job_id: str) -> bytes:
    return f"{status}\0{job_id}".encode()


def _expiry_key(when: float, job_id: str) -> bytes:
    return f"{when:017.3f}\0{job_id}".encode()


def _client_key(client: str, job_id: str) -> bytes:
    return f"{client}\0{job_id}".encode()


def clean_client(client: str) -> str:
    """A client name usable as a key prefix (no NUL, bounded length)."""
    return client.replace("\0", "")[:200]


class JobStore:
    """Durable job records; safe to use from the event loop and from worker threads."""

    def __init__(self, path: str, map_size: int = _MAP_SIZE, *, reserve_bytes: int = RESERVE_BYTES,
                 compact_over: int = COMPACT_OVER):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._map_size = map_size
        # every process holds a shared lock while the store is open; compaction needs it exclusive
        self._open_lock = open(os.path.join(path, _OPEN_LOCK), "a+")
        try:
            alone = bool(compact_over)
            if alone:
                try:
                    fcntl.flock(self._open_lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process has the store open: no compaction now
                    alone = False
            if not alone:
                fcntl.flock(self._open_lock.fileno(), fcntl.LOCK_SH)
            self.env = self._open()
            if alone:
                try:
                    self.compacted = self._compact_if_bloated(compact_over)
                finally:
                    fcntl.flock(self._open_lock.fileno(), fcntl.LOCK_SH)
        except BaseException:
            self._open_lock.close()
            raise
        self._open_dbs()
        self._admit_limit = int(map_size * _ADMIT_SHARE)
        self._reserve_path = os.path.join(path, _RESERVE_NAME)
        self._reserve_bytes = reserve_bytes
        self._reserve_lock = threading.Lock()
        self.degraded = False  # the reserve was used and is not back yet: new jobs are refused
        # public bodies handed out since the environment's last commit (see public_body)
        self._bodies: tuple[int, dict[tuple[str, str], bytes]] = (-1, {})
        self.clear_stale_readers()
        self.restore_reserve()

    compacted = False  # whether opening this store compacted its data file

    def _open(self) -> "lmdb.Environment":
        try:
            return lmdb.open(self.path, map_size=self._map_size, max_dbs=8, subdir=True, sync=True,
                             metasync=True, max_readers=256)
        except lmdb.Error as e:
            raise StoreError(f"cannot open the job store at {self.path}: {e}") from None

    def _open_dbs(self) -> None:
        self._jobs = self.env.open_db(b"jobs")
        self._public = self.env.open_db(b"public")
        self._inputs = self.env.open_db(b"inputs")
        self._status = self.env.open_db(b"status")
        self._owners = self.env.open_db(b"owners")
        self._pending = self.env.open_db(b"pending")
        self._expiry = self.env.open_db(b"expiry")

    def _compact_if_bloated(self, over: int) -> bool:
        """Rewrite the data file without its free pages when they pass `over` bytes (the file never
        shrinks by itself: a burst of large jobs left it large for ever). Only with no other process
        in the store (the caller holds the open lock exclusively)."""
        data = os.path.join(self.path, "data.mdb")
        self._open_dbs()
        with self.env.begin() as txn:
            live = self._live_bytes(txn)
        size = os.path.getsize(data)
        if size - live <= over:
            return False
        tmp = os.path.join(self.path, "compact.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            self.env.copy(tmp, compact=True)
            with open(os.path.join(tmp, "data.mdb"), "rb") as f:
                os.fsync(f.fileno())
            self.env.close()
            try:
                os.replace(os.path.join(tmp, "data.mdb"), data)
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                self.env = self._open()
                self._open_dbs()
        except (OSError, lmdb.Error) as e:  # e.g. no room for the copy: keep the store as it is
            log.warning("job store: not compacted: %s", e)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("job store: compacted %s from %d to %d bytes", data, size, os.path.getsize(data))
        return True

    def close(self) -> None:
        """Close the environment."""
        self.env.close()
        self._open_lock.close()

    def clear_stale_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction (SIGKILL, the OOM
        killer); how many. LMDB never frees them itself while any process has the store open (a
        front end replaced under `serve --processes` keeps it open), and such a slot pins the
        snapshot it read: no page freed after it is used again, so the data file grew with every
        write (300 updates of a 10 kB job record: 16 MB instead of 0.1 MB) until the map was full."""
        try:
            return self.env.reader_check()
        except lmdb.Error as e:
            log.warning("%s: stale readers not checked (%s)", self.path, e)
            return 0

    # the disk-space reserve ------------------------------------------------------------------

    def restore_reserve(self) -> bool:
        """Make sure the reserve file exists at full size; True when it does."""
        if self._reserve_bytes <= 0:
            self.degraded = False
            return True
        with self._reserve_lock:
            try:
                st = os.stat(self._reserve_path)
                if st.st_size >= self._reserve_bytes and st.st_blocks * 512 >= self._reserve_bytes:
                    self.degraded = False
                    return True
            except FileNotFoundError:
                pass
            tmp = f"{self._reserve_path}.{os.getpid()}.tmp"  # front ends restore it at once on start
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    try:
                        os.posix_fallocate(fd, 0, self._reserve_bytes)
                    except OSError as e:
                        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
                        os.write(fd, b"\0" * self._reserve_bytes)  # file systems without fallocate
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self._reserve_path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if not self.degraded:
                    log.warning("job store: cannot keep %d bytes of disk in reserve: %s", self._reserve_bytes,
                                e.strerror or e)
                self.degraded = True
                return False
            self.degraded = False
            return True

    def _release_reserve(self) -> bool:
        with self._reserve_lock:
            try:
                os.unlink(self._reserve_path)
            except FileNotFoundError:
                return False
            self.degraded = True
            log.warning("job store: the disk is full; used the reserve to record a job's end")
            return True

    # reads -----------------------------------------------------------------------------------

    def get(self, job_id: str, *, inputs: bool = True) -> Job | None:
        """The job with this id (with its parameters unless inputs=False), or None."""
        key = job_id.encode()
        with self.env.begin() as txn:
            data = txn.get(key, db=self._jobs)
            if data is None:
                return None
            raw = txn.get(key, db=self._inputs) if inputs else None
        return Job.from_bytes(data, json.loads(raw) if raw is not None else None)

    def public(self, job_id: str) -> tuple[str, str, bytes] | None:
        """(service, kind, Esri job JSON bytes) of a job, without parsing anything, or None."""
        with self.env.begin(db=self._public, buffers=True) as txn:
            data = txn.get(job_id.encode())
            if data is None:
                return None
            data = bytes(data)
        service, kind, body = data.split(b"\0", 2)
        return service.decode(), kind.decode(), body

    def public_body(self, job_id: str, service: str) -> bytes | None:
        """The Esri job JSON bytes of a job of `service` (one read, one copy, nothing decoded), or None
        when there is no such job or it is another service's.

        Bodies read are kept until the environment's next commit, by any process: LMDB's last
        committed transaction id is read from the shared meta page (no read transaction), so a
        status poll between two writes costs a dictionary lookup. A body is kept only when the read
        transaction that read it saw exactly that id: a writer updates the meta page before the
        readers' table, so a transaction begun in between still reads the state before it."""
        txnid = self.env.info()["last_txnid"]
        seen, bodies = self._bodies
        if seen == txnid:
            hit = bodies.get((service, job_id))
            if hit is not None:
                return hit
        else:
            bodies = {}
            self._bodies = (txnid, bodies)
        if not is_job_id(job_id):  # checked before any lookup (a kept body's id was checked)
            return None
        with self.env.begin(db=self._public) as txn:
            data = txn.get(job_id.encode())
            read_at = txn.id()
        prefix = service.encode() + b"\0"
        if data is None or not data.startswith(prefix):
            return None
        body = data[data.index(b"\0", len(prefix)) + 1:]
        if read_at == txnid and len(bodies) < _KEPT_BODIES:
            bodies[(service, job_id)] = body
        return body

    def inputs(self, job_id: str) -> dict[str, str] | None:
        """The stored parameters of a job, or None."""
        with self.env.begin(db=self._inputs) as txn:
            raw = txn.get(job_id.encode())
        return json.loads(raw) if raw is not None else None

    def ids_by_status(self, *statuses: str) -> list[str]:
        """Ids of the jobs in any of these states."""
        out = []
        with self.env.begin(db=self._status) as txn:
            for status in statuses:
                out.extend(self._scan(txn, self._status, status))
        return out

    def count(self, *statuses: str) -> int:
        """How many jobs are in any of these states."""
        return len(self.ids_by_status(*statuses))

    def all_ids(self) -> list[str]:
        """Every stored job id."""
        with self.env.begin(db=self._jobs) as txn:
            return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def client_usage(self, client: str) -> tuple[int, int, int]:
        """(stored jobs, outstanding jobs, stored input bytes) of one client."""
        with self.env.begin() as txn:
            return self._usage(txn, clean_client(client))

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

    def _scan(self, txn, db, prefix_text: str, values: bool = False) -> Iterable:
        prefix = f"{prefix_text}\0".encode()
        cur = txn.cursor(db=db)
        if cur.set_range(prefix):
            for key, value in cur.iternext(keys=True, values=True):
                if not key.startswith(prefix):
                    break
                yield (key[len(prefix):].decode(), value) if values else key[len(prefix):].decode()

    def _usage(self, txn, client: str) -> tuple[int, int, int]:
        jobs = nbytes = 0
        for _, value in self._scan(txn, self._owners, client, values=True):
            jobs += 1
            nbytes += struct.unpack(">Q", value)[0] if len(value) == 8 else 0
        outstanding = sum(1 for _ in self._scan(txn, self._pending, client))
        return jobs, outstanding, nbytes

    # writes ----------------------------------------------------------------------------------

    def _write(self, txn, job: Job, old: Job | None) -> None:
        job.version = (old.version if old is not None else job.version) + 1
        if old is not None and old.status != job.status:
            txn.delete(_status_key(old.status, job.id), db=self._status)
        txn.put(_status_key(job.status, job.id), b"", db=self._status)
        if job.client or (old is not None and old.client):
            key = _client_key(clean_client(job.client), job.id)
            if job.status in OUTSTANDING:
                txn.put(key, b"", db=self._pending)
            else:
                txn.delete(key, db=self._pending)
        key = job.id.encode()
        txn.put(key, job.to_bytes(), db=self._jobs)
        txn.put(key, b"\0".join((job.service.encode(), job.kind.encode(), job.public_bytes())), db=self._public)

    def _write_new(self, txn, job: Job) -> int:
        """A new record with its parameters and owner entry; returns the stored parameter bytes."""
        params = job.params_bytes()
        txn.put(job.id.encode(), params, db=self._inputs)
        if job.client:
            txn.put(_client_key(clean_client(job.client), job.id), struct.pack(">Q", len(params)), db=self._owners)
        self._write(txn, job, None)
        return len(params)

    def put(self, job: Job) -> None:
        """Insert or replace a job record (with its parameters)."""
        with self._begin_write() as txn:
            old = txn.get(job.id.encode(), db=self._jobs)
            if old is None:
                self._write_new(txn, job)
            else:
                txn.put(job.id.encode(), job.params_bytes(), db=self._inputs)
                self._write(txn, job, Job.from_bytes(old))

    def admit(self, job: Job, limit: int | None, quota: Quota | None = None) -> None:
        """Store a new job unless a limit is reached; one transaction.

        AdmissionRefused: `limit` jobs are outstanding (site-wide). QuotaExceeded: the job's client
        holds its share. StoreError: the store (or the disk under it) is too full; a store past its
        admission share is full for new jobs so that the jobs already admitted can always record
        their progress and their end, and jobs with large parameters may only fill part of it, so
        that ordinary jobs are admitted while there is room for them.
        """
        job.client = clean_client(job.client)
        params = len(job.params_bytes())
        need = 2 * (len(job.to_bytes()) + params + len(job.public_bytes())) + 4096
        with self._begin_write() as txn:
            if self.degraded:
                raise StoreError(_DISK_FULL)
            live = self._live_bytes(txn)
            if live + need > self._admit_limit:
                raise StoreError(_FULL)
            if quota is not None and params > quota.large_input and \
                    live + need > self._admit_limit * quota.large_share:
                raise StoreError(f"The job store is too full for a request of {params} bytes; smaller requests "
                                 f"are still accepted. Finished jobs are removed after maxFileAge.")
            if quota is not None and job.client:
                self._check_quota(txn, job.client, params, quota)
            if limit is not None:
                outstanding = sum(1 for s in OUTSTANDING for _ in self._scan(txn, self._status, s))
                if outstanding >= limit:
                    raise AdmissionRefused(outstanding, limit)
            self._write_new(txn, job)

    def _check_quota(self, txn, client: str, params: int, quota: Quota) -> None:
        jobs, outstanding, nbytes = self._usage(txn, client)
        if quota.max_outstanding_per_client is not None and outstanding >= quota.max_outstanding_per_client:
            raise QuotaExceeded(f"You have {outstanding} jobs submitted or executing, as many as one client may "
                                f"have ({quota.max_outstanding_per_client}); wait for one to finish.")
        if quota.max_jobs_per_client is not None and jobs >= quota.max_jobs_per_client:
            raise QuotaExceeded(f"You have {jobs} stored jobs, as many as one client may keep "
                                f"({quota.max_jobs_per_client}); finished jobs are removed after maxFileAge.")
        if quota.max_input_bytes_per_client is not None and nbytes + params > quota.max_input_bytes_per_client:
            raise QuotaExceeded(f"Your stored jobs' parameters take {nbytes} bytes; this request's {params} more "
                                f"would pass one client's share ({quota.max_input_bytes_per_client} bytes). "
                                f"Finished jobs are removed after maxFileAge.")

    def update(self, job_id: str, change: Callable[[Job], bool | None],
               expire_at: Callable[[Job], float | None] | None = None, *, essential: bool = False) -> Job | None:
        """Read-modify-write one job atomically; `change` returns False to leave it as it was.

        `expire_at(job)` (after the change) gives an expiry time to record in the same transaction.
        The job passed to `change` has no parameters (they are stored apart and never rewritten).
        `essential`: a job's end; on a full disk the reserve is given up to record it.
        """
        def attempt() -> Job | None:
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
        return self._essential(attempt) if essential else attempt()

    def _essential(self, attempt: Callable):
        # any failed commit may be the disk: a full tmpfs answers a short page write with EIO
        try:
            return attempt()
        except StoreError:
            if not self._release_reserve():
                raise
        return attempt()

    def set_expiry(self, job_id: str, when: float) -> None:
        """Record when a finished job and its output are to be removed."""
        with self._begin_write() as txn:
            txn.put(_expiry_key(when, job_id), b"", db=self._expiry)

    def delete(self, *job_ids: str) -> None:
        """Remove job records, their parameters, index entries and expiry records, in one transaction.

        The expiry records are found in one pass however many jobs go: cleanup removes expired
        jobs in batches, and a pass per job made it quadratic in the number of stored jobs.
        """
        ids = set(job_ids)
        if not ids:
            return

        def attempt() -> None:
            with self._begin_write() as txn:
                for job_id in ids:
                    key = job_id.encode()
                    data = txn.get(key, db=self._jobs)
                    if data is not None:
                        job = Job.from_bytes(data)
                        txn.delete(_status_key(job.status, job_id), db=self._status)
                        if job.client:
                            ckey = _client_key(clean_client(job.client), job_id)
                            txn.delete(ckey, db=self._owners)
                            txn.delete(ckey, db=self._pending)
                        txn.delete(key, db=self._jobs)
                    txn.delete(key, db=self._public)
                    txn.delete(key, db=self._inputs)
                cur = txn.cursor(db=self._expiry)
                stale = [k for k in cur.iternext(keys=True, values=False) if k.decode().partition("\0")[2] in ids]
                for k in stale:
                    txn.delete(k, db=self._expiry)
        self._essential(attempt)  # deleting frees room: it must work on a full disk too

    def _live_bytes(self, txn) -> int:
        """Bytes of the pages the records and indexes use now (free pages not counted)."""
        total = 0
        for db in (self._jobs, self._public, self._inputs, self._status, self._owners, self._pending, self._expiry):
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

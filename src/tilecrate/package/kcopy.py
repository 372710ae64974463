"""Byte ranges of source files into an output: copied in the kernel, the CRC-32 read alongside.

Zip entries need a CRC-32 before the central directory, and bundle runs need their 4-byte size
prefixes checked, so the bytes of a run are read in user space once anyway. `RunScanner` does
that read (pread, prefix check and fix, isal CRC-32) on a helper thread, into a small pool of
reused buffers. On a seekable output (`write_parts(patch=...)`) a run copied in the kernel is
copied at once while the helper reads it, the CRC patched into the header afterwards: the copy
and the read overlap. A run whose source prefixes turn out wrong is then rewritten fixed (pwrite
over the copy); at most DEFER_AHEAD runs are copied ahead of their reads. On a stream the helper
reads SCAN_AHEAD runs ahead and the writer waits for each; the writer reads a range itself when
the helper has not started it, so nothing waits on an unscheduled thread.

How the writer puts a run into the output (`COPY_METHOD`, env TILECRATE_COPY_METHOD): "auto"
(default) copies runs of KERNEL_MIN bytes or more in the kernel with `KernelCopier` and writes
shorter ones from the helper's buffer (short runs: the buffered writes won every bbox comparison
of bench_copy on 2026-12-01). `KernelCopier.copy` uses `copy_file_range`, falling back to
`sendfile`, then to pread/write, where a file system or the output kind refuses (EXDEV, EINVAL
for pipes, EBADF for O_APPEND outputs, ENOSYS, EOPNOTSUPP; a refusal is remembered). A staged
file whose CRC is known (`ZipWriter.add_file`) is only ever copied in the kernel: nothing is read.

A range read with its prefixes found right has its CRC-32 remembered (`RUN_CRCS`), keyed by the
source file's version (device, inode, size, mtime and ctime in ns) and the range: an export of
the same bundles again (a server's usual day), or one whose runs a prescan thread read ahead
(`prescan_plan`), copies those ranges in the kernel without reading them in user space, adjacent
ranges of one file in one `copy_file_range` span, and assembles the entry's CRC with
`crc32_combine`. Every user of a remembered CRC opened the file at that version and checks it is
unchanged after its copy, and a rewrite moves the ctime (no caller can set it back); a version
younger than RACY_NS is never remembered. `RUN_CLAIMS` keeps the prescan and the writer from
reading the same run: the writer takes the runs of its bundle the prescan has not read (waiting
for the one it may be reading), the prescan skips those.

Every way refuses a source that ends before the range does (the file shrank): an error naming the
file, never a short entry. Python's own os.copy_file_range/os.sendfile/os.preadv are used; each
releases the GIL, as does isal's CRC-32 on the helper thread.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from isal import isal_zlib

from tilecrate import _plan
from tilecrate.errors import BundleError

METHODS = ("copy_file_range", "sendfile", "readwrite")
WRITE_MODES = METHODS + ("auto", "buffered", "chunks")
KERNEL_MIN = 1 << 20             # "auto": runs of at least this many bytes go by copy_file_range
# how file ranges reach an output (zip or folder): a method of METHODS (kernel copies, falling back
# in that order), "buffered" (written from the helper's read-ahead buffers), "auto" (runs of
# KERNEL_MIN bytes or more by copy_file_range, shorter ones buffered), or "chunks" (bundles
# through the plan's own buffer, read and written on the writer's thread: the path before kernel
# copies, kept as the benchmarks' baseline)
COPY_METHOD = os.environ.get("TILECRATE_COPY_METHOD") or "auto"
if COPY_METHOD not in WRITE_MODES:
    raise ValueError(f"TILECRATE_COPY_METHOD={COPY_METHOD!r} is not one of {', '.join(WRITE_MODES)}")
# refusals that mean "not between these files", not "the copy failed"
_REFUSED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP,
                      errno.EBADF, errno.ESPIPE})
_RW_BUFFER = 1 << 20
SCAN_AHEAD = 2                   # runs read ahead of the writer (each holds one buffer of up to a run)
DEFER_AHEAD = 4                  # runs copied in the kernel before their read (for the CRC) finished


RUN_CRC_ENTRIES = 1 << 15        # ~6 MB of keys; at 8 MiB a run, CRCs of 256 GB of sources


RACY_NS = 2_000_000_000   # a version younger than this (ctime) is never remembered


class RunCrcs:
    """CRC-32s of source ranges whose size prefixes were right, keyed by (file version, offset,
    length); least recently used first out. `enabled` off (env TILECRATE_RUN_CRCS=0) forgets nothing
    but answers no look-up (the benchmarks' baseline)."""

    def __init__(self, limit: int = RUN_CRC_ENTRIES):
        self.limit = int(limit)
        self.enabled = os.environ.get("TILECRATE_RUN_CRCS", "1") != "0"
        self.hits = 0
        self.misses = 0
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, file_id: tuple | None, offset: int, length: int) -> int | None:
        """The remembered CRC-32 of `length` bytes at `offset` of the file version `file_id`, or None."""
        if file_id is None or not self.enabled:
            return None
        key = (file_id, offset, length)
        with self._lock:
            crc = self._d.get(key)
            if crc is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return crc

    def put(self, file_id: tuple | None, offset: int, length: int, crc: int) -> None:
        """Remember a range's CRC-32 (call only once the file was found unchanged after the read)."""
        if file_id is None or not self.enabled or len(file_id) < 5:
            return
        # git's "racy" rule: a file changed within the last RACY_NS may be rewritten again in the same
        # timestamp tick (coarse clocks, some file systems) and keep this version; only settled files count
        if time.time_ns() - int(file_id[4]) < RACY_NS:
            return
        with self._lock:
            self._d[(file_id, offset, length)] = crc & 0xFFFFFFFF
            self._d.move_to_end((file_id, offset, length))
            while len(self._d) > self.limit:
                self._d.popitem(last=False)

    def clear(self) -> None:
        """Forget every range (tests, benchmarks)."""
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)


RUN_CRCS = RunCrcs()


class RunClaims:
    """Who reads each source run of a first export for its CRC: the prescan thread or the writer, never both.

    The writer takes the runs of its bundle the prescan has not read (waiting for the one run it may be
    reading); the prescan skips runs the writer took. Keys are (file version, offset, length).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._prescan: set = set()
        self._writer: set = set()

    def prescan_take(self, key: tuple) -> bool:
        """Claim a run for the prescan; False when the writer (or another prescan) has it."""
        with self._cond:
            if key in self._writer or key in self._prescan:
                return False
            self._prescan.add(key)
            return True

    def prescan_done(self, key: tuple) -> None:
        """The prescan has read the run (its CRC is in RUN_CRCS unless its prefixes were wrong)."""
        with self._cond:
            self._prescan.discard(key)
            self._cond.notify_all()

    def writer_take(self, parts, file_id: tuple | None) -> list:
        """Take the runs of `parts` whose CRC is unknown, after any the prescan is reading (whose CRC it
        then fills in); the keys to give back with `writer_done`."""
        keys = []
        if file_id is None:
            return keys
        with self._cond:
            for p in parts:
                if not isinstance(p, CopyRange) or p.crc is not None:
                    continue
                key = (file_id, p.offset, p.length)
                while key in self._prescan:
                    self._cond.wait()
                p.crc = RUN_CRCS.get(file_id, p.offset, p.length)
                if p.crc is None and key not in self._writer:
                    self._writer.add(key)
                    keys.append(key)
        return keys

    def writer_done(self, keys: list) -> None:
        """Give back what `writer_take` took."""
        with self._cond:
            self._writer.difference_update(keys)


RUN_CLAIMS = RunClaims()


class SourceChanged(BundleError):
    """The source file ended before a range that was planned inside it."""


def _changed(label: str) -> SourceChanged:
    return SourceChanged(f"{label}: the file changed while it was being exported")


class KernelCopier:
    """Copies ranges of source files to one output fd at its current file position.

    `method` picks the first method to try (tests force the fallbacks); a refused method is
    dropped for the rest of this copier's life. `copied[m]` counts the bytes each method moved.
    """

    def __init__(self, out_fd: int, method: str = "copy_file_range"):
        if method not in METHODS:
            raise ValueError(f"unknown copy method {method!r} (one of {', '.join(METHODS)})")
        self.out_fd = out_fd
        self._methods = list(METHODS[METHODS.index(method):])
        self.copied = {m: 0 for m in METHODS}
        self._buf: bytearray | None = None

    @property
    def method(self) -> str:
        """The method the next copy starts with."""
        return self._methods[0]

    def copy(self, src_fd: int, offset: int, length: int, label: str) -> None:
        """Copy `length` bytes from `offset` of `src_fd` to the output (GIL released in each syscall)."""
        if offset < 0 or length < 0:
            raise ValueError(f"{label}: bad range (offset {offset}, length {length})")
        done = 0
        while done < length:
            method = self._methods[0]
            try:
                n = self._step(method, src_fd, offset + done, length - done)
            except OSError as e:
                if e.errno in _REFUSED and len(self._methods) > 1:
                    self._methods.pop(0)     # every method writes at the output's position: resume there
                    continue
                raise
            if n == 0:
                raise _changed(label)
            self.copied[method] += n
            done += n

    def _step(self, method: str, src: int, offset: int, count: int) -> int:
        if method == "copy_file_range":
            return os.copy_file_range(src, self.out_fd, count, offset)
        if method == "sendfile":
            return os.sendfile(self.out_fd, src, offset, count)
        if self._buf is None:
            self._buf = bytearray(_RW_BUFFER)
        view = memoryview(self._buf)[:min(count, _RW_BUFFER)]
        n = os.preadv(src, [view], offset)
        if n > 0:
            write_all(self.out_fd, view[:n])
        return n


IOV_MAX = 1024                   # buffers per writev (Linux's IOV_MAX)


def write_all(fd: int, parts) -> None:
    """Write a bytes-like object, or bytes-like parts in order, to `fd` (writev in batches; a short
    write resumes where it stopped)."""
    if isinstance(parts, (bytes, bytearray, memoryview)):
        parts = [parts]
    elif type(parts) is not list:
        parts = list(parts)
    # parts go to writev as they are: a view is only made of a part a short write cut (a cast and a
    # length check per part cost more than the writev itself on an export of 20 000 small tiles)
    i = 0
    while i < len(parts):
        batch = parts[i:i + IOV_MAX]
        n = os.writev(fd, batch)
        if n == sum(map(_nbytes, batch)):
            i += len(batch)
            continue
        for k, p in enumerate(batch):
            size = _nbytes(p)
            if n >= size:
                n -= size
                continue
            parts = [memoryview(p).cast("B")[n:], *parts[i + k + 1:]]
            i = 0
            break


def _nbytes(p) -> int:
    kind = type(p)
    if kind is bytes or kind is bytearray:
        return len(p)
    return p.nbytes if kind is memoryview else memoryview(p).nbytes


class ScannedRun:
    """A run read by the scanner: its CRC-32, and its bytes (`data`, in a pooled buffer) when kept
    or when the source's prefixes were wrong and had to be fixed; `release()` returns the buffer."""

    __slots__ = ("crc", "length", "data", "fixed", "_buf", "_pool")

    def __init__(self, crc: int, length: int, data: memoryview | None, fixed: bool, buf, pool):
        self.crc, self.length, self.data, self.fixed, self._buf, self._pool = crc, length, data, fixed, buf, pool

    def release(self) -> None:
        """Give the buffer back to the scanner (the data is invalid afterwards)."""
        if self._buf is not None:
            self.data = None
            self._pool.append(self._buf)
            self._buf = None


def check_prefixes(buf: np.ndarray, rel: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether the 4 bytes at each `rel` offset of `buf` hold the matching size, little-endian."""
    if not len(rel):
        return True
    pos = rel[:, None] + np.arange(4, dtype=np.int64)
    got = buf[pos].astype(np.uint32)
    value = got[:, 0] | (got[:, 1] << 8) | (got[:, 2] << 16) | (got[:, 3] << 24)
    return bool(np.array_equal(value, sizes))


def fix_prefixes(buf: np.ndarray, rel: np.ndarray, sizes: np.ndarray) -> None:
    """Write each size as 4 little-endian bytes at its `rel` offset of `buf`."""
    pos = rel[:, None] + np.arange(4, dtype=np.int64)
    buf[pos] = np.asarray(sizes, dtype="<u4").view(np.uint8).reshape(-1, 4)


class RunScanner:
    """Reads file ranges on a helper thread ahead of the writer: CRC-32, prefix check and fix.

    Buffers come from a small pool (a run's buffer is reused once the writer released it), so
    memory is a few runs whatever the package size.
    """

    def __init__(self, threads: int = 1):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tilecrate-scan")
        self._free: deque = deque()      # append/pop are atomic: writer and helper share it unlocked

    def _take(self, size: int) -> bytearray:
        try:
            buf = self._free.pop()
        except IndexError:
            buf = None
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, 1 << 20))
        return buf

    def submit(self, part: "CopyRange", keep: bool = False, crc: bool = True) -> Future:
        """Read a range on the helper thread; a Future of a ScannedRun (holding the bytes when `keep`)."""
        return self._pool.submit(self.scan, part, keep, crc)

    def scan(self, part: "CopyRange", keep: bool = False, want_crc: bool = True) -> ScannedRun:
        """The work of `submit`, on the calling thread."""
        length = part.length
        buf = self._take(length)
        try:
            view = memoryview(buf)[:length]
            crc, fixed = read_range(part, view, keep, want_crc)
        except BaseException:
            self._free.append(buf)
            raise
        if want_crc:
            part.scanned_crc, part.fixed = crc, fixed
        if keep or fixed:
            return ScannedRun(crc, length, view, fixed, buf, self._free)
        del view
        self._free.append(buf)
        return ScannedRun(crc, length, None, False, None, self._free)

    def close(self) -> None:
        """Stop the helper thread (pending scans are cancelled) and drop the buffers."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._free.clear()


def read_range(part: "CopyRange", view: memoryview, keep: bool = False, want_crc: bool = True) -> tuple[int, bool]:
    """Read `part` into `view` (its length), check and fix its size prefixes; (CRC-32 or 0, fixed)."""
    part.check()    # prefixes outside the range would be written through numpy's negative indexing
    length = part.length
    if view.nbytes != length:
        raise ValueError(f"{part.label}: a {view.nbytes}-byte buffer for a {length}-byte range")
    got = 0
    while got < length:
        n = os.preadv(part.fd, [view[got:]], part.offset + got)
        if n == 0:
            raise _changed(part.label)
        got += n
    fixed = False
    if part.prefix_at is not None and len(part.prefix_at):
        if keep and int(part.prefix_at[0]) == part.prefix_base:
            # written from this buffer anyway: set every prefix (compiled, bounds-checked); not
            # checked, so counted as fixed (its CRC is not the source range's to remember)
            _plan.fill_prefixes(view, part.prefix_at, part.prefix_sizes, 0, len(part.prefix_at))
            fixed = True
        else:
            arr = np.frombuffer(view, dtype=np.uint8, count=length)
            rel = part.prefix_at.astype(np.int64) - part.prefix_base
            fixed = not check_prefixes(arr, rel, part.prefix_sizes)
            if fixed:     # legacy or garbage prefixes in the source: the writer takes these bytes
                fix_prefixes(arr, rel, part.prefix_sizes)
            del arr
    return (isal_zlib.crc32(view) if want_crc else 0), fixed


def crc_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from CRC(A), CRC(B) and len(B)."""
    return isal_zlib.crc32_combine(crc1, crc2, len2) & 0xFFFFFFFF


@dataclass
class CopyRange:
    """`length` bytes at `offset` of the open file `fd`, as part of a zip entry or output file.

    The 4-byte size prefixes the bytes must hold sit at `prefix_at - prefix_base` (offsets within
    the range; uint64 and uint32 arrays, e.g. slices of a plan's tile offsets and sizes); a range
    whose source prefixes differ is written fixed from memory. `crc`, when known (remembered in
    RUN_CRCS for this file version), means the bytes need not be read: prefixes right, CRC that.
    A scan sets `scanned_crc` and `fixed` (what `remember` stores once the file is found unchanged).
    """

    fd: int
    offset: int
    length: int
    label: str
    prefix_at: np.ndarray | None = None
    prefix_sizes: np.ndarray | None = None
    prefix_base: int = 0
    crc: int | None = None
    scanned_crc: int | None = None
    fixed: bool = False

    def __post_init__(self):
        if self.prefix_at is not None:
            self.prefix_at = np.ascontiguousarray(self.prefix_at, dtype=np.uint64)
            self.prefix_sizes = np.ascontiguousarray(self.prefix_sizes, dtype=np.uint32)

    def check(self) -> None:
        """Refuse a range that is negative, or prefixes that do not lie inside it."""
        if self.offset < 0 or self.length < 0:
            raise ValueError(f"{self.label}: bad range (offset {self.offset}, length {self.length})")
        if self.prefix_at is not None and len(self.prefix_at):
            if len(self.prefix_at) != len(self.prefix_sizes):
                raise ValueError(f"{self.label}: {len(self.prefix_at)} prefix offsets for {len(self.prefix_sizes)} sizes")
            lo, hi = int(self.prefix_at.min()), int(self.prefix_at.max())
            if lo < self.prefix_base or hi - self.prefix_base > self.length - 4:
                raise ValueError(f"{self.label}: a size prefix lies outside its {self.length}-byte range")


def part_size(part) -> int:
    """Bytes of one part: a CopyRange or a bytes-like object."""
    if isinstance(part, CopyRange):
        return part.length
    return memoryview(part).nbytes


def write_parts(parts, write, copier: KernelCopier | None, scanner: RunScanner | None,
                need_crc: bool, flush=None, kernel_min: int = 0, patch=None) -> tuple[int | None, int]:
    """Write `parts` in order: bytes through `write`, FileRanges by kernel copy; (CRC-32 or None, bytes).

    FileRanges are read ahead on `scanner` when the CRC is needed or prefixes must be checked;
    `flush` empties the caller's buffer before each kernel copy (the copy writes at the fd's
    position). Ranges shorter than `kernel_min`, and every range without a `copier`, are
    written from the read buffer through `write`. Ranges of known CRC (`CopyRange.crc`) are not
    read when a `copier` is given; adjacent ones of one fd go in one kernel copy.

    With `patch(offset, data)` (a seekable output: write `data` at `offset` bytes into these parts),
    a range copied in the kernel is copied at once while the scanner reads it for its CRC: the copy
    and the read overlap instead of following each other. A range whose prefixes turn out wrong is
    then written again, fixed, through `patch`; at most DEFER_AHEAD such reads are outstanding.
    """
    parts = list(parts)
    for p in parts:
        if isinstance(p, CopyRange):
            p.check()
    # a range of known CRC (prefixes known right) needs no read when the kernel can copy it
    known = [isinstance(p, CopyRange) and p.crc is not None and copier is not None for p in parts]
    keeps = [isinstance(p, CopyRange) and not kn and (copier is None or p.length < kernel_min)
             for p, kn in zip(parts, known)]
    scans = [isinstance(p, CopyRange) and not kn and (need_crc or k or p.prefix_at is not None)
             for p, k, kn in zip(parts, keeps, known)]
    defer = [patch is not None and s and not k for s, k in zip(scans, keeps)]
    if any(scans) and scanner is None:
        raise ValueError("a scanner is needed to read file ranges")
    crcs: list = []             # (CRC-32, length) of each stretch, in order, combined at the end
    total = 0
    ahead: dict[int, Future] = {}
    deferred: deque = deque()   # (index in crcs, part, its Future, offset in the parts) copied, not yet read
    # the first range is read on this thread: waiting for the helper to start on it would cost a
    # thread hand-off per entry (milliseconds on a loaded machine); the helper reads the next ones.
    # Deferred ranges are always the helper's: this thread copies meanwhile.
    inline = next((k for k, w in enumerate(scans) if w and not defer[k]), -1)

    def settle() -> None:
        slot, part, fut, at = deferred.popleft()
        scanned = scanner.scan(part, False, need_crc) if fut.cancel() else fut.result()
        try:
            if scanned.fixed:       # the source's prefixes were wrong: the copy is replaced by the fixed bytes
                if flush is not None:
                    flush()
                patch(at, scanned.data)
        finally:
            scanned.release()
        crcs[slot] = (scanned.crc, part.length)

    nxt = 0
    i = 0
    try:
        while i < len(parts):
            p = parts[i]
            while nxt < len(parts) and nxt <= i + SCAN_AHEAD:
                if scans[nxt] and nxt != inline:
                    q = parts[nxt]
                    ahead[nxt] = scanner.submit(q, keeps[nxt], need_crc)
                nxt += 1
            if not isinstance(p, CopyRange):
                view = memoryview(p).cast("B")
                if need_crc:
                    crcs.append((isal_zlib.crc32(view), view.nbytes))
                write(view)
                total += view.nbytes
                i += 1
                continue
            if known[i]:
                # adjacent known ranges of one file (a bundle's runs) go in one kernel copy
                end = p.offset
                j = i
                while j < len(parts) and known[j] and parts[j].fd == p.fd and parts[j].offset == end:
                    crcs.append((parts[j].crc, parts[j].length))
                    end += parts[j].length
                    j += 1
                if flush is not None:
                    flush()
                copier.copy(p.fd, p.offset, end - p.offset, p.label)
                total += end - p.offset
                i = j
                continue
            if defer[i]:
                if flush is not None:
                    flush()
                copier.copy(p.fd, p.offset, p.length, p.label)
                crcs.append(None)
                deferred.append((len(crcs) - 1, p, ahead.pop(i), total))
                while len(deferred) > DEFER_AHEAD:
                    settle()
                total += p.length
                i += 1
                continue
            fut = ahead.pop(i, None)
            if i == inline or (fut is not None and fut.cancel()):
                # not started by the helper (busy, or not scheduled on a loaded machine): read it
                # here rather than wait, so the worst case is the serial read-then-write
                scanned = scanner.scan(p, keeps[i], need_crc)
            else:
                scanned = fut.result() if fut is not None else None
            try:
                if scanned is not None and scanned.data is not None:
                    write(scanned.data)
                else:
                    if flush is not None:
                        flush()
                    copier.copy(p.fd, p.offset, p.length, p.label)
            finally:
                if scanned is not None:
                    scanned.release()
            if need_crc:
                crcs.append((scanned.crc, p.length))
            total += p.length
            i += 1
        while deferred:
            settle()
    finally:
        # the scans read the callers' fds and hold pooled buffers: settle every one before returning
        pending = list(ahead.values()) + [d[2] for d in deferred]
        for fut in pending:
            fut.cancel()
        for fut in pending:
            if not fut.cancelled() and fut.exception() is None:
                fut.result().release()
    if not need_crc:
        return None, total
    crc = 0
    for c, n in crcs:
        crc = crc_combine(crc, c, n)
    return crc & 0xFFFFFFFF, total


def identity(st: os.stat_result) -> tuple:
    """(device, inode, size, mtime and ctime in ns): a file's content version, as the cache records it
    (`sourcefiles.file_id`)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def version(st: os.stat_result) -> tuple:
    """The key of remembered run CRCs: `identity`, whose ctime tells a rewrite that put the old mtime
    back (no caller can set the ctime)."""
    return identity(st)


def open_source(path: str, size: int, label: str, file_id: tuple | None = None) -> int:
    """An fd of the regular file `path`, refused when it is no longer the planned version (its size
    is not `size`, or its identity is not `file_id` when known)."""
    return open_source_id(path, size, label, file_id)[0]


def open_source_id(path: str, size: int, label: str, file_id: tuple | None = None) -> tuple[int, tuple]:
    """`open_source`, with the opened file's `version` (the key of its remembered run CRCs)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{label}: not a regular file")
        ident = version(st)
        if st.st_size != size or (file_id is not None and ident[:len(file_id)] != tuple(file_id)):
            raise _changed(label)
    except BaseException:
        os.close(fd)
        raise
    return fd, ident


def check_unchanged(fd: int, size: int, label: str, file_id: tuple | None = None) -> None:
    """Refuse a source that changed while it was copied (same test as `open_source`; `file_id` an
    `identity` or a `version`)."""
    st = os.fstat(fd)
    if st.st_size != size or (file_id is not None and version(st)[:len(file_id)] != tuple(file_id)):
        raise _changed(label)


def plan_parts(plan, fd: int, label: str, file_id: tuple | None = None) -> list | None:
    """A bundle plan as parts: its header block from memory, then each run as a CopyRange of the
    source (the run's first prefix included) with the prefixes it must hold, and its CRC-32 when
    RUN_CRCS remembers it for the file version `file_id`; None when a run cannot be taken from
    the file as it is (then the plan's buffered path writes it)."""
    if plan.file is None:
        return None
    parts: list = [plan.aux]
    offsets = plan.tile_offsets
    sizes = plan.tile_sizes
    limit = plan.file_size - plan.file_offset
    for off, length, first, count in plan.runs.tolist():
        if off < 4 or off + length > limit or count < 1:
            return None
        # the range starts at the first tile's prefix (off - 4): tile k's prefix is at tile_k - off in it
        start = plan.file_offset + off - 4
        parts.append(CopyRange(fd, start, length + 4, label, offsets[first:first + count],
                               sizes[first:first + count], off, RUN_CRCS.get(file_id, start, length + 4)))
    return parts


def remember(parts, file_id: tuple | None) -> None:
    """Put the CRCs the scans found (prefixes right) into RUN_CRCS; call after `check_unchanged`."""
    for p in parts:
        if isinstance(p, CopyRange) and p.scanned_crc is not None and not p.fixed:
            RUN_CRCS.put(file_id, p.offset, p.length, p.scanned_crc)


_prescan = threading.local()


def prescan_plan(plan, min_length: int = 0) -> int:
    """Read a planned bundle's runs (CRC-32, prefix check) into RUN_CRCS ahead of the writer, on the
    calling (planning) thread, so the writer only copies in the kernel; bytes read.

    An optimisation only: a file that changed or cannot be read is left to the writer, which reads
    it again and reports the error. One buffer of up to a run per thread. Runs shorter than
    `min_length` are left to the writer (written from its own read buffer).
    """
    if plan.file is None or not RUN_CRCS.enabled:
        return 0
    try:
        fd, ident = open_source_id(plan.file, plan.file_size, plan.file, getattr(plan, "file_id", None))
    except (OSError, BundleError):
        return 0
    done = 0
    try:
        if time.time_ns() - int(ident[4]) < RACY_NS:
            return 0                # changed just now: nothing read here could be remembered (RunCrcs.put)
        parts = (plan_parts(plan, fd, plan.file, ident) or [None])[1:]
        if parts and hasattr(os, "posix_fadvise"):
            # a cold file: the kernel reads the runs' span while this thread checks the first run,
            # or (every CRC remembered) before the writer's kernel copy gets there
            os.posix_fadvise(fd, parts[0].offset, parts[-1].offset + parts[-1].length - parts[0].offset,
                             os.POSIX_FADV_WILLNEED)
        todo = [p for p in parts if p.crc is None and p.length >= min_length]
        if not todo:
            return 0
        buf = getattr(_prescan, "buf", None)
        for p in todo:
            key = (ident, p.offset, p.length)
            # a run the writer took (it reached this bundle first) is read by it, not here too
            if not RUN_CLAIMS.prescan_take(key):
                continue
            try:
                p.check()
                if buf is None or len(buf) < p.length:
                    buf = _prescan.buf = bytearray(max(p.length, 1 << 20))
                crc, fixed = read_range(p, memoryview(buf)[:p.length])
                done += p.length
                # remembered at once, for the writer that may be waiting for it: every user of RUN_CRCS
                # opened the file at this version and checks it is unchanged after its copy, so a
                # later change makes the entry unreachable (a new ctime), never wrong bytes
                if not fixed:
                    RUN_CRCS.put(ident, p.offset, p.length, crc)
            finally:
                RUN_CLAIMS.prescan_done(key)
    except (OSError, BundleError, ValueError):
        return done
    finally:
        os.close(fd)
    return done

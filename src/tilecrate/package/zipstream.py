"""A streaming zip writer for tile packages: STORED entries only, ZIP64 when needed, isal CRC-32.

Every entry's size is known before its bytes are written; its CRC too, or (seekable outputs) it
is computed as the bytes pass and patched into the local header, so no data descriptor is needed
and the writer never seeks: it can write to a pipe or socket as well as to a file. Entries can be
made of byte ranges of other files (`add_parts`, `add_file`): on a seekable output a long range
is copied in the kernel at once while a helper thread reads it for its CRC-32 and size prefixes
(a range whose prefixes were wrong is rewritten fixed over its copy); short ones are read ahead by
the helper and written from its buffer (`package.kcopy`); a staged file of known CRC is only
copied in the kernel.
Memory is flat in the package size: only the central directory (one small record per entry)
is kept. ArcGIS Runtime refuses compressed packages, which is why nothing is ever deflated.
"""
from __future__ import annotations

import fcntl
import io
import os
import struct
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable

from isal import isal_zlib

from tilecrate._files import preallocate
from tilecrate.package import kcopy
from tilecrate.package.kcopy import (METHODS, WRITE_MODES, CopyRange, KernelCopier, RunScanner, check_unchanged,
                                     open_source, open_source_id, part_size, plan_parts, remember, write_all,
                                     write_parts)

ZIP64_LIMIT = 0xFFFFFFFF     # a size or offset at or above this needs ZIP64 records
_MAX16 = 0xFFFF
_LOCAL = struct.Struct("<4sHHHHHLLLHH")         # 30 bytes
_CENTRAL = struct.Struct("<4sHHHHHHLLLHHHHHLL")  # 46 bytes
_EOCD = struct.Struct("<4sHHHHLLH")             # 22 bytes
_EOCD64 = struct.Struct("<4sQHHLLQQQQ")         # 56 bytes
_LOCATOR64 = struct.Struct("<4sLQL")            # 20 bytes
_FLAG_UTF8 = 0x0800
_ATTR_DIR = 0x10             # MS-DOS directory attribute


@dataclass
class _Entry:
    name: bytes
    flags: int
    size: int
    crc: int
    offset: int
    is_dir: bool


def dos_datetime(t: float | None = None) -> tuple[int, int]:
    """(date, time) in MS-DOS format for a POSIX time (now by default), local time as zip tools do."""
    lt = time.localtime(t)
    year = max(lt.tm_year, 1980)
    return ((year - 1980) << 9) | (lt.tm_mon << 5) | lt.tm_mday, \
        (lt.tm_hour << 11) | (lt.tm_min << 5) | (lt.tm_sec // 2)


_JOIN_AT_MOST = 1 << 20      # add_wholes gathers headers and bytes into writes of about this size


def _crc_of_group(group: list, running: int) -> int:
    """The running CRC-32 carried over a list of buffers."""
    for part in group:
        running = isal_zlib.crc32(part, running)
    return running


class ZipWriter:
    """Write a stored zip to a binary stream, entry by entry; `close()` writes the central directory.

    `zip64_limit` lowers the point at which ZIP64 records are used (tests force them with a small
    value; readers take ZIP64 fields whenever the 32-bit field holds 0xFFFFFFFF). With
    `dry_run=True` nothing is written and only positions advance: that is how the exact package
    size is predicted from the same code that writes packages.
    """

    def __init__(self, out: BinaryIO | None, *, zip64_limit: int = ZIP64_LIMIT, dry_run: bool = False,
                 mtime: float | None = None, copy_method: str | None = None, reserve: int = 0):
        if not dry_run and out is None:
            raise ValueError("an output stream is needed unless dry_run is set")
        if isinstance(out, io.RawIOBase):
            out = io.BufferedWriter(out, buffer_size=1 << 20)
        self._out = out
        self._dry = dry_run
        self._limit = int(zip64_limit)
        self._entries: list[_Entry] = []
        self._names: set[bytes] = set()
        self._date, self._time = dos_datetime(mtime)
        self.position = 0
        self.closed = False
        self._fd = None
        self._reserved = False
        self._copier: KernelCopier | None = None
        self.copy_method = copy_method or kcopy.COPY_METHOD
        self._scanner: RunScanner | None = None
        if not dry_run:
            try:
                if out.seekable():
                    self._fd = out.fileno()
                    self._start = out.tell()
            except (AttributeError, OSError, ValueError):
                self._fd = None
            # the zip's predicted size, given its disk blocks at once (a full disk fails here, before a
            # byte is written); close() cuts the file where the zip ends. Not for an output opened to append:
            # its writes would land after the reserved bytes
            self._reserved = (self._fd is not None and reserve > 0
                              and not fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_APPEND
                              and preallocate(self._fd, self._start + reserve))
            copy_method = copy_method or kcopy.COPY_METHOD
            if copy_method not in WRITE_MODES:
                raise ValueError(f"unknown copy method {copy_method!r} (one of {', '.join(WRITE_MODES)})")
            try:
                # a pipe or socket takes kernel copies too (sendfile); only in-memory streams do not
                self._copier = KernelCopier(out.fileno(), copy_method if copy_method in METHODS else METHODS[0])
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                self._copier = None

    @property
    def can_patch(self) -> bool:
        """Whether CRCs may be left to `add_stream` (computed while writing, patched into the header)."""
        return self._dry or self._fd is not None

    # -- writing primitives

    def _write(self, data) -> None:
        kind = type(data)
        if not self._dry and (kind is bytes or (kind is memoryview and data.ndim == 1 and data.itemsize == 1
                                                and data.c_contiguous)):
            # headers and small entries, most of the calls: a BufferedWriter takes all in one call
            n = len(data)
            written = self._out.write(data)
            self.position += n
            if written is None or written < n:
                self._write_rest(memoryview(data)[written or 0:])
            return
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not self._dry and n:
            self._write_rest(memoryview(data).cast("B"))
        self.position += n

    def _write_rest(self, view: memoryview) -> None:
        """Write all of `view` (a stream may take part of a buffer per call)."""
        while view.nbytes:
            written = self._out.write(view)
            if written is None:       # a non-blocking raw stream would return None; ours block
                written = 0
            view = view[written:]

    def _name(self, name: str) -> tuple[bytes, int]:
        if "\\" in name or name.startswith("/") or not name:
            raise ValueError(f"bad zip entry name {name!r}")
        raw = name.encode("utf-8")
        if raw in self._names:
            raise ValueError(f"duplicate zip entry {name!r}")
        self._names.add(raw)
        return raw, (0 if raw.isascii() else _FLAG_UTF8)

    def _local_header(self, entry: _Entry) -> bytes:
        zip64 = entry.size >= self._limit
        extra = struct.pack("<HHQQ", 1, 16, entry.size, entry.size) if zip64 else b""
        size32 = ZIP64_LIMIT if zip64 else entry.size
        return _LOCAL.pack(b"PK\x03\x04", 45 if zip64 else 20, entry.flags, 0, self._time, self._date,
                           entry.crc, size32, size32, len(entry.name), len(extra)) + entry.name + extra

    # -- entries

    def add_dir(self, name: str) -> None:
        """An explicit directory entry (`name` ends with '/'), as the Esri sample packages have."""
        if not name.endswith("/"):
            name += "/"
        raw, flags = self._name(name)
        entry = _Entry(raw, flags, 0, 0, self.position, True)
        self._write(self._local_header(entry))
        self._entries.append(entry)

    def add_bytes(self, name: str, data: bytes) -> None:
        """A whole entry from bytes in memory (metadata files)."""
        self.add_whole(name, data, isal_zlib.crc32(data))

    def add_whole(self, name: str, data, crc: int) -> None:
        """A whole entry from a buffer whose CRC-32 is known: header and bytes in one write."""
        self.add_wholes(((name, data, crc),))

    def add_wholes(self, items) -> None:
        """Whole entries from buffers of known CRC-32, (name, data, crc) each, written together: a
        .vtpk's hundreds of font ranges cost their Python calls and writes more than their bytes."""
        parts = []
        held = 0
        pack, limit, when = _LOCAL.pack, self._limit, (self._time, self._date)
        for name, data, crc in items:
            raw, flags = self._name(name)
            size = data.nbytes if isinstance(data, memoryview) else len(data)
            crc = int(crc) & 0xFFFFFFFF
            entry = _Entry(raw, flags, size, crc, self.position, False)
            self._entries.append(entry)
            if size < limit:
                header = pack(b"PK\x03\x04", 20, flags, 0, *when, crc, size, size, len(raw), 0) + raw
            else:
                header = self._local_header(entry)
            self.position += len(header) + size
            if self._dry:
                continue
            parts += (header, data)
            held += len(header) + size
            if held >= _JOIN_AT_MOST:
                self._write_all(parts)
                parts, held = [], 0
        if parts:
            self._write_all(parts)

    def _write_all(self, parts: list) -> None:
        """Write buffers already counted in `position`: gathered by writev on a file (no copy into a
        joined buffer, whose fresh pages cost more than the copy), one by one on other streams."""
        if self._fd is None or len(parts) <= 2:
            for part in parts:
                self._write_rest(memoryview(part).cast("B"))
            return
        self._out.flush()
        write_all(self._fd, parts)

    def _begin_file(self, name: str, size: int, crc: int | None) -> _Entry:
        """Write a file entry's local header (CRC 0 when it is to be patched in) and return the entry."""
        raw, flags = self._name(name)
        if crc is None and not self.can_patch:
            raise ValueError(f"zip entry {name}: a non-seekable stream needs the CRC-32 before the data")
        entry = _Entry(raw, flags, int(size), int(crc or 0) & 0xFFFFFFFF, self.position, False)
        self._write(self._local_header(entry))
        return entry

    def add_stream(self, name: str, size: int, crc: int | None, chunks: Iterable) -> None:
        """An entry of known size, its bytes streamed from `chunks` (buffers).

        With `crc=None` (seekable outputs only) the CRC-32 is computed while the bytes pass and
        written into the local header afterwards, so the data is read once.
        """
        self._add_written(name, size, crc, chunks, isal_zlib.crc32, self._write)

    def add_gathered(self, name: str, size: int, crc: int | None, groups: Iterable[list]) -> None:
        """An entry of known size whose bytes come as lists of buffers, each list written with one gathered
        write (no copy into a joined buffer); with `crc=None` the CRC-32 is computed as for `add_stream`."""
        self._add_written(name, size, crc, groups, _crc_of_group, self._write_group)

    def _add_written(self, name: str, size: int, crc: int | None, items: Iterable,
                     crc_of: Callable[[object, int], int], write: Callable[[object], None]) -> None:
        """add_stream's and add_gathered's body: each item written by `write`, its CRC-32 taken by `crc_of`
        when `crc` is None and patched into the local header; the bytes written must be `size`."""
        entry = self._begin_file(name, size, crc)
        if self._dry:
            self.position += entry.size
        else:
            start = self.position
            running = 0
            for item in items:
                if crc is None:
                    running = crc_of(item, running)
                write(item)
            if self.position - start != entry.size:
                raise ValueError(f"zip entry {name}: {self.position - start} bytes written, {entry.size} announced")
            if crc is None:
                entry.crc = running & 0xFFFFFFFF
                self._out.flush()       # the header may still sit in the buffer
                os.pwrite(self._fd, struct.pack("<L", entry.crc), self._start + entry.offset + 14)
        self._entries.append(entry)

    def _write_group(self, group: list) -> None:
        n = sum(map(len, group))
        self.position += n
        if self._fd is not None and len(group) <= kcopy.IOV_MAX:
            # one writev of buffers that are already flat bytes; a short write resumes in write_all
            self._out.flush()
            done = os.writev(self._fd, group)
            if done < n:
                write_all(self._fd, memoryview(b"".join(group))[done:])
        else:
            self._write_all(group)

    @property
    def dry_run(self) -> bool:
        """Whether only positions advance."""
        return self._dry

    @property
    def copier(self) -> KernelCopier | None:
        """The kernel copier of this output (None for in-memory streams and dry runs)."""
        return self._copier

    def add_parts(self, name: str, size: int, parts, crc: int | None = None) -> None:
        """An entry made of parts in order: bytes-like objects and `kcopy.CopyRange`s of open files.

        Ranges are copied file to file in the kernel. With `crc=None` (seekable outputs) the CRC-32
        is computed from the ranges read ahead on a helper thread and patched into the header; a
        given CRC is checked whenever the ranges are read anyway (prefix checks), and a mismatch
        (a source rewritten since planning) is an error.
        """
        parts = list(parts)
        if sum(part_size(p) for p in parts) != int(size):
            raise ValueError(f"zip entry {name}: parts of {sum(part_size(p) for p in parts)} bytes, {size} announced")
        entry = self._begin_file(name, size, crc)
        if self._dry:
            self.position += entry.size
            self._entries.append(entry)
            return
        checked = any(isinstance(p, CopyRange) and p.prefix_at is not None for p in parts)
        need_crc = crc is None or checked
        # short ranges read anyway (for their CRC or prefixes) are written from the read buffers
        # in "auto" mode; long ones, and ranges nobody needs to read, are copied in the kernel
        kernel = self.copy_method in METHODS or self.copy_method == "auto" or not need_crc
        copier = self._copier if kernel else None
        kernel_min = kcopy.KERNEL_MIN if (self.copy_method == "auto" and need_crc) else 0
        if self._scanner is None and (need_crc or copier is None or kernel_min):
            self._scanner = RunScanner()
        start = self.position

        def patch(at: int, data) -> None:
            """Rewrite `data` `at` bytes into the entry's data (a run copied before its prefixes were found wrong)."""
            view, pos = memoryview(data).cast("B"), self._start + start + at
            while view.nbytes:
                n = os.pwrite(self._fd, view, pos)
                view, pos = view[n:], pos + n

        # a seekable output: long runs are copied while the helper reads them for their CRC
        got, written = write_parts(parts, self._write, copier, self._scanner, need_crc, flush=self._out.flush,
                                   kernel_min=kernel_min,
                                   patch=patch if self._fd is not None and copier is not None else None)
        self.position = start + written      # _write counted only what passed through it
        if crc is None:
            entry.crc = got
            self._out.flush()
            os.pwrite(self._fd, struct.pack("<L", entry.crc), self._start + entry.offset + 14)
        elif need_crc and got != entry.crc:
            raise ValueError(f"zip entry {name}: the bytes' CRC-32 is not the one planned (a source changed)")
        self._entries.append(entry)

    def add_file(self, name: str, path: str, size: int, crc: int) -> None:
        """A whole file (a staged bundle) of known size and CRC-32, copied in the kernel."""
        if self._dry:
            self.add_parts(name, size, [CopyRange(-1, 0, int(size), path)], crc)
            return
        fd = open_source(path, int(size), path)
        try:
            self.add_parts(name, size, [CopyRange(fd, 0, int(size), path)], crc)
        finally:
            os.close(fd)

    def add_size(self, name: str, size: int) -> None:
        """Dry runs only: account for an entry of `size` bytes without its data."""
        if not self._dry:
            raise ValueError("add_size is only for dry runs")
        self.add_stream(name, size, 0, ())

    # -- the end

    def close(self) -> int:
        """Write the central directory (and ZIP64 end records when needed); returns the zip's size."""
        if self.closed:
            return self.position
        cd_start = self.position
        records = []
        pack, limit, when = _CENTRAL.pack, self._limit, (self._time, self._date)
        for e in self._entries:
            attr = _ATTR_DIR if e.is_dir else 0
            if e.size < limit and e.offset < limit:
                records.append(pack(b"PK\x01\x02", 20, 20, e.flags, 0, *when, e.crc, e.size, e.size,
                                    len(e.name), 0, 0, 0, 0, attr, e.offset))
                records.append(e.name)
                if len(records) >= 16384:        # written in pieces: a package may have millions of entries
                    self._write(b"".join(records))
                    records = []
                continue
            fields = []
            size32 = e.size
            off32 = e.offset
            if e.size >= limit:
                fields += [e.size, e.size]
                size32 = ZIP64_LIMIT
            if e.offset >= limit:
                fields.append(e.offset)
                off32 = ZIP64_LIMIT
            extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
            records.append(pack(b"PK\x01\x02", 45, 45, e.flags, 0, *when, e.crc, size32, size32,
                                len(e.name), len(extra), 0, 0, 0, attr, off32) + e.name + extra)
        self._write(b"".join(records))
        cd_size = self.position - cd_start
        count = len(self._entries)
        if count >= _MAX16 or cd_size >= self._limit or cd_start >= self._limit:
            eocd64_at = self.position
            self._write(_EOCD64.pack(b"PK\x06\x06", _EOCD64.size - 12, 45, 45, 0, 0, count, count,
                                     cd_size, cd_start))
            self._write(_LOCATOR64.pack(b"PK\x06\x07", 0, eocd64_at, 1))
            self._write(_EOCD.pack(b"PK\x05\x06", 0, 0, min(count, _MAX16), min(count, _MAX16),
                                   ZIP64_LIMIT, ZIP64_LIMIT, 0))
        else:
            self._write(_EOCD.pack(b"PK\x05\x06", 0, 0, count, count, cd_size, cd_start, 0))
        if not self._dry:
            self._out.flush()
            if self._reserved:
                os.ftruncate(self._fd, self._start + self.position)
        self._close_scanner()
        self.closed = True
        return self.position

    def _close_scanner(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None

    def __del__(self):
        scanner = getattr(self, "_scanner", None)
        if scanner is not None:
            scanner.close()


class ZipSink:
    """The package side of an export: metadata files, directories and planned bundles into a ZipWriter."""

    def __init__(self, writer: ZipWriter):
        self.writer = writer

    def add_dir(self, name: str) -> None:
        """A directory entry."""
        self.writer.add_dir(name)

    def add_bytes(self, name: str, data: bytes) -> None:
        """A whole file from memory."""
        self.writer.add_bytes(name, data)

    @property
    def needs_crc(self) -> bool:
        """Whether plans must carry their CRC before writing (non-seekable outputs)."""
        return not self.writer.can_patch

    def add_bundle(self, name: str, plan) -> None:
        """A planned bundle, then its .bundlx for V1; CRCs computed while writing unless the plan has them.

        Runs a prescan has read (their CRCs remembered) are only copied in the kernel; the others
        this writer takes from the prescan (`kcopy.RUN_CLAIMS`) and copies while a helper thread
        reads them (CRC-32, size prefixes checked and fixed), short ones written from the helper's
        buffer (`kcopy`); plans without a source file (re-encoded or inflated tiles) go through the
        plan's buffer.
        """
        if plan.crc is None and self.needs_crc:
            plan.compute_crc()
        if getattr(plan, "held", None) is not None and self.writer.can_patch:
            # tiles held apart (a block source's): gathered writes, no copy into a joined body
            self.writer.add_gathered(name, plan.size, plan.crc, plan.gathered())
        elif not self._add_kernel(name, plan):
            self.writer.add_stream(name, plan.size, plan.crc, plan.chunks())
        if plan.bundlx is not None:
            self.writer.add_stream(name[:-1] + "x", len(plan.bundlx), plan.bundlx_crc, (plan.bundlx,))

    def _add_kernel(self, name: str, plan) -> bool:
        if plan.file is None or self.writer.dry_run or self.writer.copy_method == "chunks":
            return False
        fd, ident = open_source_id(plan.file, plan.file_size, plan.file, getattr(plan, "file_id", None))
        try:
            # runs whose CRC is remembered for this file version are copied without being read
            parts = plan_parts(plan, fd, plan.file, ident)
            if parts is None:
                return False
            # the runs a prescan thread has not read are read here (with their copies), not there too
            taken = kcopy.RUN_CLAIMS.writer_take(parts, ident)
            try:
                self.writer.add_parts(name, plan.size, parts, plan.crc)
                check_unchanged(fd, plan.file_size, plan.file, ident)
                remember(parts, ident)
            finally:
                kcopy.RUN_CLAIMS.writer_done(taken)
            return True
        finally:
            os.close(fd)

    def close(self) -> int:
        """Finish the zip; its size in bytes."""
        return self.writer.close()

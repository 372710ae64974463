"""The files of a source cache, read while they may change: identities, checked preads, no mappings.

A file is identified by (device, inode, size, mtime_ns, ctime_ns). A read opens the file (regular files only,
never blocking: a FIFO named like a bundle is refused at once), takes its identity from fstat,
reads with pread from that same descriptor and compares the identity again afterwards, so a read
returns the bytes of one version of the file or raises BundleError naming it. Nothing is mapped:
a file truncated under us is an error, never SIGBUS. Packages (.tpk/.tpkx/.vtpk) are read the same
way, their entries located from the central directory read when the package was listed.
"""
from __future__ import annotations

import os
import stat
import struct
import threading
import time
import zipfile
import zlib
from collections import OrderedDict

from tilecrate import _bundle
from tilecrate.errors import BundleError, CacheError

FileId = tuple  # (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_SMALL_LIMIT = 64 << 20           # metadata files (conf.xml, root.json, .bundlx) larger than this are refused
_INFLATE_LIMIT = 256 << 20        # a deflated bundle is inflated into memory: refuse zip bombs and giants
_INFLATED_CACHE = 8               # inflated bundles kept per package...
_INFLATED_BYTES = 256 << 20       # ...and their bytes (the newest always): 8 giants were 2 GiB a package
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, struct.error, ValueError,
               OverflowError, EOFError, OSError, UnicodeDecodeError, KeyError, IndexError, TypeError)


class Gone(CacheError):
    """The file (a bundle removed from the cache) no longer exists."""


class Stale(CacheError):
    """The package file is not the one whose central directory was read: list it again."""


def file_id(st: os.stat_result) -> FileId:
    """The identity of a file's current content: (device, inode, size, mtime and ctime in ns). The ctime,
    which no caller can set, tells apart what the rest cannot: a rewrite that puts the old mtime back
    (`cp -p`, `rsync -t`, `touch -r`) and a new file of the same size on a reused inode."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def changed(label: str) -> BundleError:
    """The one error for a file that changed while a request was reading it."""
    return BundleError(f"{label}: the file changed while it was being read; retry the request")


def open_regular(path: str, label: str) -> tuple[int, os.stat_result]:
    """(fd, fstat) of a regular file opened for reading; never blocks (FIFOs, devices are refused)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise Gone(f"{label}: the file no longer exists") from None
    except OSError as e:
        raise CacheError(f"{label}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise CacheError(f"{label}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CacheError(f"{label}: not a regular file")
    return fd, st


def pread_exact(fd: int, n: int, offset: int, label: str) -> bytes:
    """Exactly `n` bytes at `offset`, or BundleError (the file is shorter than it was)."""
    try:
        data = os.pread(fd, n, offset)
    except OSError as e:
        raise CacheError(f"{label}: cannot read ({e.strerror})") from None
    if len(data) != n:
        raise changed(label)
    return data


def read_head(path: str, n: int) -> bytes:
    """Up to the first `n` bytes of a regular file (a source's magic); a FIFO or device is refused,
    never waited on."""
    fd, _ = open_regular(path, path)
    try:
        return os.pread(fd, n, 0)
    except OSError as e:
        raise CacheError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)


def read_regular(path: str, label: str, limit: int = _SMALL_LIMIT) -> bytes:
    """The whole content of a small regular file, checked unchanged while read."""
    fd, st = open_regular(path, label)
    try:
        if st.st_size > limit:
            raise CacheError(f"{label}: {st.st_size} bytes, more than the {limit} a metadata file may have")
        data = pread_exact(fd, st.st_size, 0, label)
        if file_id(os.fstat(fd)) != file_id(st):
            raise changed(label)
        return data
    finally:
        os.close(fd)


class FileRange(tuple):
    """(path, offset of the bundle's first byte, the file's size), with `file_id`, the identity of the
    file the bundle's index was read from (None when unknown)."""

    def __new__(cls, path: str, offset: int, size: int, fid: FileId | None = None):
        self = super().__new__(cls, (path, offset, size))
        self.file_id = fid
        return self

    def __reduce__(self):
        return (FileRange, (self[0], self[1], self[2], self.file_id))


class Source:
    """One bundle's bytes, open for one read: preads from one descriptor (or from inflated memory),
    `check()` proves the file is still the version `key` names."""

    def __init__(self, label: str, key: tuple, length: int, *, fd: int = -1, base: int = 0,
                 fid: FileId | None = None, path: str | None = None, memory: bytes | None = None,
                 bundlx: bytes | None = None, watch: tuple = ()):
        self.label = label
        self.key = key                  # identity of everything the index depends on (cache key)
        self.length = length            # bytes of the .bundle
        self.fd = fd
        self.base = base
        self.fid = fid                  # identity of the file `fd` reads
        self.path = path
        self.memory = memory
        self.bundlx = bundlx
        self.watch = watch              # ((path, identity), ...) that must still hold for this version
        self.users = 0                  # readers holding it (Cache's held descriptors)
        self.retired = False
        self.paths_checked = time.monotonic()   # when `watch` was last compared with the paths

    def still_current(self) -> bool:
        """Whether every watched path still names the version this source reads (one stat each)."""
        for path, fid in self.watch:
            try:
                if file_id(os.stat(path)) != fid:
                    return False
            except OSError:
                return False
        return True

    @property
    def where(self) -> FileRange | None:
        """The file and offset holding the bundle; None for an inflated entry (memory only)."""
        if self.memory is not None or self.path is None:
            return None
        return FileRange(self.path, self.base, self.fid[2], self.fid)

    def pread(self, offset: int, n: int) -> bytes:
        """`n` bytes of the bundle from `offset` (BundleError past its end or if the file shrank)."""
        if offset < 0 or n < 0 or offset + n > self.length:
            raise BundleError(f"{self.label}: {n} bytes at offset {offset} are past the end of the bundle "
                              f"({self.length} bytes)")
        if self.memory is not None:
            return self.memory[offset:offset + n]
        return pread_exact(self.fd, n, self.base + offset, self.label)

    def pread_current(self, offset: int, n: int) -> tuple[bytes | None, bool]:
        """(`n` bytes from `offset`, whether the file is still this version after the read), the
        read and its fstat done in the compiled core; (None, False) if the file ended first."""
        if offset < 0 or n < 0 or offset + n > self.length:
            raise BundleError(f"{self.label}: {n} bytes at offset {offset} are past the end of the bundle "
                              f"({self.length} bytes)")
        if self.memory is not None:
            return self.memory[offset:offset + n], True
        try:
            data, current = _bundle.pread_checked(self.fd, self.base + offset, n, self.fid)
        except OSError as e:
            raise CacheError(f"{self.label}: cannot read ({e.strerror})") from None
        return data, current and data is not None

    def is_current(self) -> bool:
        """Whether the open file is still this version (one fstat; memory is always current)."""
        if self.fd < 0:
            return True
        try:
            return file_id(os.fstat(self.fd)) == self.fid
        except OSError:
            return False

    def check(self) -> None:
        """BundleError unless the file is still the version the read started on."""
        if self.fd < 0:
            return
        try:
            now = file_id(os.fstat(self.fd))
        except OSError as e:
            raise CacheError(f"{self.label}: cannot read ({e.strerror})") from None
        if now != self.fid:
            raise changed(self.label)

    def close(self) -> None:
        """Close the descriptor (safe to call twice)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FolderStore:
    """Bundles of a cache folder: one file each (V1: plus its .bundlx)."""

    kind = "folder"

    def open(self, bundle: str, bundlx: str | None, label: str) -> Source:
        """Open a bundle for one read."""
        fd, st = open_regular(bundle, label)
        try:
            fid = file_id(st)
            bx = None
            key: tuple = fid
            watch: tuple = ((bundle, fid),)
            if bundlx is not None:
                bx_label = bundlx
                bfd, bst = open_regular(bundlx, bx_label)
                try:
                    if bst.st_size > _bundle.BUNDLX_SIZE:
                        raise BundleError(f"{label}: .bundlx is {bst.st_size} bytes, expected {_bundle.BUNDLX_SIZE}")
                    bx = pread_exact(bfd, bst.st_size, 0, bx_label)
                    if file_id(os.fstat(bfd)) != file_id(bst):
                        raise changed(bx_label)
                finally:
                    os.close(bfd)
                key = (fid, file_id(bst))
                watch += ((bundlx, file_id(bst)),)
            if st.st_size == 0:
                raise BundleError(f"{label}: the file is empty")
            return Source(label, key, st.st_size, fd=fd, fid=fid, path=bundle, bundlx=bx, watch=watch)
        except BaseException:
            os.close(fd)
            raise

    def read_small(self, name: str, label: str | None = None) -> bytes:
        """A small file (metadata) in full."""
        return read_regular(name, label or name)

    def close(self) -> None:
        """Nothing is held open between reads."""


class ZipStore:
    """Entries of a package, located from its central directory; every read checks that the package
    is still the file that directory was read from (`Stale` otherwise)."""

    kind = "zip"

    def __init__(self, path: str):
        self.path = path
        fd, st = open_regular(path, path)
        try:
            self.fid = file_id(st)
            f = os.fdopen(os.dup(fd), "rb")
            try:
                with zipfile.ZipFile(f) as zf:
                    self.infos = {i.filename: i for i in zf.infolist()}
            except _ZIP_ERRORS as e:
                raise CacheError(f"{path}: not a readable zip package ({type(e).__name__}: {e})") from None
            finally:
                f.close()
            if file_id(os.fstat(fd)) != self.fid:
                raise changed(path)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._starts: dict[str, int] = {}
        self._inflated: OrderedDict[tuple, bytes] = OrderedDict()
        self._inflated_bytes = 0

    def _fd(self, label: str) -> int:
        fd, st = open_regular(self.path, label)
        if file_id(st) != self.fid:
            os.close(fd)
            raise Stale(f"{label}: the package changed since it was opened")
        return fd

    def _start(self, fd: int, name: str, label: str) -> int:
        start = self._starts.get(name)
        if start is not None:
            return start
        info = self.infos[name]
        size = self.fid[2]
        if info.header_offset + 30 > size:
            raise BundleError(f"{label}: the entry's header is past the end of the package (truncated?)")
        hdr = pread_exact(fd, 30, info.header_offset, label)
        if hdr[:4] != b"PK\x03\x04":
            raise BundleError(f"{label}: bad local file header")
        name_len, extra_len = struct.unpack("<HH", hdr[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.compress_size > size:
            raise BundleError(f"{label}: the entry runs past the end of the package (truncated download?)")
        self._starts[name] = start
        return start

    def _entry_bytes(self, fd: int, name: str, label: str, limit: int) -> bytes:
        """An entry's content in memory: read (stored) or inflated (deflated), CRC-checked when inflated."""
        info = self.infos[name]
        if info.file_size > limit:
            raise BundleError(f"{label}: the entry holds {info.file_size} bytes, more than the {limit} "
                              "tilecrate reads into memory")
        start = self._start(fd, name, label)
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise BundleError(f"{label}: a stored entry whose sizes disagree (corrupt central directory)")
            return pread_exact(fd, info.compress_size, start, label)
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise BundleError(f"{label}: compression method {info.compress_type} is not supported "
                              "(entries must be stored or deflated)")
        d = zlib.decompressobj(-15)
        out = bytearray()
        pos, end = start, start + info.compress_size
        try:
            while pos < end and not d.eof:
                chunk = pread_exact(fd, min(1 << 20, end - pos), pos, label)
                pos += len(chunk)
                out += d.decompress(chunk, info.file_size + 1 - len(out))
                if len(out) > info.file_size:
                    break
        except zlib.error as e:
            raise BundleError(f"{label}: the deflated entry is corrupt ({e})") from None
        if len(out) != info.file_size or not d.eof or zlib.crc32(out) != info.CRC:
            raise BundleError(f"{label}: the deflated entry is corrupt (its size or CRC-32 does not match)")
        return bytes(out)

    def read_small(self, name: str, label: str | None = None) -> bytes:
        """A small entry (metadata, .bundlx) in full."""
        label = label or f"{self.path}!{name}"
        fd = self._fd(label)
        try:
            data = self._entry_bytes(fd, name, label, _SMALL_LIMIT)
            if file_id(os.fstat(fd)) != self.fid:
                raise changed(label)
            return data
        finally:
            os.close(fd)

    def open(self, bundle: str, bundlx: str | None, label: str) -> Source:
        """Open a bundle entry for one read."""
        fd = self._fd(label)
        try:
            info = self.infos[bundle]
            bx = self._entry_bytes(fd, bundlx, label, _SMALL_LIMIT) if bundlx is not None else None
            key = (self.fid, bundle)
            if info.compress_type == zipfile.ZIP_STORED:
                start = self._start(fd, bundle, label)
                if info.compress_size == 0:
                    raise BundleError(f"{label}: the entry is empty")
                return Source(label, key, info.compress_size, fd=fd, base=start, fid=self.fid, path=self.path,
                              bundlx=bx, watch=((self.path, self.fid),))
            with self._lock:
                data = self._inflated.get(key)
                if data is not None:
                    self._inflated.move_to_end(key)
            if data is None:
                data = self._entry_bytes(fd, bundle, label, _INFLATE_LIMIT)
                with self._lock:
                    old = self._inflated.pop(key, None)
                    self._inflated_bytes += len(data) - (len(old) if old is not None else 0)
                    self._inflated[key] = data
                    while len(self._inflated) > 1 and (len(self._inflated) > _INFLATED_CACHE
                                                       or self._inflated_bytes > _INFLATED_BYTES):
                        self._inflated_bytes -= len(self._inflated.popitem(last=False)[1])
            if not data:
                raise BundleError(f"{label}: the entry is empty")
            os.close(fd)
            fd = -1
            return Source(label, key, len(data), memory=data, bundlx=bx, watch=((self.path, self.fid),))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def close(self) -> None:
        """Nothing is held open between reads."""
        with self._lock:
            self._inflated.clear()
            self._inflated_bytes = 0

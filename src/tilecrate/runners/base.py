"""What every runner shares: the records and checks of tilecrate.results, and moving outputs into place."""
from __future__ import annotations

import errno
import os
import shutil

from tilecrate.package.tempfiles import temp_path
from tilecrate.results import CancelFlag, ExportProgress, ExportResult, check_cancel, os_error

__all__ = ["ExportProgress", "ExportResult", "CancelFlag", "check_cancel", "remove", "os_error",
           "sibling_temp", "fsync_tree", "move_into_place"]


def remove(path: str) -> None:
    """Remove a file or a folder tree, ignoring what is already gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def sibling_temp(path: str) -> str:
    """A hidden name next to `path` for this process (a rename away from `path`); the stale-temp
    sweep (tilecrate.package.tempfiles) removes it if this process dies."""
    return temp_path(os.path.abspath(path))


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str, parent: str | None = None) -> None:
    """fsync an output (a file, or every file and folder of a cache folder) and, when given, the
    folder naming it."""
    if os.path.isdir(path):
        for folder, _, files in os.walk(path):
            for name in files:
                _fsync(os.path.join(folder, name), os.O_RDONLY)
            _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)
    else:
        _fsync(path, os.O_RDONLY)
    if parent is not None:
        _fsync(parent, os.O_RDONLY | os.O_DIRECTORY)


def move_into_place(src: str, dest: str) -> None:
    """Move a finished output to `dest`: a rename, or across file systems a copy to a hidden name next
    to `dest`, synced, then renamed, so `dest` never shows a half-written file."""
    if os.path.isdir(dest):
        os.rmdir(dest)          # an empty folder of the same name (export() checked it is empty)
    try:
        os.replace(src, dest)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    tmp = sibling_temp(dest)
    try:
        if os.path.isdir(src):
            shutil.copytree(src, tmp)
        else:
            shutil.copyfile(src, tmp)       # copy_file_range / sendfile inside
        fsync_tree(tmp)
        os.replace(tmp, dest)
    except BaseException:
        remove(tmp)
        raise
    remove(src)

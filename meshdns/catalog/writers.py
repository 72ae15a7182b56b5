"""Is somebody still writing the catalog file? (Linux inotify, read without blocking.)

A file rewritten in place (``cat > catalog.yaml``, ``(head; sleep; tail) > catalog.yaml``) is
truncated first and written in pieces; a pause of any length between two pieces leaves a
document that may well parse, with part of the catalog in it. What tells a finished file from
a paused one is whether its writer has closed it: inotify reports every write (``IN_MODIFY``)
and every close of a file opened for writing (``IN_CLOSE_WRITE``). The folder holding the file
is watched, by the file's name, so a file deleted and written anew is seen too.

Where inotify is missing (not Linux, no watches left) ``WriterWatch.busy`` is always False and
the file source falls back on letting the file hold still for a moment, retrying a document
that fails to parse, and its reload guards.

The same descriptor tells the file source when to look at all (``fd`` turns readable): every
event in the file's folder, and in the folder of the name as given when a symlink leads
elsewhere (a ConfigMap swaps its ``..data`` link there), so a quiet file costs no wake-ups.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                                            use_errno=True)
    _libc.inotify_init1  # noqa: B018 - present only on Linux
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _libc = None


class WriterWatch:
    """Writes to one file name in one folder, and whether the last one is closed yet."""

    def __init__(self, path: Path) -> None:
        self.fd = -1
        self.wd = -1  # the watch of the file's own folder (the other only wakes the source)
        self.folder: str | None = None
        self.name = b""
        self.writing = False  # a write seen and no close after it yet
        self.path = path

    def busy(self) -> bool:
        """True while a writer has the file open after writing to it."""
        self._follow()
        if self.fd < 0:
            return False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return False
            for wd, mask, name in _events(data):
                if mask & IN_Q_OVERFLOW:
                    self.writing = False  # lost track: the callers' other checks apply
                elif name != self.name or wd != self.wd:
                    continue
                elif mask & (IN_MODIFY | IN_CREATE):
                    self.writing = True
                elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO | IN_DELETE):
                    self.writing = False
        return self.writing

    def _follow(self) -> None:
        """Watch the folder the file is really in (a ConfigMap's symlinks move it)."""
        if _libc is None:
            return
        try:
            real = os.path.realpath(self.path)
        except OSError:
            return
        folder, name = os.path.split(real)
        if folder == self.folder and self.fd >= 0:
            return
        self.close()
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return
        mask = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
        wd = _libc.inotify_add_watch(fd, os.fsencode(folder), mask)
        if wd < 0:
            os.close(fd)
            return
        given = os.path.dirname(os.path.abspath(self.path))
        if given != folder:  # a symlink: its own folder's changes matter too (for waking)
            _libc.inotify_add_watch(fd, os.fsencode(given), mask)
        self.fd, self.wd, self.folder, self.name = fd, wd, folder, os.fsencode(name)
        self.writing = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.wd, self.folder = -1, -1, None


def _events(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos + _EVENT.size <= len(data):
        wd, mask, _cookie, size = _EVENT.unpack_from(data, pos)
        pos += _EVENT.size
        out.append((wd, mask, data[pos:pos + size].rstrip(b"\0")))
        pos += size
    return out


__all__ = ["WriterWatch"]

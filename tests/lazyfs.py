"""A LazyFS-style FUSE filesystem for power-cut tests: written data stays in this process's
memory ("the page cache") until fsync; killing the process is a power cut.

    python tests/lazyfs.py BACKING MOUNTPOINT

Mirrors BACKING at MOUNTPOINT. Reads see every write; a file's data reaches BACKING only on
fsync (or fdatasync) of that file, page by page, then an fsync of the backing file. So after a
SIGKILL of this process (and `umount -l MOUNTPOINT`), BACKING holds exactly what was fsynced.
Names (create, unlink, rename, mkdir) go to BACKING at once, as on a journaling filesystem that
commits metadata eagerly; the data model is the part that matters for SQLite and our sidecar
(LazyFS's default "cache everything until fsync" mode does the same).

Prints "ready" on stdout once mounted.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # fusepy, on libfuse 2

PAGE = 4096


class _File:
    __slots__ = ("data", "dirty", "resized")

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.dirty: set[int] = set()
        self.resized = False


class LazyFS(Operations):  # type: ignore[misc]
    # Not registered with libfuse: the kernel then keeps POSIX locks locally (SQLite needs them).
    lock = None
    # No extended attributes: SQLite does not need them.
    getxattr = listxattr = setxattr = removexattr = None

    def __init__(self, root: str) -> None:
        self.root = root
        self.mutex = threading.RLock()
        self.files: dict[str, _File] = {}
        self.fh = 0

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _load(self, path: str) -> _File:
        f = self.files.get(path)
        if f is None:
            with open(self._full(path), "rb") as src:
                f = self.files[path] = _File(src.read())
        return f

    def _next_fh(self) -> int:
        self.fh += 1
        return self.fh

    # -- metadata: straight to the backing directory --------------------------------------------

    def init(self, path: str) -> None:
        print("ready", flush=True)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        with self.mutex:
            try:
                st = os.lstat(self._full(path))
            except OSError as exc:
                raise FuseOSError(exc.errno) from exc
            attrs = {k: getattr(st, k) for k in ("st_atime", "st_ctime", "st_gid", "st_mode",
                                                 "st_mtime", "st_nlink", "st_size", "st_uid")}
            f = self.files.get(path)
            if f is not None:
                attrs["st_size"] = len(f.data)
            return attrs

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._full(path), amode):
            raise FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._full(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._full(path))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid)

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._full(path), times)

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._full(path))
        return {k: getattr(st, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize",
                                            "f_favail", "f_ffree", "f_files", "f_flag",
                                            "f_frsize", "f_namemax")}

    def unlink(self, path: str) -> None:
        with self.mutex:
            os.unlink(self._full(path))
            self.files.pop(path, None)

    def rename(self, old: str, new: str) -> None:
        with self.mutex:
            os.rename(self._full(old), self._full(new))
            f = self.files.pop(old, None)
            self.files.pop(new, None)
            if f is not None:
                self.files[new] = f

    # -- data: in memory until fsync ------------------------------------------------------------

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self.mutex:
            full = self._full(path)
            existed = os.path.exists(full)
            os.close(os.open(full, os.O_WRONLY | os.O_CREAT, mode))
            if not existed:
                self.files[path] = _File(b"")
            return self._next_fh()

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            if flags & os.O_TRUNC:
                self.truncate(path, 0)
            return self._next_fh()

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            f = self.files.get(path)
            if f is not None:
                return bytes(f.data[offset:offset + size])
            with open(self._full(path), "rb") as src:
                src.seek(offset)
                return src.read(size)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            f = self._load(path)
            end = offset + len(data)
            if end > len(f.data):
                f.data.extend(b"\0" * (end - len(f.data)))
                f.resized = True
            f.data[offset:end] = data
            f.dirty.update(range(offset // PAGE, (end - 1) // PAGE + 1))
            return len(data)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        with self.mutex:
            f = self._load(path)
            if length < len(f.data):
                del f.data[length:]
            elif length > len(f.data):
                old = len(f.data)
                f.data.extend(b"\0" * (length - old))
                f.dirty.update(range(old // PAGE, (length - 1) // PAGE + 1))
            f.resized = True

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            f = self.files.get(path)
            if f is None or not (f.dirty or f.resized):
                return 0
            fd = os.open(self._full(path), os.O_WRONLY)
            try:
                size = len(f.data)
                for page in sorted(f.dirty):
                    start = page * PAGE
                    if start < size:
                        os.pwrite(fd, bytes(f.data[start:min(size, start + PAGE)]), start)
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            f.dirty.clear()
            f.resized = False
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        return 0  # names are durable at once

    def flush(self, path: str, fh: int) -> int:
        return 0  # close() is not fsync: nothing reaches the disk

    def release(self, path: str, fh: int) -> int:
        return 0


def main() -> None:
    backing, mountpoint = sys.argv[1], sys.argv[2]
    FUSE(LazyFS(os.path.abspath(backing)), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()

"""One writer per output: an exclusive lock file ``<path>.lock`` held while a process writes ``path``.

The lock is an advisory ``flock`` on the lock file, so it dies with its process (a SIGKILLed run
leaves no stale lock); the file holds the owner's process id, which the refusal names ("in use by
process N"). Within one process the lock is re-entrant: the runner and the writer of the same run
share it. The lock file is removed on release; a process that opened it just before that re-checks
that the path still names the file it locked, so two processes never both believe they hold it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import TrajectoryFileError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; every lock is granted
    fcntl = None

__all__ = ["OutputLock", "lock_path", "holder"]

_HELD: dict[str, list] = {}  # lock path -> [file descriptor, count, owning pid]


def lock_path(path) -> Path:
    """The lock file of ``path``: ``<path>.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "?"


def holder(path) -> str | None:
    """The process id ("?" when unknown) of the process that holds the lock on ``path``, or None
    when no process holds it; creates nothing."""
    file = lock_path(path)
    if fcntl is None or not file.exists():
        return None
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _owner(fd)
    finally:
        os.close(fd)  # closing releases a shared lock we took
    return None


class OutputLock:
    """The lock on ``path`` (see the module docstring); use as a context manager or call
    :meth:`acquire` / :meth:`release`. ``what`` names the thing locked in the refusal."""

    def __init__(self, path, what: str | None = None):
        self.path = Path(path)
        self.file = lock_path(self.path)
        self.what = what or str(self.path)
        self._key = str(self.file.absolute())
        self.held = False

    def acquire(self) -> "OutputLock":
        if self.held:
            return self
        entry = _HELD.get(self._key)
        if entry is not None and entry[2] != os.getpid():  # inherited through fork: not ours
            del _HELD[self._key]
            entry = None
        if entry is not None:
            entry[1] += 1
            self.held = True
            return self
        if fcntl is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd = self._lock()
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        else:  # pragma: no cover
            fd = -1
        _HELD[self._key] = [fd, 1, os.getpid()]
        self.held = True
        return self

    def _lock(self) -> int:
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _owner(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise TrajectoryFileError(f"{self.what}: cannot lock {self.file} ({exc.strerror})") from exc
                raise TrajectoryFileError(
                    f"{self.what}: in use by process {owner} (lock {self.file}); wait for that run to end or "
                    "stop it, or write to another output"
                ) from None
            # The holder may have released (and removed) the file between our open and our lock.
            try:
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        entry = _HELD.get(self._key)
        if entry is None or entry[2] != os.getpid():
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[self._key]
        fd = entry[0]
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.file)  # while still locked: a waiting process re-checks the inode
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()

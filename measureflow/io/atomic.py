"""Replace a file atomically: readers see the old file or the new one, never a torn one.

:func:`atomic_replace` hands out a temporary path ``<path>.tmp-<pid>`` in the same directory (a
rename is atomic only within one file system); the caller writes it however it likes (torch.save,
h5py, plain text). On a normal exit the temporary is fsynced, renamed over ``path`` with
:func:`os.replace` (atomic on POSIX and Windows) and the directory is fsynced, so the rename itself
survives a power cut. On an exception the temporary is removed and the exception propagates; a
process killed mid-write leaves its temporary behind, and the next successful replace of the same
path removes it once that process is gone.

Example::

    with atomic_replace(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_replace", "fsync_directory", "io_failure"]


def io_failure(path, doing: str, exc: BaseException):
    """The one-line :class:`~measureflow.errors.TrajectoryFileError` for an I/O failure while
    writing ``path`` (disk full, …), with the errno cause when the error carries one (h5py and torch
    put it in their message as ``errno = N``)."""
    from ..errors import TrajectoryFileError

    code = getattr(exc, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code:
        cause = f"{errno.errorcode.get(code, 'errno ' + str(code))}: {os.strerror(code)}"
    else:
        lines = str(exc).strip().splitlines()
        cause = lines[0] if lines else type(exc).__name__
    return TrajectoryFileError(
        f"{path}: cannot {doing} ({cause}); the frames flushed before and the last checkpoint are intact: "
        "fix the cause (free disk space), then run again with --resume"
    )


def fsync_directory(directory: Path) -> None:
    """fsync a directory so that a rename in it is durable (a no-op where not possible)."""
    # Not possible on every platform (e.g. Windows), where the rename is still atomic.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    # fsync flushes the file's data whatever descriptor it is called on, so a writer that closed its
    # own handle (h5py, torch.save into a file it opened) is covered by reopening.
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _temporary_name(path: Path, pid: int) -> Path:
    return path.with_name(f"{path.name}.tmp-{pid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: leave its file alone
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``path``'s temporaries left by writers killed mid-write (their process is gone)."""
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:
                pass


@contextlib.contextmanager
def atomic_replace(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically (module docstring).

    The parent directory is created if missing. Returns nothing; ``path`` holds the new content once
    the ``with`` block has exited without an exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, os.getpid())
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        # Never leave a half-written temporary behind when we are still alive to clean it up.
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_directory(path.parent)
    _remove_stale_temporaries(path)

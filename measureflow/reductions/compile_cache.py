"""Where the fused kernels' compiled code outlives the process: torch's on-disk caches, in a lasting directory.

``torch.compile`` keeps what inductor generated (the FX graph cache: C++ source and the built
shared library; the AOTAutograd cache: the traced graph that points at it) under
``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_$USER`` — emptied by a reboot or a
tmp cleaner, after which the next process pays the full compile again (tens of seconds). Before
its first compile, measureflow points that variable at :func:`default_directory` unless the user
set it to another directory (torch writes its own default into the variable when ``torch._dynamo``
is imported, so that value counts as unset). A fresh process at any N then finds the kernel
compiled once per machine, torch version, dtype and static configuration, and only traces and
loads it. Caches are keyed by content, so kernels compiled earlier in /tmp stay valid; they are
just not found from the new directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "default_directory", "use_lasting_directory"]

#: The variable torch reads for the root of its on-disk compile caches.
ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/measureflow/inductor``, or ``~/.cache/measureflow/inductor`` without XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "measureflow" / "inductor"


def _torch_default() -> str | None:
    """torch's own default directory (under the temporary directory), or None if this torch has none."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return os.path.abspath(default_cache_dir())


def use_lasting_directory() -> str | None:
    """The compile-cache directory this process uses, set to :func:`default_directory` if unset
    or holding torch's default.

    Returns None (torch keeps its own default) when no home directory can be found or the
    directory cannot be created: a cache in /tmp is slower to keep, never wrong.
    """
    current = os.environ.get(ENV)
    if current and os.path.abspath(current) != _torch_default():
        return current
    try:
        path = default_directory()
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError, KeyError):  # no home (RuntimeError/KeyError) or not creatable
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        return None
    os.environ[ENV] = str(path)
    return str(path)

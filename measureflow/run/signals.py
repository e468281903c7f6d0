"""SIGTERM as a stop request: a run ends cleanly at the end of its current step."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

__all__ = ["install_sigterm"]


def install_sigterm(flag: threading.Event) -> Callable[[], None]:
    """Make SIGTERM set ``flag`` (a loop polling it can end cleanly at the end of its current step);
    returns the function that puts the previous handler back. Outside the main thread, where
    handlers cannot be installed, nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        flag.set()

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return lambda: None

    def restore():
        with contextlib.suppress(Exception):
            signal.signal(signal.SIGTERM, previous)

    return restore

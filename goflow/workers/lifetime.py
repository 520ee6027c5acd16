"""A worker process's lifetime is its parent's: no orphan outlives the coordinator or supervisor."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (no orphans)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

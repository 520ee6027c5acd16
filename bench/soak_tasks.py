"""The python nodes `make soak` runs (imported by every worker from bench/)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def work(ms: float, value=None):
    """Sleep ``ms`` milliseconds (an I/O-bound node), return ``value``."""
    time.sleep(ms / 1000)
    return value


def crunch(n: int):
    """A short CPU-bound node."""
    return sum(i * i for i in range(int(n)))


def flaky(counter_dir: str, key: str, failures: int):
    """Fail the first ``failures`` calls for ``key`` (a retry must follow), then succeed."""
    path = Path(counter_dir) / key
    count = int(path.read_text()) if path.exists() else 0
    path.write_text(str(count + 1))
    if count < failures:
        raise ConnectionError(f"transient failure {count + 1} of {failures}")
    return {"attempts": count + 1, "pid": os.getpid()}

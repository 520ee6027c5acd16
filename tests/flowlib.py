"""Callables for ``python`` nodes in the tests (imported by real worker processes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def noop():
    return None


def add(a, b):
    return a + b


def echo(value):
    return value


def timed(seconds: float, value=None):
    """Sleep, then report when and where it ran (for overlap checks)."""
    start = time.time()
    time.sleep(seconds)
    return {"value": value, "start": start, "end": time.time(), "pid": os.getpid()}


def fail(message: str = "boom"):
    raise ValueError(message)


def flaky(counter_file: str, failures: int):
    """Fail ``failures`` times (counted in ``counter_file``), then return the attempt number."""
    path = Path(counter_file)
    count = int(path.read_text()) if path.exists() else 0
    path.write_text(str(count + 1))
    if count < failures:
        raise ConnectionError(f"transient failure {count + 1}")
    return count + 1


def crash_once(marker_file: str):
    """SIGKILL our own worker process the first time; succeed afterwards."""
    path = Path(marker_file)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return {"recovered": True, "pid": os.getpid(), "first_pid": int(path.read_text())}


def stuck_in_c(seconds: float):
    """Block in C (time.sleep) so cooperative cancellation cannot interrupt it."""
    time.sleep(seconds)
    return "finished"


def spin(seconds: float):
    """Busy Python loop (interruptible by cooperative cancellation)."""
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        n += 1
    return n


def not_serializable():
    return object()


def write_file(path: str, text: str):
    Path(path).write_text(text)
    return path


def append(path: str, text: str):
    """Append a line to ``path`` (to count how often a node really ran)."""
    with open(path, "a") as handle:
        handle.write(text + "\n")
    return text


def chatty(lines: int, secret: str = ""):
    """Log at every level, print a secret, then ``lines`` numbered lines; report progress."""
    import logging

    import goflow

    log = logging.getLogger("flowlib.chatty")
    log.debug("debug record")
    log.info("info record")
    log.warning("warning record")
    log.error("error record")
    log.critical("critical record")
    print(f"the secret is {secret}")
    print("to stderr", file=__import__("sys").stderr)
    for i in range(lines):
        print(f"line {i}")
        if i % 100 == 0:
            goflow.progress(i, lines, f"printed {i}")
    return lines


def wait_for_file(path: str, lines: int = 3):
    """Print ``lines`` lines, then wait until ``path`` exists (the test creates it once it saw them)."""
    for i in range(lines):
        print(f"waiting line {i}", flush=True)
    deadline = time.time() + 60
    while not Path(path).exists() and time.time() < deadline:
        time.sleep(0.01)
    return Path(path).exists()


def hold_gil(seconds: int):
    """Hold the GIL for ``seconds`` in one C call (libc ``sleep`` through ctypes.PyDLL, which
    keeps the GIL), as a long ``sum(range(...))`` or a huge jq program does: no other thread
    of this interpreter runs meanwhile."""
    import ctypes

    ctypes.PyDLL("libc.so.6").sleep(int(seconds))
    return "held"


def write_then_sleep(marker_file: str, seconds: float):
    """Announce the start (the test waits on the file), then work for ``seconds``."""
    Path(marker_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {"slept": seconds}


def append_when(path: str, text: str, release: str):
    """Wait (up to 60 s) until ``release`` exists, then append ``text`` to ``path``."""
    deadline = time.time() + 60
    while not Path(release).exists() and time.time() < deadline:
        time.sleep(0.01)
    return append(path, text)


def big_text(size: int) -> str:
    """A string of ``size`` bytes (for the result size limit)."""
    return "x" * size


def wide(lines: int, width: int, first: int = 0):
    """Print one line of ``first`` characters (if any), then ``lines`` lines of ``width``."""
    if first:
        print("w" * first)
    for i in range(lines):
        print(str(i).ljust(width, "x"))
    return lines


def babble(seconds: float):
    """Print a line every 5 ms for ``seconds``; when cancelled, go on printing for 0.3 s
    (a cleanup that talks), then let the cancellation through."""
    end = time.time() + seconds
    i = 0
    try:
        while time.time() < end:
            print(f"babble {i}")
            i += 1
            time.sleep(0.005)
    except BaseException:
        stop = time.time() + 0.3
        while time.time() < stop:
            print("cleaning up")
            time.sleep(0.005)
        raise
    return i

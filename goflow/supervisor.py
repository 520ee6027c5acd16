"""One supervisor for worker processes: start them, notice exits, restart with backoff, stop.

Used by ``goflow-worker`` (its own loop polls it) and by the coordinator for the local
workers of ``goflow run`` and ``goflow-coordinator --local-workers`` (the broker polls it on
its liveness timer), so both restart, name and stop workers the same way:

* children are named ``PREFIX-N``, with ``.G`` from their second start on: a fresh identity
  per start, because the coordinator may still hold the previous connection;
* a child that exits is restarted after 0.5 s doubling up to ``max_backoff``, reset once it
  stayed up for a minute; exit code 75 (it lost the coordinator) restarts it at once, 77
  and 78 (its handshake failed) with the backoff, as the key may be admitted later;
* stopping sends SIGTERM to every child at once (a worker finishes what it holds and says
  goodbye; one still starting holds nothing) and SIGKILL to what is left after the grace.

It also holds the one policy for every child process a goflow parent manages (workers, the
history writer, the run display): :func:`spawn_managed`. Ctrl-C is the parent's: a
terminal sends SIGINT to the whole foreground process group, and the parent cancels, drains
and stops its children itself, so a managed child must never see that SIGINT, not even
while its interpreter is still starting.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

_BOOT = "from goflow.supervisor import run_managed_child; run_managed_child()"
"""What a managed child runs first (``python -c``, see :func:`run_managed_child`)."""
_PR_SET_PDEATHSIG = 1


def managed_command(command: Sequence[str], ignore: Sequence[int] = (signal.SIGINT,), *,
                    parent: int | None = None) -> list[str]:
    """``command`` rewritten to start as :func:`run_managed_child` says:
    ``python -c BOOT --ignore 2,15 [--parent PID] -m MOD ARGS...``.

    ``python -m MOD ARGS`` and ``python SCRIPT ARGS`` (this interpreter) then run in the child
    itself (one interpreter start); the module name stays an argument of its own (``ps`` and
    ``/proc/PID/cmdline`` still show it). Any other command is exec'd, which keeps the
    ignored dispositions."""
    command = [str(arg) for arg in command]
    prefix = [sys.executable, "-c", _BOOT, "--ignore", ",".join(str(int(s)) for s in ignore),
              *(["--parent", str(parent)] if parent is not None else [])]
    if command[:1] == [sys.executable] and len(command) > 2 and command[1] == "-m":
        return [*prefix, *command[1:]]
    if command[:1] == [sys.executable] and len(command) > 1 and not command[1].startswith("-"):
        return [*prefix, *command[1:]]
    return [*prefix, "--exec", *command]


def run_managed_child() -> None:
    """The first code of a child started by :func:`spawn_managed` (``sys.argv`` as
    :func:`managed_command` made it): ignore the signals, then unblock them (blocked since
    the fork, none could interrupt the interpreter's start); with ``--parent PID``, have the
    kernel SIGKILL this process when that parent dies, and exit at once if it already has
    (a parent interrupted while it was starting children must not leave them running).
    Then run the command as ``python -m MOD``/``python SCRIPT`` would, or exec it (``--exec``)."""
    import runpy

    argv = sys.argv[1:]   # sys.argv[0] is "-c"
    options: dict[str, str] = {}
    while len(argv) >= 2 and argv[0] in ("--ignore", "--parent"):
        options[argv[0]] = argv[1]
        argv = argv[2:]
    if "--ignore" not in options or not argv or (argv[0] in ("-m", "--exec") and len(argv) < 2):
        raise SystemExit("usage: python -c BOOT --ignore SIGNUMS [--parent PID] "
                         "(-m MODULE | SCRIPT | --exec PROGRAM) ARGS...")
    ignore = [int(n) for n in options["--ignore"].split(",") if n]
    for signum in ignore:
        signal.signal(signum, signal.SIG_IGN)   # discards any of them pending since the fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ignore)
    if "--parent" in options:
        _die_with_parent(int(options["--parent"]))
    kind, rest = argv[0], argv[1:]
    if kind == "-m":
        sys.argv = rest
        sys.path[0] = os.getcwd()   # as -m has it ("" under -c)
        runpy._run_module_as_main(rest[0])   # what `python -m` itself runs
    elif kind == "--exec":
        for name in ("SIGPIPE", "SIGXFSZ"):   # as Popen(restore_signals=True): this interpreter ignores them
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.execvp(rest[0], rest)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(kind))
        runpy.run_path(kind, run_name="__main__")


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL when ``parent`` dies (the kernel's parent-death signal), and exit now if
    it is already gone (then this process was adopted: its parent id changed). Elsewhere: nothing."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, ImportError):
        return
    if os.getppid() != parent:
        os._exit(1)


def spawn_managed(command: Sequence[str], *, ignore: Sequence[int] = (signal.SIGINT,),
                  die_with_parent: bool = False, **popen: Any) -> subprocess.Popen:
    """Start a child the calling process manages, immune to ``ignore`` (SIGINT: Ctrl-C) from
    its first instruction on: the signals are blocked in the calling thread around the fork
    (the child inherits the mask; a signal arriving meanwhile waits, pending, in the child
    and is discarded when the boot ignores it) and ignored and unblocked by the child before
    it imports anything of goflow. Ignoring a signal only after the imports (as a child's
    ``main`` did) left the first ~0.1-0.5 s open: a Ctrl-C then killed the child with a
    traceback (the history writer: "Fatal Python error: init_import_site").

    ``die_with_parent``: the child is killed when this process dies (the kernel's parent-death
    signal: strictly, when the spawning thread ends), from its first instruction on too; for
    workers, not for the history writer, which must outlive its parent.

    The parent's own handling is untouched: a signal sent to it during the call is delivered
    to another thread, or to this one once the call returns. No ``preexec_fn`` (unsafe with
    threads) and no new process group (the child stays in the terminal's job)."""
    ignore = tuple(ignore)
    command = managed_command(command, ignore, parent=os.getpid() if die_with_parent else None)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ignore)
    try:
        return subprocess.Popen(command, **popen)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


EXIT_COORDINATOR_LOST = 75
"""A worker's exit code when it heard nothing from the coordinator for its liveness time."""
EXIT_KEY_REFUSED = 77
"""A worker's exit code when the coordinator refused its CURVE key (sysexits' EX_NOPERM): a
socket refused in the handshake is never retried by ZeroMQ, so only a new process can try."""
EXIT_SECURITY_MISMATCH = 78
"""A worker's exit code when its handshake failed on the security mechanism (sysexits'
EX_CONFIG): CURVE on one side only, or the endpoint is not a goflow coordinator's."""
HANDSHAKE_FAILURES = {
    EXIT_KEY_REFUSED: "was refused by the coordinator (its CURVE key is not authorized there)",
    EXIT_SECURITY_MISMATCH: "failed its handshake (CURVE on one side only, or not a goflow workers endpoint)",
}
BACKOFF_BASE = 0.5
STABLE_AFTER = 60.0
"""A child up this long counts as healthy again: its backoff starts over."""


class Child:
    """One supervised process slot."""

    __slots__ = ("index", "generation", "process", "started", "failures", "restart_at", "name")

    def __init__(self, index: int):
        self.index = index
        self.generation = 0
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0
        self.name = ""


class WorkerProcesses:
    """``count`` worker processes made by ``command(name)``, kept running until :meth:`stop`.

    ``env``: the children's environment (None: inherited). ``log``/``exit_level``: where and
    how loudly exits and restarts are told.
    """

    def __init__(self, count: int, command: Callable[[str], list[str]], *, prefix: str,
                 env: dict[str, str] | None = None, max_backoff: float = 30.0,
                 log: logging.Logger | None = None, exit_level: int = logging.WARNING):
        self.command = command
        self.prefix = prefix
        self.env = env
        self.max_backoff = max_backoff
        self.log = log or logging.getLogger("goflow.worker")
        self.exit_level = exit_level
        self.children = [Child(i + 1) for i in range(count)]
        self.closing = False
        self.restarts = 0

    def start(self) -> None:
        """Start every child; interrupted meanwhile (Ctrl-C), stop those already started."""
        try:
            for child in self.children:
                self._spawn(child)
        except BaseException:
            self.closing = True
            for child in self.alive():   # (nothing to drain yet: none has taken a task)
                child.process.kill()
            for child in self.children:
                if child.process is not None:
                    child.process.wait()
                    child.process = None
            raise

    def _spawn(self, child: Child) -> None:
        child.generation += 1
        child.name = f"{self.prefix}-{child.index}" + (f".{child.generation}" if child.generation > 1 else "")
        # (SIGINT ignored: Ctrl-C on `goflow run` or a hand-run `goflow-worker` reaches the whole
        # group; the parent stops its workers with SIGTERM, see stop())
        child.process = spawn_managed(self.command(child.name), die_with_parent=True, env=self.env,
                                      stdin=subprocess.DEVNULL)
        child.started = time.monotonic()
        self.log.info("started worker %s (pid %d)", child.name, child.process.pid,
                      extra={"fields": {"worker": child.name, "pid": child.process.pid}})

    def poll(self) -> list[tuple[str, int]]:
        """Notice children that exited (returned as ``(name, exit code)``) and restart the
        ones whose backoff is over; nothing restarts once :meth:`stop` began."""
        exited = []
        now = time.monotonic()
        for child in self.children:
            if child.process is not None:
                code = child.process.poll()
                if code is not None:
                    exited.append((child.name, code))
                    self._exited(child, code)
            if child.process is None and not self.closing and now >= child.restart_at:
                self._spawn(child)
        return exited

    def _exited(self, child: Child, code: int) -> None:
        uptime = time.monotonic() - child.started
        child.process = None
        if self.closing:
            return
        if uptime >= STABLE_AFTER:
            child.failures = 0
        if code == EXIT_COORDINATOR_LOST:
            delay = 0.0 if child.failures == 0 else min(self.max_backoff, BACKOFF_BASE * 2 ** (child.failures - 1))
            why = "lost the coordinator; reconnecting"
        else:
            delay = min(self.max_backoff, BACKOFF_BASE * 2 ** child.failures)
            if code in HANDSHAKE_FAILURES:
                why = HANDSHAKE_FAILURES[code]
            else:
                why = f"exited with code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
        child.failures += 1
        child.restart_at = time.monotonic() + delay
        self.restarts += 1
        self.log.log(self.exit_level, "worker %s %s after %.1fs; restarting in %.1fs", child.name, why, uptime,
                     delay, extra={"fields": {"worker": child.name, "code": code, "uptime_s": round(uptime, 3),
                                              "restart_in_s": delay}})

    def owns(self, name: str) -> bool:
        return any(child.name == name and child.process is not None for child in self.children)

    def alive(self) -> list[Child]:
        return [c for c in self.children if c.process is not None and c.process.poll() is None]

    def kill(self, name: str | None = None) -> None:
        """SIGKILL the child named ``name`` (every child when None); :meth:`poll` sees the exit."""
        for child in self.alive():
            if name is None or child.name == name:
                child.process.kill()

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM every child at once, wait up to ``grace`` seconds, then SIGKILL what is left."""
        self.closing = True
        alive = self.alive()
        for child in alive:
            try:
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for child in alive:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker %s did not stop within the grace period; killing it", child.name)
                child.process.kill()
                child.process.wait()
        for child in self.children:
            child.process = None

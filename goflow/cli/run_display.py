"""What ``goflow run`` shows while it runs, drawn by a process of its own.

On a terminal it is the live view (:mod:`goflow.cli.run_view`); elsewhere one line per
node and execution event (:func:`plain_line`). The view follows the run's whole stream
from its first event with a reliable :class:`~goflow.events.monitor.Monitor`.

It runs in a child process (``python -m goflow.cli.run_display``) because decoding every
event and rendering the table cost about as much GIL time as the run itself (a 20k-node
fan-out: ~6 CPU-s), and in the coordinator's process that time was taken from the
reactor: watching a big run made it up to twice as slow. The child draws on the terminal
it inherits and exits after the execution's terminal event. It ignores Ctrl-C (the parent
cancels the run, and the view shows that to the end) from its first instruction on
(:func:`goflow.supervisor.spawn_managed` starts it so: ignoring it only in :func:`main`,
after the imports, let an early Ctrl-C end the view with a traceback), and it exits when its
parent is gone (its stdin, a pipe from the parent, closes).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from goflow.cli.event_lines import log_line

if TYPE_CHECKING:
    from goflow.events.monitor import Monitor
    from goflow.events.types import Event

NODE_EVENTS = ("node.started", "node.completed", "node.failed", "node.skipped", "node.retrying", "node.cancelled")
STOP_WAIT_S = 5.0
"""How long :meth:`DisplayProcess.stop` waits for the view to show the terminal event."""


def plain_line(event: "Event", started: float) -> str | None:
    """The log line of a node or execution event (None for the others)."""
    if event.type not in NODE_EVENTS and not event.type.startswith("execution."):
        return None
    return log_line(event, started)


class DisplayProcess:
    """The parent's handle on the display child of one execution."""

    def __init__(self, events: str, control: str, execution_id: str, *, full: bool):
        self.command = [sys.executable, "-m", "goflow.cli.run_display", "--events", events, "--control", control,
                        "--execution", execution_id, *(["--full"] if full else [])]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the child (with SIGINT ignored: Ctrl-C is the parent's); the run goes on
        without a view (and says so) if it cannot start."""
        from goflow.supervisor import spawn_managed

        try:
            self.process = spawn_managed(self.command, stdin=subprocess.PIPE)
        except OSError as exc:
            print(f"goflow run: no event display: {exc}", file=sys.stderr)

    def stop(self) -> None:
        """Wait (briefly) for the view to show the terminal event, then make sure it is gone."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        finally:
            if self.process.stdin is not None:
                self.process.stdin.close()


def follow(monitor: "Monitor", execution_id: str, *, full: bool) -> None:
    """Show ``execution_id``'s stream on stdout until its terminal event."""
    from goflow.events.filter import EventFilter

    events = monitor.subscribe(EventFilter(executions=[execution_id]), reliable=True, since="start",
                               until=lambda event: event.is_terminal)
    if sys.stdout.isatty():
        _live(monitor, events, full)
    else:
        _lines(events, time.time())


def _lines(events: Any, started: float) -> None:
    for event in events:
        if event.type == "execution.started":
            started = event.ts
        line = plain_line(event, started)
        if line:
            print(line, flush=True)


def _live(monitor: "Monitor", events: Any, full: bool) -> None:
    """The live view; with ``full`` (``goflow run --watch``) the recent events too."""
    from goflow.cli.run_view import LiveDisplay, RunView

    view = RunView(recent_events=12 if full else 0, stats=lambda: dict(monitor.stats))
    with LiveDisplay(view, sys.stdout) as display:
        for event in events:
            display.put(event)


def _exit_when_orphaned() -> None:
    """Our stdin is the parent's pipe: it reads EOF only when the parent has gone. (The raw
    descriptor, not ``sys.stdin``: a daemon thread blocked in the buffered reader holds its
    lock, and the interpreter aborts at exit when it cannot take it.)"""
    while os.read(0, 4096):
        pass
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m goflow.cli.run_display",
                                     description="The event display of `goflow run` (started by it).")
    parser.add_argument("--events", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--execution", required=True)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # already so when `goflow run` started us
    threading.Thread(target=_exit_when_orphaned, name="goflow-display-parent", daemon=True).start()
    from goflow.cli.common import silence_stdout
    from goflow.errors import GoflowError
    from goflow.events.monitor import Monitor

    monitor = Monitor(args.events, args.control)
    try:
        follow(monitor, args.execution, full=args.full)
    except GoflowError as exc:
        print(f"goflow run: event display stopped: {exc}", file=sys.stderr)
    except BrokenPipeError:  # e.g. `goflow run ... | head`: the reader is gone, the run goes on
        silence_stdout()
    finally:
        monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

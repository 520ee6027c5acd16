"""The ``goflow`` command line."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING

from goflow import __version__

if TYPE_CHECKING:
    import argparse
    import threading
    from types import FrameType


COMMAND_MODULES: dict[str, str] = {
    "validate": "validate", "run": "run", "watch": "watch",
    "server": "server_commands", "tools": "server_commands",
    "submit": "remote", "status": "remote", "cancel": "remote", "ls": "remote", "workers": "remote",
    "keys": "remote",
    "executions": "history", "execution": "history", "logs": "history", "prune": "history",
    "dashboard": "dashboard",
}
"""Each command's module in goflow.cli, in the order ``goflow --help`` lists them."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``command`` (a known one) of its module's only.

    Startup is part of every run a user waits for: a command imports what it needs and
    nothing else (``goflow run`` never imports the history viewer's event models).
    """
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="goflow", description="Run GoFlow-compatible workflows on worker "
                                                                "processes and watch every step live.")
    parser.add_argument("--version", action="version", version=f"goflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(wanted):
        module = importlib.import_module(f"goflow.cli.{name}")
        (getattr(module, "add_parser", None) or module.add_parsers)(subparsers)
    return parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    import argparse

    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a mistyped command gets a "did you mean", and an unknown flag is
    reported with the usage of the command it was given to (argparse's default is the
    top-level usage). Exits 2 on either, as argparse does."""
    import argparse
    import difflib

    commands = _commands(parser)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command is not None and command not in commands:
        close = difflib.get_close_matches(command, list(commands), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        parser.error(f"unknown command {command!r}{hint} (goflow --help lists the commands)")
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = commands.get(getattr(args, "command", None) or "")
        while sub is not None:   # the innermost command (e.g. `goflow server add`)
            inner = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
            name = getattr(args, inner.dest, None) if inner is not None and inner.dest else None
            if inner is None or name not in inner.choices:
                break
            sub = inner.choices[name]
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


_redelivery: "threading.Timer | None" = None
REDELIVER_AFTER_S = 0.005


def _on_sigint(signum: int, frame: "FrameType | None") -> None:
    """Ctrl-C in a command: KeyboardInterrupt in the main thread, as Python's own handler.

    Except while the main thread runs the import system's own code: CPython calls some of it
    from C (a module lock's weakref callback) and prints and drops an exception raised there
    ("Exception ignored in ... _get_module_lock"), so that Ctrl-C was lost and the run went on
    to its end. There the signal is delivered again a moment later (outside that code)."""
    global _redelivery
    if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        import os
        import threading

        _redelivery = threading.Timer(REDELIVER_AFTER_S, os.kill, (os.getpid(), signal.SIGINT))
        _redelivery.daemon = True
        _redelivery.start()
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status.

    Ctrl-C at any moment, from the first import of a command's module on, ends the command
    with ``interrupted`` on stderr and status 130 (128 + SIGINT), never a traceback: building
    the parser imports the command's modules, which is most of a short command's time (and
    argparse itself is imported in here, not when this module is)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:   # (not when started with Ctrl-C ignored, e.g. by nohup)
        try:
            signal.signal(signal.SIGINT, _on_sigint)
        except ValueError:   # not the main thread (goflow.cli.main called from a thread): not ours
            previous = None
    else:
        previous = None
    try:
        parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
        args = _parse(parser, argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): not an error
        from goflow.cli.common import silence_stdout

        silence_stdout()
        return 0
    finally:
        if previous is not None:
            if _redelivery is not None:   # the command ended before a deferred Ctrl-C came back
                _redelivery.cancel()
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())

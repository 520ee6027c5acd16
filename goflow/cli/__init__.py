"""The ``goflow`` command line."""

from __future__ import annotations

import argparse
import sys

from goflow import __version__


def build_parser() -> argparse.ArgumentParser:
    from goflow.cli import dashboard, history, run, validate, watch
    from goflow.cli.remote import add_parsers as add_remote_parsers
    from goflow.cli.server_commands import add_parsers as add_server_parsers

    parser = argparse.ArgumentParser(prog="goflow", description="Run GoFlow-compatible workflows on worker "
                                                                "processes and watch every step live.")
    parser.add_argument("--version", action="version", version=f"goflow {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    validate.add_parser(subparsers)
    run.add_parser(subparsers)
    watch.add_parser(subparsers)
    add_server_parsers(subparsers)
    add_remote_parsers(subparsers)
    history.add_parsers(subparsers)
    dashboard.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): not an error
        from goflow.cli.common import silence_stdout

        silence_stdout()
        return 0


if __name__ == "__main__":
    sys.exit(main())

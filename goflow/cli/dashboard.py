"""``goflow dashboard EVENTS --control CONTROL --http HOST:PORT``: the web dashboard of any stream."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    from goflow.web.server import add_arguments

    parser = subparsers.add_parser("dashboard", help="serve the live web dashboard of an event stream",
                                   description="Serve the live web dashboard of a published goflow event stream "
                                               "(docs/web.md).")
    add_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from goflow.web.server import run_from_args

    return run_from_args(args)

"""``goflow validate FILE...``: report every problem, compiler style."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from goflow.cli.common import print_problems
from goflow.language.loader import check, read


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("validate", help="check workflow files and report every problem",
                                   description="Check workflow files. Prints FILE:LINE:COL: severity: message "
                                               "for each problem; exits 0 when every file is valid, 2 otherwise.")
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--json", action="store_true", help="print the problems as a JSON array")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    problems = []
    invalid = 0
    for file in args.files:
        loaded = check(read(file))
        problems.extend(loaded.problems)
        invalid += bool(loaded.errors)
    if args.json:
        print(json.dumps([p.to_dict() for p in problems], indent=2))
    else:
        print_problems(problems, stream=sys.stdout)
        errors = sum(p.severity == "error" for p in problems)
        warnings = len(problems) - errors
        files = len(args.files)
        if invalid:
            print(f"{errors} error(s), {warnings} warning(s) in {invalid} of {files} file(s)")
        else:
            print(f"{files} file(s) valid" + (f", {warnings} warning(s)" if warnings else ""))
    return 2 if invalid else 0

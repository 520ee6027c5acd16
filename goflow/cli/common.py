"""Helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import IO, Any, Collection, Iterable

from goflow.language.problems import Problem
from goflow.states import TERMINAL_STATUSES, RunStatus

LISTED_STATUSES: tuple[str, ...] = (RunStatus.RUNNING.value, *sorted(s.value for s in TERMINAL_STATUSES))
"""The statuses a listing filters on (``goflow ls --status``): running or ended."""
HISTORY_STATUSES: tuple[str, ...] = ("submitted", *LISTED_STATUSES)
"""The statuses of the history's executions (``goflow executions --status``): the history
says ``submitted`` for a run not started yet (docs/history.md)."""


def positive_seconds(text: str) -> float:
    """An argparse type for a duration in seconds that must be > 0 (``--timeout``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):   # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds > 0 (leave it out for no limit)")
    return value


def positive_int(text: str) -> int:
    """An argparse type for a count that must be at least 1 (``--limit``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def endpoint(text: str) -> str:
    """An argparse type for a ZeroMQ endpoint to connect to, checked by the one endpoint
    check (:func:`goflow.security.endpoint_host`, as the coordinator checks its own)."""
    from goflow.security import endpoint_host

    try:
        endpoint_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_value(text: str) -> Any:
    """A ``--var`` value: JSON when it is valid JSON (``5``, ``true``, ``[1]``), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def string_variables(workflow: Any) -> frozenset[str]:
    """The workflow's ``type: string`` variables, whose ``--var`` text is taken as it is
    (``--var code=007`` is the text "007", not the number 7: GoFlow's ``--var`` gives text)."""
    return frozenset(v.name for v in getattr(workflow, "variables", ()) if v.type == "string")


def parse_vars(pairs: Iterable[str], input_file: str | None = None,
               strings: Collection[str] = frozenset()) -> dict[str, Any]:
    """Variables from ``--input FILE.json`` overlaid with ``--var NAME=VALUE`` pairs; a
    ``--var`` for a name in ``strings`` is its text, any other is :func:`parse_value`'s.

    Raises ValueError with a message that says how to fix the input.
    """
    variables: dict[str, Any] = {}
    if input_file:
        try:
            data = json.loads(Path(input_file).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read --input {input_file}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"--input {input_file} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--input {input_file} must hold a JSON object of variables")
        variables.update(data)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--var {pair!r} must look like NAME=VALUE")
        name = name.strip()
        variables[name] = value if name in strings else parse_value(value)
    return variables


def print_problems(problems: list[Problem], stream: IO[str] = sys.stderr) -> None:
    for problem in problems:
        print(problem, file=stream)


def time_text(ts: float | None) -> str:
    """The one time format of the CLI: local ISO 8601 to the second, with the UTC offset."""
    if not isinstance(ts, (int, float)) or not ts:
        return "-"
    return _dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def with_execution_id(row: dict) -> dict:
    """A history row as the CLI prints it in JSON: ``execution_id``, as every command says."""
    return {"execution_id": row.get("id"), **{k: v for k, v in row.items() if k != "id"}}


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone (`goflow ... | head`), so later
    writes and the interpreter's final flush do not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)

"""Execution ids: one policy for every place an id enters goflow.

An id is part of every event topic (``<type>/<execution_id>/[<node_id>/]``), of history
rows and of prefix lookups (``goflow status 3f2a``), so it must be a plain token: a ``/``
would put one execution's events under another's topic prefix (a subscriber of the victim
would receive them), and a non-string breaks every later prefix match. Ids are generated
(32 hex digits) unless the caller chooses one, and a chosen id is validated where it
enters: control ``submit``, :func:`goflow.start`/``run``, the embedded runtime, recovery.
"""

from __future__ import annotations

import re
import uuid

MAX_LENGTH = 64
ALPHABET = "A-Z a-z 0-9 _ -"
_VALID = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_LENGTH)


def new_execution_id() -> str:
    """A fresh id: 32 lowercase hex digits (a random UUID)."""
    return uuid.uuid4().hex


def problem(value: object) -> str | None:
    """Why ``value`` is not a valid execution id, or None if it is."""
    if not isinstance(value, str):
        return f"an execution id must be a string, not {type(value).__name__}"
    if not _VALID.fullmatch(value):
        return (f"execution id {value[:80]!r} is invalid: use 1-{MAX_LENGTH} characters of {ALPHABET} "
                f"(or give none to get a generated one)")
    return None


def checked(value: object) -> str:
    """``value`` if it is a valid execution id; raises ValueError saying why not."""
    reason = problem(value)
    if reason is not None:
        raise ValueError(reason)
    return value  # type: ignore[return-value]


def given_or_new(value: object) -> str:
    """A caller's id (validated), or a generated one when none (None or "") was given."""
    return new_execution_id() if value is None or value == "" else checked(value)

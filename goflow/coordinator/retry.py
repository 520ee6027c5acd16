"""The retry decision: whether a failed attempt runs again, and after what delay.

One place for the rule (docs/semantics.md): an error's classes are its ``type`` (an
:class:`~goflow.errors.ErrorKind`) and, for python nodes, its exception's class name. A
node's ``retry.non_retryable_errors`` wins if it names any class; otherwise ``retry.on``
(empty: every class) must name one. GoFlow's documented class names (its RetryExecutor's
``connection_error``, ``timeout_error``, ``validation``, ``data``, ``execution``, ...) stand
for the goflow kinds in :data:`GOFLOW_CLASSES`. A node without a ``retry:`` policy is retried only
when its worker was lost (3 attempts, no delay): a crashed worker should cost a retry, not
the run.
"""

from __future__ import annotations

import functools
import random

from goflow.errors import ErrorKind
from goflow.language.model import RetryPolicy

_INPUT_KINDS = (ErrorKind.EXPRESSION_ERROR, ErrorKind.UNDEFINED_VARIABLE)
GOFLOW_CLASSES: dict[str, tuple[str, ...]] = {
    "connection_error": (ErrorKind.CONNECTION, ErrorKind.SERVER_LOST),
    "timeout_error": (ErrorKind.TIMEOUT,),
    "validation": _INPUT_KINDS,
    "validation_error": _INPUT_KINDS,
    "data": (ErrorKind.TRANSFORM_ERROR, *_INPUT_KINDS),
    "transform": (ErrorKind.TRANSFORM_ERROR, *_INPUT_KINDS),
    "transform_error": (ErrorKind.TRANSFORM_ERROR, *_INPUT_KINDS),
    "execution": tuple(ErrorKind),
    "execution_error": tuple(ErrorKind),
}
"""GoFlow's retry class names, as the goflow error kinds they stand for."""

WORKER_LOST_POLICY = RetryPolicy(max_attempts=3, initial_delay=0.0, max_delay=0.0, jitter=False)
JITTER = 0.25
"""Jittered delays are drawn uniformly from +/-25% of the computed delay."""


def error_classes(error: dict) -> tuple[str, ...]:
    """The names a retry policy may use for ``error``: its type, then its exception class."""
    classes = [str(error.get("type") or "")]
    if error.get("exception"):
        classes.append(str(error["exception"]))
    return tuple(classes)


@functools.lru_cache(maxsize=256)
def _named(names: tuple[str, ...]) -> frozenset[str]:
    """The classes a policy list names: its names, GoFlow's expanded to goflow's kinds."""
    out = set(names)
    for name in names:
        out.update(str(kind) for kind in GOFLOW_CLASSES.get(name, ()))
    return frozenset(out)


def backoff_delay(policy: RetryPolicy, retry_number: int) -> float:
    """The delay in seconds before retry ``retry_number`` (1-based), before jitter."""
    if policy.backoff == "fixed":
        base = policy.initial_delay
    else:
        base = policy.initial_delay * policy.backoff_multiplier ** min(retry_number - 1, 64)
    return min(base, policy.max_delay)


def retry_delay(policy: RetryPolicy | None, error: dict, attempt: int) -> float | None:
    """Seconds to wait before attempt ``attempt + 1`` of a node, or None when it fails for good."""
    classes = error_classes(error)
    if policy is None:
        if classes[0] != ErrorKind.WORKER_LOST:
            return None
        policy = WORKER_LOST_POLICY
    if attempt >= policy.max_attempts:
        return None
    if any(name in _named(tuple(policy.non_retryable_errors)) for name in classes):
        return None
    if policy.on and not any(name in _named(tuple(policy.on)) for name in classes):
        return None
    delay = backoff_delay(policy, attempt)
    if policy.jitter and delay > 0:
        delay *= random.uniform(1 - JITTER, 1 + JITTER)
    return delay


def max_attempts(policy: RetryPolicy | None, error: dict) -> int:
    """How many attempts ``policy`` allows for ``error`` (what ``node.retrying`` reports)."""
    if policy is None:
        return WORKER_LOST_POLICY.max_attempts if error_classes(error)[0] == ErrorKind.WORKER_LOST else 1
    return policy.max_attempts

"""The coordinator <-> worker protocol, version 1 (documented in docs/protocol.md).

Each worker process holds two DEALER sockets connected to the coordinator's ROUTER:

* the **task lane** (identity ``<worker_id>``): ``ready`` -> ``welcome``; ``task`` (or a
  ``tasks`` batch) in, ``result`` (or a ``results`` batch) out. A worker announces ``credits`` (how many tasks it accepts in advance,
  :data:`DEFAULT_CREDITS` unless told) so it always has its next task in hand; each ``result`` returns one credit.
* the **control lane** (identity ``<worker_id>.ctl``), served by a process of its own
  (goflow.workers.control_lane) so it keeps working while a task holds the GIL:
  ``heartbeat`` both ways, ``cancel``, ``shutdown`` and ``reconnect`` in.
* draining (graceful stop): ``drain`` out on the task lane, ``drained`` in once the
  coordinator sends nothing more; the worker finishes what it holds, then ``bye``.
* the **log lane** (identity ``<worker_id>.log``, out only): ``log`` batches of the running
  task's output lines and progress (goflow/workers/capture.py).

Every message is one msgpack map with a ``t`` (type) key; unknown or malformed messages
are counted and dropped, never fatal.
"""

from __future__ import annotations

import re
from typing import Any

import msgpack

VERSION = 1
DEFAULT_CREDITS = 32
"""Tasks a worker accepts in advance unless told otherwise. The coordinator queues a task
behind another only when tasks like it were measured short, and then only as many as fit
its prefetch budget (goflow/coordinator/broker.py): deep credits pipeline short calls (a
batch of tasks in, a batch of results out) without making long ones wait."""
WORKER_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
"""What a worker's name may be: it is a topic segment (``worker.joined/<name>/``) and shows in
logs, pages and the ``workers`` op, so no ``/``, no control characters, bounded."""
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
CONTROL_SUFFIX = b".ctl"
LOG_SUFFIX = b".log"

# Message types.
READY = "ready"
WELCOME = "welcome"
TASK = "task"
RESULT = "result"
TASKS = "tasks"
RESULTS = "results"
HEARTBEAT = "heartbeat"
CANCEL = "cancel"
SHUTDOWN = "shutdown"
BYE = "bye"
LOG = "log"
"""A batch of a running task's output lines and latest progress, on the log lane."""
DRAIN = "drain"
"""Worker -> coordinator (task lane): send me nothing new; I finish what I hold, then leave."""
DRAINED = "drained"
"""Coordinator -> worker (task lane), after every task it sent: nothing more will come."""
RECONNECT = "reconnect"
"""Sent to a worker the coordinator does not know (it restarted, or declared the worker lost):
a worker that was welcomed before must drop what it holds and register again."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""MAXMSGSIZE of the workers socket on both ends: a larger frame would drop the connection."""
MAX_RESULT_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
"""The largest encoded result a worker sends (room left for a batch's envelope); a larger one
fails its node with a ``result_too_large`` error instead."""


class ProtocolError(ValueError):
    """A frame that is not a well-formed protocol message."""


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


_BATCH_KEYS = {kind: msgpack.packb("t") + msgpack.packb(kind) + msgpack.packb("items") for kind in (TASKS, RESULTS)}


def batch(kind: str, frames: list[bytes]) -> bytes:
    """``{"t": kind, "items": [...]}`` from already-encoded messages, without re-encoding them."""
    header = msgpack.Packer().pack_array_header(len(frames))
    return b"\x82" + _BATCH_KEYS[kind] + header + b"".join(frames)


def decode(frame: bytes) -> dict[str, Any]:
    """The message in ``frame``; raises :class:`ProtocolError` for anything malformed."""
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("t"), str):
        raise ProtocolError("not a protocol message (a map with a 't' key)")
    return message


def ready_problem(name: str, labels: Any) -> str | None:
    """Why a ``ready`` message cannot register a worker named ``name`` (None: it can)."""
    if not WORKER_NAME.fullmatch(name):
        return (f"worker name {name[:80]!r}{'...' if len(name) > 80 else ''} is not 1-128 characters of "
                "A-Z a-z 0-9 . _ : @ -")
    if labels is not None and not isinstance(labels, dict):
        return "labels must be a map"
    if labels and (len(labels) > MAX_LABELS or any(len(str(key)) > MAX_LABEL_CHARS or len(str(value)) > MAX_LABEL_CHARS
                                                   for key, value in labels.items())):
        return f"at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters each"
    return None

"""Event type names and the :class:`Event` model a subscriber receives.

The wire format itself (topics, payload keys) is documented in ``docs/events.md``; this
module is the single source of truth for the type names.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

from goflow.states import TERMINAL_EVENT_TYPES

#: Every event type the coordinator may publish, in one place.
EVENT_TYPES: tuple[str, ...] = (
    "execution.started",
    "execution.completed",
    "execution.failed",
    "execution.cancelled",
    "execution.resumed",
    "node.started",
    "node.completed",
    "node.failed",
    "node.skipped",
    "node.retrying",
    "node.cancelled",
    "node.log",
    "node.progress",
    "variable.changed",
    "condition.evaluated",
    "loop.started",
    "loop.iteration",
    "loop.completed",
    "progress.update",
    "worker.joined",
    "worker.lost",
    "heartbeat",
)

#: Types whose topic is keyed by a worker id (``<type>/<worker_id>/``); they carry no execution.
WORKER_TYPES: frozenset[str] = frozenset({"worker.joined", "worker.lost"})
HEARTBEAT = "heartbeat"
#: Types that belong to an execution (topic ``<type>/<execution_id>/[<node_id>/]``).
EXECUTION_SCOPED_TYPES: tuple[str, ...] = tuple(
    t for t in EVENT_TYPES if t not in WORKER_TYPES and t != HEARTBEAT)
#: The events that end one node attempt: every ``node.started`` is followed by exactly one.
NODE_ATTEMPT_END_TYPES: frozenset[str] = frozenset(
    {"node.completed", "node.failed", "node.retrying", "node.cancelled"})
#: The last event of an execution (until a later ``execution.resumed``).
TERMINAL_TYPES: frozenset[str] = TERMINAL_EVENT_TYPES

WIRE_VERSION = 2
"""2: events carry ``vseq`` (the variable state they saw) instead of the whole ``variables``
snapshot; the snapshot is rebuilt by the subscriber from ``variable.changed`` events
(``docs/events.md`` §1 "Variables"). 1: every event embedded the snapshot."""


class Event(BaseModel):
    """One decoded event: the payload keys of ``docs/events.md`` plus ``topic``.

    Unknown keys sent by a newer publisher are kept (``extra="allow"``).
    """

    model_config = ConfigDict(extra="allow", frozen=False)

    v: int = WIRE_VERSION
    type: str
    ts: float
    epoch: str
    seq: int
    eseq: int | None = None
    execution_id: str | None = None
    workflow: str | None = None
    node_id: str | None = None
    node_type: str | None = None
    status: str | None = None
    attempt: int | None = None
    vseq: int | None = None
    error: dict[str, Any] | None = None
    meta: dict[str, Any] = {}
    topic: str | None = None
    _snapshot: Any = PrivateAttr(default=None)
    """A :class:`~goflow.events.snapshots.SnapshotView`, set by the Monitor that delivered it."""

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def variables(self) -> dict[str, Any] | None:
        """The execution's variables snapshot when this event was emitted (GoFlow's API).

        Reconstructed on the client, on first access, by the reliable :class:`Monitor` that
        delivered the event (``goflow.events.snapshots``); ``{}`` for events outside an
        execution; None when unknown (decoded without a Monitor, raw delivery, or a base
        the coordinator could no longer provide). A fresh dict per access.
        """
        if self.execution_id is None:
            return {}
        view = self._snapshot
        return None if view is None else view.materialize()

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> "Event":
        """An Event from a well-formed decoded payload (what goflow publishes), without
        per-field validation: ~1 us instead of ~7 us for ``model_construct``. ``fields`` is
        used as the instance's storage; unknown keys become extras."""
        event = cls.__new__(cls)
        extra = None
        for key in [key for key in fields if key not in _FIELD_DEFAULTS]:
            if extra is None:
                extra = {}
            extra[key] = fields.pop(key)
        fields_set = set(fields)
        for key, default in _FIELD_DEFAULTS.items():
            if key not in fields:
                fields[key] = dict(default) if isinstance(default, dict) else default
        object.__setattr__(event, "__dict__", fields)
        object.__setattr__(event, "__pydantic_fields_set__", fields_set)
        object.__setattr__(event, "__pydantic_extra__", extra or {})
        object.__setattr__(event, "__pydantic_private__", {"_snapshot": None})
        return event

    def to_wire_dict(self) -> dict[str, Any]:
        """The payload as published plus ``topic`` (what ``goflow watch --json`` prints)."""
        return self.model_dump()


_FIELD_DEFAULTS: dict[str, Any] = {name: (None if info.is_required() else info.default)
                                   for name, info in Event.model_fields.items()}

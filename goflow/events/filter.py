"""Client-side event filters compiled to publisher-side topic prefixes."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .types import EVENT_TYPES, EXECUTION_SCOPED_TYPES, HEARTBEAT, TERMINAL_TYPES, WORKER_TYPES


def _tuple(x: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if x is None:
        return None
    if isinstance(x, str):
        return (x,)
    t = tuple(dict.fromkeys(x))   # dedupe, keep order
    return t or None


class EventFilter:
    """Select events by type, execution and node (each ``None`` = any).

    Semantics (all given criteria must hold):
    - ``types``: the event's type is one of them. Heartbeats match only when ``types``
      names ``"heartbeat"``.
    - ``executions``: the event belongs to one of them (worker events never do).
    - ``nodes``: the event's ``node_id`` is one of them; other execution-level events
      do not match, as in GoFlow.

    One exception, so a filter cannot trap a subscriber waiting for the end: the terminal
    events of an execution (``execution.completed``/``failed``/``cancelled``, see
    :data:`~goflow.events.types.TERMINAL_TYPES`) match whenever ``executions`` does,
    whatever ``types`` and ``nodes`` say. ``until=lambda ev: ev.is_terminal`` therefore
    always fires.

    :meth:`prefixes` compiles the filter into the narrowest ZeroMQ topic prefixes; since
    topics start with the type, a node filter without executions can only narrow by type
    and is completed by :meth:`matches` on arrival.
    """

    def __init__(self, types: Iterable[str] | str | None = None,
                 executions: Iterable[str] | str | None = None,
                 nodes: Iterable[str] | str | None = None):
        self.types = _tuple(types)
        self.executions = _tuple(executions)
        self.nodes = _tuple(nodes)
        if self.types:
            unknown = [t for t in self.types if t not in EVENT_TYPES and "/" in t]
            if unknown:
                raise ValueError(f"event types cannot contain '/': {unknown}")
        self._types_set = frozenset(self.types) if self.types else None
        self._exec_set = frozenset(self.executions) if self.executions else None
        self._node_set = frozenset(self.nodes) if self.nodes else None

    def __repr__(self) -> str:
        return (f"EventFilter(types={self.types!r}, executions={self.executions!r}, "
                f"nodes={self.nodes!r})")

    @property
    def is_empty(self) -> bool:
        return not (self.types or self.executions or self.nodes)

    def _scoped_types(self) -> tuple[str, ...]:
        """Types that can belong to an execution (what executions/nodes filters can match)."""
        if self.types:
            return tuple(t for t in self.types if t not in WORKER_TYPES and t != HEARTBEAT)
        return EXECUTION_SCOPED_TYPES

    def prefixes(self) -> list[str]:
        """Topic prefixes to subscribe to; ``[""]`` means everything."""
        if self.is_empty:
            return [""]
        ends = [f"{t}/{e}/" for t in TERMINAL_TYPES for e in self.executions] if self.executions \
            else [f"{t}/" for t in TERMINAL_TYPES]
        if not self.executions and not self.nodes:
            prefixes = [f"{t}/" for t in self.types]
        elif self.executions:
            types = self._scoped_types()
            if self.nodes:
                prefixes = [f"{t}/{e}/{n}/" for t in types for e in self.executions for n in self.nodes]
            else:
                prefixes = [f"{t}/{e}/" for t in types for e in self.executions]
        else:
            prefixes = [f"{t}/" for t in self._scoped_types()]   # nodes only: check on arrival
        return list(dict.fromkeys(prefixes + ends))

    def matches(self, event: Mapping[str, Any] | Any) -> bool:
        """Whether a decoded event (dict or :class:`~goflow.events.types.Event`) matches."""
        get = event.get if isinstance(event, Mapping) else (lambda k: getattr(event, k, None))
        etype = get("type")
        if etype in TERMINAL_TYPES and get("node_id") is None:
            return self._exec_set is None or get("execution_id") in self._exec_set
        if self._types_set is not None:
            if etype not in self._types_set:
                return False
        elif etype == HEARTBEAT:
            return False
        if self._exec_set is not None and get("execution_id") not in self._exec_set:
            return False
        if self._node_set is not None and get("node_id") not in self._node_set:
            return False
        return True

"""Client-side variables snapshots, rebuilt from ``variable.changed`` events.

Since wire version 2 an event no longer embeds the execution's variables; it carries
``vseq``, the ``eseq`` of the latest change to them (``docs/events.md`` §1 "Variables").
:class:`ExecutionSnapshot` applies the changes of one execution in ``eseq`` order and hands
out :class:`SnapshotView` objects, one per version, that an :class:`~goflow.events.types.Event`
keeps and materializes only when ``event.variables`` is read.

Cost: applying a change is O(1). A view that is still referenced when the next change
arrives keeps an undo record (name, previous value) instead of a copy, so holding events
costs O(changes), and reading ``event.variables`` costs O(variables + changes since that
event) once (the result is cached in the view).
"""

from __future__ import annotations

import weakref
from typing import Any

_MISSING = object()


class SnapshotView:
    """The snapshot of one execution at one version, materialized on demand.

    While current, ``_state`` is the tracker's live dict. When a change supersedes it,
    ``_state`` becomes None, ``_newer`` the next view and ``_undo`` the ``(name, previous
    value or _MISSING)`` that turns the newer snapshot back into this one.
    """

    __slots__ = ("_state", "_newer", "_undo", "_cache", "__weakref__")

    def __init__(self, state: dict[str, Any]):
        self._state: dict[str, Any] | None = state
        self._newer: SnapshotView | None = None
        self._undo: tuple[str, Any] | None = None
        self._cache: dict[str, Any] | None = None

    def materialize(self) -> dict[str, Any]:
        """A fresh dict holding the snapshot of this view's version."""
        if self._cache is None and self._state is not None:
            return dict(self._state)
        path: list[SnapshotView] = []
        view = self
        while view._cache is None and view._state is None:
            path.append(view)
            view = view._newer  # type: ignore[assignment]
        state = dict(view._cache if view._cache is not None else view._state)  # type: ignore[arg-type]
        for older in reversed(path):
            name, previous = older._undo  # type: ignore[misc]
            if previous is _MISSING:
                state.pop(name, None)
            else:
                state[name] = previous
        if path:
            self._cache, self._newer, self._undo = state, None, None
        return dict(state)


class ExecutionSnapshot:
    """One execution's variables as a subscriber rebuilds them.

    ``base``: the snapshot to start from (``{}`` from the execution's first event, else the
    ``variables`` control op's answer), None when unknown; ``base_vseq``: its version. An
    event whose ``vseq`` is older than ``base_vseq`` has no exact snapshot (its view is None).
    ``last_eseq``: the last event applied; the caller rebases when the next is not ``+1``.
    """

    def __init__(self, base: dict[str, Any] | None, base_vseq: int, last_eseq: int):
        self.known = base is not None
        self.state: dict[str, Any] = dict(base or {})
        self.base_vseq = base_vseq
        self.last_eseq = last_eseq
        self._view: weakref.ref[SnapshotView] | None = None

    def apply(self, eseq: int, vseq: int | None, type: str, meta: dict) -> None:
        """Apply one event (in eseq order). A ``variable.changed`` whose ``vseq`` equals its
        ``eseq`` sets the variable, unless the base already includes it."""
        self.last_eseq = eseq
        if type == "variable.changed" and vseq == eseq and eseq > self.base_vseq and self.known:
            self._set(str(meta.get("name")), meta.get("value"))

    def view(self, vseq: int | None) -> SnapshotView | None:
        """The view for an event that saw version ``vseq`` (just applied), or None if unknown."""
        if not self.known or vseq is None or vseq < self.base_vseq:
            return None
        view = self._view() if self._view is not None else None
        if view is None:
            view = SnapshotView(self.state)
            self._view = weakref.ref(view)
        return view

    def _set(self, name: str, value: Any) -> None:
        current = self._view() if self._view is not None else None
        if current is not None:   # someone holds the current version: keep how to get back to it
            newer = SnapshotView(self.state)
            current._state, current._newer = None, newer
            current._undo = (name, self.state.get(name, _MISSING))
            self._view = weakref.ref(newer)
        self.state[name] = value

"""Control-op answers for executions no longer in the coordinator's memory, from history.

The coordinator keeps only its ``keep_finished`` most recent finished executions in
memory; older ones, and executions a previous coordinator left behind (resumed elsewhere,
or failed as unresumable by recovery), are answered from the history store in the same
shape as the in-memory answers, with ``"source": "history"``. Reads are single-row lookups
by primary key (plus one indexed scan of the node rows for ``execution``), cheap enough for
the reactor thread.
"""

from __future__ import annotations

from typing import Any

from goflow.control.framing import ControlError
from goflow.history.store import AmbiguousId, HistoryError, NotFound


def recorded_execution(store: Any, execution_id: Any) -> dict[str, Any]:
    """The stored execution row for an id or unambiguous prefix; ControlError when absent."""
    if not isinstance(execution_id, str) or not execution_id:
        raise ControlError("not_found", f"no execution {execution_id!r}")
    try:
        return store.execution_row(execution_id)
    except AmbiguousId as exc:
        raise ControlError("bad_request", str(exc), details={"candidates": exc.candidates}) from None
    except NotFound:
        raise ControlError("not_found", f"no execution {execution_id!r}") from None
    except HistoryError as exc:
        raise ControlError("not_found", f"no execution {execution_id!r} ({exc})") from None


def status_from_history(store: Any, execution_id: Any) -> dict[str, Any]:
    """What the ``status`` op answers for an execution known only to the history."""
    row = recorded_execution(store, execution_id)
    return _summary(store, row)


def execution_from_history(store: Any, execution_id: Any) -> dict[str, Any]:
    """What the ``execution`` op answers: the summary, ``result``, main-graph ``nodes``."""
    row = recorded_execution(store, execution_id)
    nodes: dict[str, dict] = {}
    for attempt in store.node_attempts(row["id"]):
        if attempt.get("context") is None:   # the main graph, as the in-memory answer
            nodes[attempt["node_id"]] = {"status": attempt["status"], "attempt": attempt["attempt"]}
    return {**_summary(store, row), "result": row.get("result"), "nodes": nodes, "running": [], "records": []}


def variables_from_history(store: Any, execution_id: Any) -> dict[str, Any]:
    """What the ``variables`` op answers: the final variables as recorded (bounded, redacted),
    with the epoch and eseq of the execution's last recorded event."""
    row = recorded_execution(store, execution_id)
    variables = row.get("variables_out")
    if variables is None:
        variables = row.get("inputs") or row.get("variables_in") or {}
    return {"execution_id": row["id"], "variables": variables, "source": "history",
            "epoch": row.get("epoch"), "eseq": row.get("last_eseq")}


def _summary(store: Any, row: dict[str, Any]) -> dict[str, Any]:
    problem = store.history_problem(row["id"])
    return {"execution_id": row["id"], "workflow": row.get("workflow"), "status": row["status"],
            "started_at": row.get("started_at"), "finished_at": row.get("finished_at"),
            "error": row.get("error"), "progress": None, "source": "history",
            "history": {"recorded": problem is None, "problem": problem}}

"""What each event type's ``meta`` holds: declared once, documented in docs/events.md.

:data:`META_FIELDS` names every key the coordinator may put in an event's ``meta``, per
type; :data:`CONTEXT_FIELDS` are the keys that say where a node ran (inside a loop
iteration or a parallel branch) and may appear on any node-scoped event. The test suite
checks both ways: every key a real run emits is declared here, and every declared key is in
the docs' row for its type. Pure data, no imports, so the history store and metrics can
read it without pydantic.
"""

from __future__ import annotations

CONTEXT_FIELDS: frozenset[str] = frozenset({"loop", "index", "parallel", "branch"})
"""Where a node ran: ``loop`` + ``index`` inside a loop iteration, ``parallel`` + ``branch``
inside a parallel branch (nested containers: the innermost)."""

META_FIELDS: dict[str, frozenset[str]] = {
    "execution.started": frozenset({"inputs", "total_nodes", "preflight"}),
    "execution.completed": frozenset({"result", "duration_s"}),
    "execution.failed": frozenset({"duration_s"}),
    "execution.cancelled": frozenset({"duration_s"}),
    "execution.resumed": frozenset({"completed_nodes"}),
    "node.started": frozenset({"inputs"}),
    "node.completed": frozenset({
        "output", "duration_s", "started", "finished", "worker", "raw", "mcp", "resumed",
        "result", "return",                                       # condition, end nodes
        "iterations", "count", "broken", "break_index",           # loops
        "strategy", "branches", "conflicts",                      # parallel nodes
    }),
    "node.failed": frozenset({"duration_s", "worker"}),
    "node.skipped": frozenset({"reason"}),
    "node.retrying": frozenset({"next_attempt", "delay_s", "max_attempts", "worker"}),
    "node.cancelled": frozenset({"duration_s", "reason"}),
    "node.log": frozenset({"lines", "dropped", "lost_batches"}),
    "node.progress": frozenset({"progress", "total", "percent", "message"}),
    "variable.changed": frozenset({"name", "value", "old", "scope"}),
    "condition.evaluated": frozenset({"kind", "expression", "result"}),
    "loop.started": frozenset({"count", "max_parallel"}),
    "loop.iteration": frozenset({"item"}),
    "loop.completed": frozenset({"iterations", "count", "broken", "break_index"}),
    "progress.update": frozenset({"phase", "total", "resolved", "percent", "completed", "failed", "skipped",
                                  "cancelled", "running", "retries", "running_nodes"}),
    "worker.joined": frozenset({"worker_id", "pid", "host", "labels", "credits", "in_hand", "completed",
                                "local", "joined_at", "draining"}),
    "worker.lost": frozenset({"worker_id", "reason", "in_hand"}),
    "heartbeat": frozenset({"executions", "oldest_seq"}),
}


def undeclared(type: str, meta: dict) -> set[str]:
    """The keys of ``meta`` that :data:`META_FIELDS` does not declare for ``type``."""
    declared = META_FIELDS.get(type, frozenset())
    return {key for key in meta if key not in declared and key not in CONTEXT_FIELDS}

"""Crash recovery: resume what a previous coordinator left unfinished in the history store.

For each execution without a terminal event: main-graph nodes that completed are not run
again (their recorded outputs are restored), nodes that were in flight run again as new
attempts, and an ``execution.resumed`` event marks the restart. An execution that cannot
be resumed is marked failed with the reason, never silently dropped:

* its workflow text was not recorded, or no longer validates (e.g. a registered server it
  uses was removed);
* a secret variable was supplied at submission (secrets are never stored, so the run
  cannot be rebuilt faithfully: resubmit it);
* the previous coordinator could not write its history (disk full, read-only, ...: the
  store's :attr:`~goflow.history.store.Store.previous_failure`): nodes may have completed,
  and been reported, without being recorded, so running the execution again could run
  them twice.

Recovery never resumes or fails anything on a store that cannot be written now: what it
would run could not be recorded either, so the executions stay unfinished in the file
for a coordinator that can write it.

A completed node's restoration includes every change it made to the execution's variables
besides its output: a parallel node's or a concurrent loop's merge, and what the body of a
sequential loop wrote straight into them. A completed node whose recorded output or one of
those values was too large for the event stream (an ``$omitted`` marker) or is masked is
run again rather than restored with a placeholder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from goflow.coordinator.plan import initial_variables
from goflow.events import ids as execution_ids
from goflow.language.loader import check, parse
from goflow.language.model import Workflow
from goflow.language.validation import containers
from goflow.redaction import SECRET_MASK

log = logging.getLogger("goflow.coordinator.recovery")


@dataclass
class RecoveryReport:
    resumed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    """Why nothing was recovered (the store cannot be written), or None."""


def _omitted(value: Any) -> bool:
    return isinstance(value, dict) and value.get("$omitted") is True


def _holds_mask(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` shows a masked secret (``***``): history has the mask, not the data.

    Such an output is never restored as if it were data; its node runs again. A node whose
    real output contained the text ``***`` runs again too, which is safe, only slower.
    """
    if isinstance(value, str):
        return SECRET_MASK in value
    if depth > 32:
        return True
    if isinstance(value, list):
        return any(_holds_mask(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return any(_holds_mask(item, depth + 1) for item in value.values())
    return False


def _restorable(value: Any) -> bool:
    return not _omitted(value) and not _holds_mask(value)


def _writes_by_main_node(workflow: Workflow, writes: list[tuple[str, str, str | None, Any]]) -> dict[str, dict]:
    """Main-graph node id -> ``{name: last value}`` of the execution-level changes made while it
    ran, by itself or by a node inside it, its own output excepted (the restored output
    writes that). A name's last value is all the rest of the run can read."""
    inside = containers(workflow.nodes)
    by_node: dict[str, dict] = {}
    for node_id, name, scope, value in writes:
        owner = node_id
        while owner in inside:
            owner = inside[owner]
        if owner == node_id and scope == "node":
            continue
        by_node.setdefault(owner, {})[name] = value
    return by_node


def recover(coordinator: Any, store: Any) -> RecoveryReport:
    """Resume (or fail, with a reason) every unfinished execution recorded in ``store``."""
    report = RecoveryReport()
    if not store.healthy:
        report.skipped = (f"the history cannot be written ({store.last_error}); unfinished executions are left "
                          f"for a coordinator that can record them")
        log.error("recovery skipped: %s", report.skipped)
        return report
    lost = store.previous_failure
    for unfinished in store.unfinished_executions():
        bad_id = execution_ids.problem(unfinished.id)
        if bad_id is not None:
            # Not even "failed" can be published under it: its topic would reach other executions.
            report.failed[str(unfinished.id)] = bad_id
            log.error("recovery skipped an execution recorded by an older version: %s", bad_id)
            continue
        reason = None
        workflow = None
        if lost is not None:
            reason = (f"the previous coordinator could not record its history ({lost}), so nodes may have "
                      f"completed unrecorded; resubmit the workflow")
        elif not unfinished.workflow_text:
            reason = "its workflow text was not recorded"
        else:
            loaded = check(parse(unfinished.workflow_text, f"<execution {unfinished.id}>"))
            if loaded.errors:
                reason = f"its workflow no longer validates: {loaded.errors[0].message}"
            else:
                workflow = loaded.workflow
        variables = dict(unfinished.variables_in or {})
        if workflow is not None:
            masked = sorted(name for name in workflow.secret_variables if variables.get(name) == SECRET_MASK)
            masked_defaults = sorted(v.name for v in workflow.variables if v.secret and v.default == SECRET_MASK)
            if masked:
                reason = (f"secret variable(s) {', '.join(masked)} were supplied at submission and are never "
                          f"stored; resubmit the workflow")
            elif masked_defaults:
                reason = (f"the default of secret variable(s) {', '.join(masked_defaults)} is never stored; "
                          f"resubmit the workflow")
            else:
                try:   # recorded by a version that did not check the declared types
                    initial_variables(workflow, variables)
                except ValueError as exc:
                    reason = f"{exc}; resubmit the workflow"
        if reason is not None:
            coordinator.fail_unresumable(unfinished.id, unfinished.workflow or "<unknown>",
                                         f"execution {unfinished.id} cannot be resumed: {reason}")
            report.failed[unfinished.id] = reason
            log.warning("execution %s cannot be resumed: %s", unfinished.id, reason)
            continue
        writes = _writes_by_main_node(workflow, unfinished.writes)
        completed = {node: output for node, output in unfinished.completed.items()
                     if _restorable(output) and all(_restorable(v) for v in writes.get(node, {}).values())}
        coordinator.resume(unfinished.id, workflow, variables, completed,
                           {node: writes[node] for node in completed if node in writes})
        report.resumed.append(unfinished.id)
        log.info("resuming execution %s (%d node(s) already completed)", unfinished.id, len(completed))
    if lost is not None:
        _settle_previous_failure(coordinator, store)
    return report


def _settle_previous_failure(coordinator: Any, store: Any) -> None:
    """Clear the store's failure marker once the executions failed above are recorded.

    ``fail_unresumable`` publishes on the reactor: a round trip through it orders the
    barrier after those events, and the marker is cleared only when they are committed
    (until then a crash leaves the marker, and the next recovery fails them again).
    """
    def settled(problem: str | None) -> None:
        if store.healthy and store.clear_previous_failure():
            log.info("history: the previous coordinator's write failure is settled")

    coordinator.call_soon(lambda: store.after_written("", settled))

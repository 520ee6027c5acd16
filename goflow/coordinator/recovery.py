"""Crash recovery: resume what a previous coordinator left unfinished in the history store.

For each execution without a terminal event: main-graph nodes that completed are not run
again (their recorded outputs are restored), nodes that were in flight run again as new
attempts, and an ``execution.resumed`` event marks the restart. An execution that cannot
be resumed is marked failed with the reason, never silently dropped:

* its workflow text was not recorded, or no longer validates (e.g. a registered server it
  uses was removed);
* a secret variable was supplied at submission (secrets are never stored, so the run
  cannot be rebuilt faithfully: resubmit it).

A completed node whose recorded output was too large for the event stream (an
``$omitted`` marker) is run again rather than restored with a placeholder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from goflow.language.loader import check, parse

log = logging.getLogger("goflow.coordinator.recovery")
SECRET_MASK = "***"


@dataclass
class RecoveryReport:
    resumed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _omitted(value: Any) -> bool:
    return isinstance(value, dict) and value.get("$omitted") is True


def recover(coordinator: Any, store: Any) -> RecoveryReport:
    """Resume (or fail, with a reason) every unfinished execution recorded in ``store``."""
    report = RecoveryReport()
    for unfinished in store.unfinished_executions():
        reason = None
        workflow = None
        if not unfinished.workflow_text:
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
            if masked:
                reason = (f"secret variable(s) {', '.join(masked)} were supplied at submission and are never "
                          f"stored; resubmit the workflow")
        if reason is not None:
            coordinator.fail_unresumable(unfinished.id, unfinished.workflow or "<unknown>",
                                         f"execution {unfinished.id} cannot be resumed: {reason}")
            report.failed[unfinished.id] = reason
            log.warning("execution %s cannot be resumed: %s", unfinished.id, reason)
            continue
        completed = {node: output for node, output in unfinished.completed.items() if not _omitted(output)}
        coordinator.resume(unfinished.id, workflow, variables, completed)
        report.resumed.append(unfinished.id)
        log.info("resuming execution %s (%d node(s) already completed)", unfinished.id, len(completed))
    return report

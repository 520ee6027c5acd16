"""The coordinator's control operations: what ``goflow status/submit/cancel/...`` ask.

Each op runs on the reactor thread (the control socket is polled there) and answers from
the execution registry, or, for an execution no longer in memory, from the history store
(:mod:`.from_history`); the wire framing is :mod:`goflow.control.framing`, the ops are
listed in docs/events.md.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from goflow.control.framing import ControlError
from goflow.coordinator import from_history
from goflow.coordinator.plan import Plan, compile_plan, initial_variables

if TYPE_CHECKING:
    from goflow.coordinator.coordinator import Coordinator
    from goflow.coordinator.execution import Execution


def _load_submission(text: str, name: str, variables: dict[str, Any]) -> Plan:
    """Parse, validate and compile a submitted workflow (any thread); ControlError if refused."""
    from goflow.language.loader import check, parse

    loaded = check(parse(text, name))
    if loaded.errors:
        raise ControlError("invalid_workflow", f"{len(loaded.errors)} problem(s) in {name}",
                           details={"problems": [p.to_dict() for p in loaded.problems]})
    try:
        initial_variables(loaded.workflow, variables)
    except ValueError as exc:
        raise ControlError("bad_request", str(exc)) from None
    return compile_plan(loaded.workflow)


def _settle(future: Future, function: Callable[[Plan], None], plan: Plan) -> None:
    """Run ``function(plan)``; an exception it raises becomes ``future``'s."""
    try:
        function(plan)
    except BaseException as exc:
        future.set_exception(exc)


class ControlOps:
    """Control ops over one coordinator's executions and workers."""

    def __init__(self, coordinator: "Coordinator"):
        self.coordinator = coordinator
        self._loading: ThreadPoolExecutor | None = None

    def handlers(self) -> dict[str, Callable[[dict], dict]]:
        return {"progress": self.progress, "variables": self.variables, "execution": self.execution,
                "executions": self.executions, "list": self.executions, "cancel": self.cancel,
                "workers": self.workers, "submit": self.submit, "status": self.status, "graph": self.graph}

    def _find(self, request: dict) -> "Execution":
        """The execution named by ``execution_id`` (a unique prefix of 4+ characters will do)."""
        executions = self.coordinator.executions
        execution_id = request.get("execution_id")
        execution = executions.get(execution_id) if isinstance(execution_id, str) else None
        if execution is None and isinstance(execution_id, str) and len(execution_id) >= 4:
            matches = [e for key, e in executions.items() if key.startswith(execution_id)]
            if len(matches) == 1:
                execution = matches[0]
        if execution is None:
            raise ControlError("not_found", f"no execution {execution_id!r}")
        return execution

    def _in_memory(self, request: dict) -> "Execution | None":
        """The execution a request names if it is in memory; None when only history may know it."""
        try:
            return self._find(request)
        except ControlError:
            if self.coordinator.history is None:
                raise
            return None

    def _with_history(self, execution: "Execution", answer: dict) -> dict:
        """``answer`` plus ``history`` (recorded / problem) when there is a history store."""
        history = self.coordinator.history
        if history is None:
            return answer
        recorded = execution.history
        if recorded is None:   # still running: complete so far unless the store says otherwise
            recorded = {"recorded": False, "problem": history.history_problem(execution.id)}
        return {**answer, "history": recorded}

    def progress(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:   # finished long ago: its final state, nothing in progress
            recorded = from_history.status_from_history(self.coordinator.history, request.get("execution_id"))
            return {key: recorded[key] for key in ("execution_id", "status", "progress", "source")}
        return {"execution_id": execution.id, "status": execution.status, "progress": execution.progress_meta()}

    def variables(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:
            return from_history.variables_from_history(self.coordinator.history, request.get("execution_id"))
        # vseq/eseq: the version of this snapshot, so a subscriber can apply the events after it
        # (one reactor thread: no event is published between reading the three).
        publisher = self.coordinator.publisher
        return {"execution_id": execution.id, "variables": execution.redactor.variables(execution.variables),
                "vseq": publisher.vseq(execution.id), "eseq": publisher.last_eseq(execution.id)}

    def execution(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:
            return from_history.execution_from_history(self.coordinator.history, request.get("execution_id"))
        nodes = {}
        if execution.root is not None:
            for node_id, run in execution.root.runs.items():
                nodes[node_id] = {"status": run.state, "attempt": run.attempt}
        return {**self._with_history(execution, execution.summary()), "result": execution.public(execution.result),
                "nodes": nodes,
                "running": sorted(execution.running_nodes), "records": list(execution.records)[-1000:]}

    def graph(self, request: dict) -> dict:
        """The execution's workflow as nodes and edges (``goflow.language.graph``)."""
        from goflow.language.graph import workflow_graph

        execution = self._find(request)
        return {"execution_id": execution.id, **workflow_graph(execution.plan.workflow)}

    def executions(self, request: dict) -> dict:
        return {"executions": [execution.summary() for execution in self.coordinator.executions.values()]}

    def cancel(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:   # finished long ago: nothing to cancel
            recorded = from_history.status_from_history(self.coordinator.history, request.get("execution_id"))
            return {"execution_id": recorded["execution_id"], "status": recorded["status"]}
        if execution.active:
            execution.cancel(str(request.get("reason") or "cancelled by request"))
        return {"execution_id": execution.id, "status": execution.status}

    def submit(self, request: dict) -> Future:
        """``submit {workflow: YAML text, name?: file name, variables?: {...}, timeout?: s}``.

        Validated before acceptance: an invalid workflow is refused with every problem in
        ``error.details.problems``; a missing required variable with ``bad_request``.
        Parsing, validation and compiling run on the loader thread, never on the reactor,
        so a big submission does not stall heartbeats or other executions; the reply is
        sent once the execution has started (or was refused) and, with a history store,
        once its submission is committed there: an accepted submission survives a
        coordinator SIGKILL (recovery finds it), never lost after the client was told.
        """
        coordinator = self.coordinator
        if not coordinator.accepting:
            raise ControlError("unavailable", "the coordinator is shutting down and accepts no new executions")
        text, name = request.get("workflow"), request.get("name") or "<submitted>"
        if not isinstance(text, str):
            raise ControlError("bad_request", "'workflow' must be the workflow's YAML text")
        variables = request.get("variables") or {}
        timeout = request.get("timeout")
        if not isinstance(variables, dict) or (timeout is not None and not isinstance(timeout, (int, float))):
            raise ControlError("bad_request", "'variables' must be a map and 'timeout' a number of seconds")
        reply: Future = Future()

        def start(plan: Plan) -> None:  # back on the reactor
            if not coordinator.accepting:
                raise ControlError("unavailable", "the coordinator is shutting down and accepts no new executions")
            execution_id, _ = coordinator.start_execution(plan.workflow, variables, timeout=timeout, plan=plan,
                                                          execution_id=request.get("execution_id") or None,
                                                          source=text)
            accepted = {"execution_id": execution_id, "workflow": plan.workflow.name}
            if coordinator.history is None:
                reply.set_result(accepted)
                return

            def recorded(problem: str | None) -> None:   # on a store thread, once committed
                reply.set_result({**accepted, "history": {"recorded": problem is None, "problem": problem}}
                                 if problem else accepted)

            coordinator.history.after_written(execution_id, recorded)

        def load() -> None:  # on the loader thread
            try:
                plan = _load_submission(text, str(name), variables)
            except BaseException as exc:  # handed to the reply, without the frames that hold the text
                self._on_reactor(lambda error=exc.with_traceback(None): reply.set_exception(error))
                return
            self._on_reactor(lambda: _settle(reply, start, plan))

        self._loader().submit(load)
        return reply

    def _loader(self) -> ThreadPoolExecutor:
        """The thread that loads submissions (created on first use)."""
        if self._loading is None:
            self._loading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="goflow-load")
        return self._loading

    def _on_reactor(self, callback: Callable[[], None]) -> None:
        """``call_soon``, unless the reactor has stopped (then ``callback`` is dropped)."""
        if self.coordinator.reactor.running:
            self.coordinator.call_soon(callback)

    def close(self) -> None:
        """Stop the loader thread (submissions still loading are dropped: the reactor is gone)."""
        if self._loading is not None:
            self._loading.shutdown(wait=False, cancel_futures=True)

    def status(self, request: dict) -> dict:
        execution = self._in_memory(request)
        if execution is None:
            return from_history.status_from_history(self.coordinator.history, request.get("execution_id"))
        return self._with_history(execution, execution.summary())

    def workers(self, request: dict) -> dict:
        return {"workers": self.coordinator.broker.describe_workers()}

"""Every ``node.started`` has exactly one attempt-ending event (``node.completed``,
``node.failed``, ``node.retrying`` or ``node.cancelled``), whatever the outcomes of the
tasks and however the execution ends: a property checked in-process against a test host
(scheduling semantics only), then end to end on real workers for each way a running node
stops being wanted (Ctrl-C/cancel, a losing ``wait_any`` branch, the execution timeout).
"""

from __future__ import annotations

import textwrap
from typing import Any, Callable

import goflow
from hypothesis import given, settings, strategies as st

from goflow.coordinator.execution import Execution, Task
from goflow.coordinator.plan import compile_plan, initial_variables
from goflow.events.types import NODE_ATTEMPT_END_TYPES, TERMINAL_TYPES
from goflow.language.loader import parse, check


class _Timer:
    def __init__(self, callback: Callable[[], None]):
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class RecordingHost:
    """An execution.Host that records events and lets the test decide every outcome."""

    max_value_bytes = 4096

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.tasks: list[Task] = []
        self.timers: list[_Timer] = []
        self.finished = False

    def dispatch(self, task: Task) -> None:
        self.tasks.append(task)

    def cancel_task(self, task: Task) -> None:
        task.done = True
        self.tasks = [t for t in self.tasks if t is not task]

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)
        self.timers.append(timer)
        return timer

    def emit(self, execution: Execution, type: str, *, run: Any = None, **fields: Any) -> None:
        self.events.append({"type": type, "node_id": run.node.id if run else None,
                            "attempt": run.attempt if run else None, **fields})

    def progress(self, execution: Execution, force: bool) -> None:
        pass

    def execution_finished(self, execution: Execution) -> None:
        self.finished = True

    def server_spec(self, execution: Execution, server_id: str) -> dict:
        return {}


def _workflow(strategy: str, branches: int, items: int, max_parallel: int, attempts: int):
    retry = f"retry: {{max_attempts: {attempts}, initial_delay: 10ms, on: [python_error]}}"
    branch_nodes = "\n".join(
        f"  - {{id: b{i}, type: python, call: 'flowlib:noop', {retry}}}" for i in range(branches))
    text = textwrap.dedent(f"""\
        name: prop
        variables:
          - {{name: items, type: array, default: {list(range(items))}}}
        nodes:
          - {{id: start, type: start}}
          - id: par
            type: parallel
            merge_strategy: {strategy}
            branches: [{", ".join(f"[b{i}]" for i in range(branches))}]
        """) + branch_nodes + textwrap.dedent(f"""
          - {{id: each, type: loop, collection: items, item: x, body: [work], max_parallel: {max_parallel}}}
          - {{id: work, type: python, call: 'flowlib:noop', {retry}}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: par}}
          - {{from: par, to: each}}
          - {{from: each, to: end}}
        """)
    loaded = check(parse(text, "prop.yaml"))
    assert not loaded.errors, loaded.problems
    return loaded.workflow


def _attempt_key(event: dict) -> tuple:
    meta = event.get("meta") or {}
    where = tuple(sorted((k, meta[k]) for k in ("loop", "index", "parallel", "branch") if k in meta))
    return event["node_id"], event["attempt"], where


def assert_one_end_per_start(events: list[dict]) -> None:
    """Walk the stream: an attempt opens with node.started and closes with one end event."""
    open_attempts: set[tuple] = set()
    for event in events:
        if event["type"] == "node.started":
            key = _attempt_key(event)
            assert key not in open_attempts, f"started twice: {key}"
            open_attempts.add(key)
        elif event["type"] in NODE_ATTEMPT_END_TYPES:
            key = _attempt_key(event)
            assert key in open_attempts, f"{event['type']} without a running attempt: {key}"
            open_attempts.remove(key)
    assert not open_attempts, f"attempts without an end event: {sorted(open_attempts)}"


@settings(max_examples=150, deadline=None)
@given(strategy=st.sampled_from(["wait_all", "wait_any", "wait_first"]),
       branches=st.integers(1, 3), items=st.integers(0, 4), max_parallel=st.integers(1, 3),
       attempts=st.integers(1, 3),
       actions=st.lists(st.tuples(st.sampled_from(["ok", "fail", "timer"]), st.integers(0, 5)), max_size=30),
       ending=st.sampled_from(["cancel", "timeout"]))
def test_every_started_attempt_ends_exactly_once(strategy, branches, items, max_parallel, attempts,
                                                  actions, ending):
    workflow = _workflow(strategy, branches, items, max_parallel, attempts)
    host = RecordingHost()
    execution = Execution("E", compile_plan(workflow), initial_variables(workflow, {}), host, timeout=60)
    execution.start()
    for kind, pick in actions:
        if host.finished:
            break
        if kind == "timer":
            live = [t for t in host.timers if not t.cancelled and t.callback != execution.timed_out]
            if live:
                timer = live[pick % len(live)]
                host.timers.remove(timer)
                timer.callback()
        elif host.tasks:
            task = host.tasks.pop(pick % len(host.tasks))
            task.done = True
            task.deliver(task, {"ok": True, "value": pick} if kind == "ok" else
                                  {"ok": False, "error": {"type": "python_error", "message": "no"}})
    if not host.finished:
        execution.cancel("interrupted") if ending == "cancel" else execution.timed_out()
    assert host.finished
    assert_one_end_per_start(host.events)
    cancelled = [e for e in host.events if e["type"] == "node.cancelled"]
    assert all(e["error"]["type"] == "cancelled" and e["meta"]["reason"] for e in cancelled)
    assert host.events[-1]["type"] in TERMINAL_TYPES
    assert execution.counts["running"] == 0 and not execution.running_nodes



def test_losing_wait_any_branch_and_timeout_end_with_node_cancelled(write_flow):
    """Real workers: the slow branch loses (node.cancelled, reason names the parallel);
    then the execution timeout cancels the node that is still running."""
    path = write_flow("""
        name: cancelled
        nodes:
          - {id: start, type: start}
          - {id: par, type: parallel, merge_strategy: wait_any, branches: [[fast], [slow]]}
          - {id: fast, type: python, call: "flowlib:echo", args: [fast]}
          - {id: slow, type: python, call: "flowlib:spin", args: [60]}
          - {id: hang, type: python, call: "flowlib:spin", args: [60]}
          - {id: end, type: end}
        edges:
          - {from: start, to: par}
          - {from: par, to: hang}
          - {from: hang, to: end}
    """)
    with goflow.start(path, workers=2, timeout=3, history=False) as handle:
        events = list(handle.events())
        result = handle.result()
    assert result.status == "timed_out"
    assert_one_end_per_start([e.model_dump() for e in events])
    ends = {e.node_id: e for e in events if e.type == "node.cancelled"}
    assert set(ends) == {"slow", "hang"}
    assert "par" in ends["slow"].meta["reason"] and ends["slow"].meta["branch"] == 1
    assert ends["hang"].meta["reason"] == "the execution timed out"
    assert [e.type for e in events][-1] == "execution.failed"

"""Every ``node.started`` has exactly one attempt-ending event (``node.completed``,
``node.failed``, ``node.retrying`` or ``node.cancelled``), whatever the outcomes of the
tasks and however the execution ends: a property checked in-process against
:class:`tests.scheduling_host.TestHost` (scheduling semantics only; the test decides each
outcome), then end to end on real workers for each way a running node stops being wanted (Ctrl-C/cancel, a losing ``wait_any`` branch, the execution timeout).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict

import goflow
from hypothesis import given, settings, strategies as st

from goflow.events.types import NODE_ATTEMPT_END_TYPES, TERMINAL_TYPES
from goflow.language.loader import parse, check
from tests.scheduling_host import TestHost


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
    host = TestHost(durations={node: math.inf for node in ("work", *(f"b{i}" for i in range(branches)))})
    execution = host.start(workflow, timeout=60)
    for kind, pick in actions:
        if host.finished:
            break
        running = host.pending()
        if kind == "timer":
            host.step()  # the earliest timer: a retry's backoff, a scheduler turn, the timeout
        elif running:
            host.answer(running[pick % len(running)],
                        {"ok": True, "value": pick} if kind == "ok" else
                        {"ok": False, "error": {"type": "python_error", "message": "no"}})
    if not host.finished:
        execution.cancel("interrupted") if ending == "cancel" else execution.timed_out()
    assert host.finished
    assert_one_end_per_start([asdict(event) for event in host.events])
    cancelled = host.of("node.cancelled")
    assert all(e.error["type"] == "cancelled" and e.meta["reason"] for e in cancelled)
    assert host.events[-1].type in TERMINAL_TYPES
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


def test_node_cancelled_names_the_worker_that_held_the_attempt(write_flow):
    """A running attempt's node.cancelled names its worker, as its record does; an attempt
    still queued for a worker (one worker, the other branch holds it) says null."""
    path = write_flow("""
        name: held
        nodes:
          - {id: start, type: start}
          - {id: both, type: parallel, branches: [[a], [b]]}
          - {id: a, type: python, call: "flowlib:babble", args: [60]}
          - {id: b, type: python, call: "flowlib:babble", args: [60]}
          - {id: end, type: end}
        edges:
          - {from: start, to: both}
          - {from: both, to: end}
    """)
    with goflow.start(path, workers=1, history=False) as handle:
        stream = handle.events()
        for event in stream:
            if event.type == "node.log":    # its attempt runs on the worker now
                running = event.node_id
                handle.cancel("enough")
                break
        rest = list(stream)
        result = handle.result()
    assert result.status == "cancelled"
    (queued,) = {"a", "b"} - {running}
    ends = {e.node_id: e for e in rest if e.type == "node.cancelled"}
    assert ends[running].meta["worker"].startswith("local-"), ends[running].meta
    assert ends[queued].meta["worker"] is None, ends[queued].meta
    cancelled = {r["node_id"]: r["worker"] for r in result.records if r["status"] == "cancelled"}
    assert cancelled == {running: ends[running].meta["worker"], queued: None, "both": None}

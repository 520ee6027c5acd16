"""Scheduling at scale: iterative (no recursion per node) and O(1) amortised merges.

The big shapes run in-process against :class:`tests.scheduling_host.TestHost` (pure
scheduling semantics); one smaller chain runs as a user runs it, through ``goflow run``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from collections import deque

from goflow.coordinator.execution import EDGES_PER_STEP, STEPS_PER_TURN
from goflow.language.model import Workflow
from tests.scheduling_host import TestHost

pytestmark = pytest.mark.timeout(180)

BIG = 100_000


def keep_nothing(event) -> bool:
    """Keep no event (a 100k-node run only counts them)."""
    return False


def chain(n: int, kind: str = "passthrough", *, first: dict | None = None) -> Workflow:
    """start -> [first] -> n nodes of ``kind`` -> end, one edge after another."""
    extra = {"condition": "true"} if kind == "condition" else {}
    nodes = [{"id": "start", "type": "start"}] + ([first] if first else [])
    nodes += [{"id": f"n{i}", "type": kind, **extra} for i in range(n)] + [{"id": "end", "type": "end"}]
    ids = [node["id"] for node in nodes]
    return Workflow.model_validate({"name": f"chain-{kind}", "nodes": nodes,
                                    "edges": [{"from": a, "to": b} for a, b in zip(ids, ids[1:])]})


@pytest.mark.parametrize("kind", ["passthrough", "condition"])
def test_a_100k_chain_of_coordinator_side_nodes_runs_to_completion(kind):
    host = TestHost(keep=keep_nothing)
    execution = host.run(chain(BIG, kind))
    assert execution.status == "completed", execution.error
    assert host.counts["node.completed"] == BIG + 2
    assert execution.counts["completed"] == BIG + 2
    # The chain runs in slices: the host's loop gets a turn every STEPS_PER_TURN steps.
    assert host.timers_fired >= BIG // STEPS_PER_TURN


def test_skips_propagate_down_a_100k_chain_without_recursion():
    # A false condition takes no plain edge, so every node after it is skipped, one by one.
    host = TestHost(keep=keep_nothing)
    execution = host.run(chain(BIG, first={"id": "gate", "type": "condition", "condition": "false"}))
    assert execution.status == "completed", execution.error
    assert execution.counts["skipped"] == BIG + 1  # the chain and end
    assert host.counts["node.skipped"] == BIG + 1


class CountingAgenda(deque):
    """An execution's agenda that records, per step run, how many steps that step queued."""

    def __init__(self) -> None:
        super().__init__()
        self.queued_by_step: list[int] = [0]

    def append(self, item) -> None:
        self.queued_by_step[-1] += 1
        super().append(item)

    def popleft(self):
        self.queued_by_step.append(0)
        return super().popleft()


def fan_out(n: int, *, gate: str | None = None) -> Workflow:
    """start [-> condition gate] -> n passthrough nodes -> end (the gate's "true" edges lead to them)."""
    nodes = [{"id": "start", "type": "start"}, {"id": "end", "type": "end"}]
    nodes += [{"id": f"n{i}", "type": "passthrough"} for i in range(n)]
    head, label = "start", {}
    if gate is not None:
        nodes.append({"id": "gate", "type": "condition", "condition": gate})
        head, label = "gate", {"condition": "true"}
        edges = [{"from": "start", "to": "gate"}, {"from": "gate", "to": "end", "condition": "false"}]
    else:
        edges = []
    edges += [{"from": head, "to": f"n{i}", **label} for i in range(n)]
    edges += [{"from": f"n{i}", "to": "end"} for i in range(n)]
    return Workflow.model_validate({"name": "fan-out", "nodes": nodes, "edges": edges})


@pytest.mark.parametrize("gate", [None, "true", "false"])
def test_no_agenda_step_resolves_a_whole_fan_out(gate):
    # A node with 20k successors resolves its edges EDGES_PER_STEP at a time, one agenda step
    # each: no single step queues more than that many successors (plus its own continuation),
    # so the reactor gets its turns (heartbeats) while a huge fan-out starts or is skipped.
    n = 200 * EDGES_PER_STEP
    agenda = CountingAgenda()
    host = TestHost(keep=keep_nothing)

    def prepare(execution):
        execution._agenda = agenda

    execution = host.run(fan_out(n, gate=gate), prepare=prepare)
    assert execution.status == "completed", execution.error
    assert max(agenda.queued_by_step) <= EDGES_PER_STEP + 1
    if gate == "false":
        assert execution.counts["skipped"] == n
        assert host.counts["node.skipped"] == n
    else:
        assert execution.counts["completed"] == n + 2 + (gate is not None)
    assert sum(agenda.queued_by_step) >= n  # every successor went through the agenda


def loop(n: int, max_parallel: int) -> Workflow:
    return Workflow.model_validate({
        "name": "loop",
        "variables": [{"name": "items", "type": "array", "default": list(range(n))}],
        "nodes": [{"id": "start", "type": "start"},
                  {"id": "each", "type": "loop", "collection": "${items}", "item": "item", "body": ["body"],
                   "max_parallel": max_parallel, "output": "outs"},
                  {"id": "body", "type": "python", "call": "flowlib:echo", "args": ["${item}"], "output": "x"},
                  {"id": "end", "type": "end", "return": "${x}"}],
        "edges": [{"from": "start", "to": "each"}, {"from": "each", "to": "end"}]})


def test_a_100k_item_loop_with_max_parallel_completes_and_merges_once_per_name():
    host = TestHost(keep=lambda event: event.meta.get("scope") == "merge")
    execution = host.run(loop(BIG, 64))
    assert execution.status == "completed", execution.error
    assert host.max_in_flight == 64
    assert execution.variables["outs"] == list(range(BIG))  # item order
    assert execution.result == BIG - 1  # the last iteration's write wins the merge
    assert [(event.type, event.meta["name"]) for event in host.events] == [("variable.changed", "x")]


def test_an_empty_bodied_sequence_of_iterations_does_not_recurse():
    workflow = Workflow.model_validate({
        "name": "empty-bodies",
        "variables": [{"name": "items", "type": "array", "default": list(range(BIG))}],
        "nodes": [{"id": "start", "type": "start"},
                  {"id": "each", "type": "loop", "collection": "${items}", "item": "item", "body": [],
                   "output": "outs"},
                  {"id": "end", "type": "end"}],
        "edges": [{"from": "start", "to": "each"}, {"from": "each", "to": "end"}]})
    host = TestHost(keep=keep_nothing)
    execution = host.run(workflow)
    assert execution.status == "completed", execution.error
    assert len(execution.variables["outs"]) == BIG


def test_goflow_run_completes_a_5k_passthrough_chain(tmp_path):
    lines = ["name: chain-5k", "nodes:", "  - {id: start, type: start}"]
    lines += [f"  - {{id: n{i}, type: passthrough}}" for i in range(5000)]
    lines += ["  - {id: end, type: end, return: done}", "edges:", "  - {from: start, to: n0}"]
    lines += [f"  - {{from: n{i}, to: n{i + 1}}}" for i in range(4999)]
    lines += ["  - {from: n4999, to: end}"]
    path = tmp_path / "chain.yaml"
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "goflow", "run", str(path), "--json", "--workers", "1",
                           "--no-history"], capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout)
    assert outcome["status"] == "completed"
    assert outcome["result"] == "done"

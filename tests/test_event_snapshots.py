"""Events carry changes, not snapshots: the Monitor rebuilds ``event.variables`` exactly.

The coordinator's own snapshot at every event is captured by a sink on the real publisher
(called on the reactor thread at emission, so it sees the execution's variables exactly as
the event was published) and compared with what a real Monitor reconstructs.
"""

from __future__ import annotations

import threading
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.events import EventFilter, TERMINAL_TYPES
from goflow.events.codec import decode_payload, msgpack_default
from goflow.events.monitor import Monitor
from goflow.language.loader import load


class Snapshots:
    """Records the coordinator's (bounded, redacted) variables at every event of every execution."""

    def __init__(self, runtime: EmbeddedRuntime):
        self.coordinator = runtime.coordinator
        self.at: dict[str, dict[int, dict]] = {}
        self.payloads: dict[str, list[bytes]] = {}
        publisher = self.coordinator.publisher
        previous = publisher.sink

        def sink(execution_id, topic, payload):
            if previous is not None:
                previous(execution_id, topic, payload)
            execution = self.coordinator.executions.get(execution_id) if execution_id else None
            if execution is None:
                return
            eseq = decode_payload(payload)["eseq"]
            snapshot = {name: "***" if name in execution.plan.secrets else execution.bounded(value)
                        for name, value in execution.variables.items()}
            # as a subscriber decodes it (tuples become lists, ...)
            self.at.setdefault(execution_id, {})[eseq] = msgpack.unpackb(
                msgpack.packb(snapshot, default=msgpack_default), raw=False)
            self.payloads.setdefault(execution_id, []).append(payload)

        runtime.coordinator.call(lambda: setattr(publisher, "sink", sink))


@pytest.fixture(scope="module")
def runtime():
    with EmbeddedRuntime(workers=2) as rt:
        rt.wait_for_workers(2)
        yield rt


@pytest.fixture(scope="module")
def snapshots(runtime):
    return Snapshots(runtime)


def _submit(runtime, text: str, variables: dict | None = None) -> tuple[str, object]:
    return runtime.coordinator.submit(load("flow.yaml", text=text), variables or {})


def _chain(count: int, *, block: str | None = None, at: int = -1) -> str:
    """start -> ``count`` python nodes, each writing its own output (``block``: a node at
    ``at`` that waits for that file) -> end."""
    nodes = ["  - {id: start, type: start}"]
    ids = []
    for i in range(count):
        nodes.append(f"  - {{id: n{i}, type: python, call: 'flowlib:add', args: [{i}, 1], output: v{i}}}")
        ids.append(f"n{i}")
        if block is not None and i == at:
            nodes.append(f"  - {{id: hold, type: python, call: 'flowlib:wait_for_file', args: ['{block}', 1],"
                         " output: held}")
            ids.append("hold")
    nodes.append("  - {id: end, type: end}")
    chain = ["start", *ids, "end"]
    edges = [f"  - {{from: {a}, to: {b}}}" for a, b in zip(chain, chain[1:])]
    return "name: chain\nnodes:\n" + "\n".join(nodes) + "\nedges:\n" + "\n".join(edges) + "\n"


def _check(events, expected: dict[int, dict], *, exact_from: int = 1) -> int:
    """Every delivered event's snapshot is the coordinator's (or None before ``exact_from``)."""
    exact = 0
    for ev in events:
        got = ev.variables
        if got is None:
            assert ev.eseq < exact_from, f"eseq {ev.eseq} ({ev.type}) has no snapshot"
            continue
        assert got == expected[ev.eseq], f"eseq {ev.eseq} ({ev.type})"
        exact += 1
    return exact


# -- size ---------------------------------------------------------------------------------------
def test_an_events_encoded_size_does_not_grow_with_the_number_of_variables(runtime, snapshots):
    sizes = {}
    for count in (3, 120):
        execution_id, future = _submit(runtime, _chain(count))
        assert future.result(60)["status"] == "completed"
        payloads = [decode_payload(p) | {"bytes": len(p)} for p in snapshots.payloads[execution_id]]
        assert len(snapshots.at[execution_id][payloads[-1]["eseq"]]) == count, "every node wrote a variable"
        last = [p for p in payloads if p["node_id"] == "end" and p["type"] == "node.completed"][0]
        first = [p for p in payloads if p["node_id"] == "n0" and p["type"] == "node.completed"][0]
        sizes[count] = (first["bytes"], last["bytes"])
    # eseq/seq grow by a byte or two in msgpack; the snapshot is no longer there (3 vs 120 variables)
    assert abs(sizes[120][0] - sizes[3][0]) <= 8 and abs(sizes[120][1] - sizes[3][1]) <= 8, sizes


# -- reconstruction, property test ------------------------------------------------------------
NAMES = ["a", "b", "c"]
segment = st.one_of(
    st.tuples(st.just("py"), st.sampled_from(NAMES), st.integers(0, 9)),
    st.tuples(st.just("loop"), st.sampled_from(NAMES), st.sampled_from([1, 2])),
    st.tuples(st.just("parallel"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("secret"), st.just("token"), st.integers(0, 9)),
)


def _random_workflow(segments) -> str:
    nodes = ["  - {id: start, type: start}"]
    main = ["start"]
    for i, seg in enumerate(segments):
        kind = seg[0]
        if kind in ("py", "secret"):
            nodes.append(f"  - {{id: s{i}, type: python, call: 'flowlib:add', args: [{seg[2]}, {i}], "
                         f"output: {seg[1]}}}")
        elif kind == "loop":
            _, name, limit = seg   # max_parallel 2: isolated iterations, merged at the end
            nodes.append(f"  - {{id: s{i}, type: loop, collection: items, item: it, body: [s{i}b], "
                         f"output: loop{i}, max_parallel: {limit}}}")
            nodes.append(f"  - {{id: s{i}b, type: python, call: 'flowlib:add', args: ['${{it}}', {i}], "
                         f"output: {name}}}")
        else:
            _, left, right = seg
            nodes.append(f"  - {{id: s{i}, type: parallel, branches: [[s{i}l], [s{i}r]]}}")
            nodes.append(f"  - {{id: s{i}l, type: python, call: 'flowlib:add', args: [{i}, 1], output: {left}}}")
            nodes.append(f"  - {{id: s{i}r, type: python, call: 'flowlib:add', args: [{i}, 2], output: {right}}}")
        main.append(f"s{i}")
    nodes.append("  - {id: end, type: end}")
    main.append("end")
    edges = [f"  - {{from: {a}, to: {b}}}" for a, b in zip(main, main[1:])]
    return ("name: random\nvariables:\n  - {name: items, type: array, default: [1, 2, 3]}\n"
            "  - {name: token, type: string, default: s3cretvalue, secret: true}\n"
            "nodes:\n" + "\n".join(nodes) + "\nedges:\n" + "\n".join(edges) + "\n")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(segment, min_size=1, max_size=6),
       types=st.one_of(st.none(), st.sets(st.sampled_from(
           ["node.completed", "variable.changed", "loop.iteration", "progress.update"]), min_size=1)))
def test_the_monitors_snapshot_equals_the_coordinators_at_every_event(runtime, snapshots, segments, types):
    execution_id, future = _submit(runtime, _random_workflow(segments))
    assert future.result(60)["status"] == "completed"
    monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint)
    try:
        wanted = EventFilter(executions=[execution_id],
                             types=None if types is None else sorted(types | set(TERMINAL_TYPES)))
        events = list(monitor.subscribe(wanted, since="start", until=lambda e: e.is_terminal, timeout=30))
    finally:
        monitor.close()
    assert events and events[-1].is_terminal and monitor.stats["lost"] == 0
    assert _check(events, snapshots.at[execution_id]) == len(events)
    final = events[-1].variables
    assert final == snapshots.at[execution_id][events[-1].eseq] and final["token"] == "***"
    assert "s3cretvalue" not in repr([e.variables for e in events])


def test_events_held_across_later_changes_keep_their_own_snapshot(runtime, snapshots):
    """Materialized late (after the whole run), every held event still shows its version."""
    execution_id, future = _submit(runtime, _chain(40))
    monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint)
    try:
        events = list(monitor.subscribe(EventFilter(executions=[execution_id]), since="start",
                                        until=lambda e: e.is_terminal, timeout=30))
    finally:
        monitor.close()
    assert future.result(60)["status"] == "completed"
    assert _check(reversed(events), snapshots.at[execution_id]) == len(events)
    sizes = [len(e.variables) for e in events]
    assert sizes == sorted(sizes) and sizes[-1] == 40


# -- late joiners and gaps ---------------------------------------------------------------------
def _started(runtime, execution_id: str, node: str) -> None:
    monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint)
    try:
        seen = list(monitor.subscribe(EventFilter(executions=[execution_id], types=["node.started"], nodes=[node]),
                                      since="start", until=lambda e: True, timeout=30))
    finally:
        monitor.close()
    assert seen, f"{node} never started"


def test_a_late_joiner_starts_from_the_variables_op_and_is_exact(runtime, snapshots, tmp_path):
    gate = tmp_path / "go"
    execution_id, future = _submit(runtime, _chain(30, block=str(gate), at=19))
    _started(runtime, execution_id, "hold")
    monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint)
    base = monitor.variables(execution_id)
    assert base["vseq"] <= base["eseq"] and len(base["variables"]) == 20
    assert base["variables"] == snapshots.at[execution_id][base["eseq"]]
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(monitor.subscribe(
        EventFilter(executions=[execution_id]), since="now", until=lambda e: e.is_terminal, timeout=30)))
    reader.start()
    while not monitor.stats["received"] and reader.is_alive():   # its first heartbeat: subscribed
        reader.join(0.05)
    Path(gate).touch()
    assert future.result(60)["status"] == "completed"
    reader.join(60)
    monitor.close()
    assert events and events[-1].is_terminal and events[0].eseq > 1
    assert _check(events, snapshots.at[execution_id]) == len(events)
    assert len(events[-1].variables) == 31


def test_a_truncated_history_rebases_on_the_variables_op(runtime, snapshots, tmp_path):
    """The replay log lost the beginning: events before the base's version have no snapshot
    (None, never a wrong one); from the base on, every snapshot is exact."""
    gate = tmp_path / "go"
    publisher = runtime.coordinator.publisher
    capacity = runtime.coordinator.call(lambda: publisher.log_capacity)
    runtime.coordinator.call(lambda: setattr(publisher, "log_capacity", 12))
    try:
        execution_id, future = _submit(runtime, _chain(30, block=str(gate), at=19))
        _started(runtime, execution_id, "hold")
        monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint)
        events: list = []
        reader = threading.Thread(target=lambda: events.extend(monitor.subscribe(
            EventFilter(executions=[execution_id]), since="start", until=lambda e: e.is_terminal, timeout=30)))
        reader.start()
        while not events and not monitor.stats["replayed"] and reader.is_alive():
            reader.join(0.05)
        with Monitor(runtime.events_endpoint, runtime.control_endpoint) as query:
            base_vseq = query.variables(execution_id)["vseq"]
        Path(gate).touch()
        assert future.result(60)["status"] == "completed"
        reader.join(60)
        monitor.close()
    finally:
        runtime.coordinator.call(lambda: setattr(publisher, "log_capacity", capacity))
    assert monitor.stats["truncated"] > 0, "the scenario must lose the beginning"
    assert events[-1].is_terminal
    exact = _check(events, snapshots.at[execution_id], exact_from=base_vseq)
    after = [e for e in events if e.vseq >= base_vseq]
    assert exact == len(after) > 10 and len(events[-1].variables) == 31


def test_repaired_gaps_keep_snapshots_exact(write_flow):
    """Forced drops at the publisher (SNDHWM 5) are repaired from the replay log, and the
    changes they carried are applied in order."""
    fan = ("name: fan\nnodes:\n  - {id: start, type: start}\n  - {id: end, type: end}\n"
           + "".join(f"  - {{id: n{i}, type: python, call: 'flowlib:add', args: [{i}, 1], output: v{i}}}\n"
                     for i in range(300))
           + "edges:\n" + "".join(f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}\n"
                                   for i in range(300)))
    with EmbeddedRuntime(workers=2, sndhwm=5) as rt:
        rt.wait_for_workers(2)
        recorded = Snapshots(rt)
        execution_id = "gaps-execution"
        monitor = Monitor(rt.events_endpoint, rt.control_endpoint, rcvhwm=5)
        events: list = []

        def slow_consumer():
            for event in monitor.subscribe(EventFilter(executions=[execution_id], types=["node.completed",
                                                                                          "execution.completed"]),
                                           since="start", until=lambda e: e.is_terminal, timeout=30):
                events.append(event)
                if len(events) % 50 == 0:
                    threading.Event().wait(0.05)  # fall behind on purpose

        reader = threading.Thread(target=slow_consumer)
        reader.start()
        _, future = rt.coordinator.submit(load("fan.yaml", text=fan), execution_id=execution_id)
        assert future.result(60)["status"] == "completed"
        reader.join(60)
        monitor.close()
        assert monitor.stats["gaps"] > 0 and monitor.stats["lost"] == 0
        assert sum(e.type == "node.completed" for e in events) == 302 and events[-1].is_terminal
        assert _check(events, recorded.at[execution_id]) == len(events)
        assert len(events[-1].variables) == 300

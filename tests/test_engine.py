"""The engine end to end: real coordinator, real worker processes, real ZeroMQ sockets.

Only what needs them: independent nodes and loop iterations really overlapping on
different workers, a worker SIGKILLed mid-node, a node stuck in C, a value that cannot
be encoded, transforms through the wire, the ``goflow.run`` API. Scheduling semantics
(joins, skips, loops, parallel, retries, timeouts) run in-process: tests/test_semantics.py.
"""

from __future__ import annotations

import goflow
import pytest

pytestmark = pytest.mark.timeout(60)


def test_fan_out_overlaps_in_time(write_flow):
    path = write_flow("""
        name: fanout
        nodes:
          - {id: start, type: start}
          - {id: x, type: python, call: "flowlib:timed", args: [0.6, x], output: x}
          - {id: y, type: python, call: "flowlib:timed", args: [0.6, y], output: y}
          - {id: end, type: end}
        edges:
          - {from: start, to: x}
          - {from: start, to: y}
          - {from: x, to: end}
          - {from: y, to: end}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == "completed"
    x, y = result.variables["x"], result.variables["y"]
    assert x["pid"] != y["pid"], "independent nodes ran on the same worker"
    assert x["start"] < y["end"] and y["start"] < x["end"], "independent nodes did not overlap"


def test_loop_max_parallel_iterations_really_overlap(write_flow):
    path = write_flow("""
        name: parloop
        variables:
          - {name: items, type: array, default: [0.4, 0.1, 0.3, 0.2]}
        nodes:
          - {id: start, type: start}
          - {id: each, type: loop, collection: items, item: s, body: [work], output: out, max_parallel: 2}
          - {id: work, type: python, call: "flowlib:timed", args: ["${s}", "${s_index}"], output: w}
          - {id: end, type: end, return: "${out}"}
        edges:
          - {from: start, to: each}
          - {from: each, to: end}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == "completed", result.error
    out = result.result
    assert [entry["value"] for entry in out] == [0, 1, 2, 3]
    assert out[0]["start"] < out[1]["end"] and out[1]["start"] < out[0]["end"], "iterations did not overlap"


def test_tasks_measured_short_are_prefetched_and_unmeasured_ones_wait_for_an_idle_worker():
    """The broker learns a profile's duration from its results (one sample per worker
    message, batched or not): tasks measured short are then handed several at a time (the
    prefetch depth), and a profile never measured is only given to an idle worker (depth 1)."""
    from goflow.coordinator.broker import PREFETCH_BELOW_S
    from goflow.coordinator.embedded import EmbeddedRuntime
    from goflow.coordinator.task import Task
    from goflow.language.loader import load

    lines = ["name: quick", "nodes:", "  - {id: start, type: start}", "  - {id: end, type: end}"]
    lines += [f'  - {{id: n{i}, type: python, call: "flowlib:noop"}}' for i in range(300)]
    lines += ["edges:"] + [f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}" for i in range(300)]
    workflow = load("quick.yaml", text="\n".join(lines) + "\n")
    with EmbeddedRuntime(workers=1) as rt:
        assert rt.wait_for_workers(1)
        assert rt.submit(workflow).result(timeout=60)["status"] == "completed"
        broker = rt.coordinator.broker

        def depth(call: str) -> int:
            return broker._depth(Task("e", "n", 1, "python", {"call": call}, None, lambda *_: None))

        estimate = rt.coordinator.call(lambda: broker.durations.get(("python", "flowlib:noop")))
        learned, unknown = rt.coordinator.call(lambda: (depth("flowlib:noop"), depth("flowlib:other")))
    assert estimate is not None and estimate < PREFETCH_BELOW_S
    assert learned > 1 and unknown == 1


def test_short_tasks_are_never_queued_behind_a_long_one(tmp_path):
    """Tasks measured short are prefetched, but never into the hand of a worker running one
    that may be long: with one worker blocked, a 300-node fan-out of short calls completes on
    the other (before, some waited behind the blocked node until it ended)."""
    import time

    from goflow.coordinator.embedded import EmbeddedRuntime
    from goflow.language.loader import load

    gate = tmp_path / "gate"
    fan = ["name: fan", "nodes:", "  - {id: start, type: start}", "  - {id: end, type: end}"]
    fan += [f'  - {{id: n{i}, type: python, call: "flowlib:noop"}}' for i in range(300)]
    fan += ["edges:"] + [f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}" for i in range(300)]
    fan_out = load("fan.yaml", text="\n".join(fan) + "\n")
    hold = load("hold.yaml", text=f"""
name: hold
nodes:
  - {{id: start, type: start}}
  - {{id: wait, type: python, call: "flowlib:wait_for_file", args: ["{gate}", 0]}}
  - {{id: end, type: end}}
edges:
  - {{from: start, to: wait}}
  - {{from: wait, to: end}}
""")
    with EmbeddedRuntime(workers=2) as rt:
        assert rt.wait_for_workers(2)
        assert rt.submit(fan_out).result(timeout=60)["status"] == "completed"   # noop is measured short
        held = rt.submit(hold)
        broker = rt.coordinator.broker
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not rt.coordinator.call(broker.busy):
            time.sleep(0.01)
        _, done = rt.coordinator.submit(fan_out, {})
        try:
            outcome = done.result(timeout=30)
            blocked_meanwhile = not held.done()
        finally:
            gate.touch()
        assert outcome["status"] == "completed" and blocked_meanwhile
        assert held.result(timeout=60)["status"] == "completed"


def test_node_stuck_in_c_code_is_timed_out_and_worker_replaced(write_flow):
    path = write_flow("""
        name: stuck
        nodes:
          - {id: start, type: start}
          - id: stuck
            type: python
            call: "flowlib:stuck_in_c"
            args: [60]
            timeout: 200ms
            retry: {max_attempts: 2, initial_delay: 0s, on: [timeout]}
          - {id: end, type: end}
        edges:
          - {from: start, to: stuck}
          - {from: stuck, to: end}
    """)
    result = goflow.run(path, workers=1, timeout=20)
    assert result.status == "failed"
    assert result.error["type"] == "timeout"
    assert [r["attempt"] for r in result.records if r["node_id"] == "stuck"] == [1, 2]


def test_worker_killed_mid_node_is_retried_on_another_worker(write_flow, tmp_path):
    marker = tmp_path / "crashed"
    path = write_flow(f"""
        name: crash
        nodes:
          - {{id: start, type: start}}
          - {{id: crash, type: python, call: "flowlib:crash_once", args: ["{marker}"], output: out}}
          - {{id: end, type: end, return: "${{out}}"}}
        edges:
          - {{from: start, to: crash}}
          - {{from: crash, to: end}}
    """)
    result = goflow.run(path, workers=2, timeout=30)
    assert result.status == "completed", result.error
    assert result.result["recovered"] is True
    assert result.result["pid"] != result.result["first_pid"]
    attempts = [r for r in result.records if r["node_id"] == "crash"]
    assert attempts[0]["status"] == "failed" and attempts[0]["error"]["type"] == "worker_lost"
    assert attempts[-1]["status"] == "completed"


def test_unserializable_return_value_is_a_clear_node_error(write_flow):
    path = write_flow("""
        name: ser
        nodes:
          - {id: start, type: start}
          - {id: bad, type: python, call: "flowlib:not_serializable"}
          - {id: end, type: end}
        edges:
          - {from: start, to: bad}
          - {from: bad, to: end}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "failed"
    assert result.error["type"] == "serialization"
    assert "JSON-like" in result.error["message"]


def test_transform_nodes_run_on_workers(write_flow):
    path = write_flow("""
        name: transforms
        variables:
          - name: orders
            type: object
            default: {items: [{sku: a, price: 10.5}, {sku: b, price: 25.5}]}
          - {name: factor, type: number, default: 3}
        nodes:
          - {id: start, type: start}
          - {id: total, type: transform, input: orders, expression: "jq(.items | map(.price) | add)", output: total}
          - {id: skus, type: transform, input: "${orders}", expression: "$.items[*].sku", output: skus}
          - {id: tripled, type: transform, expression: "factor * 3", output: tripled}
          - {id: text, type: transform, template: "Total: ${total}", output: text}
          - {id: end, type: end, return: "${text}"}
        edges:
          - {from: start, to: total}
          - {from: start, to: skus}
          - {from: start, to: tripled}
          - {from: total, to: text}
          - {from: skus, to: end}
          - {from: tripled, to: end}
          - {from: text, to: end}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == "completed", result.error
    assert result.variables["total"] == 36.0
    assert result.variables["skus"] == ["a", "b"]
    assert result.variables["tripled"] == 9
    assert result.result == "Total: 36.0"


def test_missing_required_variable_is_an_error_before_anything_starts(write_flow):
    path = write_flow("""
        name: required
        variables:
          - {name: who, type: string, required: true}
        nodes:
          - {id: start, type: start}
          - {id: end, type: end, return: "${who}"}
        edges:
          - {from: start, to: end}
    """)
    with pytest.raises(ValueError, match="who"):
        goflow.run(path, workers=1)
    assert goflow.run(path, {"who": "me"}, workers=1).result == "me"

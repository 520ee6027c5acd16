"""The engine end to end: real coordinator, real worker processes, real ZeroMQ sockets."""

from __future__ import annotations

import goflow
import pytest

pytestmark = pytest.mark.timeout(60)


def completed(records, node_id):
    return [r for r in records if r["node_id"] == node_id and r["status"] == "completed"]


def test_diamond_join_runs_once_after_both_inputs(write_flow):
    path = write_flow("""
        name: diamond
        nodes:
          - {id: start, type: start}
          - {id: a, type: python, call: "flowlib:timed", args: [0.05, a], output: a_out}
          - {id: b, type: python, call: "flowlib:timed", args: [0.3, b], output: b_out}
          - {id: c, type: python, call: "flowlib:timed", args: [0.05, c], output: c_out}
          - {id: d, type: python, call: "flowlib:timed", args: [0.0, d], output: d_out}
          - {id: end, type: end, return: "${d_out.value}"}
        edges:
          - {from: start, to: a}
          - {from: a, to: b}
          - {from: a, to: c}
          - {from: b, to: d}
          - {from: c, to: d}
          - {from: d, to: end}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == "completed", result.error
    assert result.result == "d"
    assert len(completed(result.records, "d")) == 1
    v = result.variables
    assert v["d_out"]["start"] >= v["b_out"]["end"]
    assert v["d_out"]["start"] >= v["c_out"]["end"]


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


def test_condition_skips_the_other_branch_and_skip_propagates(write_flow):
    path = write_flow("""
        name: skip
        variables:
          - {name: value, type: number, default: 3}
        nodes:
          - {id: start, type: start}
          - {id: check, type: condition, condition: "${value} > 10"}
          - {id: big1, type: python, call: "flowlib:echo", args: [big], output: big}
          - {id: big2, type: python, call: "flowlib:echo", args: [big2], output: big2}
          - {id: small, type: python, call: "flowlib:echo", args: [small], output: small}
          - {id: join, type: passthrough}
          - {id: end, type: end, return: "${small}"}
        edges:
          - {from: start, to: check}
          - {from: check, to: big1, condition: "true"}
          - {from: big1, to: big2}
          - {from: check, to: small, condition: "false"}
          - {from: big2, to: join}
          - {from: small, to: join}
          - {from: join, to: end}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "completed"
    assert result.result == "small"
    assert "big" not in result.variables and "big2" not in result.variables
    assert completed(result.records, "join"), "a join with one taken input must run"


def test_loop_with_break_and_output_in_item_order(write_flow):
    path = write_flow("""
        name: loop
        variables:
          - {name: items, type: array, default: [1, 2, 3, 4, 5]}
        nodes:
          - {id: start, type: start}
          - id: each
            type: loop
            collection: "${items}"
            item: n
            body: [double]
            break_condition: "n == 4"
            output: doubled
          - {id: double, type: python, call: "flowlib:add", args: ["${n}", "${n_index}"], output: d}
          - {id: end, type: end, return: "${doubled}"}
        edges:
          - {from: start, to: each}
          - {from: each, to: end}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == "completed", result.error
    assert result.result == [1, 3, 5]  # n + index for n = 1, 2, 3; the iteration with n == 4 never runs
    assert "n" not in result.variables and "n_index" not in result.variables


def test_loop_max_parallel_overlaps_and_keeps_order(write_flow):
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


@pytest.mark.parametrize("strategy, expected_status, expected", [
    ("wait_all", "completed", ["fast", "slow"]),
    ("wait_any", "completed", "fast"),
    ("wait_first", "completed", "fast"),
])
def test_parallel_merge_strategies(write_flow, strategy, expected_status, expected):
    path = write_flow(f"""
        name: par
        nodes:
          - {{id: start, type: start}}
          - id: par
            type: parallel
            merge_strategy: {strategy}
            branches: [[fast], [slow]]
          - {{id: fast, type: python, call: "flowlib:echo", args: [fast], output: fast_out}}
          - {{id: slow, type: python, call: "flowlib:timed", args: [1.5, slow], output: slow_out}}
          - {{id: collect, type: transform, expression: "${{fast_out}}", output: collected}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: par}}
          - {{from: par, to: collect}}
          - {{from: collect, to: end}}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == expected_status, result.error
    par = [r for r in result.records if r["node_id"] == "par"]
    assert par and par[-1]["status"] == "completed"
    assert result.variables["fast_out"] == "fast"
    if strategy == "wait_all":
        assert result.variables["slow_out"]["value"] == "slow"
    else:
        assert "slow_out" not in result.variables, "a cancelled branch's writes must not be merged"


def test_parallel_wait_first_fails_when_first_finisher_fails(write_flow):
    path = write_flow("""
        name: parfail
        nodes:
          - {id: start, type: start}
          - {id: par, type: parallel, merge: wait_first, branches: [[bad], [slow]]}
          - {id: bad, type: python, call: "flowlib:fail", args: [nope]}
          - {id: slow, type: python, call: "flowlib:timed", args: [2, slow], output: s}
          - {id: end, type: end}
        edges:
          - {from: start, to: par}
          - {from: par, to: end}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == "failed"
    assert result.error["type"] == "python_error"
    assert "nope" in result.error["message"]


def test_parallel_wait_any_fails_only_when_all_fail(write_flow):
    path = write_flow("""
        name: anyfail
        nodes:
          - {id: start, type: start}
          - {id: par, type: parallel, merge_strategy: wait_any, branches: [[bad1], [bad2]]}
          - {id: bad1, type: python, call: "flowlib:fail", args: [one]}
          - {id: bad2, type: python, call: "flowlib:fail", args: [two]}
          - {id: end, type: end}
        edges:
          - {from: start, to: par}
          - {from: par, to: end}
    """)
    result = goflow.run(path, workers=2)
    assert result.status == "failed"
    assert "all parallel branches failed" in result.error["message"]


def test_retry_with_backoff_succeeds_on_third_attempt(write_flow, tmp_path):
    counter = tmp_path / "counter"
    path = write_flow(f"""
        name: retry
        nodes:
          - {{id: start, type: start}}
          - id: flaky
            type: python
            call: "flowlib:flaky"
            args: ["{counter}", 2]
            output: attempt
            retry: {{max_attempts: 3, backoff: exponential, initial_delay: 50ms, max_delay: 1s, on: [python_error]}}
          - {{id: end, type: end, return: "${{attempt}}"}}
        edges:
          - {{from: start, to: flaky}}
          - {{from: flaky, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "completed", result.error
    assert result.result == 3
    attempts = [r for r in result.records if r["node_id"] == "flaky"]
    assert [r["status"] for r in attempts] == ["failed", "failed", "completed"]
    assert [r["attempt"] for r in attempts] == [1, 2, 3]


def test_retry_policy_does_not_retry_other_error_classes(write_flow, tmp_path):
    counter = tmp_path / "counter"
    path = write_flow(f"""
        name: retry
        nodes:
          - {{id: start, type: start}}
          - id: flaky
            type: python
            call: "flowlib:flaky"
            args: ["{counter}", 2]
            retry: {{max_attempts: 5, initial_delay: 10ms, on: [timeout]}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: flaky}}
          - {{from: flaky, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "failed"
    assert counter.read_text() == "1"


def test_node_timeout_cancels_the_work(write_flow):
    path = write_flow("""
        name: nodetimeout
        nodes:
          - {id: start, type: start}
          - {id: spin, type: python, call: "flowlib:spin", args: [30], timeout: 300ms}
          - {id: end, type: end}
        edges:
          - {from: start, to: spin}
          - {from: spin, to: end}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "failed"
    assert result.error["type"] == "timeout"
    assert result.error["node_id"] == "spin"


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


def test_execution_timeout(write_flow):
    path = write_flow("""
        name: exectimeout
        nodes:
          - {id: start, type: start}
          - {id: slow, type: python, call: "flowlib:spin", args: [30]}
          - {id: end, type: end}
        edges:
          - {from: start, to: slow}
          - {from: slow, to: end}
    """)
    result = goflow.run(path, workers=1, timeout=0.5)
    assert result.status == "timed_out"
    assert result.error["type"] == "timeout"
    assert result.exit_code == 1


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


def test_end_return_keeps_type_and_last_end_wins(write_flow):
    path = write_flow("""
        name: ends
        variables:
          - {name: data, type: object, default: {a: [1, 2]}}
        nodes:
          - {id: start, type: start}
          - {id: slow, type: python, call: "flowlib:timed", args: [0.3, late]}
          - {id: e1, type: end, return: "${data}"}
          - {id: e2, type: end, return: "late"}
        edges:
          - {from: start, to: e1}
          - {from: start, to: slow}
          - {from: slow, to: e2}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "completed"
    assert result.result == "late"


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


def test_goflow_retry_class_names_match_goflow_error_classes(write_flow):
    # GoFlow documents `on: [connection_error, timeout]`; timeout_error is its alias of timeout.
    path = write_flow("""
        name: goflowretry
        nodes:
          - {id: start, type: start}
          - id: spin
            type: python
            call: "flowlib:spin"
            args: [30]
            timeout: 200ms
            retry: {max_attempts: 2, initial_delay: 0s, on: [connection_error, timeout_error]}
          - {id: end, type: end}
        edges:
          - {from: start, to: spin}
          - {from: spin, to: end}
    """)
    result = goflow.run(path, workers=1, timeout=20)
    assert result.status == "failed"
    assert result.error["type"] == "timeout"
    assert [r["attempt"] for r in result.records if r["node_id"] == "spin"] == [1, 2]

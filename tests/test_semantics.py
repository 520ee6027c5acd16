"""Scheduling semantics, in-process: goflow's own execution, plan, retry decision and
executors against :class:`tests.scheduling_host.TestHost` (no processes, no sockets, a fake
clock), so each runs in milliseconds. Joins, skips, condition edges and guards, loops,
parallel merge strategies, retries, timeouts, undefined variables and expression errors.

What needs real workers (a killed worker, a node stuck in C, values that cannot be encoded,
real overlap in time, the ``goflow.run`` API) is in tests/test_engine.py.
"""

from __future__ import annotations

import math
import textwrap

import pytest

from goflow.coordinator.embedded import ExecutionResult
from goflow.coordinator.execution import Execution
from goflow.language.loader import check, parse
from goflow.language.model import Workflow
from tests.scheduling_host import TestHost

pytestmark = pytest.mark.timeout(30)


def flow(text: str) -> Workflow:
    """A workflow from YAML text, loaded and validated as ``goflow run`` loads it."""
    loaded = check(parse(textwrap.dedent(text).lstrip(), "flow.yaml"))
    assert not loaded.errors, loaded.problems
    return loaded.workflow


def completed(execution: Execution, node_id: str) -> list[dict]:
    return [r for r in execution.records if r["node_id"] == node_id and r["status"] == "completed"]


def test_diamond_join_runs_once_after_both_inputs():
    host = TestHost(durations={"a": 0.05, "b": 0.3, "c": 0.05})
    execution = host.run(flow("""
        name: diamond
        nodes:
          - {id: start, type: start}
          - {id: a, type: python, call: "flowlib:echo", args: [a], output: a_out}
          - {id: b, type: python, call: "flowlib:echo", args: [b], output: b_out}
          - {id: c, type: python, call: "flowlib:echo", args: [c], output: c_out}
          - {id: d, type: python, call: "flowlib:echo", args: [d], output: d_out}
          - {id: end, type: end, return: "${d_out}"}
        edges:
          - {from: start, to: a}
          - {from: a, to: b}
          - {from: a, to: c}
          - {from: b, to: d}
          - {from: c, to: d}
          - {from: d, to: end}
    """))
    assert execution.status == "completed", execution.error
    assert execution.result == "d"
    assert len(completed(execution, "d")) == 1
    (d,) = host.of("node.completed", "d")
    for before in ("b", "c"):
        (done,) = host.of("node.completed", before)
        assert d.meta["started"] >= done.meta["finished"], f"d started before {before} finished"
    assert d.meta["started"] == pytest.approx(0.35)  # the later input, b, decided when


def test_condition_skips_the_other_branch_and_skip_propagates():
    host = TestHost()
    execution = host.run(flow("""
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
    """))
    assert execution.status == "completed"
    assert execution.result == "small"
    assert "big" not in execution.variables and "big2" not in execution.variables
    assert completed(execution, "join"), "a join with one taken input must run"
    assert [e.node_id for e in host.of("node.skipped")] == ["big1", "big2"]
    assert host.dispatched == ["small"]


def test_a_false_guard_skips_its_node_and_what_only_it_leads_to():
    host = TestHost()
    execution = host.run(flow("""
        name: guard
        variables:
          - {name: mode, type: string, default: quick}
        nodes:
          - {id: start, type: start}
          - {id: full, type: python, call: "flowlib:echo", args: [full], output: full, condition: "mode == 'full'"}
          - {id: after_full, type: python, call: "flowlib:echo", args: [after], output: after}
          - {id: quick, type: python, call: "flowlib:echo", args: [quick], output: quick, condition: "mode == 'quick'"}
          - {id: end, type: end, return: "${quick}"}
        edges:
          - {from: start, to: full}
          - {from: full, to: after_full}
          - {from: start, to: quick}
          - {from: after_full, to: end}
          - {from: quick, to: end}
    """))
    assert execution.status == "completed", execution.error
    assert execution.result == "quick"
    guards = {e.node_id: e.meta["result"] for e in host.of("condition.evaluated") if e.meta["kind"] == "guard"}
    assert guards == {"full": False, "quick": True}
    skipped = {e.node_id: e.meta["reason"] for e in host.of("node.skipped")}
    assert skipped == {"full": "its guard condition is false", "after_full": "no incoming edge was taken"}
    assert host.dispatched == ["quick"]


def test_loop_with_break_and_output_in_item_order():
    host = TestHost()
    execution = host.run(flow("""
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
    """))
    assert execution.status == "completed", execution.error
    assert execution.result == [1, 3, 5]  # n + index for n = 1, 2, 3; the iteration with n == 4 never runs
    assert "n" not in execution.variables and "n_index" not in execution.variables
    (done,) = host.of("loop.completed", "each")
    assert done.meta["broken"] is True and done.meta["break_index"] == 3


def test_loop_max_parallel_overlaps_and_keeps_order():
    seconds = [0.4, 0.1, 0.3, 0.2]
    host = TestHost(durations=lambda task: seconds[task.spec["args"][0]["value"]])
    execution = host.run(flow("""
        name: parloop
        variables:
          - {name: items, type: array, default: [0.4, 0.1, 0.3, 0.2]}
        nodes:
          - {id: start, type: start}
          - {id: each, type: loop, collection: items, item: s, body: [work], output: out, max_parallel: 2}
          - {id: work, type: python, call: "flowlib:echo", args: [{value: "${s_index}"}], output: w}
          - {id: end, type: end, return: "${out}"}
        edges:
          - {from: start, to: each}
          - {from: each, to: end}
    """))
    assert execution.status == "completed", execution.error
    assert [entry["value"] for entry in execution.result] == [0, 1, 2, 3]
    ends = {e.meta["index"]: e.meta for e in host.of("node.completed", "work")}
    assert ends[0]["started"] < ends[1]["finished"] and ends[1]["started"] < ends[0]["finished"], \
        "iterations did not overlap"
    assert host.max_in_flight == 2
    assert [e.meta["index"] for e in host.of("node.completed", "work")][0] == 1  # finished first, merged second


@pytest.mark.parametrize("strategy, expected", [
    ("wait_all", ["fast", {"value": "slow"}]),
    ("wait_any", "fast"),
    ("wait_first", "fast"),
])
def test_parallel_merge_strategies(strategy, expected):
    host = TestHost(durations={"slow": 1.5})
    execution = host.run(flow(f"""
        name: par
        nodes:
          - {{id: start, type: start}}
          - id: par
            type: parallel
            merge_strategy: {strategy}
            branches: [[fast], [slow]]
          - {{id: fast, type: python, call: "flowlib:echo", args: [fast], output: fast_out}}
          - {{id: slow, type: python, call: "flowlib:echo", args: [{{value: slow}}], output: slow_out}}
          - {{id: collect, type: transform, expression: "${{fast_out}}", output: collected}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: par}}
          - {{from: par, to: collect}}
          - {{from: collect, to: end}}
    """))
    assert execution.status == "completed", execution.error
    par = [r for r in execution.records if r["node_id"] == "par"]
    assert par and par[-1]["status"] == "completed"
    assert host.of("node.completed", "par")[0].meta["output"] == expected
    assert execution.variables["fast_out"] == "fast"
    assert execution.variables["collected"] == "fast"
    if strategy == "wait_all":
        assert execution.variables["slow_out"]["value"] == "slow"
        assert not host.cancelled
    else:
        assert "slow_out" not in execution.variables, "a cancelled branch's writes must not be merged"
        assert host.cancelled == ["slow"]
        (cancelled,) = host.of("node.cancelled", "slow")
        assert "par" in cancelled.meta["reason"] and cancelled.meta["branch"] == 1


def test_parallel_wait_first_fails_when_first_finisher_fails():
    host = TestHost(durations={"slow": 2})
    execution = host.run(flow("""
        name: parfail
        nodes:
          - {id: start, type: start}
          - {id: par, type: parallel, merge: wait_first, branches: [[bad], [slow]]}
          - {id: bad, type: python, call: "flowlib:fail", args: [nope]}
          - {id: slow, type: python, call: "flowlib:echo", args: [slow], output: s}
          - {id: end, type: end}
        edges:
          - {from: start, to: par}
          - {from: par, to: end}
    """))
    assert execution.status == "failed"
    assert execution.error["type"] == "python_error"
    assert execution.error["exception"] == "ValueError"
    assert "nope" in execution.error["message"]
    assert host.cancelled == ["slow"]


def test_parallel_wait_any_fails_only_when_all_fail():
    host = TestHost(durations={"bad2": 1})
    execution = host.run(flow("""
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
    """))
    assert execution.status == "failed"
    assert "all parallel branches failed" in execution.error["message"]
    assert "two" in execution.error["message"]  # the last failure, after the first one waited
    assert host.of("node.failed", "par")[0].time == 1


def test_retry_with_backoff_succeeds_on_third_attempt(tmp_path):
    counter = tmp_path / "counter"
    host = TestHost()
    execution = host.run(flow(f"""
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
    """))
    assert execution.status == "completed", execution.error
    assert execution.result == 3
    attempts = [r for r in execution.records if r["node_id"] == "flaky"]
    assert [r["status"] for r in attempts] == ["failed", "failed", "completed"]
    assert [r["attempt"] for r in attempts] == [1, 2, 3]
    retrying = host.of("node.retrying", "flaky")
    assert [e.error["exception"] for e in retrying] == ["ConnectionError", "ConnectionError"]
    delays = [e.meta["delay_s"] for e in retrying]
    assert 0.05 * 0.75 <= delays[0] <= 0.05 * 1.25 and 0.1 * 0.75 <= delays[1] <= 0.1 * 1.25  # jittered
    starts = [e.time for e in host.of("node.started", "flaky")]
    assert starts == pytest.approx([0, delays[0], delays[0] + delays[1]])


@pytest.mark.parametrize("backoff, delays", [
    ("exponential", [1, 2, 3, 3]),   # initial 1s doubling, capped at max_delay 3s
    ("fixed", [1, 1, 1, 1]),
])
def test_backoff_delays_on_the_clock(backoff, delays):
    host = TestHost()
    execution = host.run(flow(f"""
        name: backoff
        nodes:
          - {{id: start, type: start}}
          - id: boom
            type: python
            call: "flowlib:fail"
            retry: {{max_attempts: 5, backoff: {backoff}, initial_delay: 1s, max_delay: 3s, jitter: false}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: boom}}
          - {{from: boom, to: end}}
    """))
    assert execution.status == "failed"
    assert [e.meta["delay_s"] for e in host.of("node.retrying", "boom")] == delays
    starts = [e.time for e in host.of("node.started", "boom")]
    assert [later - earlier for earlier, later in zip(starts, starts[1:])] == delays
    assert [e.attempt for e in host.of("node.started", "boom")] == [1, 2, 3, 4, 5]


def test_retry_policy_does_not_retry_other_error_classes(tmp_path):
    counter = tmp_path / "counter"
    host = TestHost()
    execution = host.run(flow(f"""
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
    """))
    assert execution.status == "failed"
    assert counter.read_text() == "1"


@pytest.mark.parametrize("names", [["python_error"], ["ValueError"]])
def test_non_retryable_errors_win(names):
    """``non_retryable_errors`` naming the error's type or its exception's class fails after
    one attempt (without it, the policy retries three times)."""
    host = TestHost()
    execution = host.run(flow(f"""
        version: "1.0"
        name: no-retry
        nodes:
          - id: start
            type: start
          - id: boom
            type: python
            call: "flowlib:fail"
            retry: {{max_attempts: 3, initial_delay: 0, non_retryable_errors: {names}}}
          - id: end
            type: end
        edges:
          - {{from: start, to: boom}}
          - {{from: boom, to: end}}
    """))
    assert execution.status == "failed"
    assert [r["attempt"] for r in execution.records if r["node_id"] == "boom"] == [1]


def test_node_timeout_cancels_the_work():
    host = TestHost(durations={"spin": 30})
    execution = host.run(flow("""
        name: nodetimeout
        nodes:
          - {id: start, type: start}
          - {id: spin, type: python, call: "flowlib:spin", args: [30], timeout: 300ms}
          - {id: end, type: end}
        edges:
          - {from: start, to: spin}
          - {from: spin, to: end}
    """))
    assert execution.status == "failed"
    assert execution.error["type"] == "timeout"
    assert execution.error["node_id"] == "spin"
    assert host.cancelled == ["spin"]
    assert host.of("node.failed", "spin")[0].time == pytest.approx(0.3)


def test_goflow_retry_class_names_match_goflow_error_classes():
    # GoFlow documents `on: [connection_error, timeout]`; timeout_error is its alias of timeout.
    host = TestHost(durations={"spin": math.inf})
    execution = host.run(flow("""
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
    """))
    assert execution.status == "failed"
    assert execution.error["type"] == "timeout"
    assert [r["attempt"] for r in execution.records if r["node_id"] == "spin"] == [1, 2]
    assert len(host.cancelled) == 2


def test_execution_timeout():
    host = TestHost(durations={"slow": 30})
    execution = host.run(flow("""
        name: exectimeout
        nodes:
          - {id: start, type: start}
          - {id: slow, type: python, call: "flowlib:spin", args: [30]}
          - {id: end, type: end}
        edges:
          - {from: start, to: slow}
          - {from: slow, to: end}
    """), timeout=0.5)
    assert execution.status == "timed_out"
    assert execution.error["type"] == "timeout"
    assert ExecutionResult.from_summary(execution.outcome()).exit_code == 1
    (cancelled,) = host.of("node.cancelled", "slow")
    assert cancelled.meta["reason"] == "the execution timed out" and cancelled.time == 0.5
    assert host.cancelled == ["slow"]


def test_end_return_keeps_type_and_last_end_wins():
    host = TestHost(durations={"slow": 0.3})
    execution = host.run(flow("""
        name: ends
        variables:
          - {name: data, type: object, default: {a: [1, 2]}}
        nodes:
          - {id: start, type: start}
          - {id: slow, type: python, call: "flowlib:echo", args: [late]}
          - {id: e1, type: end, return: "${data}"}
          - {id: e2, type: end, return: "late"}
        edges:
          - {from: start, to: e1}
          - {from: start, to: slow}
          - {from: slow, to: e2}
    """))
    assert execution.status == "completed"
    assert execution.result == "late"
    assert host.of("node.completed", "e1")[0].meta["return"] == {"a": [1, 2]}


def test_a_variable_left_unset_by_a_skipped_branch_is_an_undefined_variable_error():
    host = TestHost()
    execution = host.run(flow("""
        name: undefined
        variables:
          - {name: value, type: number, default: 3}
        nodes:
          - {id: start, type: start}
          - {id: check, type: condition, condition: "value > 10"}
          - {id: big, type: python, call: "flowlib:echo", args: [big], output: big}
          - {id: join, type: passthrough}
          - {id: use, type: python, call: "flowlib:echo", args: ["${big}"]}
          - {id: end, type: end}
        edges:
          - {from: start, to: check}
          - {from: check, to: big, condition: "true"}
          - {from: check, to: join, condition: "false"}
          - {from: big, to: join}
          - {from: join, to: use}
          - {from: use, to: end}
    """))
    assert execution.status == "failed"
    assert execution.error["type"] == "undefined_variable" and execution.error["node_id"] == "use"
    assert "big" in execution.error["message"]
    assert "use" not in host.dispatched, "inputs are resolved before dispatch"
    assert [e.type for e in host.events if e.node_id == "use"] == ["node.started", "node.failed"]


def test_a_transform_reading_an_unset_variable_fails_on_the_executor():
    host = TestHost()
    execution = host.run(flow("""
        name: transform-undefined
        variables:
          - {name: value, type: number, default: 3}
        nodes:
          - {id: start, type: start}
          - {id: check, type: condition, condition: "value > 10"}
          - {id: big, type: python, call: "flowlib:echo", args: [big], output: big}
          - {id: join, type: passthrough}
          - {id: shout, type: transform, template: "${big}!", output: shouted}
          - {id: end, type: end}
        edges:
          - {from: start, to: check}
          - {from: check, to: big, condition: "true"}
          - {from: check, to: join, condition: "false"}
          - {from: big, to: join}
          - {from: join, to: shout}
          - {from: shout, to: end}
    """))
    assert execution.status == "failed"
    assert execution.error["type"] == "undefined_variable" and execution.error["node_id"] == "shout"


def test_a_condition_that_cannot_be_evaluated_fails_its_node_with_an_expression_error():
    host = TestHost()
    execution = host.run(flow("""
        name: bad-condition
        variables:
          - {name: value, type: string, default: "three"}
        nodes:
          - {id: start, type: start}
          - {id: check, type: condition, condition: "int(value) > 10"}
          - {id: yes, type: passthrough}
          - {id: no, type: passthrough}
          - {id: end, type: end}
        edges:
          - {from: start, to: check}
          - {from: check, to: yes, condition: "true"}
          - {from: check, to: no, condition: "false"}
          - {from: yes, to: end}
          - {from: no, to: end}
    """))
    assert execution.status == "failed"
    assert execution.error["type"] == "expression_error" and execution.error["node_id"] == "check"
    assert not host.dispatched

"""node.log and node.progress from real worker processes, seen by a raw subscriber."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.language.loader import load
from goflow.workers import capture

pytestmark = pytest.mark.timeout(120)

TERMINAL = ("execution.completed", "execution.failed", "execution.cancelled")


def _subscriber(endpoint: str) -> zmq.Socket:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def _wait_subscribed(runtime: EmbeddedRuntime) -> None:
    while runtime.coordinator.call(lambda: runtime.coordinator.publisher.subscription_count) < 1:
        time.sleep(0.01)  # bounded by the test's timeout


def _events(sub: zmq.Socket, execution_id: str, until=TERMINAL) -> list[dict]:
    events = []
    while True:
        assert sub.poll(60_000), "no event within 60 s"
        _, payload = sub.recv_multipart()
        event = msgpack.unpackb(payload, raw=False)
        if event.get("execution_id") != execution_id:
            continue
        events.append(event)
        if event["type"] in until:
            return events


@pytest.fixture
def runtime():
    with EmbeddedRuntime(workers=1) as rt:
        rt.wait_for_workers(1)
        yield rt


def test_a_chatty_node_streams_bounded_ordered_masked_lines_before_it_completes(runtime, write_flow):
    path = write_flow("""
        name: chatty
        variables:
          - {name: token, type: string, default: hunter2-secret, secret: true}
        nodes:
          - {id: start, type: start}
          - {id: talk, type: python, call: "flowlib:chatty", args: [10000, "${token}"], output: n}
          - {id: end, type: end}
        edges:
          - {from: start, to: talk}
          - {from: talk, to: end}
    """)
    sub = _subscriber(runtime.events_endpoint)
    _wait_subscribed(runtime)
    execution_id, future = runtime.coordinator.submit(load(path))
    events = _events(sub, execution_id)
    assert future.result(30)["status"] == "completed"

    types = [e["type"] for e in events]
    completed = next(i for i, e in enumerate(events) if e["type"] == "node.completed" and e["node_id"] == "talk")
    logs = [e for e in events if e["type"] == "node.log"]
    assert logs
    assert max(i for i, t in enumerate(types) if t == "node.log") < completed, "a line came after node.completed"
    assert all(e["node_id"] == "talk" and e["attempt"] == 1 for e in logs)
    # batched: far fewer messages than lines
    lines = [line for e in logs for line in e["meta"]["lines"]]
    assert len(logs) * 50 < len(lines)
    dropped = sum(e["meta"]["dropped"] for e in logs)
    total = 5 + 2 + 10000  # five records, the secret and the stderr line, 10,000 printed lines
    assert len(lines) + dropped == total, "every line is either delivered or counted as dropped"
    assert len(lines) >= capture.BURST_LINES  # the burst always passes
    assert dropped > 0  # 10,000 lines at once exceed the stated rate

    records = [line for line in lines if line["stream"] == "log"]
    assert [(r["level"], r["text"]) for r in records] == [
        ("debug", "debug record"), ("info", "info record"), ("warning", "warning record"),
        ("error", "error record"), ("critical", "critical record")]
    assert all(r["logger"] == "flowlib.chatty" for r in records)
    assert {"ts", "stream", "level", "text"} <= set(lines[0])
    secret_lines = [line["text"] for line in lines if line["text"].startswith("the secret is")]
    assert secret_lines == ["the secret is ***"]
    assert "hunter2-secret" not in repr(events)
    assert [line["text"] for line in lines if line["stream"] == "stderr"] == ["to stderr"]
    printed = [int(line["text"].split()[1]) for line in lines if line["text"].startswith("line ")]
    assert printed == sorted(printed) and len(set(printed)) == len(printed), "lines arrive in order, once"
    assert printed[: capture.BURST_LINES - 7] == list(range(capture.BURST_LINES - 7))

    progress = [e for e in events if e["type"] == "node.progress"]
    assert progress and max(i for i, t in enumerate(types) if t == "node.progress") < completed
    done = [e["meta"]["progress"] for e in progress]
    assert done == sorted(done) and progress[-1]["meta"]["total"] == 10000
    assert progress[-1]["meta"]["progress"] == 9900 and progress[-1]["meta"]["message"] == "printed 9900"


def test_lines_arrive_while_the_node_is_still_running(runtime, write_flow, tmp_path):
    release = tmp_path / "release"
    path = write_flow(f"""
        name: live
        nodes:
          - {{id: start, type: start}}
          - {{id: wait, type: python, call: "flowlib:wait_for_file", args: ["{release}", 3]}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: wait}}
          - {{from: wait, to: end}}
    """)
    sub = _subscriber(runtime.events_endpoint)
    _wait_subscribed(runtime)
    execution_id, future = runtime.coordinator.submit(load(path))
    seen: list[str] = []
    before = _events(sub, execution_id, until=("node.log", *TERMINAL))
    assert before[-1]["type"] == "node.log", "the node only finishes once the test saw its lines"
    seen += [line["text"] for line in before[-1]["meta"]["lines"]]
    while len(seen) < 3:
        more = _events(sub, execution_id, until=("node.log", *TERMINAL))
        assert more[-1]["type"] == "node.log"
        seen += [line["text"] for line in more[-1]["meta"]["lines"]]
    assert seen == ["waiting line 0", "waiting line 1", "waiting line 2"]
    release.write_text("go")
    rest = _events(sub, execution_id)
    assert future.result(30)["status"] == "completed"
    assert "node.completed" in [e["type"] for e in rest]


def test_a_quiet_node_sends_no_log_events_and_progress_is_a_no_op_outside_workers(runtime, write_flow):
    import goflow

    goflow.progress(1, 2, "nothing listens")  # outside a worker: nothing happens, nothing fails
    path = write_flow("""
        name: quiet
        nodes:
          - {id: start, type: start}
          - {id: add, type: python, call: "flowlib:add", args: [1, 2]}
          - {id: end, type: end}
        edges:
          - {from: start, to: add}
          - {from: add, to: end}
    """)
    sub = _subscriber(runtime.events_endpoint)
    _wait_subscribed(runtime)
    execution_id, future = runtime.coordinator.submit(load(path))
    events = _events(sub, execution_id)
    assert future.result(30)["status"] == "completed"
    assert not [e for e in events if e["type"] in ("node.log", "node.progress")]


def test_node_log_is_stored_in_history_and_printed_by_goflow_logs(write_flow, tmp_path, capsys):
    from goflow.cli import main
    from goflow.history.store import Store

    db = tmp_path / "history.db"
    path = write_flow("""
        name: stored
        nodes:
          - {id: start, type: start}
          - {id: talk, type: python, call: "flowlib:chatty", args: [3]}
          - {id: end, type: end}
        edges:
          - {from: start, to: talk}
          - {from: talk, to: end}
    """)
    with EmbeddedRuntime(workers=1, db=db) as rt:
        rt.wait_for_workers(1)
        execution_id, future = rt.coordinator.submit(load(path))
        assert future.result(30)["status"] == "completed"
    with Store(db, readonly=True) as store:
        stored = [msgpack.unpackb(payload) for payload in store.events(execution_id, nodes=["talk"])]
    types = [event["type"] for event in stored]
    assert "node.log" in types and types.index("node.log") < types.index("node.completed")
    assert main(["logs", execution_id, "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "node.log" in out and "line 2" in out and "[warning] warning record" in out


def test_output_bytes_and_line_length_are_bounded_and_counted(runtime, write_flow):
    path = write_flow("""
        name: wide
        nodes:
          - {id: start, type: start}
          - {id: talk, type: python, call: "flowlib:wide", args: [600, 4000, 10000]}
          - {id: end, type: end}
        edges:
          - {from: start, to: talk}
          - {from: talk, to: end}
    """)
    sub = _subscriber(runtime.events_endpoint)
    _wait_subscribed(runtime)
    execution_id, future = runtime.coordinator.submit(load(path))
    events = _events(sub, execution_id)
    assert future.result(30)["status"] == "completed"
    logs = [e for e in events if e["type"] == "node.log"]
    lines = [line["text"] for e in logs for line in e["meta"]["lines"]]
    dropped = sum(e["meta"]["dropped"] for e in logs)
    cut = capture.MAX_LINE_CHARS
    assert lines[0] == "w" * cut + f"… [{10000 - cut} characters cut]"
    assert len(lines) + dropped == 601 and dropped > 0
    kept = sum(len(text) for text in lines)
    assert kept <= capture.MAX_BYTES < kept + 4000, "lines stop where the next one would pass the byte bound"
    assert [int(text.rstrip("x")) for text in lines[1:]] == list(range(len(lines) - 1))


def test_no_line_is_published_after_the_node_was_cancelled(runtime, write_flow):
    path = write_flow("""
        name: babbling
        nodes:
          - {id: start, type: start}
          - {id: talk, type: python, call: "flowlib:babble", args: [60]}
          - {id: end, type: end}
        edges:
          - {from: start, to: talk}
          - {from: talk, to: end}
    """)
    quiet = write_flow("""
        name: after
        nodes:
          - {id: start, type: start}
          - {id: add, type: python, call: "flowlib:add", args: [1, 2]}
          - {id: end, type: end}
        edges:
          - {from: start, to: add}
          - {from: add, to: end}
    """, name="after.yaml")
    sub = _subscriber(runtime.events_endpoint)
    _wait_subscribed(runtime)
    execution_id, future = runtime.coordinator.submit(load(path))
    _events(sub, execution_id, until=("node.log",))
    runtime.coordinator.cancel(execution_id)
    assert future.result(30)["status"] == "cancelled"
    # The only worker finishes the cancelled task (its last lines come with its result)
    # before it runs the next execution's node: once that completed, all is in.
    _, after = runtime.coordinator.submit(load(quiet))
    assert after.result(30)["status"] == "completed"
    published = runtime.coordinator.call(lambda: runtime.coordinator.publisher.replay(execution_id, 1))
    types = [msgpack.unpackb(payload)["type"] for payload in published]
    assert "node.log" in types
    cancelled = types.index("node.cancelled")
    assert "node.log" not in types[cancelled:], "a line came after node.cancelled"

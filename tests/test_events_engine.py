"""The engine's event stream, seen by raw pyzmq+msgpack subscribers and by the Monitor."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from goflow.events.filter import EventFilter
from goflow.events.meta import undeclared
from goflow.language.loader import load
from goflow.events.monitor import Monitor
from goflow.coordinator.embedded import EmbeddedRuntime

pytestmark = pytest.mark.timeout(90)

PAYLOAD_KEYS = {"v", "type", "ts", "epoch", "seq", "eseq", "execution_id", "workflow", "node_id", "node_type",
                "status", "attempt", "vseq", "error", "meta"}
EXECUTION_TYPES = {"execution.started", "execution.failed"}
NODE_TYPES = {"node.started", "node.completed", "node.failed", "node.skipped", "node.retrying",
              "variable.changed", "condition.evaluated", "loop.started", "loop.iteration", "loop.completed",
              "progress.update"}

EVERYTHING = """
name: everything
variables:
  - {name: items, type: array, default: [1, 2, 3, 4]}
  - {name: token, type: string, default: s3cret, secret: true}
  - {name: counter, type: string}
nodes:
  - {id: start, type: start}
  - {id: check, type: condition, condition: "len(items) > 2"}
  - {id: never, type: passthrough}
  - id: each
    type: loop
    collection: items
    item: n
    body: [square]
    break_condition: "n == 3"
    output: squares
  - {id: square, type: python, call: "flowlib:add", args: ["${n}", "${n}"], output: sq}
  - {id: par, type: parallel, branches: [[left], [right]]}
  - {id: left, type: python, call: "flowlib:echo", args: [left], output: l}
  - {id: right, type: python, call: "flowlib:echo", args: [right], output: r}
  - id: flaky
    type: python
    call: "flowlib:flaky"
    args: ["${counter}", 1]
    retry: {max_attempts: 2, initial_delay: 10ms}
  - {id: leak, type: python, call: "flowlib:echo", args: ["Bearer ${token}"], output: header}
  - {id: boom, type: python, call: "flowlib:fail", args: [kaboom]}
  - {id: end, type: end}
edges:
  - {from: start, to: check}
  - {from: check, to: each, condition: "true"}
  - {from: check, to: never, condition: "false"}
  - {from: each, to: par}
  - {from: par, to: flaky}
  - {from: flaky, to: leak}
  - {from: leak, to: boom}
  - {from: boom, to: end}
  - {from: never, to: end}
"""


def fan_out_yaml(count: int) -> str:
    """start -> ``count`` no-op python nodes -> end."""
    nodes = "".join(f"  - {{id: n{i}, type: python, call: 'flowlib:noop'}}\n" for i in range(count))
    edges = "".join(f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}\n" for i in range(count))
    return ("name: many\nnodes:\n  - {id: start, type: start}\n  - {id: end, type: end}\n" + nodes
            + "edges:\n" + edges)


def _raw_subscriber(context: zmq.Context, endpoint: str, prefixes=(b"",), rcvhwm: int = 0) -> zmq.Socket:
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    for prefix in prefixes:
        sub.setsockopt(zmq.SUBSCRIBE, prefix)
    sub.connect(endpoint)
    return sub


def _wait_subscriptions(runtime: EmbeddedRuntime, count: int) -> None:
    while runtime.coordinator.call(lambda: runtime.coordinator.publisher.subscription_count) < count:
        time.sleep(0.01)  # bounded by the test's timeout


def _collect(sub: zmq.Socket, execution_id: str, timeout: float = 30) -> list[tuple[str, dict]]:
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sub.poll(200):
            continue
        topic, payload = sub.recv_multipart()
        event = msgpack.unpackb(payload, raw=False)
        events.append((topic.decode(), event))
        if event.get("execution_id") == execution_id and event["type"] in (
                "execution.completed", "execution.failed", "execution.cancelled"):
            return events
    raise AssertionError("the execution never finished")


@pytest.fixture
def runtime():
    with EmbeddedRuntime(workers=2) as rt:
        rt.wait_for_workers(2)
        yield rt


def test_every_type_is_emitted_with_documented_fields(runtime, write_flow, tmp_path):
    workflow = load(write_flow(EVERYTHING))
    context = zmq.Context.instance()
    sub = _raw_subscriber(context, runtime.events_endpoint)
    _wait_subscriptions(runtime, 1)
    execution_id, future = runtime.coordinator.submit(workflow, {"counter": str(tmp_path / "c")})
    events = _collect(sub, execution_id)
    sub.close(0)
    assert future.result(10)["status"] == "failed"

    mine = [(t, e) for t, e in events if e.get("execution_id") == execution_id]
    types = {e["type"] for _, e in mine}
    assert EXECUTION_TYPES | NODE_TYPES <= types, (EXECUTION_TYPES | NODE_TYPES) - types

    for topic, event in mine:
        assert set(event) == PAYLOAD_KEYS, set(event) ^ PAYLOAD_KEYS
        assert not undeclared(event["type"], event["meta"]), (event["type"], undeclared(event["type"], event["meta"]))
        assert event["v"] == 2 and event["workflow"] == "everything" and event["epoch"]
        assert isinstance(event["ts"], float)
        expected = f"{event['type']}/{execution_id}/" + (f"{event['node_id']}/" if event["node_id"] else "")
        assert topic == expected
        if event["type"] == "variable.changed" and event["meta"]["name"] == "token":
            assert event["meta"]["value"] == "***"
    assert "s3cret" not in json.dumps([e for _, e in mine], default=str), "a secret leaked by value"
    leak_done = [e for _, e in mine if e["type"] == "node.completed" and e["node_id"] == "leak"][0]
    assert leak_done["meta"]["output"] == "Bearer ***"
    leak_started = [e for _, e in mine if e["type"] == "node.started" and e["node_id"] == "leak"][0]
    assert leak_started["meta"]["inputs"]["args"] == ["Bearer ***"]

    eseqs = [e["eseq"] for _, e in mine]
    assert eseqs == list(range(1, len(eseqs) + 1)), "eseq is not gap-free"
    seqs = [e["seq"] for _, e in mine]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # Started before completed, for every node run.
    position = {}
    for index, (_, event) in enumerate(mine):
        key = (event["type"], event["node_id"], event["meta"].get("index"), event["attempt"])
        position.setdefault(key, index)
    for (kind, node, index, attempt), at in position.items():
        if kind in ("node.completed", "node.failed"):
            assert position[("node.started", node, index, attempt)] < at

    by_type = {}
    for _, event in mine:
        by_type.setdefault(event["type"], []).append(event)
    assert [e["meta"]["index"] for e in by_type["loop.iteration"]] == [0, 1]
    assert by_type["loop.completed"][0]["meta"]["broken"] is True
    assert by_type["loop.completed"][0]["meta"]["break_index"] == 2
    breaks = [e for e in by_type["condition.evaluated"] if e["meta"]["kind"] == "break_condition"]
    assert [e["meta"]["result"] for e in breaks] == [False, False, True]
    assert {e["node_id"] for e in by_type["node.skipped"]} == {"never"}
    retry = by_type["node.retrying"][0]
    assert retry["node_id"] == "flaky" and retry["attempt"] == 1 and retry["error"]["type"] == "python_error"
    failed = by_type["execution.failed"][0]
    assert {k: failed["error"][k] for k in ("type", "message", "node_id")} == {
        "type": "python_error", "message": "ValueError: kaboom", "node_id": "boom"}
    assert failed["error"]["exception"] == "ValueError" and "kaboom" in failed["error"]["traceback"]
    progress = by_type["progress.update"]
    assert progress[0]["meta"]["resolved"] == 0 and progress[-1]["meta"]["failed"] >= 1
    squares = [e for e in by_type["variable.changed"] if e["meta"]["name"] == "squares"]
    assert squares[0]["meta"]["value"] == [2, 4]


def test_cancelled_and_completed_executions(runtime, write_flow):
    context = zmq.Context.instance()
    sub = _raw_subscriber(context, runtime.events_endpoint, [b"execution."])
    _wait_subscriptions(runtime, 1)
    slow = load(write_flow("""
        name: slow
        nodes:
          - {id: start, type: start}
          - {id: spin, type: python, call: "flowlib:spin", args: [30]}
          - {id: end, type: end}
        edges:
          - {from: start, to: spin}
          - {from: spin, to: end}
    """, "slow.yaml"))
    execution_id, future = runtime.coordinator.submit(slow)
    while not runtime.coordinator.call(lambda: execution_id in runtime.coordinator.executions and
                                       runtime.coordinator.executions[execution_id].running_nodes):
        time.sleep(0.01)  # until the node runs; bounded by the test's timeout
    runtime.coordinator.cancel(execution_id)
    events = _collect(sub, execution_id)
    assert [e["type"] for _, e in events] == ["execution.started", "execution.cancelled"]
    assert future.result(10)["status"] == "cancelled"
    sub.close(0)


def test_prefix_filters_deliver_exactly_the_matching_events(runtime, write_flow, tmp_path):
    workflow = load(write_flow(EVERYTHING))
    context = zmq.Context.instance()
    everything = _raw_subscriber(context, runtime.events_endpoint)
    failures = _raw_subscriber(context, runtime.events_endpoint, [b"node.failed/"])
    _wait_subscriptions(runtime, 2)
    execution_id = "filter-test-execution"
    square_only = _raw_subscriber(context, runtime.events_endpoint,
                                  [f"node.completed/{execution_id}/square/".encode()])
    _wait_subscriptions(runtime, 3)
    runtime.coordinator.submit(workflow, {"counter": str(tmp_path / "c")}, execution_id=execution_id)
    all_events = _collect(everything, execution_id)

    def take(sock, count):
        """``count`` events (each awaited with a generous bound), then check nothing more is queued."""
        out = []
        while len(out) < count:
            assert sock.poll(30_000), f"only {len(out)} of {count} events arrived"
            out.append(msgpack.unpackb(sock.recv_multipart()[1], raw=False))
        assert not sock.poll(100), "an event outside the filter arrived"
        return out

    expected_failures = [e["seq"] for t, e in all_events if t.startswith("node.failed/")]
    expected_square = [e["seq"] for t, e in all_events if t.startswith(f"node.completed/{execution_id}/square/")]
    assert [e["seq"] for e in take(failures, len(expected_failures))] == expected_failures and expected_failures
    assert [e["seq"] for e in take(square_only, len(expected_square))] == expected_square \
        and len(expected_square) == 2
    for sock in (everything, failures, square_only):
        sock.close(0)


def test_a_subscriber_that_never_reads_does_not_stop_the_run(write_flow):
    path = write_flow(fan_out_yaml(300))
    with EmbeddedRuntime(workers=2, sndhwm=10) as runtime:
        context = zmq.Context.instance()
        stalled = _raw_subscriber(context, runtime.events_endpoint, rcvhwm=10)
        _wait_subscriptions(runtime, 1)
        _, future = runtime.coordinator.submit(load(path))
        assert future.result(60)["status"] == "completed"
        published = runtime.coordinator.call(lambda: runtime.coordinator.publisher.last_seq)
        got = 0
        while stalled.poll(100):
            stalled.recv_multipart()
            got += 1
        assert got < published, "the stalled subscriber should have lost events (PUB drops at the HWM)"
        # The reliable Monitor still gets the whole history afterwards.
        monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint)
        execution_id = _
        replayed = list(monitor.subscribe(EventFilter(executions=[execution_id]), since="start",
                                          until=lambda e: e.is_terminal, timeout=10))
        assert [e.eseq for e in replayed] == list(range(1, len(replayed) + 1))
        assert replayed[-1].type == "execution.completed"
        monitor.close()
        stalled.close(0)


def test_forced_drops_are_repaired_by_the_reliable_monitor(write_flow):
    path = write_flow(fan_out_yaml(400))
    with EmbeddedRuntime(workers=2, sndhwm=5) as runtime:
        runtime.wait_for_workers(2)
        execution_id = "drops-execution"
        monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint)
        received = []

        def slow_consumer():
            for event in monitor.subscribe(EventFilter(executions=[execution_id]), since="start",
                                           until=lambda e: e.is_terminal, timeout=30):
                received.append(event)
                if len(received) % 50 == 0:
                    time.sleep(0.05)  # fall behind on purpose

        import threading

        thread = threading.Thread(target=slow_consumer)
        thread.start()
        _, future = runtime.coordinator.submit(load(path), execution_id=execution_id)
        assert future.result(60)["status"] == "completed"
        thread.join(60)
        published = runtime.coordinator.call(lambda: runtime.coordinator.publisher.replay(execution_id, 1))
        assert [e.eseq for e in received] == list(range(1, len(published) + 1))
        assert [e.type for e in received][-1] == "execution.completed"
        assert monitor.stats["lost"] == 0
        monitor.close()




def test_goflow_run_publish_and_watch_json(write_flow, tmp_path, free_ports):
    path = write_flow(EVERYTHING)
    events_port, control_port = free_ports(2)
    events, control = f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{control_port}"
    run = subprocess.Popen([sys.executable, "-m", "goflow", "run", str(path), "--workers", "2", "--json",
                            "--publish", events, "--control", control, "--await-subscribers", "1",
                            "--var", f"counter={tmp_path / 'c'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    watch = subprocess.Popen([sys.executable, "-m", "goflow", "watch", events, "--control", control, "--json",
                              "--type", "node.failed", "--type", "execution.failed"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 1, err
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any('"execution.failed"' in line for line in lines):
            line = watch.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        watch.send_signal(signal.SIGINT)
        try:
            watch.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watch.kill()
    decoded = [json.loads(line) for line in lines]
    assert [e["type"] for e in decoded] == ["node.failed", "execution.failed"]
    assert decoded[0]["topic"].startswith("node.failed/") and decoded[0]["node_id"] == "boom"
    assert json.loads(out)["status"] == "failed"


def test_many_subscribers_each_receive_everything(write_flow, tmp_path):
    workflow = load(write_flow(EVERYTHING))
    with EmbeddedRuntime(workers=2) as runtime:
        runtime.wait_for_workers(2)
        context = zmq.Context.instance()
        subs = [_raw_subscriber(context, runtime.events_endpoint, [b"node.", b"execution."]) for _ in range(100)]
        _wait_subscriptions(runtime, 200)
        execution_id, future = runtime.coordinator.submit(workflow, {"counter": str(tmp_path / "c")})
        assert future.result(60)["status"] == "failed"
        published = runtime.coordinator.call(lambda: runtime.coordinator.publisher.replay(execution_id, 1))
        expected = sorted(msgpack.unpackb(p, raw=False)["seq"] for p in published
                          if msgpack.unpackb(p, raw=False)["type"].startswith(("node.", "execution.")))
        for sub in subs:
            got = []
            while len(got) < len(expected) and sub.poll(2000):
                got.append(msgpack.unpackb(sub.recv_multipart()[1], raw=False)["seq"])
            assert got == expected
            sub.close(0)


def test_garbage_on_the_coordinators_sockets_never_stops_it(runtime, write_flow):
    context = zmq.Context.instance()
    control = context.socket(zmq.DEALER)
    control.connect(runtime.control_endpoint)
    for frames in ([b"\xff\x00garbage"], [b""], [b"a", b"b", b"c", b"d", b"e"], [msgpack.packb([1, 2])],
                   [msgpack.packb({"no": "op"})], [msgpack.packb({"op": "execution", "execution_id": 5})]):
        control.send_multipart(frames)
        if control.poll(2000):
            reply = msgpack.unpackb(control.recv_multipart()[-1], raw=False)
            assert reply["ok"] is False and reply["error"]["type"] in ("bad_request", "not_found")
    worker = context.socket(zmq.DEALER)
    worker.connect(runtime.coordinator.workers_endpoint)
    for frames in ([b"\x00\x01"], [msgpack.packb({"t": "result", "id": "nope"})], [b"x", b"y"],
                   [msgpack.packb({"t": "ready", "v": 99})]):
        worker.send_multipart(frames)
    sub_garbage = context.socket(zmq.PUB)  # a publisher-side peer sending junk subscriptions
    sub_garbage.connect(runtime.events_endpoint)
    while runtime.coordinator.call(lambda: runtime.coordinator.broker.stats["bad_worker_frames"]) < 2:
        time.sleep(0.01)  # the garbage was received and counted; bounded by the test's timeout
    result = runtime.coordinator.submit(load(write_flow("""
        name: still-alive
        nodes:
          - {id: start, type: start}
          - {id: add, type: python, call: "flowlib:add", args: [1, 2], output: three}
          - {id: end, type: end, return: "${three}"}
        edges:
          - {from: start, to: add}
          - {from: add, to: end}
    """)))[1].result(30)
    assert result["status"] == "completed" and result["result"] == 3
    control.send(msgpack.packb({"op": "executions", "id": 7}))
    assert control.poll(5000)
    reply = msgpack.unpackb(control.recv(), raw=False)
    assert reply["ok"] and reply["id"] == 7
    for sock in (control, worker, sub_garbage):
        sock.close(0)


@pytest.mark.parametrize("ready", [{"worker": "x" * 100_000}, {"worker": "a/b"}, {"worker": "tab\tname"},
                                   {"worker": "w-labels", "labels": {str(i): "v" for i in range(65)}},
                                   {"worker": "w-long-label", "labels": {"k": "v" * 300}}])
def test_a_worker_with_a_name_or_labels_out_of_bounds_is_refused_with_the_reason(runtime, ready):
    """A worker's name is a topic segment and shows in logs and pages: it is checked, and the
    worker is told why it was refused instead of joining with a 100 KB or '/'-split name."""
    known = runtime.coordinator.call(lambda: {w.name for w in runtime.coordinator.broker.workers.workers.values()})
    worker = zmq.Context.instance().socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(runtime.coordinator.workers_endpoint)
    try:
        worker.send(msgpack.packb({"t": "ready", "v": 1, "credits": 1, **ready}))
        assert worker.poll(10_000)
        reply = msgpack.unpackb(worker.recv(), raw=False)
    finally:
        worker.close(0)
    assert reply["t"] == "shutdown" and reply["reason"].startswith("refused: ")
    assert ("labels" in reply["reason"]) == ("labels" in ready)
    assert len(reply["reason"]) < 300
    assert runtime.coordinator.call(lambda: {w.name for w in runtime.coordinator.broker.workers.workers.values()}) == known


def test_value_size_bound_is_configurable(write_flow):
    workflow = load(write_flow("""
        name: sizes
        nodes:
          - {id: start, type: start}
          - {id: big, type: python, call: "flowlib:echo", args: ["xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"], output: text}
          - {id: end, type: end}
        edges:
          - {from: start, to: big}
          - {from: big, to: end}
    """))
    with EmbeddedRuntime(workers=1, max_value_bytes=32) as runtime:
        execution_id, future = runtime.coordinator.submit(workflow)
        assert future.result(30)["status"] == "completed"
        events = [msgpack.unpackb(p, raw=False)
                  for p in runtime.coordinator.call(lambda: runtime.coordinator.publisher.replay(execution_id, 1))]
    done = [e for e in events if e["type"] == "node.completed" and e["node_id"] == "big"][0]
    assert done["meta"]["output"]["$omitted"] is True and done["meta"]["output"]["type"] == "string"
    changed = [e for e in events if e["type"] == "variable.changed" and e["meta"]["name"] == "text"][0]
    assert changed["meta"]["value"]["$omitted"] is True and changed["vseq"] == changed["eseq"]

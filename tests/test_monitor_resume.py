"""A reliable Monitor that stalls and resumes with ``since=<seq>`` (as bench/soak.py's
subscribers do) delivers every event from the resume point exactly once and in order, or
counts what it cannot: the soak once saw 8-15 events missing in the middle of 4 executions'
streams with ``stats["lost"] == 0`` (docs/reliability.md).

Root cause found: when the first control request of a resumed all-executions subscription
(``replay_seq`` to learn the latest seq) failed, e.g. timed out on a busy coordinator, the
tracker took the first live event as its base, so everything between the resume point and
that event was skipped silently. Real coordinator, real workers, real sockets; the stall is
injected by blocking the coordinator's reactor.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import msgpack

from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.events.monitor import Monitor
from goflow.language.loader import load

try:
    from tests.test_events_engine import fan_out_yaml
except ImportError:  # pragma: no cover - rootdir without package import
    from test_events_engine import fan_out_yaml


def chain_yaml(count: int, seconds: float) -> str:
    """start -> ``count`` python nodes in a row, each napping ``seconds`` and setting a
    variable -> end: a steady stream of node and variable events while subscribers follow."""
    nodes = "".join(f"  - {{id: n{i}, type: python, call: 'flowlib:timed', args: [{seconds}, {i}], "
                    f"output: v{i % 5}}}\n" for i in range(count))
    order = ["start", *(f"n{i}" for i in range(count)), "end"]
    edges = "".join(f"  - {{from: {a}, to: {b}}}\n" for a, b in zip(order, order[1:]))
    return ("name: steady\nnodes:\n  - {id: start, type: start}\n  - {id: end, type: end}\n" + nodes
            + "edges:\n" + edges)


def ring(runtime: EmbeddedRuntime, start: int) -> list[dict]:
    """The coordinator's own stream from ``start`` (its global replay ring), decoded."""
    publisher = runtime.coordinator.publisher
    pairs = runtime.coordinator.call(lambda: publisher.replay_seq(start))
    return [msgpack.unpackb(payload, raw=False) for _, payload in pairs]


def per_execution(events) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = defaultdict(list)
    for ev in events:
        get = ev.get if isinstance(ev, dict) else lambda k, ev=ev: getattr(ev, k)
        if get("execution_id") is not None:
            out[get("execution_id")].append((get("eseq"), get("type"), get("node_id")))
    return dict(out)


def assert_same_stream(delivered, runtime: EmbeddedRuntime, start: int) -> None:
    """``delivered`` is the coordinator's stream from ``start`` up to its last event: every
    seq once, in order, and per execution the same events as the replay log."""
    last = delivered[-1].seq
    want = [e for e in ring(runtime, start) if e["seq"] <= last]
    assert [e.seq for e in delivered] == list(range(start, last + 1))
    assert per_execution(delivered) == per_execution(want)


def test_resume_whose_first_control_request_times_out_repairs_from_the_resume_point(write_flow):
    workflow = load(write_flow(fan_out_yaml(20)))
    with EmbeddedRuntime(workers=2, sndhwm=5) as runtime:
        runtime.wait_for_workers(2)
        for k in range(3):   # what the subscriber had partly read before it reconnected
            _, future = runtime.coordinator.submit(workflow, execution_id=f"before-{k}")
            assert future.result(60)["status"] == "completed"
        resume = ring(runtime, 1)[-1]["seq"] // 2       # "right after its last event"
        monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint, control_timeout=0.3)
        first_socket = monitor.control.socket
        delivered: list = []
        error: list[BaseException] = []

        def consume() -> None:
            try:
                for ev in monitor.subscribe(since=resume, timeout=60,
                                            until=lambda e: e.execution_id == "after" and e.is_terminal):
                    delivered.append(ev)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                error.append(exc)

        blocked, release = threading.Event(), threading.Event()

        def stall() -> None:   # the coordinator too busy to answer the control socket
            blocked.set()
            release.wait(60)

        runtime.coordinator.call_soon(stall)
        consumer = threading.Thread(target=consume, daemon=True)
        try:
            assert blocked.wait(30)
            consumer.start()
            deadline = time.monotonic() + 30   # a generous bound on a loaded machine
            while monitor.control.socket is first_socket and time.monotonic() < deadline:
                time.sleep(0.01)  # until the replay_seq request timed out (the client reconnects)
            assert monitor.control.socket is not first_socket, "the control request never timed out"
            monitor.control.timeout = 30.0   # the repair's own requests must not time out
        finally:
            release.set()
        _, future = runtime.coordinator.submit(workflow, execution_id="after")  # new, unseen
        assert future.result(60)["status"] == "completed"
        consumer.join(90)
        assert not consumer.is_alive() and not error, error
        assert delivered and delivered[-1].execution_id == "after" and delivered[-1].is_terminal
        assert_same_stream(delivered, runtime, resume)
        assert monitor.stats["lost"] == 0 and monitor.stats["repaired"] > 0
        monitor.close()


def test_a_stalling_subscriber_that_resumes_with_since_gets_every_event_once(write_flow):
    """The soak's subscriber pattern with forced drops (send and receive high-water marks of
    5): follow everything, stall now and then, stop after a few hundred events and resume
    right after the last one, while several executions publish."""
    workflow = load(write_flow(chain_yaml(40, 0.02)))
    executions = [f"steady-{k}" for k in range(4)]
    with EmbeddedRuntime(workers=2, sndhwm=5) as runtime:
        runtime.wait_for_workers(2)
        delivered: list = []
        stats: list[dict] = []
        error: list[BaseException] = []
        finished: set[str] = set()

        def consume() -> None:
            since: int | str = "start"
            try:
                while not finished >= set(executions):
                    monitor = Monitor(runtime.events_endpoint, runtime.control_endpoint, rcvhwm=5)
                    count = [0]

                    def enough(ev, count=count) -> bool:
                        count[0] += 1
                        return count[0] >= 250 or finished >= set(executions)

                    for ev in monitor.subscribe(since=since, timeout=30, until=enough):
                        delivered.append(ev)
                        since = ev.seq + 1
                        if ev.is_terminal:
                            finished.add(ev.execution_id)
                        if len(delivered) % 97 == 0:
                            time.sleep(0.2)   # a stalled subscriber falls behind (drops)
                    stats.append(dict(monitor.stats))
                    monitor.close()
                    if monitor.timed_out:
                        return
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                error.append(exc)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        futures = [runtime.coordinator.submit(workflow, execution_id=eid)[1] for eid in executions]
        for future in futures:
            assert future.result(120)["status"] == "completed"
        consumer.join(120)
        assert not consumer.is_alive() and not error, error
        assert finished == set(executions)
        assert_same_stream(delivered, runtime, 1)
        assert len(stats) > 1, "the subscriber never resumed"
        assert sum(s["lost"] for s in stats) == 0
        assert sum(s["repaired"] for s in stats) > 0   # drops happened, and were repaired

"""Monitor: reliable delivery (gap repair, late join, heartbeat tail, epoch change)."""

from __future__ import annotations

import asyncio
import threading
import time

import msgpack
import pytest

from goflow.events import EventFilter, TERMINAL_TYPES
from goflow.events.filter import EventFilter as _EF  # noqa: F401 - public path check
from goflow.events.monitor import Monitor, _Reliable

try:
    from tests.test_events_publisher import Harness, wait_for
except ImportError:  # pragma: no cover - rootdir without package import
    from test_events_publisher import Harness, wait_for


def n_prefixes(filt, reliable=True):
    import collections
    return len(_Reliable(filt, collections.Counter(), collections.deque(), True).prefixes()) \
        if reliable else len(filt.prefixes())


class Consumer(threading.Thread):
    """Iterate a Monitor subscription in a thread, sleeping ``stall`` at the first event."""

    def __init__(self, monitor, stall=0.0, **kw):
        super().__init__(daemon=True)
        self.monitor, self.stall, self.kw = monitor, stall, kw
        self.events = []
        self.error = None
        self.start()

    def run(self):
        try:
            for ev in self.monitor.subscribe(**self.kw):
                self.events.append(ev)
                if self.stall and len(self.events) == 1:
                    time.sleep(self.stall)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def result(self, timeout=100):
        self.join(timeout)  # a generous bound (a loaded machine), within pytest-timeout
        assert not self.is_alive(), "consumer did not finish"
        if self.error:
            raise self.error
        return self.events


def terminal(ev):
    return ev.type in TERMINAL_TYPES


def emit_execution(p, eid, n, *, close=True, start=True):
    if start:
        p.open_execution(eid, "wf")
        p.emit("execution.started", eid, status="running")
    for i in range(n):
        p.emit("node.completed", eid, node_id=f"n{i % 37}", meta={"i": i})
    if close:
        p.emit("execution.completed", eid, status="completed")
        p.close_execution(eid)


def published(h, eid):
    return h.call(lambda p: p.replay(eid))


@pytest.fixture
def harness():
    h = Harness(sndhwm=5, heartbeat_every=0.1)
    yield h
    h.stop()


def test_forced_drops_are_repaired_for_a_named_execution(harness):
    mon = Monitor(harness.events_ep, harness.control_ep, rcvhwm=5)
    filt = EventFilter(executions=["E1"])
    c = Consumer(mon, stall=0.3, filter=filt, until=terminal, timeout=20)
    harness.wait_subscriptions(n_prefixes(filt))
    harness.call(lambda p: emit_execution(p, "E1", 3000))
    events = c.result()
    assert [e.eseq for e in events] == list(range(1, 3003))
    assert [e.seq for e in events] == list(range(1, 3003))
    # the delivered stream equals the published one, payload for payload
    assert [msgpack.unpackb(p, raw=False)["seq"] for p in published(harness, "E1")] == \
        [e.seq for e in events]
    assert events[-1].type == "execution.completed"
    assert mon.stats["repaired"] > 0 and mon.stats["lost"] == 0
    assert mon.stats["delivered"] == 3002
    mon.close()


def test_forced_drops_are_repaired_for_all_executions(harness):
    mon = Monitor(harness.events_ep, harness.control_ep, rcvhwm=5)
    c = Consumer(mon, stall=0.3, until=lambda ev: ev.type == "worker.lost", timeout=20)
    harness.wait_subscriptions(1)

    def scenario(p):
        p.emit("worker.joined", worker_id="w1")
        for k in range(3):
            emit_execution(p, f"E{k}", 700, close=False)
        for k in range(3):
            p.emit("execution.completed", f"E{k}")
        p.emit("worker.lost", worker_id="w1")

    harness.call(scenario)
    events = c.result()
    assert [e.seq for e in events] == list(range(1, 2109))
    for k in range(3):
        assert [e.eseq for e in events if e.execution_id == f"E{k}"] == list(range(1, 703))
    assert mon.stats["repaired"] > 0 and mon.stats["lost"] == 0
    assert mon.stats["duplicates_dropped"] >= 0
    mon.close()


def test_filter_applies_after_reliable_repair(harness):
    mon = Monitor(harness.events_ep, harness.control_ep, rcvhwm=5)
    filt = EventFilter(types=["node.completed", "execution.completed"], executions=["E1"],
                       nodes=None)
    c = Consumer(mon, stall=0.2, filter=filt, until=terminal, timeout=20)
    harness.wait_subscriptions(n_prefixes(filt))
    harness.call(lambda p: emit_execution(p, "E1", 1000))
    events = c.result()
    assert [e.eseq for e in events] == list(range(2, 1003))
    assert {e.type for e in events} == {"node.completed", "execution.completed"}
    assert mon.stats["lost"] == 0
    mon.close()


def test_late_joiner_since_start_gets_whole_history_then_live(harness):
    harness.call(lambda p: emit_execution(p, "E1", 300, close=False))
    mon = Monitor(harness.events_ep, harness.control_ep)
    filt = EventFilter(executions=["E1"])
    c = Consumer(mon, filter=filt, since="start", until=terminal, timeout=60)
    harness.wait_subscriptions(n_prefixes(filt))
    harness.call(lambda p: emit_execution(p, "E1", 200, start=False))
    events = c.result()
    assert [e.eseq for e in events] == list(range(1, 503))     # no gap, no duplicate
    assert mon.stats["replayed"] >= 301 and mon.stats["lost"] == 0
    # a finished execution, joined late: the whole history, then the terminal event stops it
    mon2 = Monitor(harness.events_ep, harness.control_ep)
    events2 = list(mon2.subscribe(filt, since="start", until=terminal, timeout=60))
    assert [e.eseq for e in events2] == list(range(1, 503))
    assert events2[0].topic == "execution.started/E1/"
    mon.close()
    mon2.close()


def test_since_start_for_all_executions_replays_the_ring(harness):
    harness.call(lambda p: [emit_execution(p, f"E{k}", 50) for k in range(3)])
    mon = Monitor(harness.events_ep, harness.control_ep)
    events = list(mon.subscribe(since="start", timeout=0.5))
    assert [e.seq for e in events] == list(range(1, 157))
    assert mon.stats["truncated"] == 0 and mon.stats["lost"] == 0
    mon.close()


def test_resuming_with_an_int_since_counts_the_evicted_part_of_the_range_lost_once():
    """since=<seq> asks for that range: what the ring evicted is lost (not "truncated",
    which is for since="start"), in one record."""
    h = Harness(sndhwm=5, heartbeat_every=0.1, log_capacity=100)
    try:
        h.call(lambda p: [emit_execution(p, f"E{k}", 50) for k in range(3)])   # seqs 1-156
        mon = Monitor(h.events_ep, h.control_ep)
        events = list(mon.subscribe(since=10, timeout=0.5))
        assert [e.seq for e in events] == list(range(57, 157))               # the ring keeps 100
        assert mon.stats["lost"] == 47 and mon.stats["truncated"] == 0
        assert [(r["count"], r["reason"], r["from_seq"], r["to_seq"]) for r in mon.losses] \
            == [(47, "not in replay ring", 10, 56)]
        mon.close()
    finally:
        h.stop()


def test_heartbeat_reveals_a_lost_last_event_and_loss_is_counted_without_control(harness):
    mon = Monitor(harness.events_ep, None, rcvhwm=5)      # no control: can detect, not repair
    filt = EventFilter(executions=["E1"])
    c = Consumer(mon, stall=0.3, filter=filt, timeout=1.0)
    harness.wait_subscriptions(n_prefixes(filt))
    harness.call(lambda p: emit_execution(p, "E1", 500))
    events = c.result()
    assert events and events[-1].type != "execution.completed"  # the tail was dropped...
    assert mon.stats["heartbeats"] > 0
    assert mon.stats["lost"] == 502 - len(events)               # ...and every loss is counted
    assert any(rec["reason"].startswith("tail lost") for rec in mon.losses)


def test_heartbeat_tail_is_repaired_with_control(harness):
    mon = Monitor(harness.events_ep, harness.control_ep, rcvhwm=5)
    filt = EventFilter(types=["execution.completed"], executions=["E1"])
    c = Consumer(mon, stall=0.3, filter=EventFilter(executions=["E1"]), until=terminal, timeout=10)
    harness.wait_subscriptions(n_prefixes(filt))
    harness.call(lambda p: emit_execution(p, "E1", 500))
    events = c.result()
    assert events[-1].type == "execution.completed" and len(events) == 502
    assert mon.stats["lost"] == 0


def test_since_now_for_an_execution_whose_positioning_replay_times_out_starts_at_the_next_event(harness):
    """since="now" asks the coordinator where a named execution is; when that request times
    out, the stream starts at the execution's next event: nothing before it is delivered,
    nor counted lost (it was never asked for)."""
    harness.call(lambda p: emit_execution(p, "E1", 100, close=False))        # running: eseq 1-101
    mon = Monitor(harness.events_ep, f"ipc://{harness.dir}/nobody-answers", rcvhwm=10_000,
                  control_timeout=0.3)
    filt = EventFilter(executions=["E1"])
    c = Consumer(mon, filter=filt, since="now", until=terminal, timeout=10)
    harness.wait_subscriptions(n_prefixes(filt))
    harness.call(lambda p: (p.emit("node.completed", "E1", node_id="late"),
                            p.emit("execution.completed", "E1", status="completed")))
    events = c.result()
    assert [(e.eseq, e.type) for e in events] == [(102, "node.completed"), (103, "execution.completed")]
    assert mon.stats["lost"] == 0 and not mon.losses, list(mon.losses)


def test_epoch_change_is_detected_and_reported():
    h1 = Harness(epoch="epoch-A", heartbeat_every=0.1)
    events_ep, control_ep, d = h1.events_ep, h1.control_ep, h1.dir
    mon = Monitor(events_ep, control_ep, control_timeout=2)
    c = Consumer(mon, until=lambda ev: ev.type == "execution.completed" and ev.epoch == "epoch-B",
                 timeout=20)
    h1.wait_subscriptions(1)
    h1.call(lambda p: emit_execution(p, "E1", 10, close=False))
    wait_for(lambda: len(c.events) >= 11)
    h1.stop(remove_dir=False)
    h2 = Harness(dirpath=d, epoch="epoch-B", heartbeat_every=0.1)
    try:
        h2.wait_subscriptions(1)
        h2.call(lambda p: (p.open_execution("E1", "wf"),
                           p.emit("execution.resumed", "E1"),
                           emit_execution(p, "E1", 5, start=False)))
        events = c.result()
    finally:
        h2.stop()
    assert [e.seq for e in events if e.epoch == "epoch-A"] == list(range(1, 12))
    assert [e.seq for e in events if e.epoch == "epoch-B"] == list(range(1, 8))
    assert events[11].type == "execution.resumed"
    assert mon.stats["epoch_changes"] == 1
    assert any("restarted" in rec["reason"] for rec in mon.losses)


def test_non_reliable_mode_uses_narrow_prefixes(harness):
    mon = Monitor(harness.events_ep)
    filt = EventFilter(types=["node.failed"])
    c = Consumer(mon, filter=filt, reliable=False, timeout=1.0)
    harness.wait_subscriptions(1 + len(TERMINAL_TYPES))
    assert harness.call(lambda p: p.subscriptions) == {"node.failed/": 1, **{f"{t}/": 1 for t in TERMINAL_TYPES}}

    def scenario(p):
        emit_execution(p, "E1", 5, close=False)
        p.emit("node.failed", "E1", node_id="x", error={"type": "t", "message": "m", "node_id": "x"})
        p.emit("execution.failed", "E1", status="failed")

    harness.call(scenario)
    events = c.result()
    assert [(e.type, e.node_id) for e in events] == [("node.failed", "x"), ("execution.failed", None)]


def test_asubscribe_is_the_async_twin(harness):
    async def main():
        mon = Monitor(harness.events_ep, harness.control_ep, rcvhwm=5)
        out = []
        filt = EventFilter(executions=["E1"])

        async def consume():
            async for ev in mon.asubscribe(filt, until=terminal, timeout=20):
                out.append(ev)
                if len(out) == 1:
                    await asyncio.sleep(0.3)

        task = asyncio.create_task(consume())
        await asyncio.to_thread(harness.wait_subscriptions, n_prefixes(filt))
        await asyncio.to_thread(harness.call, lambda p: emit_execution(p, "E1", 1000))
        await asyncio.wait_for(task, 30)
        mon.close()
        return out, mon.stats

    events, stats = asyncio.run(main())
    assert [e.eseq for e in events] == list(range(1, 1003))
    assert stats["lost"] == 0


def test_control_queries_and_replay(harness):
    extra = {"progress": lambda r: {"execution_id": r["execution_id"], "percent": 50.0}}
    h = Harness(handlers=extra)
    try:
        h.call(lambda p: emit_execution(p, "E1", 3))
        mon = Monitor(h.events_ep, h.control_ep)
        assert mon.progress("E1") == {"execution_id": "E1", "percent": 50.0}
        assert [e.eseq for e in mon.replay("E1")] == [1, 2, 3, 4, 5]
        from goflow.control.framing import ControlError
        with pytest.raises(ControlError) as ei:
            mon.executions()
        assert ei.value.type == "unknown_op"
        with pytest.raises(ControlError) as ei:
            mon.control.request("replay", execution_id="nope")
        assert ei.value.type == "not_found"
        mon.close()
    finally:
        h.stop()


def test_watch_json_and_live_view(harness, capsys):
    import argparse
    from goflow.cli import watch
    parser = argparse.ArgumentParser()
    watch.add_parser(parser.add_subparsers())
    harness.call(lambda p: (emit_execution(p, "E1", 3),
                            p.emit("node.failed", "E2", node_id="z",
                                   error={"type": "t", "message": "bad", "node_id": "z"})))
    args = parser.parse_args(["watch", harness.events_ep, "--control", harness.control_ep,
                              "--execution", "E1", "--json", "--exit-on-finish"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    import json
    objs = [json.loads(line) for line in lines]
    assert [o["eseq"] for o in objs] == [1, 2, 3, 4, 5]
    assert objs[0]["topic"] == "execution.started/E1/" and objs[-1]["type"] == "execution.completed"
    from goflow.cli.run_view import RunView

    view = RunView(stats=lambda: {"repaired": 2, "lost": 1})
    mon = Monitor(harness.events_ep, harness.control_ep)
    for ev in mon.replay("E1") + mon.replay("E2"):
        view.feed(ev)
    from rich.console import Console
    console = Console(record=True, width=120)
    console.print(view.render())
    text = console.export_text()
    assert "E1" in text and "completed" in text and "lost 1" in text and "bad" in text
    mon.close()

"""EventPublisher over real sockets (the publisher runs in a small reactor thread)."""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time

import msgpack
import pytest
import zmq

from goflow.control.framing import ControlServer, publisher_handlers
from goflow.events import EVENT_TYPES, TERMINAL_TYPES, EventFilter, EventPublisher
from goflow.events.codec import PAYLOAD_KEYS, decode_payload
from goflow.events.publisher import OUTBOX_EVENTS


def wait_for(cond, timeout=10.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    raise AssertionError("condition not met within %.1fs" % timeout)


class Harness:
    """A minimal coordinator reactor: one thread owns an EventPublisher and a ControlServer.

    ``call(fn)`` runs ``fn(publisher)`` on that thread (the publisher is single-threaded)
    and returns its result. ``heartbeat_every`` > 0 publishes heartbeats periodically.
    """

    def __init__(self, ctx=None, *, dirpath=None, epoch=None, heartbeat_every=0.0, handlers=None,
                 **pub_kwargs):
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.dir = dirpath or tempfile.mkdtemp(prefix="gfev")
        self.events_ep = f"ipc://{self.dir}/events"
        self.control_ep = f"ipc://{self.dir}/control"
        self.epoch = epoch
        self.heartbeat_every = heartbeat_every
        self.extra_handlers = handlers or {}
        self.pub_kwargs = pub_kwargs
        self._calls: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _run(self):
        self.pub = EventPublisher(self.ctx, [self.events_ep], epoch=self.epoch, **self.pub_kwargs)
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.control_ep)
        self.control = ControlServer(router, {**publisher_handlers(self.pub), **self.extra_handlers})
        poller = zmq.Poller()
        poller.register(self.pub.socket, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        self._ready.set()
        next_hb = time.monotonic()
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(5):
                    if sock is router:
                        self.control.on_readable()
                    else:
                        self.pub.on_readable()
                while True:
                    try:
                        fn, box = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        box.put((True, fn(self.pub)))
                    except BaseException as exc:  # noqa: BLE001 - hand it to the caller
                        box.put((False, exc))
                if self.heartbeat_every and time.monotonic() >= next_hb:
                    self.pub.heartbeat()
                    next_hb = time.monotonic() + self.heartbeat_every
                self.pub.flush()   # the end of a turn, as the coordinator's reactor does
        finally:
            self.pub.close(linger_ms=0)
            router.close(0)

    def call(self, fn, timeout=30.0):
        box: queue.Queue = queue.Queue()
        self._calls.put((fn, box))
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def subscriptions(self):
        return self.call(lambda p: p.subscription_count)

    def wait_subscriptions(self, n, timeout=10.0):
        wait_for(lambda: self.subscriptions() >= n, timeout)

    def stop(self, remove_dir=True):
        self._stop.set()
        self._thread.join(10)
        if self._own_ctx:
            self.ctx.term()
        if remove_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()


def raw_sub(ctx, endpoint, prefixes=(b"",), rcvhwm=100_000):
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, rcvhwm)
    for p in prefixes:
        s.setsockopt(zmq.SUBSCRIBE, p if isinstance(p, bytes) else p.encode())
    s.connect(endpoint)
    return s


def drain(sock, idle=0.3):
    out = []
    while sock.poll(int(idle * 1000)):
        out.append(sock.recv_multipart())
    return out


# ---------------------------------------------------------------------------------------
def test_raw_subscriber_decodes_every_documented_field(harness):
    ctx = zmq.Context()
    sub = raw_sub(ctx, harness.events_ep)
    harness.wait_subscriptions(1)

    def scenario(p):
        p.open_execution("E1", "demo")
        p.emit("execution.started", "E1", status="running", meta={"total_nodes": 3})
        p.emit("variable.changed", "E1", snapshot_change=True, meta={"name": "x", "value": 1})
        p.emit("node.failed", "E1", node_id="n1", node_type="python", status="failed", attempt=2,
               error={"type": "python", "message": "boom", "node_id": "n1"},
               meta={"duration": 0.5})
        p.emit("worker.joined", worker_id="w-1", meta={"host": "h"})
        p.heartbeat()
        return p.epoch

    epoch = harness.call(scenario)
    msgs = drain(sub)
    assert [m[0] for m in msgs] == [b"execution.started/E1/", b"variable.changed/E1/", b"node.failed/E1/n1/",
                                     b"worker.joined/w-1/", b"heartbeat/"]
    payloads = [msgpack.unpackb(m[1], raw=False) for m in msgs]
    for d in payloads:
        assert set(d) == set(PAYLOAD_KEYS)
        assert d["v"] == 2 and d["epoch"] == epoch and isinstance(d["ts"], float)
    started, changed, failed, joined, hb = payloads
    assert started["type"] == "execution.started" and started["seq"] == 1 and started["eseq"] == 1
    assert started["execution_id"] == "E1" and started["workflow"] == "demo"
    assert started["node_id"] is None and started["status"] == "running"
    assert started["vseq"] == 0, "no variable changed yet"
    assert changed["eseq"] == 2 and changed["vseq"] == 2 and changed["meta"] == {"name": "x", "value": 1}
    assert started["meta"] == {"total_nodes": 3} and started["error"] is None
    assert failed["seq"] == 3 and failed["eseq"] == 3 and failed["node_id"] == "n1"
    assert failed["node_type"] == "python" and failed["attempt"] == 2
    assert failed["error"] == {"type": "python", "message": "boom", "node_id": "n1"}
    assert failed["vseq"] == 2, "the version of the variables it saw"
    assert joined["seq"] == 4 and joined["eseq"] is None and joined["execution_id"] is None
    assert joined["meta"] == {"host": "h", "worker_id": "w-1"} and joined["vseq"] is None
    assert hb["type"] == "heartbeat" and hb["seq"] == 4 and hb["eseq"] is None
    assert hb["meta"]["executions"] == {"E1": 3}
    sub.close(0)
    ctx.term()


def test_prefix_filters_deliver_exactly_matching_events(harness):
    ctx = zmq.Context()
    filters = {
        "all": EventFilter(),
        "failures": EventFilter(types=["node.failed"]),
        "e1": EventFilter(executions=["E1"]),
        "e1_done": EventFilter(types=["node.completed"], executions=["E1"]),
        "e1_n1": EventFilter(executions=["E1"], nodes=["n1"]),
        "n1_anywhere": EventFilter(nodes=["n1"]),
    }
    subs = {k: raw_sub(ctx, harness.events_ep, f.prefixes()) for k, f in filters.items()}
    harness.wait_subscriptions(sum(len(f.prefixes()) for f in filters.values()))
    emitted = []

    def scenario(p):
        for eid in ("E1", "E10"):
            p.open_execution(eid, "wf")
            emitted.append(("execution.started", eid, None))
            p.emit("execution.started", eid)
            for node in ("n1", "n10"):
                for t in ("node.started", "node.completed", "node.failed"):
                    p.emit(t, eid, node_id=node)
                    emitted.append((t, eid, node))
            p.emit("execution.completed", eid)
            emitted.append(("execution.completed", eid, None))
        p.emit("worker.lost", worker_id="w1")
        emitted.append(("worker.lost", None, None))
        p.heartbeat()

    harness.call(scenario)
    for name, sock in subs.items():
        got = []
        for topic, payload in drain(sock):
            d = msgpack.unpackb(payload, raw=False)
            if filters[name].matches(d):    # the arrival check (only narrows n1_anywhere)
                got.append((d["type"], d["execution_id"], d["node_id"]))
        expected = [e for e in emitted
                    if filters[name].matches({"type": e[0], "execution_id": e[1], "node_id": e[2]})]
        assert got == expected, name
        sock.close(0)
    # spot-check the narrowness: n1 never leaks n10, E1 never leaks E10
    assert EventFilter(types=["node.completed"], executions=["E1"], nodes=["n1"]).prefixes() == \
        ["node.completed/E1/n1/", *(f"{t}/E1/" for t in TERMINAL_TYPES)]
    assert len([e for e in emitted if e[1] == "E1"]) == 8
    ctx.term()


def test_stalled_subscriber_never_blocks_emit():
    h = Harness(sndhwm=10, log_capacity=1000)
    ctx = zmq.Context()
    stalled = raw_sub(ctx, h.events_ep, rcvhwm=10)   # never reads
    h.wait_subscriptions(1)

    def burst(p):
        p.open_execution("E", "wf")
        for i in range(100_000):
            p.emit("node.completed", "E", node_id="n%d" % (i % 50), meta={"i": 1})
        p.flush()
        return p.stats()

    stats = h.call(burst, timeout=120)
    assert stats["seq"] == 100_000
    assert stats["published"] + stats["dropped"] == 100_000
    assert stats["log_events"] <= 1000 and stats["ring_events"] <= 1000
    received = len(drain(stalled, idle=0.2))
    assert received < 100_000      # the rest was dropped at the HWM, never blocking emit
    stalled.close(0)
    ctx.term()
    h.stop()


def test_a_turn_s_events_are_queued_boundedly_and_a_heartbeat_never_overtakes_them(harness):
    """emit queues until the owner's flush; the queue stays within OUTBOX_EVENTS however long
    the turn, and a heartbeat (which says the latest seq) goes out after every queued event."""
    ctx = zmq.Context()
    sub = raw_sub(ctx, harness.events_ep)
    harness.wait_subscriptions(1)
    n = 3 * OUTBOX_EVENTS + 7

    def turn(p):
        p.open_execution("E", "wf")
        queued = []
        for i in range(n):
            p.emit("node.completed", "E", node_id=f"n{i}")
            queued.append(p.stats()["queued"])
        p.heartbeat()            # within the same turn: flushes what is queued first
        return queued, p.stats()

    queued, stats = harness.call(turn)
    assert max(queued) == OUTBOX_EVENTS - 1 and queued[-1] == n % OUTBOX_EVENTS
    assert stats["queued"] == 0 and stats["published"] == n
    frames = drain(sub)
    seqs = [decode_payload(f[1])["seq"] for f in frames]
    assert seqs == list(range(1, n + 1)) + [n]       # every event in order, then the heartbeat
    assert frames[-1][0] == b"heartbeat/"
    sub.close(0)
    ctx.term()


def test_hundred_concurrent_subscribers_each_receive_everything(harness):
    ctx = zmq.Context()
    subs = [raw_sub(ctx, harness.events_ep) for _ in range(100)]
    harness.wait_subscriptions(100)

    def scenario(p):
        p.open_execution("E", "wf")
        for i in range(200):
            p.emit("node.completed", "E", node_id=f"n{i}")

    harness.call(scenario)
    poller = zmq.Poller()
    for s in subs:
        poller.register(s, zmq.POLLIN)
    counts = {s: 0 for s in subs}
    deadline = time.monotonic() + 20
    while min(counts.values()) < 200 and time.monotonic() < deadline:
        for s, _ in poller.poll(100):
            while True:
                try:
                    s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                counts[s] += 1
    assert sorted(set(counts.values())) == [200]
    for s in subs:
        s.close(0)
    wait_for(lambda: harness.subscriptions() == 0)   # unsubscriptions are counted too
    ctx.term()


def test_replay_logs_are_bounded_by_bytes_too():
    """Events carry values up to max_value_bytes each: a count alone would not bound memory."""
    ctx = zmq.Context()
    pub = EventPublisher(ctx, ["inproc://bytes"], log_capacity=1_000_000, log_bytes=100_000)
    pub.open_execution("E", "wf")
    for i in range(1000):
        pub.emit("node.completed", "E", node_id=f"n{i}", meta={"output": "x" * 1000})
    stats = pub.stats()
    assert 0 < stats["log_bytes"] <= 100_000 and 0 < stats["ring_bytes"] <= 100_000
    assert 50 <= stats["log_events"] < 100
    kept = pub.replay("E")
    assert len(kept) == stats["log_events"] and pub.oldest_eseq("E") == 1001 - len(kept)
    assert decode_payload(kept[-1])["eseq"] == 1000, "the newest event is always kept"
    assert [t for t, _ in pub.replay_seq(1)][-1] == b"node.completed/E/n999/"
    pub.close(0)
    ctx.term()


def test_replay_logs_are_bounded_and_report_what_is_gone():
    ctx = zmq.Context()
    sunk = []
    pub = EventPublisher(ctx, ["inproc://bounded"], log_capacity=10,
                         sink=lambda eid, t, p: sunk.append((eid, t)))
    pub.open_execution("old", "wf")
    for _ in range(6):
        pub.emit("node.completed", "old", node_id="n")
    pub.close_execution("old")
    pub.open_execution("run", "wf")
    for _ in range(8):
        pub.emit("node.completed", "run", node_id="n")
    st = pub.stats()
    assert st["log_events"] == 10 and st["ring_events"] == 10
    # the finished execution was evicted first; the running one is intact
    assert pub.oldest_eseq("old") == 5 and pub.oldest_eseq("run") == 1
    assert [msgpack.unpackb(p)["eseq"] for p in pub.replay("old")] == [5, 6]
    assert [msgpack.unpackb(p)["eseq"] for p in pub.replay("run", 3, 5)] == [3, 4, 5]
    for _ in range(4):
        pub.emit("node.completed", "run", node_id="n")
    assert pub.oldest_eseq("old") == 7 and pub.replay("old") == []   # all gone, and said so
    assert pub.oldest_eseq("run") == 3                                # then the running tail
    assert [msgpack.unpackb(p)["seq"] for _, p in pub.replay_seq(0)] == list(range(9, 19))
    assert pub.replay_seq(19) == [] and pub.oldest_seq == 9
    assert len(sunk) == 18 and sunk[0] == ("old", b"node.completed/old/n/")
    assert pub.oldest_eseq("nope") is None and pub.replay("nope") == []
    pub.close(0)
    ctx.term()


def test_heartbeat_keeps_finished_executions_and_seq_without_consuming_it():
    ctx = zmq.Context()
    pub = EventPublisher(ctx, ["inproc://hb"])
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat/")
    sub.connect("inproc://hb")
    wait_for(lambda: (pub.on_readable(), pub.subscription_count)[1] == 1)
    pub.open_execution("A", "wf")
    pub.open_execution("B", "wf")
    pub.emit("execution.started", "A")
    pub.emit("execution.completed", "A")
    pub.close_execution("A")
    pub.emit("execution.started", "B")
    pub.heartbeat()
    pub.heartbeat()
    topic, payload = sub.recv_multipart()
    d = msgpack.unpackb(payload)
    assert d["seq"] == 3 and d["meta"]["executions"] == {"A": 2, "B": 1}
    assert pub.emit("node.started", "B", node_id="x") == 4
    assert set(EVENT_TYPES) >= {"heartbeat", "execution.resumed", "node.retrying"}
    sub.close(0)
    pub.close(0)
    ctx.term()

"""Topic and payload codec."""

from __future__ import annotations

import msgpack
import zmq

from goflow.events import EVENT_TYPES, TERMINAL_TYPES, Event, EventFilter, EventPublisher
from goflow.events.codec import PAYLOAD_KEYS, decode_event, decode_payload, encode_event, parse_topic, topic_for

FULL = {
    "v": 2, "type": "node.failed", "ts": 1700000000.25, "epoch": "ep1", "seq": 42, "eseq": 7,
    "execution_id": "E1", "workflow": "wf", "node_id": "n1", "node_type": "python",
    "status": "failed", "attempt": 3, "vseq": 5,
    "error": {"type": "python", "message": "boom", "node_id": "n1"}, "meta": {"duration": 1.5},
}


def test_topics():
    assert topic_for("node.completed", "E1", "n1") == "node.completed/E1/n1/"
    assert topic_for("execution.started", "E1") == "execution.started/E1/"
    assert topic_for("heartbeat") == "heartbeat/"
    assert topic_for("worker.joined", worker_id="w1") == "worker.joined/w1/"
    assert parse_topic("node.completed/E1/n1/") == {"type": "node.completed", "execution_id": "E1",
                                                    "node_id": "n1", "worker_id": None}
    assert parse_topic("worker.lost/w1/")["worker_id"] == "w1"
    assert not "node.completed/E1/n10/".startswith(topic_for("node.completed", "E1", "n1"))


def test_roundtrip_of_every_field():
    payload = encode_event(FULL)
    assert set(msgpack.unpackb(payload, raw=False)) == set(PAYLOAD_KEYS)
    ev = decode_event(b"node.failed/E1/n1/", payload)
    assert isinstance(ev, Event)
    for key, value in FULL.items():
        assert getattr(ev, key) == value, key
    assert ev.topic == "node.failed/E1/n1/"
    assert decode_payload(payload) == FULL
    assert ev.model_dump() == {**FULL, "topic": "node.failed/E1/n1/"}


def test_publisher_payload_roundtrip_every_field():
    ctx = zmq.Context()
    pub = EventPublisher(ctx, ["inproc://codec"], epoch="ep1")
    pub.open_execution("E1", "wf")
    for t in EVENT_TYPES:
        if t in ("heartbeat",):
            continue
        kw = {"worker_id": "w1"} if t.startswith("worker.") else {"node_id": "n1"}
        eid = None if t.startswith("worker.") else "E1"
        pub.emit(t, eid, node_type="python", status="s", attempt=1, snapshot_change=t == "variable.changed",
                 error={"type": "x", "message": "m", "node_id": "n1"},
                 meta={"k": [1, 2]}, **kw)
    ring = pub.replay_seq(1)
    vseq = 0
    assert len(ring) == len(EVENT_TYPES) - 1
    for topic, payload in ring:
        ev = decode_event(topic, payload)
        assert ev.epoch == "ep1" and ev.v == 2 and ev.type in EVENT_TYPES
        assert ev.topic == topic_for(ev.type, ev.execution_id, ev.node_id, ev.meta.get("worker_id"))
        assert ev.error == {"type": "x", "message": "m", "node_id": "n1"}
        assert ev.meta["k"] == [1, 2] and ev.attempt == 1 and ev.status == "s"
        if ev.execution_id:
            assert ev.workflow == "wf" and ev.eseq == ev.seq
            assert ev.vseq == (ev.eseq if ev.type == "variable.changed" else vseq)
            if ev.type == "variable.changed":
                vseq = ev.eseq
            assert ev.variables is None, "a snapshot is rebuilt by a Monitor, not by decoding"
        else:
            assert ev.variables == {} and ev.eseq is None and ev.vseq is None
    pub.close(0)
    ctx.term()


def test_decode_rejects_garbage():
    import pytest
    with pytest.raises(ValueError):
        decode_payload(b"\xc1")
    with pytest.raises(ValueError):
        decode_payload(msgpack.packb([1]))


def test_filter_prefixes_and_matches():
    assert EventFilter().prefixes() == [""]
    ends = [f"{t}/" for t in TERMINAL_TYPES]
    assert EventFilter(types=["node.failed"]).prefixes() == ["node.failed/", *ends]
    assert EventFilter(types="node.failed", executions="E1").prefixes() == \
        ["node.failed/E1/", *(f"{t}/E1/" for t in TERMINAL_TYPES)]
    p = EventFilter(executions=["E1"]).prefixes()
    assert "execution.started/E1/" in p and "node.completed/E1/" in p
    assert not any(x.startswith(("worker.", "heartbeat")) for x in p)
    nodes_only = EventFilter(nodes=["n1"])
    assert "node.failed/" in nodes_only.prefixes() and "" not in nodes_only.prefixes()
    assert nodes_only.matches({"type": "node.failed", "execution_id": "E", "node_id": "n1"})
    assert not nodes_only.matches({"type": "node.failed", "execution_id": "E", "node_id": "n10"})
    assert not nodes_only.matches({"type": "execution.started", "execution_id": "E", "node_id": None})
    assert not nodes_only.matches({"type": "progress.update", "execution_id": "E", "node_id": None})
    assert not EventFilter().matches({"type": "heartbeat"})
    assert EventFilter(types=["heartbeat"]).matches({"type": "heartbeat"})
    assert not EventFilter(executions=["E1"]).matches({"type": "worker.lost", "execution_id": None})


def test_filters_never_hide_the_end_of_an_execution():
    """Whatever types and nodes say, an execution's terminal events match (and are
    subscribed to), so ``until=lambda ev: ev.is_terminal`` always fires."""
    filters = [EventFilter(nodes=["n1"]), EventFilter(types=["node.failed"]),
               EventFilter(types=["node.completed"], executions=["E1"], nodes=["n1"]),
               EventFilter(types=["heartbeat"], nodes=["n1"])]
    for filt in filters:
        for etype in TERMINAL_TYPES:
            event = {"type": etype, "execution_id": "E1", "node_id": None}
            assert filt.matches(event), (filt, etype)
            assert any(f"{etype}/E1/".startswith(p) for p in filt.prefixes()), (filt, etype)
        assert not filt.matches({"type": "execution.started", "execution_id": "E1", "node_id": None})
    scoped = EventFilter(executions=["E1"], nodes=["n1"])
    assert not scoped.matches({"type": "execution.completed", "execution_id": "E2", "node_id": None})
    assert not any("execution.completed/E2/".startswith(p) for p in scoped.prefixes())

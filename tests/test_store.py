"""The SQLite history store, fed by the real EventPublisher and by a real coordinator run."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import zmq

from goflow.events.publisher import EventPublisher
from goflow.history.store import (SCHEMA_VERSION, AmbiguousId, NotFound, Store, combine_sinks, default_db_path, migrate,
                          open_store, schema_version)

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = Path(__file__).resolve().parent


class Publisher:
    """A real EventPublisher (single-threaded use, as on the reactor) feeding ``sink``."""

    def __init__(self, sink, epoch: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="goflow-store-test-")
        self.context = zmq.Context()
        self.pub = EventPublisher(self.context, [f"ipc://{self.dir}/events"], sink=sink, epoch=epoch)

    def close(self) -> None:
        self.pub.close(0)
        self.context.term()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, eid: str | None = None, *, workflow: str = "demo", outcome: str = "completed",
            retry: bool = True, loop: int = 2, finish: bool = True) -> str:
        """Emit a plausible run: inputs, a retried python node, a loop body, a skip, the end."""
        eid = eid or uuid.uuid4().hex
        p = self.pub
        p.open_execution(eid, workflow)
        p.emit("execution.started", eid, status="running",
               meta={"inputs": {"x": 1, "token": "***"}, "total_nodes": 4})
        p.emit("variable.changed", eid, snapshot_change=True,
               meta={"name": "x", "value": 1, "old": None, "scope": "execution"})
        p.emit("variable.changed", eid, snapshot_change=True,
               meta={"name": "token", "value": "***", "old": None, "scope": "execution"})
        p.emit("node.started", eid, node_id="fetch", node_type="python", status="running", attempt=1, meta={})
        if retry:
            p.emit("node.retrying", eid, node_id="fetch", node_type="python", status="retrying", attempt=1,
                   error={"type": "python_error", "message": "ConnectionError: flaky", "node_id": "fetch"},
                   meta={"next_attempt": 2, "delay_s": 0.01, "max_attempts": 3})
            p.emit("node.started", eid, node_id="fetch", node_type="python", status="running", attempt=2, meta={})
        now = time.time()
        p.emit("variable.changed", eid, node_id="fetch", snapshot_change=True,
               meta={"name": "data", "value": [1, 2], "old": None, "scope": "node"})
        p.emit("node.completed", eid, node_id="fetch", node_type="python", status="completed",
               attempt=2 if retry else 1,
               meta={"output": [1, 2], "duration_s": 0.02, "worker": "w-1", "started": now, "finished": now})
        p.emit("loop.started", eid, node_id="each", node_type="loop", meta={"count": loop, "max_parallel": 2})
        for index in range(loop):   # two iterations in flight at once
            p.emit("node.started", eid, node_id="square", node_type="python", status="running", attempt=1,
                   meta={"loop": "each", "index": index})
        for index in reversed(range(loop)):
            p.emit("node.completed", eid, node_id="square", node_type="python", status="completed", attempt=1,
                   meta={"output": index * index, "duration_s": 0.001, "worker": f"w-{index}",
                         "loop": "each", "index": index})
        p.emit("loop.completed", eid, node_id="each", node_type="loop",
               meta={"iterations": loop, "count": loop, "broken": False})
        p.emit("node.skipped", eid, node_id="never", node_type="passthrough", status="skipped", attempt=1,
               meta={"reason": "its guard condition is false"})
        if not finish:
            return eid
        if outcome == "completed":
            p.emit("node.started", eid, node_id="end", node_type="end", status="running", attempt=1, meta={})
            p.emit("node.completed", eid, node_id="end", node_type="end", status="completed", attempt=1,
                   meta={"return": {"ok": True}, "output": None, "duration_s": 0.0})
            p.emit("execution.completed", eid, status="completed", meta={"result": {"ok": True}, "duration_s": 0.5})
        else:
            error = {"type": "python_error", "message": "ValueError: boom", "node_id": "end"}
            p.emit("node.started", eid, node_id="end", node_type="python", status="running", attempt=1, meta={})
            p.emit("node.failed", eid, node_id="end", node_type="python", status="failed", attempt=1,
                   error=error, meta={"duration_s": 0.01})
            p.emit("execution.failed", eid, status="failed", error=error, meta={"duration_s": 0.5})
        p.close_execution(eid)
        return eid


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "history.db")
    yield s
    s.close()


@pytest.fixture
def publisher(store):
    p = Publisher(store.sink)
    yield p
    p.close()


# -- basics ---------------------------------------------------------------------------------------
def test_file_is_wal_and_versioned(store, tmp_path):
    store.flush()
    conn = sqlite3.connect(tmp_path / "history.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert schema_version(conn) == SCHEMA_VERSION == 4
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"executions", "node_executions", "variable_changes", "events", "event_chunks", "workflow_texts",
            "schema_version"} <= tables
    conn.close()


def test_migrations_apply_missing_steps_in_order(tmp_path):
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    assert migrate(conn) == 4
    assert migrate(conn) == 4                       # idempotent
    steps = [(1, "SELECT 1;"), (2, "SELECT 2;"), (3, "SELECT 3;"), (4, "SELECT 4;"),
             (5, "ALTER TABLE executions ADD COLUMN labels TEXT;"), (6, "CREATE INDEX executions_labels ON executions(labels);")]
    assert migrate(conn, steps) == 6
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2, 3, 4, 5, 6]
    assert "labels" in [r[1] for r in conn.execute("PRAGMA table_info(executions)")]
    with pytest.raises(sqlite3.Error):   # a failing step leaves the previous version
        migrate(conn, steps + [(7, "ALTER TABLE nope ADD COLUMN x;")])
    assert schema_version(conn) == 6


def test_default_db_path(monkeypatch, tmp_path):
    monkeypatch.setenv("GOFLOW_HOME", str(tmp_path / "gf"))
    assert default_db_path() == tmp_path / "gf" / "history.db"
    monkeypatch.delenv("GOFLOW_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "goflow" / "history.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_db_path() == Path.home() / ".local" / "share" / "goflow" / "history.db"


# -- what a run becomes ---------------------------------------------------------------------------
def test_a_run_becomes_rows(store, publisher):
    store.record_submission("placeholder", "demo", "name: demo\n", {"x": 1}, secrets=["token"])
    eid = publisher.run(outcome="completed")
    store.record_submission(eid, "demo", "name: demo\nnodes: []\n", {"x": 1, "token": "s3cret"},
                            secrets=["token"])
    assert store.flush(5)
    run = store.get_execution(eid)
    assert run["status"] == "completed" and run["workflow"] == "demo"
    assert run["result"] == {"ok": True} and run["error"] is None and run["duration_s"] == 0.5
    assert run["variables_in"] == {"x": 1, "token": "***"}          # redacted at submit
    assert run["inputs"] == {"x": 1, "token": "***"}
    assert run["variables_out"] == {"x": 1, "token": "***", "data": [1, 2]}
    assert run["workflow_text"] == "name: demo\nnodes: []\n"
    import hashlib
    assert run["workflow_hash"] == hashlib.sha256(b"name: demo\nnodes: []\n").hexdigest()
    assert run["epoch"] == publisher.pub.epoch and run["last_eseq"] == run["events"] == publisher.pub.last_eseq(eid)

    attempts = [(n["node_id"], n["attempt"], n["status"], n["worker"], (n["context"] or {}).get("index"))
                for n in run["nodes"]]
    assert attempts == [("fetch", 1, "failed", None, None), ("fetch", 2, "completed", "w-1", None),
                        ("square", 1, "completed", "w-0", 0), ("square", 1, "completed", "w-1", 1),
                        ("never", 1, "skipped", None, None), ("end", 1, "completed", None, None)]
    by = {(n["node_id"], n["attempt"], (n["context"] or {}).get("index")): n for n in run["nodes"]}
    assert by[("fetch", 1, None)]["error"]["message"] == "ConnectionError: flaky"
    assert by[("fetch", 2, None)]["output"] == [1, 2] and by[("fetch", 2, None)]["duration_s"] == 0.02
    assert by[("square", 1, 1)]["output"] == 1 and by[("square", 1, 1)]["context"] == {"loop": "each", "index": 1}
    assert by[("end", 1, None)]["output"] == {"ok": True}           # an end node's return
    assert all(n["started_at"] and n["finished_at"] for n in run["nodes"])
    changes = [(c["name"], c["new"], c["scope"], c["node_id"]) for c in run["variable_changes"]]
    assert changes == [("x", 1, "execution", None), ("token", "***", "execution", None),
                       ("data", [1, 2], "node", "fetch")]
    assert "s3cret" not in repr(run)


def test_events_are_stored_byte_for_byte_in_order(store, publisher):
    eid = publisher.run()
    other = publisher.run()
    assert store.flush(5)
    stored = store.events(eid)
    assert stored == publisher.pub.replay(eid)                 # exactly as published
    assert [msgpack.unpackb(p)["eseq"] for p in stored] == list(range(1, len(stored) + 1))
    with_topics = store.events(eid, with_topic=True)
    assert all(t.startswith(f"{msgpack.unpackb(p)['type']}/{eid}/") for t, p in with_topics)
    assert store.events(eid, from_eseq=5) == publisher.pub.replay(eid, from_eseq=5)
    started = store.events(eid, types=["node.started"])
    assert [msgpack.unpackb(p)["node_id"] for p in started] == ["fetch", "fetch", "square", "square", "end"]
    assert len(store.events(eid, nodes=["square"])) == 4
    assert len(store.events(eid, types=["node.completed"], nodes=["square"])) == 2
    assert store.events(other) == publisher.pub.replay(other)


def test_a_v1_file_is_migrated_and_its_events_still_read(tmp_path):
    from goflow.history.store import MIGRATIONS

    path = tmp_path / "old.db"
    publisher = Publisher(lambda *event: None)
    try:
        eid = publisher.run()
        published = publisher.pub.replay_seq(1)
    finally:
        publisher.close()
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:1])                  # a file from before event chunks
    conn.execute("INSERT INTO executions (id, workflow, status) VALUES (?, 'demo', 'running')", (eid,))
    for topic, payload in published[:3]:
        event = msgpack.unpackb(payload)
        conn.execute("INSERT INTO events (execution_id, epoch, eseq, seq, type, node_id, ts, topic, payload) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (eid, event["epoch"], event["eseq"], event["seq"],
                                                           event["type"], event.get("node_id"), event["ts"],
                                                           topic.decode(), payload))
    conn.close()
    s = Store(path)
    try:
        for topic, payload in published:          # the first three again, then the rest
            s.sink(eid, topic, payload)
        assert s.flush(5)
        assert s.events(eid) == [payload for _, payload in published]
        assert s.events(eid, from_eseq=3) == [payload for _, payload in published[2:]]
        assert s.last_event(eid)["eseq"] == len(published)
    finally:
        s.close()


def test_a_v2_file_keeps_its_workflow_texts_in_their_own_table(tmp_path):
    from goflow.history.store import MIGRATIONS

    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:2])                  # before workflow_texts
    conn.execute("INSERT INTO executions (id, workflow, workflow_text, status) VALUES "
                 "('old-run', 'demo', 'name: demo\n', 'running')")
    conn.close()
    s = Store(path)
    try:
        s.record_submission("new-run", "demo", "name: new\n", {})
        assert s.flush(5)
        assert s.get_execution("old-run")["workflow_text"] == "name: demo\n"
        assert s.get_execution("new-run")["workflow_text"] == "name: new\n"
        assert {u.id: u.workflow_text for u in s.unfinished_executions()} == {"old-run": "name: demo\n",
                                                                               "new-run": "name: new\n"}
        assert "workflow_text" not in s.list_executions()[0]
    finally:
        s.close()
    conn = sqlite3.connect(path)
    try:   # the rows the writer updates per batch no longer carry the text
        assert conn.execute("SELECT COUNT(*) FROM executions WHERE workflow_text IS NOT NULL").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM workflow_texts").fetchone()[0] == 2
    finally:
        conn.close()


def test_duplicate_events_are_ignored(store, publisher):
    eid = publisher.run()
    assert store.flush(5)
    before = store.get_execution(eid)
    for topic_payload in publisher.pub.replay_seq(1):          # the same events again
        store.sink(eid, *topic_payload)
    assert store.flush(5)
    after = store.get_execution(eid)
    assert after["nodes"] == before["nodes"] and after["events"] == before["events"]
    assert len(store.events(eid)) == publisher.pub.last_eseq(eid)


def test_garbage_and_worker_events_do_not_break_the_writer(store, publisher):
    store.sink("bad", b"node.started/bad/", b"\xc1 not msgpack")
    store.sink(None, b"worker.joined/w1/", msgpack.packb({"type": "worker.joined"}))
    eid = publisher.run()
    assert store.flush(5)
    assert store.stats["bad_events"] == 1
    assert store.get_execution(eid)["status"] == "completed"
    assert store.healthy


# -- queries --------------------------------------------------------------------------------------
def test_list_filters_and_prefixes(store, publisher):
    ids = [publisher.run(f"aaaa{n:04d}" + uuid.uuid4().hex[:8], workflow="alpha" if n % 2 else "beta",
                         outcome="failed" if n == 3 else "completed") for n in range(5)]
    unique = publisher.run("bbbb" + uuid.uuid4().hex, workflow="gamma")
    assert store.flush(5)
    listed = store.list_executions()
    assert [r["id"] for r in listed][0] == unique and len(listed) == 6        # newest first
    assert {r["id"] for r in store.list_executions(workflow="alpha")} == {ids[1], ids[3]}
    assert [r["id"] for r in store.list_executions(status="failed")] == [ids[3]]
    assert len(store.list_executions(limit=2)) == 2
    assert len(store.list_executions(since=60)) == 6
    import datetime
    assert store.list_executions(since=datetime.datetime.now() + datetime.timedelta(hours=1)) == []
    assert store.list_executions(since=datetime.timedelta(minutes=5))

    assert store.get_execution(unique[:4])["id"] == unique
    assert store.get_execution(ids[2][:8])["id"] == ids[2]
    with pytest.raises(AmbiguousId) as info:
        store.get_execution("aaaa")
    assert set(info.value.candidates) == set(ids) and ids[0] in str(info.value)
    with pytest.raises(NotFound):
        store.get_execution("bbb")                 # fewer than 4 characters
    with pytest.raises(NotFound):
        store.get_execution("zzzz")


def test_unfinished_executions_for_recovery(store, publisher):
    done = publisher.run()
    running = publisher.run(finish=False)
    store.record_submission("queued-only", "demo", "name: demo\n", {"x": 2})
    store.record_submission(running, "demo", "name: demo\n", {"x": 1, "token": "t"}, secrets=["token"])
    assert store.flush(5)
    unfinished = {u.id: u for u in store.unfinished_executions()}
    assert set(unfinished) == {running, "queued-only"} and done not in unfinished
    u = unfinished[running]
    assert u.workflow_text == "name: demo\n" and u.variables_in == {"x": 1, "token": "***"}
    assert u.completed == {"fetch": [1, 2]}      # main graph only: loop-body runs are not listed
    assert u.epoch == publisher.pub.epoch and u.last_eseq == publisher.pub.last_eseq(running)
    assert unfinished["queued-only"].completed == {}


def test_resumed_execution_after_a_coordinator_restart(store, publisher):
    """What Coordinator.resume publishes: a new epoch, execution.resumed, execution.started,
    restored nodes as started+completed with meta.resumed, then the rest for real."""
    eid = publisher.run(finish=False)
    publisher.pub.emit("node.started", eid, node_id="end", node_type="python", status="running", attempt=1,
                       meta={})           # in flight when the coordinator dies
    assert store.flush(5)
    before = store.get_execution(eid)
    assert store.unfinished_executions()[0].completed == {"fetch": [1, 2]}

    second = Publisher(store.sink)        # the restarted coordinator: new epoch, eseq from 1
    try:
        p = second.pub
        p.open_execution(eid, "demo")
        p.emit("execution.resumed", eid, status="running", meta={"completed_nodes": ["fetch"]})
        p.emit("execution.started", eid, status="running", meta={"inputs": {"x": 1}, "total_nodes": 4})
        p.emit("node.started", eid, node_id="fetch", node_type="python", status="running", attempt=1, meta={})
        p.emit("node.completed", eid, node_id="fetch", node_type="python", status="completed", attempt=1,
               meta={"resumed": True, "output": [1, 2], "duration_s": 0.0})
        p.emit("node.started", eid, node_id="end", node_type="python", status="running", attempt=1, meta={})
        p.emit("node.completed", eid, node_id="end", node_type="python", status="completed", attempt=1,
               meta={"output": 7, "duration_s": 0.1, "worker": "w-new"})
        p.emit("execution.completed", eid, status="completed", meta={"result": 7, "duration_s": 0.2})
        assert store.flush(5)
        after = store.get_execution(eid)
        assert after["status"] == "completed" and after["result"] == 7
        assert after["started_at"] == before["started_at"]            # the original start
        assert after["epoch"] == p.epoch and after["last_eseq"] == 7
        rows = [(n["node_id"], n["attempt"], n["status"], n["worker"]) for n in after["nodes"]]
        assert rows.count(("fetch", 2, "completed", "w-1")) == 1
        assert not [r for r in rows if r[0] == "fetch" and r[2] == "running"]   # no restored duplicate
        assert ("end", 1, "interrupted", None) in rows and ("end", 1, "completed", "w-new") in rows
        interrupted = next(n for n in after["nodes"] if n["status"] == "interrupted")
        assert interrupted["error"]["type"] == "interrupted"
        everything = store.events(eid)
        assert everything == publisher.pub.replay(eid) + p.replay(eid)  # both epochs, in order
        assert store.events(eid, from_eseq=6) == p.replay(eid, from_eseq=6)  # latest epoch
        assert store.unfinished_executions() == []
    finally:
        second.close()


def test_prune(store, publisher, tmp_path):
    old, new, running = publisher.run(), publisher.run(), publisher.run(finish=False)
    assert store.flush(5)
    conn = sqlite3.connect(tmp_path / "history.db", isolation_level=None)
    conn.execute("UPDATE executions SET finished_at = ? WHERE id = ?", (time.time() - 10 * 86400, old))
    conn.close()
    assert store.prune(7) == 1
    assert {r["id"] for r in store.list_executions()} == {new, running}
    assert store.events(old) == [] and store.node_attempts(old) == []
    assert store.prune(0) == 1                      # finished now; the unfinished one stays
    assert [r["id"] for r in store.list_executions()] == [running]


def test_queries_from_other_threads_while_writing(store, publisher):
    errors = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                for row in store.list_executions(limit=5):
                    store.node_attempts(row["id"])
                    store.events(row["id"])
        except Exception as exc:   # pragma: no cover - the failure we look for
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    ids = [publisher.run() for _ in range(50)]
    assert store.flush(10)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.list_executions(limit=None)) == 50
    assert all(store.get_execution(i)["status"] == "completed" for i in ids[:5])


def test_read_only_open_for_the_cli(store, publisher, tmp_path):
    eid = publisher.run()
    assert store.flush(5)
    reader = open_store(tmp_path / "history.db")
    try:
        assert reader.get_execution(eid)["status"] == "completed"
    finally:
        reader.close()
    with pytest.raises(NotFound):
        open_store(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


# -- bounded memory and failures ------------------------------------------------------------------
@pytest.mark.timeout(20)  # a sink that blocked would hang here
def test_full_queue_drops_and_never_blocks(tmp_path, caplog):
    s = Store(tmp_path / "h.db", queue_capacity=10, start=False)
    p = Publisher(s.sink)
    try:
        with caplog.at_level(logging.WARNING, logger="goflow.history.store"):
            p.run(loop=10)
        assert s.queue_depth == 10
        assert s.dropped_from_history == p.pub.last_seq - 10
        assert p.pub.stats()["sink_errors"] == 0
        assert sum("history queue full" in r.message for r in caplog.records) == 1   # warned once
        assert s.gauges()["store_dropped_events"] == s.dropped_from_history
    finally:
        p.close()
        s.close()


@pytest.mark.timeout(30)
def test_flush_and_close_drain_the_queue(tmp_path):
    s = Store(tmp_path / "h.db", flush_interval=3600.0)  # the timer alone would wait an hour
    p = Publisher(s.sink)
    eid = p.run()
    s.close()
    p.close()
    reader = open_store(tmp_path / "h.db")
    assert reader.get_execution(eid)["status"] == "completed"
    reader.close()


def test_a_memory_store_writes_in_this_process():
    s = Store(":memory:")
    p = Publisher(s.sink)
    try:
        eid = p.run()
        assert s.flush(10)
        assert s.writer_pid is None and s.in_memory and s.healthy     # no writer process for memory
        run = s.get_execution(eid)
        assert run["status"] == "completed" and [n["node_id"] for n in run["nodes"]][:2] == ["fetch", "fetch"]
        assert len(s.events(eid)) == p.pub.last_eseq(eid)
        assert s.history_problem(eid) is None
    finally:
        p.close()
        s.close()


def test_a_file_store_writes_in_its_writer_process_and_reads_here(store, publisher):
    eid = publisher.run()
    assert store.flush(10)
    assert store.writer_pid is not None and store.writer_pid != os.getpid() and not store.in_memory
    assert store.stats["events_written"] == publisher.pub.last_eseq(eid)    # acknowledged counts
    assert store.get_execution(eid)["status"] == "completed"
    assert store.queue_depth == 0


def test_one_batch_writes_the_rows_one_event_per_batch_writes(tmp_path):
    # The writer inserts a batch's attempt and variable rows together at its end, and completes
    # an attempt started in the same batch without an UPDATE: the tables must be exactly what
    # one statement per event made (same ids, same values), through retries, loop iterations
    # that overlap, skips, an attempt whose node.started was lost, and a resumed epoch.
    events: list[tuple] = []
    first = Publisher(lambda eid, topic, payload: events.append((eid, topic, payload)))
    try:
        eid = first.run(finish=False)
        first.pub.emit("node.started", eid, node_id="end", node_type="python", status="running", attempt=1,
                       meta={})
    finally:
        first.close()
    second = Publisher(lambda eid, topic, payload: events.append((eid, topic, payload)))
    try:
        p = second.pub
        p.open_execution(eid, "demo")
        p.emit("execution.resumed", eid, status="running", meta={"completed_nodes": ["fetch"]})
        p.emit("node.started", eid, node_id="fetch", node_type="python", status="running", attempt=1, meta={})
        p.emit("node.completed", eid, node_id="fetch", node_type="python", status="completed", attempt=1,
               meta={"resumed": True, "output": [1, 2], "duration_s": 0.0})
        p.emit("node.started", eid, node_id="lost", node_type="python", status="running", attempt=1, meta={})
        p.emit("node.started", eid, node_id="end", node_type="python", status="running", attempt=1, meta={})
        p.emit("node.completed", eid, node_id="lost", node_type="python", status="completed", attempt=1,
               meta={"output": "x", "worker": "w-2"})
        p.emit("variable.changed", eid, node_id="end", snapshot_change=True,
               meta={"name": "y", "value": {"a": [1, "b"]}, "old": None, "scope": "node"})
        p.emit("node.completed", eid, node_id="end", node_type="python", status="completed", attempt=1,
               meta={"output": 7, "duration_s": 0.1, "worker": "w-new"})
        p.emit("execution.completed", eid, status="completed", meta={"result": 7, "duration_s": 0.2})
    finally:
        second.close()
    lost = next(i for i, (_, _, payload) in enumerate(events)
                if msgpack.unpackb(payload)["type"] == "node.started" and msgpack.unpackb(payload)["node_id"] == "lost")
    del events[lost]   # its completion finds no running row: the outcome is inserted instead

    def tables(batch_size: int) -> tuple[list, list]:
        path = tmp_path / f"batch-{batch_size}.db"
        store = Store(path, batch_size=batch_size, flush_interval=3600.0)  # close() writes what is queued
        for item in events:
            store.sink(*item)
        store.close()
        conn = sqlite3.connect(path)
        try:
            return (conn.execute("SELECT * FROM node_executions ORDER BY id").fetchall(),
                    conn.execute("SELECT * FROM variable_changes ORDER BY id").fetchall())
        finally:
            conn.close()

    one_by_one, together = tables(1), tables(len(events) + 10)
    assert together == one_by_one
    attempts = [(row[2], row[4], row[5]) for row in together[0]]
    assert ("lost", 1, "completed") in attempts and ("end", 1, "interrupted") in attempts
    assert attempts.count(("fetch", 1, "failed")) == 1
    assert attempts[-2:] == [("end", 1, "completed"), ("lost", 1, "completed")]  # inserted at its completion
    assert len(together[1]) == 4


def test_unwritable_path_degrades_to_memory(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.ERROR, logger="goflow.history.store"):
        s = Store(blocker / "history.db")
    p = Publisher(s.sink)
    try:
        assert not s.healthy and "a-file" in s.last_error
        eid = p.run()
        assert s.flush(5)
        assert s.get_execution(eid)["status"] == "completed"     # recent history, in memory
        assert s.events(eid) == p.pub.replay(eid)
        assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1
    finally:
        p.close()
        s.close()


def test_db_replaced_by_a_directory_degrades(tmp_path, caplog):
    path = tmp_path / "history.db"
    s = Store(path, start=False)
    s.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.mkdir()
    with caplog.at_level(logging.ERROR, logger="goflow.history.store"):
        s = Store(path)
    try:
        assert not s.healthy and s.last_error
        p = Publisher(s.sink)
        eid = p.run()
        assert s.flush(5) and s.get_execution(eid)["status"] == "completed"
        p.close()
    finally:
        s.close()


@pytest.fixture
def tiny_tmpfs():
    mountpoint = tempfile.mkdtemp(prefix="goflow-tmpfs-")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mountpoint],
                            capture_output=True, text=True)
    if result.returncode != 0:
        os.rmdir(mountpoint)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield Path(mountpoint)
    finally:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        os.rmdir(mountpoint)


def test_disk_full_is_reported_once_and_history_continues_in_memory(tiny_tmpfs, caplog):
    s = Store(tiny_tmpfs / "history.db", memory_events=500)
    p = Publisher(s.sink)
    try:
        first = p.run()
        assert s.flush(5) and s.healthy
        with caplog.at_level(logging.ERROR, logger="goflow.history.store"):
            eid = uuid.uuid4().hex
            p.pub.open_execution(eid, "big")
            for n in range(40):
                # ~40 KB per event, incompressible (event chunks are compressed)
                values = {f"v{i}": os.urandom(1750).hex() for i in range(12)}
                p.pub.emit("progress.update", eid, meta={"n": n, **values})
            last = p.run()
            assert s.flush(10)
        assert not s.healthy
        assert "full" in s.last_error.lower()
        assert sum(r.levelno >= logging.ERROR for r in caplog.records) == 1     # reported once
        assert s.get_execution(last)["status"] == "completed"                 # served from memory
        assert s.events(last) == p.pub.replay(last)
        assert p.pub.stats()["sink_errors"] == 0
        # memory stays bounded
        for _ in range(60):
            p.run()
        assert s.flush(10)
        conn_events = sum(len(s.events(r["id"])) for r in s.list_executions(limit=None))
        assert conn_events <= 500
        del first
    finally:
        p.close()
        s.close()


# -- end to end -----------------------------------------------------------------------------------
E2E = """
name: e2e
variables:
  - {name: items, type: array, default: [1, 2, 3]}
  - {name: token, type: string, default: s3cret, secret: true}
  - {name: counter, type: string}
nodes:
  - {id: start, type: start}
  - id: each
    type: loop
    collection: items
    item: n
    body: [square]
    output: squares
  - {id: square, type: python, call: "flowlib:add", args: ["${n}", "${n}"], output: sq}
  - id: flaky
    type: python
    call: "flowlib:flaky"
    args: ["${counter}", 1]
    retry: {max_attempts: 3, initial_delay: 10ms}
    output: attempts
  - {id: total, type: python, call: "flowlib:add", args: [1, 2], output: total}
  - {id: end, type: end, return: "${total}"}
edges:
  - {from: start, to: each}
  - {from: each, to: flaky}
  - {from: flaky, to: total}
  - {from: total, to: end}
"""


class EmbeddedWithSink:
    """What EmbeddedRuntime does, with ``sink=`` (EmbeddedRuntime does not take one yet)."""

    def __init__(self, sink, workers: int = 2, **coordinator_options):
        from goflow.coordinator.coordinator import Coordinator
        from goflow.coordinator.local_workers import LocalWorkerPool

        self.dir = tempfile.mkdtemp(prefix="goflow-e2e-")
        self.events_endpoint = f"ipc://{self.dir}/events"
        self.control_endpoint = f"ipc://{self.dir}/control"
        self.coordinator = Coordinator(workers_endpoint=f"ipc://{self.dir}/workers",
                                       event_endpoints=[self.events_endpoint],
                                       control_endpoints=[self.control_endpoint],
                                       context=zmq.Context.instance(), sink=sink, **coordinator_options)
        self.pool = LocalWorkerPool(self.coordinator.workers_endpoint, workers, python_paths=[str(TESTS_DIR)])
        self.coordinator.attach_local_pool(self.pool)
        self.workers = workers

    def __enter__(self):
        self.coordinator.start()
        self.pool.start()
        while self.coordinator.call(lambda: len(self.coordinator.broker.workers)) < self.workers:
            time.sleep(0.02)  # bounded by the test's timeout
        return self

    def __exit__(self, *exc):
        import shutil

        self.coordinator.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_end_to_end_real_coordinator_and_workers(tmp_path):
    from goflow.language.loader import load

    path = tmp_path / "e2e.yaml"
    path.write_text(E2E)
    workflow = load(path)
    store = Store(tmp_path / "history.db")
    try:
        with EmbeddedWithSink(store.sink) as rt:
            variables = {"counter": str(tmp_path / "counter")}
            eid = uuid.uuid4().hex
            store.record_submission(eid, workflow.name, path.read_text(), variables,
                                    secrets=workflow.secret_variables)
            _, future = rt.coordinator.submit(workflow, variables, execution_id=eid)
            summary = future.result(30)
            assert summary["status"] == "completed"
            published = rt.coordinator.call(lambda: rt.coordinator.publisher.replay(eid))
        assert store.flush(5)
        run = store.get_execution(eid[:8])
        assert run["status"] == "completed" and run["result"] == 3
        assert run["workflow_text"] == E2E and run["variables_in"] == variables
        assert run["inputs"]["token"] == "***" and run["variables_out"]["token"] == "***"
        assert run["variables_out"]["squares"] == [2, 4, 6]
        assert store.events(eid) == published
        nodes = [(n["node_id"], n["attempt"], n["status"]) for n in run["nodes"]]
        assert ("flaky", 1, "failed") in nodes and ("flaky", 2, "completed") in nodes
        squares = [n for n in run["nodes"] if n["node_id"] == "square"]
        assert sorted(n["context"]["index"] for n in squares) == [0, 1, 2]
        assert sorted(n["output"] for n in squares) == [2, 4, 6]
        assert all(n["worker"] and n["worker"].startswith("local-") for n in squares)
        flaky_fail = next(n for n in run["nodes"] if n["node_id"] == "flaky" and n["attempt"] == 1)
        assert flaky_fail["error"]["type"] == "python_error"
        assert {n["node_id"] for n in run["nodes"]} == {"start", "each", "square", "flaky", "total", "end"}
        assert all(n["status"] != "running" for n in run["nodes"])
        names = [c["name"] for c in run["variable_changes"]]
        assert names[:3] == ["items", "token", "counter"] and "squares" in names and "total" in names
        # Only the workflow text (stored verbatim, as the file) holds the secret's default.
        assert "s3cret" not in repr({k: v for k, v in run.items() if k != "workflow_text"})
        assert store.unfinished_executions() == []
    finally:
        store.close()


def test_combine_sinks_isolates_failures():
    seen = []

    def broken(*_):
        raise RuntimeError("boom")

    sink = combine_sinks(broken, None, lambda *a: seen.append(a))
    sink("e", b"t/", b"p")
    assert seen == [("e", b"t/", b"p")]

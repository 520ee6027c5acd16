"""History that keeps up, loses nothing and says when it cannot: real coordinator, real
workers, real SQLite files (a slowed database, a full tmpfs, a read-only remount)."""

from __future__ import annotations

import json
import tempfile
import textwrap
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import pytest

from goflow.history.store import Store, open_store
from goflow.language.loader import load
from tests.test_store import EmbeddedWithSink, Publisher, tiny_tmpfs  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(240)

TESTS_DIR = Path(__file__).resolve().parent


class FileGate:
    """A gate the writer process can see: open once its file exists."""

    def __init__(self, path: Path):
        self.path = path

    def set(self) -> None:
        self.path.touch()


class SlowStore(Store):
    """A real Store on a real file whose writer process is the real one with its SQLite
    connection slowed down (``tests/slow_history_writer.py``: a progress handler, run by
    SQLite every few thousand VM steps, waits for ``gate`` and sleeps ``pause``). Nothing of
    the store's or the writer's own logic is replaced."""

    def __init__(self, *args, gate: FileGate, pause: float = 0.0, **kwargs):
        self.gate = gate
        self.pause = pause
        super().__init__(*args, **kwargs)

    def _writer_command(self) -> list[str]:
        return [sys.executable, str(TESTS_DIR / "slow_history_writer.py"), str(self.gate.path), str(self.pause),
                self.path]


def fan_out_with_outputs(count: int) -> str:
    """start -> ``count`` python nodes, node i writes ``o<i>`` = i + 1 -> end."""
    nodes = "".join(f"  - {{id: n{i}, type: python, call: 'flowlib:add', args: [{i}, 1], output: o{i}}}\n"
                    for i in range(count))
    edges = "".join(f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}\n" for i in range(count))
    return (f"name: fan{count}\nnodes:\n  - {{id: start, type: start}}\n  - {{id: end, type: end}}\n" + nodes
            + "edges:\n" + edges)


def wait_for(predicate, what: str, bound: float = 120.0) -> None:
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_a_5k_node_run_is_recorded_completely_with_a_slowed_writer(tmp_path):
    count = 5000
    gate = FileGate(tmp_path / "gate")
    store = SlowStore(tmp_path / "history.db", gate=gate, pause=0.001, high_watermark=1000)
    workflow = load("fan.yaml", text=fan_out_with_outputs(count))
    try:
        with EmbeddedWithSink(store.sink, history=store) as rt:
            opener = threading.Thread(target=lambda: (wait_for(lambda: store.stats["backlogged"] >= 1,
                                                               "back-pressure"), gate.set()))
            opener.start()
            eid, future = rt.coordinator.submit(workflow, {})
            summary = future.result(200)
            opener.join()
            last_eseq = rt.coordinator.call(lambda: rt.coordinator.publisher.last_eseq(eid))
        assert summary["status"] == "completed"
        assert summary["history"] == {"recorded": True, "problem": None}   # reported once recorded
        # The writer was blocked, then slow: dispatch held instead of the queue growing with
        # the run. Bound: the watermark + the node.started burst of the ready frontier (all
        # 5k nodes become ready at once, each announced as queued) + what was in flight.
        assert store.stats["backlogged"] >= 1 and store.dropped_from_history == 0
        assert last_eseq > 3 * count
        assert store.max_queue_depth < store.high_watermark + count + 2000
        events = [msgpack.unpackb(p) for p in store.events(eid)]
        assert [e["eseq"] for e in events] == list(range(1, last_eseq + 1))   # contiguous, complete
        assert events[-1]["type"] == "execution.completed"
        outputs = {n["node_id"]: n["output"] for n in store.node_attempts(eid) if n["status"] == "completed"}
        assert all(outputs[f"n{i}"] == i + 1 for i in range(count))
        assert store.execution_row(eid)["status"] == "completed"
    finally:
        gate.set()
        store.close()


def test_close_waits_for_a_blocked_writer_and_writes_everything(tmp_path):
    gate = FileGate(tmp_path / "gate")
    store = SlowStore(tmp_path / "history.db", gate=gate, flush_interval=3600.0)
    publisher = Publisher(store.sink)
    try:
        ids = [publisher.run() for _ in range(200)]
        closer = threading.Thread(target=store.close)
        closer.start()
        closer.join(0.5)
        assert closer.is_alive()          # the writer holds a batch: close waits, closes nothing under it
        gate.set()
        closer.join()
    finally:
        gate.set()
        publisher.close()
    reader = open_store(tmp_path / "history.db")
    try:
        assert all(reader.execution_status(i) == "completed" for i in ids)
        assert all(len(reader.events(i)) == publisher.pub.last_eseq(i) for i in ids[:5])
    finally:
        reader.close()


def test_files_are_private(tmp_path):
    path = tmp_path / "new" / "history.db"
    store = Store(path)
    publisher = Publisher(store.sink)
    try:
        publisher.run()
        assert store.flush(10)
    finally:
        publisher.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for name in ("history.db", "history.db-wal", "history.db-shm", "history.db.state"):
        assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    store.close()
    existing = tmp_path / "shared"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    Store(existing / "history.db").close()           # an existing directory keeps its mode
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755
    assert stat.S_IMODE((existing / "history.db").stat().st_mode) == 0o600


def test_an_evicted_finished_execution_is_answered_from_history(tmp_path):
    from goflow.control.framing import ControlClient

    store = Store(tmp_path / "history.db")
    workflow = load("tiny.yaml", text="name: tiny\nnodes:\n  - {id: start, type: start}\n"
                         "  - {id: add, type: python, call: 'flowlib:add', args: [1, 2], output: sum}\n"
                         "  - {id: end, type: end, return: '${sum}'}\n"
                         "edges:\n  - {from: start, to: add}\n  - {from: add, to: end}\n")
    try:
        with EmbeddedWithSink(store.sink, history=store, keep_finished=2) as rt:
            ids = []
            for _ in range(5):
                eid, future = rt.coordinator.submit(workflow, {})
                assert future.result(60)["status"] == "completed"
                ids.append(eid)
            wait_for(lambda: rt.coordinator.call(lambda: ids[0] not in rt.coordinator.executions), "eviction")
            client = ControlClient(rt.control_endpoint, timeout=10)
            try:
                status = client.request("status", execution_id=ids[0])
                execution = client.request("execution", execution_id=ids[0][:12])
                variables = client.request("variables", execution_id=ids[0])
                recent = client.request("status", execution_id=ids[-1])
                progress = client.request("progress", execution_id=ids[0])
                cancelled = client.request("cancel", execution_id=ids[0])
            finally:
                client.close()
        assert status["status"] == "completed" and status["source"] == "history"
        assert status["history"] == {"recorded": True, "problem": None}
        assert execution["execution_id"] == ids[0] and execution["result"] == 3
        assert execution["nodes"]["add"] == {"status": "completed", "attempt": 1}
        assert variables["variables"]["sum"] == 3
        assert "source" not in recent and recent["history"]["recorded"] is True   # still in memory
        assert progress["status"] == cancelled["status"] == "completed"         # nothing to cancel any more
    finally:
        store.close()


# -- a failing disk -------------------------------------------------------------------------------
def _fill(mountpoint: Path, leave: int) -> None:
    """Fill the tmpfs except ``leave`` bytes."""
    free = os.statvfs(mountpoint)
    room = free.f_bavail * free.f_frsize - leave
    if room > 0:
        (mountpoint / "filler").write_bytes(b"\0" * room)


def test_a_full_disk_is_told_to_the_waiting_client_and_in_status(tiny_tmpfs):
    from goflow.control.framing import ControlClient

    store = Store(tiny_tmpfs / "history.db")
    before = load("before.yaml", text="name: before\nnodes:\n  - {id: start, type: start}\n  - {id: end, type: end}\n"
                       "edges:\n  - {from: start, to: end}\n")
    big = load("big.yaml", text=fan_out_with_outputs(200))
    try:
        with EmbeddedWithSink(store.sink, history=store) as rt:
            first, future = rt.coordinator.submit(before, {})
            assert future.result(60)["history"] == {"recorded": True, "problem": None}
            _fill(tiny_tmpfs, leave=8 * 1024)
            eid, future = rt.coordinator.submit(big, {})
            summary = future.result(120)
            client = ControlClient(rt.control_endpoint, timeout=10)
            try:
                status = client.request("status", execution_id=eid)
            finally:
                client.close()
        assert summary["status"] == "completed"                      # the run itself is fine...
        assert summary["history"]["recorded"] is False
        assert "full" in summary["history"]["problem"].lower()        # ...and the waiter is told why
        assert status["history"] == summary["history"]
        assert not store.healthy
    finally:
        store.close()
    (tiny_tmpfs / "filler").unlink()
    conn = sqlite3.connect(tiny_tmpfs / "history.db")
    try:    # nothing already recorded is damaged
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT status FROM executions WHERE id = ?", (first,)).fetchone()[0] == "completed"
    finally:
        conn.close()
    assert "full" in (tiny_tmpfs / "history.db.state").read_text(errors="replace").lower()


def test_goflow_run_on_a_full_disk_exits_4_and_says_why(tiny_tmpfs, tmp_path):
    flow = tmp_path / "big.yaml"
    flow.write_text(fan_out_with_outputs(200))
    _fill(tiny_tmpfs, leave=64 * 1024)
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    proc = subprocess.run([sys.executable, "-m", "goflow", "run", str(flow), "--json", "--workers", "1",
                           "--db", str(tiny_tmpfs / "history.db")], capture_output=True, text=True, env=env,
                          timeout=200)
    assert proc.returncode == 4, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "completed" and "full" in data["history"]["problem"].lower()
    assert "history of execution" in proc.stderr and "incomplete" in proc.stderr


@pytest.fixture
def small_tmpfs():
    """A real 8 MB tmpfs that the test may remount read-only."""
    mountpoint = tempfile.mkdtemp(prefix="goflow-tmpfs-")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mountpoint],
                            capture_output=True, text=True)
    if result.returncode != 0:
        os.rmdir(mountpoint)
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield Path(mountpoint)
    finally:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        os.rmdir(mountpoint)


def _remount(mountpoint: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mountpoint)], check=True, capture_output=True)


def _recorded_completed(db: Path, execution_id: str, node_id: str) -> bool:
    try:
        reader = open_store(db)
    except Exception:
        return False
    try:
        return any(n["node_id"] == node_id and n["status"] == "completed" for n in reader.node_attempts(execution_id))
    finally:
        reader.close()


def test_a_read_only_disk_never_leads_to_a_node_running_twice(small_tmpfs, tmp_path):
    from tests.test_recovery import Daemon, _wait_status

    db, log, release = small_tmpfs / "history.db", tmp_path / "ran.log", tmp_path / "release"
    workflow = textwrap.dedent(f"""
        name: twice
        nodes:
          - {{id: start, type: start}}
          - {{id: first, type: python, call: "flowlib:append", args: ["{log}", first], output: a}}
          - {{id: second, type: python, call: "flowlib:append_when", args: ["{log}", second, "{release}"],
              output: b}}
          - {{id: end, type: end, return: "${{a}}-${{b}}"}}
        edges:
          - {{from: start, to: first}}
          - {{from: first, to: second}}
          - {{from: second, to: end}}
    """)
    daemon = Daemon(db).start()
    try:
        execution_id = daemon.request("submit", workflow=workflow, name="twice.yaml")["execution_id"]
        wait_for(lambda: _recorded_completed(db, execution_id, "first"), "first recorded")
        daemon.kill()
    finally:
        daemon.stop()
    release.touch()          # from now on `second` would finish at once if anything ran it
    _remount(small_tmpfs, "ro")
    readonly = Daemon(db).start()
    stderr = readonly.stop()
    assert "recovery skipped" in stderr and "cannot be written" in stderr
    assert log.read_text().splitlines() == ["first"]      # nothing ran where it could not be recorded
    _remount(small_tmpfs, "rw")
    writable = Daemon(db).start()
    try:
        final = _wait_status(writable, execution_id, {"completed", "failed", "cancelled", "timed_out"})
        assert final["status"] == "completed", final
    finally:
        writable.stop()
    assert log.read_text().splitlines() == ["first", "second"]


def test_after_a_write_failure_recovery_fails_what_may_have_run_unrecorded(small_tmpfs):
    from goflow.coordinator.recovery import recover

    db = small_tmpfs / "history.db"
    store = Store(db)
    publisher = Publisher(store.sink)
    try:
        eid = publisher.run(finish=False)
        assert store.flush(10) and store.healthy
        _fill(small_tmpfs, leave=0)
        big = "x" * 200_000
        for n in range(20):   # completions published (and seen by subscribers) but not recorded
            publisher.pub.emit("node.completed", eid, node_id=f"late{n}", node_type="python", status="completed",
                               attempt=1, meta={"output": big})
        assert store.flush(10) and not store.healthy
    finally:
        publisher.close()
        store.close()
    (small_tmpfs / "filler").unlink()

    store = Store(db)
    try:
        assert store.healthy and "full" in store.previous_failure.lower()
        with EmbeddedWithSink(store.sink, history=store) as rt:
            report = recover(rt.coordinator, store)
            assert eid in report.failed and not report.resumed
            wait_for(lambda: store.previous_failure is None, "the failure marker to be settled")
        row = store.execution_row(eid)
        assert row["status"] == "failed" and row["error"]["type"] == "unresumable"
        assert "could not record its history" in row["error"]["message"]
    finally:
        store.close()
    store = Store(db)          # settled: a third coordinator has nothing left to fail
    try:
        assert store.previous_failure is None and store.unfinished_executions() == []
    finally:
        store.close()


def test_submit_wait_on_a_daemon_with_a_full_disk_exits_4_and_status_says_why(tiny_tmpfs, tmp_path):
    from tests.test_recovery import Daemon

    flow = tmp_path / "big.yaml"
    flow.write_text(fan_out_with_outputs(200).replace("flowlib:add", "operator:add"))
    daemon = Daemon(tiny_tmpfs / "history.db").start()
    try:
        _fill(tiny_tmpfs, leave=8 * 1024)
        goflow = [sys.executable, "-m", "goflow"]
        proc = subprocess.run([*goflow, "submit", str(flow), "--coordinator", daemon.control, "--wait", "--json"],
                              capture_output=True, text=True, timeout=200)
        assert proc.returncode == 4, proc.stderr
        result = json.loads(proc.stdout)
        assert result["status"] == "completed" and "full" in result["history"]["problem"].lower()
        assert "incomplete" in proc.stderr
        status = subprocess.run([*goflow, "status", result["execution_id"], "--coordinator", daemon.control],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "history incomplete" in status.stdout, status.stdout + status.stderr
    finally:
        daemon.stop()


# -- the writer process ---------------------------------------------------------------------------
def _writer_processes(parent: int) -> list[int]:
    """Pids of the history writer processes whose parent is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"goflow.history.writer" in cmdline:
            found.append(int(entry.name))
    return found


def _exited(pid: int) -> bool:
    """The process is gone (or a zombie: it exited, nobody reaped it yet)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except (OSError, IndexError):
        return True


def test_the_writer_process_dying_mid_run_is_told_to_the_client_and_history_goes_on_in_memory(tmp_path):
    import signal

    release, log = tmp_path / "release", tmp_path / "ran.log"
    workflow = load("held.yaml", text=textwrap.dedent(f"""
        name: held
        nodes:
          - {{id: start, type: start}}
          - {{id: first, type: python, call: "flowlib:add", args: [1, 2], output: a}}
          - {{id: held, type: python, call: "flowlib:append_when", args: ["{log}", held, "{release}"], output: b}}
          - {{id: end, type: end, return: "${{a}}"}}
        edges:
          - {{from: start, to: first}}
          - {{from: first, to: held}}
          - {{from: held, to: end}}
    """))
    db = tmp_path / "history.db"
    store = Store(db)
    try:
        assert store.writer_pid in _writer_processes(os.getpid())
        with EmbeddedWithSink(store.sink, history=store) as rt:
            eid, future = rt.coordinator.submit(workflow, {})
            wait_for(lambda: any(n["node_id"] == "first" and n["status"] == "completed"
                                 for n in store.node_attempts(eid)), "first recorded in the file")
            writer = store.writer_pid
            os.kill(writer, signal.SIGKILL)
            release.touch()
            summary = future.result(60)
        assert summary["status"] == "completed" and summary["result"] == 3     # the run itself is fine...
        assert summary["history"]["recorded"] is False                        # ...and its client is told
        assert f"pid {writer}" in summary["history"]["problem"]
        assert not store.healthy and store.writer_pid is None and store.in_memory
        events = [msgpack.unpackb(p) for p in store.events(eid)]               # what followed, in memory
        assert events[-1]["type"] == "execution.completed"
        assert store.execution_row(eid)["status"] == "completed"
    finally:
        store.close()
    assert "writer process" in (tmp_path / "history.db.state").read_text(errors="replace")
    reader = Store(db)      # the next coordinator is told; the file has the beginning, intact
    try:
        assert f"pid {writer}" in reader.previous_failure
        assert reader.execution_status(eid) == "running"
    finally:
        reader.close()


def test_the_writer_process_exits_with_a_sigkilled_coordinator_and_keeps_what_it_committed(tmp_path):
    from tests.test_recovery import Daemon

    db = tmp_path / "history.db"
    daemon = Daemon(db).start()
    try:
        writers = _writer_processes(daemon.proc.pid)
        assert len(writers) == 1
        execution_id = daemon.request("submit", workflow="name: tiny\nnodes:\n  - {id: start, type: start}\n"
                                      "  - {id: end, type: end}\nedges:\n  - {from: start, to: end}\n",
                                      name="tiny.yaml")["execution_id"]
        daemon.kill()
        wait_for(lambda: _exited(writers[0]), "the writer process to exit after its coordinator")
    finally:
        daemon.stop()
    reader = open_store(db)
    try:    # the submission was committed before the reply, and nothing is damaged
        assert reader.execution_row(execution_id)["workflow"] == "tiny"
    finally:
        reader.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_the_writer_process_ignores_the_signals_a_process_group_gets(tmp_path):
    import signal

    store = Store(tmp_path / "history.db")
    publisher = Publisher(store.sink)
    try:
        first = publisher.run()
        assert store.flush(10)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # Ctrl-C, a service stop, a hangup
            os.kill(store.writer_pid, signum)
        second = publisher.run()         # the coordinator drains into it after such a signal
        assert store.flush(10)
        assert store.healthy and store.history_problem(second) is None
        assert [store.execution_status(e) for e in (first, second)] == ["completed", "completed"]
    finally:
        publisher.close()
        store.close()

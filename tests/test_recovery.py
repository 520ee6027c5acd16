"""Crash recovery: SIGKILL the daemon mid-run, restart it on the same --db, nothing completed re-runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest

from goflow.control.framing import ControlClient
from goflow.history.store import open_store
from tests.conftest import pick_free_ports

pytestmark = pytest.mark.timeout(120)


class Daemon:
    def __init__(self, db: Path, *extra: str):
        control, events, workers = pick_free_ports(3)
        self.control = f"tcp://127.0.0.1:{control}"
        self.args = [sys.executable, "-m", "goflow.coordinator.daemon", "--control-endpoint", self.control,
                     "--events-endpoint", f"tcp://127.0.0.1:{events}", "--workers-endpoint",
                     f"tcp://127.0.0.1:{workers}", "--db", str(db), "--local-workers", "1", "--log-format", "json",
                     *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        client = ControlClient(self.control, timeout=1.0)
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                try:
                    if client.request("workers")["workers"]:
                        return self
                except Exception:
                    time.sleep(0.1)
            raise AssertionError("the daemon did not come up with a worker")
        finally:
            client.close()

    def request(self, op: str, **fields):
        client = ControlClient(self.control, timeout=5.0)
        try:
            return client.request(op, **fields)
        finally:
            client.close()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stderr.read() if self.proc and self.proc.stderr else ""


def _wait_status(daemon: Daemon, execution_id: str, statuses: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = daemon.request("status", execution_id=execution_id)
            if status["status"] in statuses:
                return status
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"execution {execution_id} never reached {statuses}")


def _wait_for_lines(path: Path, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {count} line(s)")


def _wait_recorded(db: Path, execution_id: str, node_ids: set[str], timeout: float = 30) -> None:
    """Until the history holds ``node.completed`` of every node in ``node_ids``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            store = open_store(db)
            try:
                recorded = {msgpack.unpackb(p, raw=False)["node_id"]
                            for p in store.events(execution_id, types=["node.completed"])}
            finally:
                store.close()
        except Exception:  # not created yet
            recorded = set()
        if node_ids <= recorded:
            return
        time.sleep(0.05)
    raise AssertionError(f"{sorted(node_ids)} never recorded as completed")


def test_sigkill_and_restart_resumes_without_rerunning_completed_nodes(tmp_path):
    db, log = tmp_path / "history.db", tmp_path / "ran.log"
    workflow = textwrap.dedent(f"""
        name: recoverable
        nodes:
          - {{id: start, type: start}}
          - {{id: first, type: python, call: "flowlib:append", args: ["{log}", first], output: a}}
          - {{id: long, type: python, call: "flowlib:append", args: ["{log}", long]}}
          - {{id: wait, type: python, call: "flowlib:timed", args: [4, waited], output: w}}
          - {{id: last, type: python, call: "flowlib:append", args: ["{log}", last], output: z}}
          - {{id: end, type: end, return: "${{a}}-${{w.value}}-${{z}}"}}
        edges:
          - {{from: start, to: first}}
          - {{from: first, to: long}}
          - {{from: long, to: wait}}
          - {{from: wait, to: last}}
          - {{from: last, to: end}}
    """)
    daemon = Daemon(db).start()
    try:
        execution_id = daemon.request("submit", workflow=workflow, name="recoverable.yaml")["execution_id"]
        _wait_for_lines(log, 2)  # first and long done; wait is running
        _wait_recorded(db, execution_id, {"first", "long"})  # the store's writer batches every 50 ms
        daemon.kill()
    finally:
        daemon.stop()
    assert log.read_text().splitlines() == ["first", "long"]

    restarted = Daemon(db).start()
    try:
        final = _wait_status(restarted, execution_id, {"completed", "failed", "cancelled", "timed_out"})
        assert final["status"] == "completed", final
    finally:
        restarted.stop()
    assert log.read_text().splitlines() == ["first", "long", "last"], "a completed node ran again"
    store = open_store(db)
    record = store.get_execution(execution_id)
    assert record["status"] == "completed"
    types = [msgpack.unpackb(p, raw=False)["type"] for p in store.events(execution_id)]
    assert "execution.resumed" in types
    assert types[-1] == "execution.completed"


def test_a_resumed_run_gets_back_what_completed_containers_wrote(tmp_path):
    """A parallel node's merge, a sequential loop's body writes and a concurrent loop's merge
    change the execution's variables besides the container's own output: after a SIGKILL,
    the restored containers give them back (before, ``ra`` was undefined and ``total`` 0)."""
    db, log, gate = tmp_path / "history.db", tmp_path / "ran.log", tmp_path / "gate"
    workflow = textwrap.dedent(f"""
        name: containers
        variables:
          - {{name: total, type: number, default: 0}}
          - {{name: items, type: array, default: [1, 2, 3]}}
          - {{name: pair, type: array, default: [10, 20]}}
        nodes:
          - {{id: start, type: start}}
          - {{id: par, type: parallel, branches: [[pa], [pb]]}}
          - {{id: pa, type: python, call: "flowlib:append", args: ["{log}", pa], output: ra}}
          - {{id: pb, type: python, call: "flowlib:append", args: ["{log}", pb], output: rb}}
          - {{id: seq, type: loop, collection: items, item: it, body: [acc, mark]}}
          - {{id: acc, type: python, call: "flowlib:add", args: ["${{total}}", "${{it}}"], output: total}}
          - {{id: mark, type: python, call: "flowlib:append", args: ["{log}", "seq${{it}}"]}}
          - {{id: conc, type: loop, collection: pair, item: x, max_parallel: 2, body: [lastx]}}
          - {{id: lastx, type: python, call: "flowlib:append", args: ["{log}", "conc${{x}}"], output: last}}
          - {{id: hold, type: python, call: "flowlib:wait_for_file", args: ["{gate}"]}}
          - {{id: end, type: end, return: "${{ra}}|${{rb}}|${{total}}|${{last}}"}}
        edges:
          - {{from: start, to: par}}
          - {{from: par, to: seq}}
          - {{from: seq, to: conc}}
          - {{from: conc, to: hold}}
          - {{from: hold, to: end}}
    """)
    daemon = Daemon(db).start()
    try:
        execution_id = daemon.request("submit", workflow=workflow, name="containers.yaml")["execution_id"]
        _wait_for_lines(log, 7)
        _wait_recorded(db, execution_id, {"par", "seq", "conc"})
        daemon.kill()
    finally:
        daemon.stop()
    gate.touch()
    restarted = Daemon(db).start()
    try:
        final = _wait_status(restarted, execution_id, {"completed", "failed", "cancelled", "timed_out"})
        assert final["status"] == "completed", final
    finally:
        restarted.stop()
    assert sorted(log.read_text().splitlines()) == ["conc10", "conc20", "pa", "pb", "seq1", "seq2", "seq3"]
    record = open_store(db).get_execution(execution_id)
    assert record["result"] == "pa|pb|6|conc20"


def test_an_execution_that_cannot_be_resumed_is_marked_failed_with_the_reason(tmp_path):
    db, log = tmp_path / "history.db", tmp_path / "ran.log"
    workflow = textwrap.dedent(f"""
        name: secretive
        variables:
          - {{name: token, type: string, secret: true, required: true}}
        nodes:
          - {{id: start, type: start}}
          - {{id: first, type: python, call: "flowlib:append", args: ["{log}", first], output: f}}
          - {{id: wait, type: python, call: "flowlib:timed", args: [5, waited]}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: first}}
          - {{from: first, to: wait}}
          - {{from: wait, to: end}}
    """)
    daemon = Daemon(db).start()
    try:
        execution_id = daemon.request("submit", workflow=workflow, name="secretive.yaml",
                                      variables={"token": "hunter2-secret"})["execution_id"]
        _wait_for_lines(log, 1)
        _wait_recorded(db, execution_id, {"first"})
        daemon.kill()
    finally:
        daemon.stop()
    restarted = Daemon(db).start()
    try:
        deadline = time.monotonic() + 30
        store = open_store(db)
        while time.monotonic() < deadline and store.get_execution(execution_id)["status"] != "failed":
            time.sleep(0.1)
        record = store.get_execution(execution_id)
        status = restarted.request("status", execution_id=execution_id)   # answered as what it is
        variables = restarted.request("variables", execution_id=execution_id)
    finally:
        restarted.stop()
    assert record["status"] == "failed"
    # The variables the first coordinator recorded, not the new epoch's empty stream.
    assert variables["variables"] == {"token": "***", "f": "first"}
    last = msgpack.unpackb(store.events(execution_id)[-1], raw=False)
    assert (last["type"], last["eseq"]) == ("execution.failed", 1)
    assert (variables["source"], variables["eseq"], variables["epoch"]) == ("history", 1, last["epoch"])
    assert "cannot be resumed" in str(record["error"]) and "token" in str(record["error"])
    assert status["status"] == "failed" and status["error"]["type"] == "unresumable"
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("history.db*"))
    assert b"hunter2-secret" not in stored, "a secret reached the history store"


def test_keep_days_prunes_finished_executions_at_start(tmp_path):
    db = tmp_path / "history.db"
    daemon = Daemon(db).start()
    try:
        execution_id = daemon.request("submit", workflow=textwrap.dedent("""
            name: short
            nodes:
              - {id: start, type: start}
              - {id: end, type: end}
            edges:
              - {from: start, to: end}
        """), name="short.yaml")["execution_id"]
        _wait_status(daemon, execution_id, {"completed"})
    finally:
        daemon.stop()
    assert open_store(db).get_execution(execution_id)["status"] == "completed"
    time.sleep(0.1)
    pruning = Daemon(db, "--keep-days", "0").start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and open_store(db).list_executions():
            time.sleep(0.1)
        assert open_store(db).list_executions() == []
    finally:
        pruning.stop()


def test_an_accepted_submission_survives_a_sigkill_right_after_the_reply(tmp_path):
    """``submit`` answers only once the submission is committed to history: a SIGKILL the
    moment the client is told cannot lose it (the soak lost 2 of 441 before)."""
    db = tmp_path / "history.db"
    flow = textwrap.dedent("""
        name: survives
        nodes:
          - {id: start, type: start}
          - {id: nap, type: python, call: "time:sleep", args: [30]}
          - {id: end, type: end}
        edges:
          - {from: start, to: nap}
          - {from: nap, to: end}
    """)
    daemon = Daemon(db).start()
    accepted = [daemon.request("submit", workflow=flow, name="survives.yaml")["execution_id"] for _ in range(5)]
    daemon.kill()                     # at once: the writer's 50 ms batching window is open
    restarted = Daemon(db).start()
    try:
        for execution_id in accepted:
            assert restarted.request("status", execution_id=execution_id)["status"] in (
                "running", "pending", "completed", "failed", "cancelled"), execution_id
    finally:
        restarted.stop()

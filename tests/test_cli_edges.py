"""The goflow command's edges, as a user meets them: real subprocesses, real sockets."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from goflow import EventFilter, Monitor
from goflow.events.types import EXECUTION_SCOPED_TYPES
from tests.conftest import pick_free_ports

pytestmark = pytest.mark.timeout(120)

GOFLOW = [sys.executable, "-m", "goflow"]
BIN = Path(sys.executable).parent


def goflow(*args: str, timeout: float = 60, **options) -> subprocess.CompletedProcess:
    return subprocess.run([*GOFLOW, *args], capture_output=True, text=True, timeout=timeout, **options)


# A loop of passthrough nodes: 6 events per iteration, no worker involved, so the whole run
# is over in a moment while the subscriber has not read anything yet.
MANY = """
name: many
variables:
  - {name: items, type: array, default: %s}
nodes:
  - {id: start, type: start}
  - {id: each, type: loop, collection: items, item: x, body: [mark]}
  - {id: mark, type: passthrough}
  - {id: end, type: end}
edges:
  - {from: start, to: each}
  - {from: each, to: end}
"""


def test_a_subscriber_thousands_of_events_behind_repairs_after_the_run_ended(write_flow):
    path = write_flow(MANY % list(range(2000)))
    events_port, control_port = pick_free_ports(2)
    events, control = f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{control_port}"
    execution_id = "linger-test-1"   # chosen: the subscriber knows it before the run
    monitor = Monitor(events, control, rcvhwm=50)
    stream = monitor.subscribe(EventFilter(executions=[execution_id]), since="start", until=lambda e: e.is_terminal)
    prefixes = len(EXECUTION_SCOPED_TYPES) + 1   # + heartbeat/: what --await-subscribers counts
    proc = subprocess.Popen([*GOFLOW, "run", str(path), "--json", "--workers", "1", "--publish", events,
                             "--control", control, "--execution-id", execution_id, "--sndhwm", "50",
                             "--await-subscribers", str(prefixes), "--linger", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: list = []
    reader = threading.Thread(target=lambda: first.append(next(stream)), daemon=True)
    reader.start()       # subscribes; the run starts once the subscriptions arrived
    line = proc.stdout.readline()   # the run is over: nothing more read so far
    reader.join(30)
    assert line, proc.stderr.read()
    result = json.loads(line)
    assert result["status"] == "completed" and result["execution_id"] == execution_id
    events_seen = first + list(stream)
    monitor.close()
    code = proc.wait(30)       # the subscription closed: the run stops lingering
    stderr = proc.stderr.read()
    assert code == 0, stderr
    assert [e.eseq for e in events_seen] == list(range(1, len(events_seen) + 1))
    assert len(events_seen) > 10000 and events_seen[-1].type == "execution.completed"
    # Thousands of events came from the coordinator's log, not live: through the stream's
    # first replay (since="start") or its gap repairs, depending on whether the run had
    # emitted them by the time the first replay request arrived (a race either way ends in).
    stats = monitor.stats
    assert stats["lost"] == 0 and stats["repaired"] + stats["replayed"] >= 2000, stats
    assert f"goflow run: execution {execution_id}" in stderr and "--linger" in stderr
    assert "\r" not in stderr


def test_did_you_mean_and_per_command_usage():
    wrong = goflow("rnu")
    assert wrong.returncode == 2 and "did you mean 'run'" in wrong.stderr
    bad_flag = goflow("run", "x.yaml", "--bogus")
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.startswith("usage: goflow run ") and "unrecognized arguments: --bogus" in bad_flag.stderr


def test_status_without_a_daemon_fails_fast_with_exit_3():
    (port,) = pick_free_ports(1)
    done = goflow("status", "abcd", "--coordinator", f"tcp://127.0.0.1:{port}", timeout=20)
    assert done.returncode == 3
    assert "no coordinator at" in done.stderr and "Connection refused" in done.stderr


@pytest.mark.parametrize("program", ["goflow-coordinator", "goflow-worker", "goflow"])
def test_every_program_has_version(program):
    done = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith(f"{program} ")


def test_run_json_on_an_invalid_workflow_prints_a_json_error(write_flow):
    path = write_flow("name: bad\nnodes:\n  - {id: a, type: nope}\n")
    done = goflow("run", str(path), "--json")
    assert done.returncode == 2
    data = json.loads(done.stdout)
    assert data["status"] == "invalid" and data["execution_id"] is None
    assert data["error"]["type"] == "invalid_workflow"
    assert any("nope" in p["message"] for p in data["error"]["problems"])
    missing = goflow("run", str(write_flow("""
        name: needs
        variables: [{name: n, type: number, required: true}]
        nodes: [{id: start, type: start}, {id: end, type: end}]
        edges: [{from: start, to: end}]
    """, "needs.yaml")), "--json")
    assert missing.returncode == 2 and json.loads(missing.stdout)["error"]["type"] == "bad_request"


def test_history_json_says_execution_id_and_times_share_one_format(write_flow):
    path = write_flow(MANY % [1])
    run = json.loads(goflow("run", str(path), "--json", "--workers", "1").stdout)
    listed = json.loads(goflow("executions", "--json").stdout)
    assert [row["execution_id"] for row in listed] == [run["execution_id"]] and "id" not in listed[0]
    one = json.loads(goflow("execution", run["execution_id"], "--json").stdout)
    assert one["execution_id"] == run["execution_id"] and "id" not in one
    from goflow.cli.common import time_text

    table = goflow("executions").stdout
    assert time_text(listed[0]["started_at"]) in table


def test_submit_watch_prints_each_event_once_across_idle_spells(write_flow, tmp_path):
    """A node that runs longer than the 2 s idle check: the history is not printed again."""
    import signal

    from tests.test_daemon import Daemon, WorkerGroup, child_env

    daemon = Daemon(tmp_path).start()
    group = WorkerGroup(tmp_path, daemon.workers)
    try:
        path = write_flow("""
            name: slowish
            nodes:
              - {id: start, type: start}
              - {id: nap, type: python, call: "flowlib:timed", args: [4.5]}
              - {id: end, type: end}
            edges:
              - {from: start, to: nap}
              - {from: nap, to: end}
        """)
        done = goflow("submit", str(path), "--watch", "--coordinator", daemon.control, "--events", daemon.events,
                      env=child_env())
    finally:
        group.stop()
        daemon.stop(signal.SIGKILL)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines() if "node." in line or "execution." in line]
    kinds = [(words[1], words[2]) for words in lines if len(words) > 2]
    assert kinds.count(("node.started", "nap")) == 1 and kinds.count(("node.completed", "nap")) == 1
    assert kinds.count(("execution.started", "-")) == 1

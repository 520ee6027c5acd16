"""One policy in one place: secret masking, the retry decision, the server registry,
submission recording and prompt teardown (issue 12's fixes, each with a real run)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
import zmq

import goflow
from goflow.control.framing import ControlClient
from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.coordinator.local_workers import LocalWorkerPool
from goflow.coordinator.retry import retry_delay
from goflow.coordinator.server_registry import ServerRegistry
from goflow.history.store import Store
from goflow.language.loader import load
from goflow.language.model import RetryPolicy

TOKEN = "tok-9f8e7d6c5b"

SECRET_FLOW = f"""
version: "1.0"
name: secrets
variables:
  - {{name: token, type: string, default: {TOKEN}, secret: true}}
nodes:
  - id: start
    type: start
  - id: echo
    type: python
    call: "flowlib:echo"
    args: ["Bearer ${{token}}"]
    output: header
  - id: end
    type: end
    return: "${{header}}"
edges:
  - {{from: start, to: echo}}
  - {{from: echo, to: end}}
"""


def test_secret_never_in_run_json(write_flow):
    path = write_flow(SECRET_FLOW)
    done = subprocess.run([sys.executable, "-m", "goflow", "run", str(path), "--json", "--workers", "1",
                           "--no-history"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["status"] == "completed"
    assert reply["result"] == "Bearer ***"
    assert reply["variables"]["token"] == "***" and reply["variables"]["header"] == "Bearer ***"
    assert TOKEN not in done.stdout + done.stderr


def test_secret_never_in_python_result_or_control_ops(write_flow):
    path = write_flow(SECRET_FLOW)
    workflow = load(path)
    with EmbeddedRuntime(workers=1, python_paths=[str(path.parent)]) as runtime:
        execution_id, future = runtime.coordinator.submit(workflow)
        outcome = future.result(timeout=60)
        with ControlClient(runtime.control_endpoint) as client:
            replies = [client.request(op, execution_id=execution_id)
                       for op in ("status", "execution", "variables", "progress")]
            replies.append(client.request("executions"))
    shown = json.dumps([outcome, replies], default=str)
    assert outcome["status"] == "completed" and outcome["result"] == "Bearer ***"
    assert replies[2]["variables"]["header"] == "Bearer ***"
    assert TOKEN not in shown


def test_secret_masked_in_errors(write_flow):
    path = write_flow(f"""
        version: "1.0"
        name: secret-error
        variables:
          - {{name: token, type: string, default: {TOKEN}, secret: true}}
        nodes:
          - id: start
            type: start
          - id: boom
            type: python
            call: "flowlib:fail"
            args: ["refused ${{token}}"]
          - id: end
            type: end
        edges:
          - {{from: start, to: boom}}
          - {{from: boom, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "failed"
    assert "refused ***" in result.error["message"]
    assert TOKEN not in json.dumps([result.to_dict(), result.records], default=str)


LONG_TOKEN = "ghp_S3CRETabcdefghijklmnopqrstuvwxyz0123"
PASSWORD = "P4ssw0rdQQ"


def test_secret_fields_and_secrets_cut_short_in_errors_are_masked(write_flow, tmp_path):
    """An object secret's fields, used one by one, and a long secret that jq's error message
    shortens to its first characters plus '...', stay out of events, results and history."""
    path = write_flow(f"""
        version: "1.0"
        name: secret-fields
        variables:
          - {{name: creds, type: object, default: {{user: bob, pass: {PASSWORD}}}, secret: true}}
          - {{name: gh, type: string, default: {LONG_TOKEN}, secret: true}}
        nodes:
          - {{id: start, type: start}}
          - {{id: echo, type: python, call: "flowlib:echo", args: ["${{creds.pass}}"], output: pass_out}}
          - {{id: pick, type: transform, input: "${{creds}}", expression: "jq(.pass)", output: picked}}
          - {{id: iterate, type: transform, input: "${{gh}}", expression: "jq(.[])"}}
          - {{id: end, type: end, return: {{p: "${{pass_out}}", q: "${{picked}}"}}}}
        edges:
          - {{from: start, to: echo}}
          - {{from: echo, to: pick}}
          - {{from: pick, to: iterate}}
          - {{from: iterate, to: end}}
    """)
    events = []
    db = tmp_path / "history.db"
    result = goflow.run(path, workers=1, db=db, on_event=lambda event: events.append(event.model_dump()))
    assert result.status == "failed" and result.error["node_id"] == "iterate"
    assert "Cannot iterate over string" in result.error["message"] and "***" in result.error["message"]
    assert result.variables["pass_out"] == "***" and result.variables["picked"] == "***"
    store = Store(db)
    try:
        recorded = [store.get_execution(result.execution_id), store.events(result.execution_id)]
    finally:
        store.close()
    shown = json.dumps([result.to_dict(), result.records, events, recorded], default=str)
    assert any(e["type"] == "node.failed" for e in events) and recorded[0] is not None
    assert PASSWORD not in shown and LONG_TOKEN[:12] not in shown


@pytest.mark.parametrize("policy, error, attempt, retried", [
    (None, {"type": "worker_lost"}, 1, True),
    (None, {"type": "worker_lost"}, 3, False),
    (None, {"type": "python_error", "exception": "ValueError"}, 1, False),
    (RetryPolicy(non_retryable_errors=["python_error"]), {"type": "python_error", "exception": "ValueError"}, 1, False),
    (RetryPolicy(non_retryable_errors=["ValueError"]), {"type": "python_error", "exception": "ValueError"}, 1, False),
    (RetryPolicy(on=["ValueError"]), {"type": "python_error", "exception": "ValueError"}, 1, True),
    (RetryPolicy(on=["timeout"]), {"type": "python_error", "exception": "ValueError"}, 1, False),
    (RetryPolicy(max_attempts=2), {"type": "tool_error"}, 2, False),
    (RetryPolicy(), {"type": "tool_error"}, 2, True),
])
def test_retry_decision(policy, error, attempt, retried):
    assert (retry_delay(policy, error, attempt) is not None) is retried


def test_jittered_delay_stays_within_a_quarter():
    policy = RetryPolicy(initial_delay=2.0, backoff="fixed", jitter=True)
    delays = {retry_delay(policy, {"type": "tool_error"}, 1) for _ in range(200)}
    assert min(delays) >= 1.5 and max(delays) <= 2.5 and len(delays) > 1


def test_server_registry_read_once_reloaded_on_demand(private_goflow_home):
    private_goflow_home.mkdir(parents=True, exist_ok=True)
    path = private_goflow_home / "servers.yaml"
    path.write_text(yaml.safe_dump({"servers": [{"id": "a", "command": "one"}]}))
    registry = ServerRegistry()
    assert registry.spec("a")["command"] == "one"
    path.write_text(yaml.safe_dump({"servers": [{"id": "a", "command": "two"}]}))
    assert registry.spec("a")["command"] == "one", "servers.yaml is read once, not per dispatch"
    assert registry.reload() == 1
    assert registry.spec("a")["command"] == "two"


def test_python_submission_recorded_through_the_coordinator(write_flow, tmp_path):
    path = write_flow(SECRET_FLOW)
    db = tmp_path / "history.db"
    with EmbeddedRuntime(workers=1, python_paths=[str(path.parent)], db=db) as runtime:
        execution_id, future = runtime.coordinator.submit(load(path), source=path.read_text())
        future.result(timeout=60)
    store = Store(db)
    try:
        row = store.get_execution(execution_id)
    finally:
        store.close()
    assert row is not None and row["workflow"] == "secrets"
    assert TOKEN not in json.dumps(row, default=str)


@pytest.mark.timeout(60)
def test_stopping_never_waits_for_workers_that_never_joined(tmp_path):
    """Workers still starting (never registered, so never told to shut down) get SIGTERM at once."""
    pool = LocalWorkerPool(f"ipc://{tmp_path}/nobody-listens", 2)
    pool.start()
    processes = [child.process for child in pool.children]
    pool.stop(grace=600)   # bounded by the test's timeout, not by the grace
    assert all(proc.returncode in (0, -signal.SIGTERM) for proc in processes)


def test_recovery_never_restores_a_masked_output():
    """An output history shows with ``***`` in it is recomputed on resume, not restored."""
    from goflow.coordinator.recovery import _holds_mask

    assert _holds_mask("Bearer ***") and _holds_mask({"h": ["x", {"a": "***"}]})
    assert not _holds_mask({"h": ["x", 3, None]}) and not _holds_mask("plain")

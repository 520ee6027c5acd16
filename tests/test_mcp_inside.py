"""Inside an MCP call: progress, server logs, structured results, auth from secrets.

Real servers: the ``everything`` reference server from npm (pinned in package.json, run with
``node node_modules/...``; no network) and tests/mcp_test_server.py (the official SDK).
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.language.loader import load

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
TEST_SERVER = Path(__file__).resolve().parent / "mcp_test_server.py"
EVERYTHING = REPO / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
TERMINAL = ("execution.completed", "execution.failed", "execution.cancelled")

SERVERS = f"""
servers:
  - id: everything
    command: node
    args: ["{EVERYTHING}", "stdio"]
  - id: test
    command: {sys.executable}
    args: ["{TEST_SERVER}"]
"""


@pytest.fixture(scope="module")
def runtime():
    assert EVERYTHING.exists(), "run `npm ci` (package.json pins @modelcontextprotocol/server-everything)"
    with EmbeddedRuntime(workers=1) as rt:
        rt.wait_for_workers(1)
        yield rt


def _run(runtime: EmbeddedRuntime, tmp_path: Path, body: str, variables: dict | None = None):
    """Run a workflow (``SERVERS`` + ``body``); return its summary and every event of it, in order."""
    path = tmp_path / "flow.yaml"
    path.write_text(textwrap.dedent(body).lstrip() + SERVERS)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(runtime.events_endpoint)
    try:
        while runtime.coordinator.call(lambda: runtime.coordinator.publisher.subscription_count) < 1:
            time.sleep(0.01)  # bounded by the test's timeout
        execution_id, future = runtime.coordinator.submit(load(path), variables)
        events = []
        while not events or events[-1]["type"] not in TERMINAL:
            assert sub.poll(60_000), "no event within 60 s"
            event = msgpack.unpackb(sub.recv_multipart()[1], raw=False)
            if event.get("execution_id") == execution_id:
                events.append(event)
        return future.result(30), events
    finally:
        sub.close(0)


def _single_tool(tool: str, server: str, parameters: str, output: str = "out") -> str:
    return f"""
        name: single
        nodes:
          - {{id: start, type: start}}
          - {{id: call, type: mcp_tool, server: {server}, tool: {tool}, parameters: {parameters}, output: {output}}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: call}}
          - {{from: call, to: end}}
    """


def _outcome_index(events: list[dict], node: str = "call") -> int:
    return next(i for i, e in enumerate(events)
                if e["node_id"] == node and e["type"] in ("node.completed", "node.failed"))


def test_long_running_tool_reports_progress_during_the_call(runtime, tmp_path):
    summary, events = _run(runtime, tmp_path, _single_tool(
        "trigger-long-running-operation", "everything", "{duration: 1.5, steps: 3}"))
    assert summary["status"] == "completed", summary["error"]
    outcome = _outcome_index(events)
    progress = [(i, e) for i, e in enumerate(events) if e["type"] == "node.progress"]
    assert progress, "the server's notifications/progress became node.progress events"
    assert all(i < outcome for i, _ in progress)
    values = [e["meta"]["progress"] for _, e in progress]
    assert values == sorted(values) and values[-1] == 3
    assert all(e["meta"]["total"] == 3 and e["node_id"] == "call" for _, e in progress)
    assert progress[-1][1]["meta"]["percent"] == 100.0


def test_structured_tool_result_is_the_structured_content(runtime, tmp_path):
    summary, events = _run(runtime, tmp_path, _single_tool(
        "get-structured-content", "everything", '{location: "Chicago"}'))
    assert summary["status"] == "completed", summary["error"]
    assert summary["variables"]["out"] == {"temperature": 36, "conditions": "Light rain / drizzle", "humidity": 82}


def test_resource_links_are_kept_as_data(runtime, tmp_path):
    summary, _ = _run(runtime, tmp_path, _single_tool("get-resource-links", "everything", "{count: 2}"))
    assert summary["status"] == "completed", summary["error"]
    out = summary["variables"]["out"]
    links = [item for item in out if isinstance(item, dict) and item.get("type") == "resource_link"]
    assert len(links) == 2 and all(link["uri"] and link.get("name") for link in links)


def test_a_result_that_does_not_match_the_output_schema_fails_the_node(runtime, tmp_path):
    summary, events = _run(runtime, tmp_path, _single_tool("wrong_schema", "test", "{}"))
    assert summary["status"] == "failed"
    failed = [e for e in events if e["type"] == "node.failed" and e["node_id"] == "call"]
    error = failed[0]["error"]
    assert error["type"] == "tool_error"
    assert "test/wrong_schema does not match the tool's outputSchema" in error["message"]
    assert "'hot' is not of type 'number'" in error["message"]


def test_server_log_notifications_and_progress_become_node_events(runtime, tmp_path):
    summary, events = _run(runtime, tmp_path, _single_tool("chatter", "test", "{steps: 4}"))
    assert summary["status"] == "completed", summary["error"]
    outcome = _outcome_index(events)
    logs = [(i, e) for i, e in enumerate(events) if e["type"] == "node.log"]
    assert logs and all(i < outcome for i, _ in logs)
    lines = [line for _, e in logs for line in e["meta"]["lines"] if line["stream"] == "mcp_log"]
    assert [(line["level"], line["text"]) for line in lines] == [
        ("debug", "debug from the server"), ("info", "info from the server"),
        ("warning", '{"structured": "warning"}'), ("error", "error from the server")]
    assert lines[1]["logger"] == "chatter"
    progress = [e["meta"] for e in events if e["type"] == "node.progress"]
    assert progress and progress[-1]["progress"] == 4 and progress[-1]["message"] == "step 4"


def _start_http_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(TEST_SERVER), "--http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}/mcp"
        except OSError:
            assert proc.poll() is None, "the HTTP test server exited at start"
            time.sleep(0.05)  # waiting for the port, bounded by the deadline
    proc.kill()
    raise AssertionError("the HTTP test server did not start listening")


@pytest.fixture(scope="module")
def http_server():
    proc, url = _start_http_server()
    yield url
    proc.terminate()
    proc.wait(10)


def test_bearer_token_from_a_secret_reaches_the_server_and_nothing_else(tmp_path, http_server):
    token = "tok-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:24]
    db = tmp_path / "history.db"
    flow = tmp_path / "auth.yaml"
    flow.write_text(textwrap.dedent(f"""
        name: auth
        variables:
          - {{name: api_token, type: string, secret: true, required: true}}
        servers:
          - id: web
            transport: http
            url: "{http_server}"
            headers: {{Authorization: "Bearer ${{api_token}}"}}
        nodes:
          - {{id: start, type: start}}
          - {{id: call, type: mcp_tool, server: web, tool: headers_seen, parameters: {{}}, output: seen}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: call}}
          - {{from: call, to: end}}
    """).lstrip())
    with EmbeddedRuntime(workers=1, db=db) as rt:
        rt.wait_for_workers(1)
        execution_id, future = rt.coordinator.submit(load(flow), {"api_token": token})
        summary = future.result(60)
        published = rt.coordinator.call(lambda: rt.coordinator.publisher.replay(execution_id, 1))
    assert summary["status"] == "completed", summary["error"]
    expected = hashlib.sha256(f"Bearer {token}".encode()).hexdigest()
    assert summary["variables"]["seen"]["authorization_sha256"] == expected, "the server got the bearer token"
    assert token not in repr(published) and token not in repr(summary)
    assert token.encode() not in db.read_bytes()
    for suffix in ("-wal", "-shm"):
        extra = db.with_name(db.name + suffix)
        assert not extra.exists() or token.encode() not in extra.read_bytes()


def test_a_stdio_servers_stderr_during_the_call_becomes_node_lines(runtime, tmp_path):
    summary, events = _run(runtime, tmp_path, _single_tool("noisy", "test", "{lines: 5}"))
    assert summary["status"] == "completed", summary["error"]
    outcome = _outcome_index(events)
    lines = [(i, line) for i, e in enumerate(events) if e["type"] == "node.log"
             for line in e["meta"]["lines"] if line["stream"] == "mcp_stderr"]
    noise = [line["text"] for _, line in lines if line["text"].startswith("noise line")]
    assert noise == [f"noise line {i} " + "x" * 200 for i in range(5)]
    assert all(i < outcome for i, _ in lines)


def test_embedded_resources_are_kept_as_data(runtime, tmp_path):
    summary, _ = _run(runtime, tmp_path, _single_tool("get-resource-reference", "everything",
                                                      '{resourceType: "Text", resourceId: 3}'))
    assert summary["status"] == "completed", summary["error"]
    out = summary["variables"]["out"]
    embedded = [item for item in out if isinstance(item, dict) and item.get("type") == "resource"]
    assert len(embedded) == 1
    resource = embedded[0]["resource"]
    assert resource["uri"].endswith("/3") and resource["text"]

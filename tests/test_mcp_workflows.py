"""mcp_tool nodes end to end: real MCP servers started by real worker processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import goflow
from goflow.language.loader import load
from goflow.coordinator.embedded import EmbeddedRuntime

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
TEST_SERVER = Path(__file__).resolve().parent / "mcp_test_server.py"


def _test_server_block() -> str:
    return f"""
servers:
  - id: test
    command: {sys.executable}
    args: ["{TEST_SERVER}"]
"""


def test_goflow_readme_quick_start_runs_as_written(tmp_path):
    if not (REPO / "node_modules" / "@modelcontextprotocol" / "server-filesystem").exists() \
            and shutil.which("npx") is None:
        pytest.skip("neither a local install (npm ci) nor npx can start @modelcontextprotocol/server-filesystem")
    work = Path("/tmp") / f"goflow-quickstart-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        (work / "input.json").write_text('{"data": [{"price": 10.5}, {"price": 20.3}, {"price": 5.2}]}')
        proc = subprocess.run([sys.executable, "-m", "goflow", "run", str(REPO / "examples" / "quickstart.yaml"),
                               "--json", "--workers", "1", "--var", f"input_file={work / 'input.json'}",
                               "--var", f"output_file={work / 'output.txt'}"],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (work / "output.txt").read_text() == "Total: 36.0"
        result = json.loads(proc.stdout)
        assert result["variables"]["file_contents"] == {"data": [{"price": 10.5}, {"price": 20.3}, {"price": 5.2}]}
        assert result["variables"]["total_price"] == 36.0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_mcp_server_time_typed_arguments_and_structured_result():
    result = goflow.run(REPO / "examples" / "time.yaml", {"zone": "Asia/Tokyo"}, workers=1)
    assert result.status == "completed", result.error
    there = result.variables["there_now"]
    assert there["timezone"] == "Asia/Tokyo" and "+09:00" in there["datetime"]
    assert isinstance(there["is_dst"], bool)
    raw = [r for r in result.records if r["node_id"] == "there" and r["status"] == "completed"][0]["raw"]
    assert raw["structuredContent"] == there, "the raw MCP result stays reachable"


def test_numbers_stay_numbers_and_tool_errors_fail_the_node(write_flow):
    path = write_flow(f"""
        name: typed
        variables:
          - {{name: a, type: number, default: 40}}
        {_test_server_block().replace(chr(10), chr(10) + "        ")}
        nodes:
          - {{id: start, type: start}}
          - {{id: add, type: mcp_tool, server: test, tool: add, parameters: {{a: "${{a}}", b: 2}}, output: sum}}
          - {{id: boom, type: mcp_tool, server: test, tool: fail, parameters: {{message: "disk on fire"}}}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: add}}
          - {{from: add, to: boom}}
          - {{from: boom, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.variables["sum"] == 42
    assert result.status == "failed"
    assert result.error["type"] == "tool_error" and result.error["node_id"] == "boom"
    assert "disk on fire" in result.error["message"]


def test_preflight_rejects_unknown_tools_before_anything_runs(write_flow):
    path = write_flow(f"""
        name: preflight
        {_test_server_block().replace(chr(10), chr(10) + "        ")}
        nodes:
          - {{id: start, type: start}}
          - {{id: first, type: python, call: "flowlib:noop"}}
          - {{id: call, type: mcp_tool, server: test, tool: ehco, parameters: {{message: hi}}}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: first}}
          - {{from: first, to: call}}
          - {{from: call, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "failed"
    assert result.error["type"] == "tool_not_found" and result.error["node_id"] == "call"
    assert "did you mean 'echo'" in result.error["message"]
    assert len(result.records) == 0, "a node ran before the preflight failed"


def test_preflight_checks_parameters_against_the_input_schema(write_flow):
    path = write_flow(f"""
        name: schema
        {_test_server_block().replace(chr(10), chr(10) + "        ")}
        nodes:
          - {{id: start, type: start}}
          - {{id: produce, type: python, call: "flowlib:echo", args: [1], output: later}}
          - {{id: ok, type: mcp_tool, server: test, tool: add, parameters: {{a: "${{later}}", b: 2}}}}
          - {{id: bad, type: mcp_tool, server: test, tool: add, parameters: {{a: "one", b: 2}}}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: produce}}
          - {{from: produce, to: ok}}
          - {{from: ok, to: bad}}
          - {{from: bad, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "failed"
    assert result.error["type"] == "invalid_arguments" and result.error["node_id"] == "bad"
    assert "'one'" in result.error["message"] and "add" in result.error["message"]


def test_timeout_cancels_on_the_server_and_sessions_outlive_executions(write_flow):
    slow = load(write_flow(f"""
        name: slow
        {_test_server_block().replace(chr(10), chr(10) + "        ")}
        nodes:
          - {{id: start, type: start}}
          - {{id: wait, type: mcp_tool, server: test, tool: slow, parameters: {{seconds: 30}}, timeout: 500ms}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: wait}}
          - {{from: wait, to: end}}
    """, "slow.yaml"))
    probe = load(write_flow(f"""
        name: probe
        {_test_server_block().replace(chr(10), chr(10) + "        ")}
        nodes:
          - {{id: start, type: start}}
          - {{id: count, type: mcp_tool, server: test, tool: cancelled_count, output: cancelled}}
          - {{id: pid, type: mcp_tool, server: test, tool: pid, output: pid}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: count}}
          - {{from: count, to: pid}}
          - {{from: pid, to: end}}
    """, "probe.yaml"))
    with EmbeddedRuntime(workers=1) as runtime:
        _, future = runtime.coordinator.submit(slow)
        first = future.result(60)
        assert first["status"] == "failed" and first["error"]["type"] == "timeout"
        _, future = runtime.coordinator.submit(probe)
        second = future.result(60)
        assert second["status"] == "completed", second["error"]
        assert second["variables"]["cancelled"] == 1, "the timed-out call was not cancelled on the server"
        _, future = runtime.coordinator.submit(probe)
        third = future.result(60)
        assert third["variables"]["pid"] == second["variables"]["pid"], "the session was not reused"


def test_registered_server_is_used_when_not_declared(write_flow, tmp_path, monkeypatch):
    monkeypatch.setenv("GOFLOW_HOME", str(tmp_path / "home"))
    add = subprocess.run([sys.executable, "-m", "goflow", "server", "add", "reg", sys.executable, str(TEST_SERVER)],
                         capture_output=True, text=True, timeout=30)
    assert add.returncode == 0, add.stderr
    path = write_flow("""
        name: registered
        nodes:
          - {id: start, type: start}
          - {id: call, type: mcp_tool, server: reg, tool: echo, parameters: {message: hello}, output: said}
          - {id: end, type: end, return: "${said}"}
        edges:
          - {from: start, to: call}
          - {from: call, to: end}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "completed", result.error
    assert result.result == "hello"

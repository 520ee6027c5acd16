"""MCPSessionPool against real MCP servers (no mocks).

Servers: tests/mcp_test_server.py (stdio and streamable HTTP), ``python -m mcp_server_time``
and ``@modelcontextprotocol/server-filesystem`` (from ./node_modules, installed by
``npm ci`` from package.json, or through npx).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from goflow.workers.executors.mcp import (
    MCPSessionPool,
    MCPToolError,
    check_arguments,
    tool_result_value,
)

ROOT = Path(__file__).resolve().parent.parent
TEST_SERVER = str(ROOT / "tests" / "mcp_test_server.py")

pytestmark = pytest.mark.timeout(60)


def stdio_spec(server_id: str = "test", **extra) -> dict:
    return {"id": server_id, "command": sys.executable, "args": [TEST_SERVER], **extra}


@pytest.fixture(scope="module")
def pool():
    p = MCPSessionPool()
    yield p
    p.close()


# ------------------------------------------------------------------ stdio tools


@pytest.mark.timeout(30)
def test_each_tool_over_stdio(pool):
    spec = stdio_spec()
    assert pool.call_tool(spec, "echo", {"message": "hello"}).value == "hello"
    result = pool.call_tool(spec, "add", {"a": 2, "b": 40})
    assert result.value == 42 and isinstance(result.value, int)
    assert result.raw["structuredContent"] == {"result": 42}
    assert pool.call_tool(spec, "structured", {}).value == {"name": "widget", "count": 3, "tags": ["a", "b"]}
    assert pool.call_tool(spec, "env_value", {"name": "GOFLOW_SURELY_UNSET_VAR"}).value is None
    # echo of JSON-looking text stays a string: the {"result": X} wrapper wins
    assert pool.call_tool(spec, "echo", {"message": "123"}).value == "123"


@pytest.mark.timeout(30)
def test_tool_error_is_raised_with_the_tools_text(pool):
    with pytest.raises(MCPToolError) as info:
        pool.call_tool(stdio_spec(), "fail", {"message": "disk on fire"})
    assert info.value.error_type == "tool_error"
    assert "disk on fire" in str(info.value)
    assert info.value.retryable is False
    # the session survives a tool error
    assert pool.call_tool(stdio_spec(), "echo", {"message": "still here"}).value == "still here"


@pytest.mark.timeout(30)
def test_invalid_arguments_and_unknown_tool(pool):
    with pytest.raises(MCPToolError) as info:
        pool.call_tool(stdio_spec(), "add", {"a": "two", "b": 1})
    assert info.value.error_type == "invalid_arguments"
    assert "a" in str(info.value) and "integer" in str(info.value)
    with pytest.raises(MCPToolError) as info:
        pool.call_tool(stdio_spec(), "add", {"a": 1})
    assert info.value.error_type == "invalid_arguments" and "'b' is a required property" in str(info.value)
    with pytest.raises(MCPToolError) as info:
        pool.call_tool(stdio_spec(), "no_such_tool", {})
    assert info.value.error_type == "tool_error" and "not found" in str(info.value)


@pytest.mark.timeout(30)
def test_session_is_reused(pool):
    spec = stdio_spec()
    pids = {pool.call_tool(spec, "pid", {}).value for _ in range(5)}
    assert len(pids) == 1
    assert "test" in pool.session_ids()


@pytest.mark.timeout(30)
def test_large_result_over_stdio(pool):
    size = 3 * 1024 * 1024
    value = pool.call_tool(stdio_spec(), "big", {"size": size}).value
    assert isinstance(value, str) and len(value) == size


@pytest.mark.timeout(30)
def test_chatty_stderr_does_not_block_the_server(pool):
    # ~2000 * 215 bytes = 430 KB on stderr, far beyond a pipe buffer
    assert pool.call_tool(stdio_spec(), "noisy", {"lines": 2000}).value == 2000
    assert pool.call_tool(stdio_spec(), "echo", {"message": "ok"}).value == "ok"


@pytest.mark.timeout(30)
def test_server_crash_mid_call_then_fresh_session():
    with MCPSessionPool() as pool:
        spec = stdio_spec("crashy")
        first_pid = pool.call_tool(spec, "pid", {}).value
        with pytest.raises(MCPToolError) as info:
            pool.call_tool(spec, "die", {}, timeout=20)
        assert info.value.error_type == "server_lost"
        assert info.value.retryable is True
        assert "die(): exiting now" in str(info.value)  # stderr tail is included
        second_pid = pool.call_tool(spec, "pid", {}).value
        assert second_pid != first_pid


@pytest.mark.timeout(30)
def test_dead_idle_server_is_detected_before_reuse():
    with MCPSessionPool() as pool:
        spec = stdio_spec("idle")
        first_pid = pool.call_tool(spec, "pid", {}).value
        os.kill(first_pid, 9)
        deadline = time.monotonic() + 5
        while "idle" in pool.session_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "idle" not in pool.session_ids()
        assert pool.call_tool(spec, "pid", {}).value != first_pid


@pytest.mark.timeout(20)  # the call sleeps 30 s unless the timeout cancels it
def test_timeout_cancels_the_request_on_the_server(pool):
    spec = stdio_spec()
    before = pool.call_tool(spec, "cancelled_count", {}).value
    pid = pool.call_tool(spec, "pid", {}).value
    with pytest.raises(MCPToolError) as info:
        pool.call_tool(spec, "slow", {"seconds": 30}, timeout=0.5)
    assert info.value.error_type == "timeout"
    # the server was told (notifications/cancelled) and interrupted the handler
    deadline = time.monotonic() + 5
    while pool.call_tool(spec, "cancelled_count", {}).value == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.call_tool(spec, "cancelled_count", {}).value == before + 1
    # same session, still usable
    assert pool.call_tool(spec, "pid", {}).value == pid
    assert pool.call_tool(spec, "add", {"a": 1, "b": 1}).value == 2


@pytest.mark.timeout(20)  # the call sleeps 30 s unless the cancel reaches it
def test_cancel_from_another_thread(pool):
    spec = stdio_spec()
    before = pool.call_tool(spec, "cancelled_count", {}).value
    timer = threading.Timer(0.5, pool.cancel)
    timer.start()
    with pytest.raises(MCPToolError) as info:
        pool.call_tool(spec, "slow", {"seconds": 30})
    assert info.value.error_type == "cancelled"
    deadline = time.monotonic() + 5
    while pool.call_tool(spec, "cancelled_count", {}).value == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.call_tool(spec, "cancelled_count", {}).value == before + 1


@pytest.mark.timeout(30)
def test_env_is_merged_over_os_environ_and_expanded(pool, monkeypatch):
    monkeypatch.setenv("GOFLOW_TEST_INHERITED", "inherited-value")
    monkeypatch.setenv("GOFLOW_TEST_SECRET", "s3cr3t-token")
    spec = stdio_spec("envtest", env={"GOFLOW_TEST_SET": "plain", "GOFLOW_TEST_TOKEN": "Bearer ${env.GOFLOW_TEST_SECRET}"})
    assert pool.call_tool(spec, "env_value", {"name": "GOFLOW_TEST_SET"}).value == "plain"
    assert pool.call_tool(spec, "env_value", {"name": "GOFLOW_TEST_TOKEN"}).value == "Bearer s3cr3t-token"
    assert pool.call_tool(spec, "env_value", {"name": "GOFLOW_TEST_INHERITED"}).value == "inherited-value"


@pytest.mark.timeout(30)
def test_missing_env_reference_is_a_clear_connection_error(pool):
    spec = stdio_spec("envmissing", env={"TOKEN": "${env.GOFLOW_DEFINITELY_NOT_SET_123}"})
    with pytest.raises(MCPToolError) as info:
        pool.call_tool(spec, "echo", {"message": "x"})
    assert info.value.error_type == "connection"
    assert "GOFLOW_DEFINITELY_NOT_SET_123" in str(info.value)


@pytest.mark.timeout(30)
def test_connection_errors_redact_secrets(monkeypatch):
    monkeypatch.setenv("GOFLOW_TEST_SECRET2", "hunter2-very-secret")
    script = "import os, sys; print('token is ' + os.environ['TOK'], file=sys.stderr); sys.exit(3)"
    spec = {"id": "leaky", "command": sys.executable, "args": ["-c", script], "env": {"TOK": "${env.GOFLOW_TEST_SECRET2}"}}
    with MCPSessionPool() as p:
        with pytest.raises(MCPToolError) as info:
            p.call_tool(spec, "echo", {})
    err = info.value
    assert err.error_type == "connection"
    assert "token is ***" in str(err)
    assert "hunter2" not in str(err) and "hunter2" not in "".join(err.stderr_tail)


@pytest.mark.timeout(30)
def test_unstartable_server_is_a_connection_error():
    with MCPSessionPool() as p:
        with pytest.raises(MCPToolError) as info:
            p.call_tool({"id": "nope", "command": "/nonexistent/goflow-mcp-server"}, "x", {})
    assert info.value.error_type == "connection"
    assert "/nonexistent/goflow-mcp-server" in str(info.value)


@pytest.mark.timeout(30)
def test_list_tools_and_check_arguments(pool):
    tools = {t["name"]: t for t in pool.list_tools(stdio_spec())}
    assert {"echo", "add", "fail", "slow", "big", "die", "structured", "env_value"} <= set(tools)
    schema = tools["add"]["input_schema"]
    assert check_arguments(schema, {"a": 1, "b": 2}) == []
    problems = check_arguments(schema, {"a": "1"})
    assert any("'b' is a required property" in p for p in problems)
    assert any(p.startswith("a:") and "integer" in p for p in problems)
    assert check_arguments(None, {"anything": 1}) == []


# ------------------------------------------------------------------ result rule


def test_result_rule_unit():
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    assert tool_result_value({"content": [text("hi")], "structuredContent": {"result": "hi"}}) == "hi"
    assert tool_result_value({"content": [text('{"a": 1}')]}) == {"a": 1}
    assert tool_result_value({"content": [text("plain")]}) == "plain"
    # filesystem server: text + {"content": text} -> parsed JSON
    assert tool_result_value({"content": [text('{"x": [1]}')], "structuredContent": {"content": '{"x": [1]}'}}) == {"x": [1]}
    assert tool_result_value({"content": [text("not json")], "structuredContent": {"content": "not json"}}) == "not json"
    # structured content beats a human summary text
    assert tool_result_value({"content": [text("3 rows")], "structuredContent": {"rows": 3}}) == {"rows": 3}
    # ... and a JSON text that differs from it (structuredContent is the result where given)
    assert tool_result_value({"content": [text('{"rows": "3"}')], "structuredContent": {"rows": 3}}) == {"rows": 3}
    link = {"type": "resource_link", "uri": "file:///a.txt", "name": "a.txt", "mimeType": "text/plain"}
    embedded = {"type": "resource", "resource": {"uri": "file:///b.txt", "text": "bee"}}
    assert tool_result_value({"content": [link]}) == link
    assert tool_result_value({"content": [text("two files"), link, embedded]}) == ["two files", link, embedded]
    # a tool that really returns {"result": ...}
    assert tool_result_value({"content": [text('{"result": 5}')], "structuredContent": {"result": 5}}) == {"result": 5}
    assert tool_result_value({"content": [], "structuredContent": {"result": None}}) is None
    assert tool_result_value({"content": []}) is None
    img = {"type": "image", "data": "AAAA", "mimeType": "image/png"}
    assert tool_result_value({"content": [img]}) == img
    assert tool_result_value({"content": [text("1"), text("x"), img]}) == [1, "x", img]
    with pytest.raises(MCPToolError) as info:
        tool_result_value({"content": [text("bad"), text("worse")], "isError": True})
    assert info.value.error_type == "tool_error" and str(info.value) == "bad\nworse"


# -------------------------------------------------------------- other transports


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_server():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, TEST_SERVER, "--http", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("the HTTP test server exited at start")
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the HTTP test server did not start listening")
    yield f"http://127.0.0.1:{port}/mcp"
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.timeout(40)
def test_streamable_http_transport(http_server, monkeypatch):
    monkeypatch.setenv("GOFLOW_TEST_HTTP_TOKEN", "abc123")
    spec = {"id": "web", "transport": "http", "url": http_server,
            "headers": {"Authorization": "Bearer ${env.GOFLOW_TEST_HTTP_TOKEN}"}}
    with MCPSessionPool() as p:
        assert p.call_tool(spec, "add", {"a": 20, "b": 22}).value == 42
        pids = {p.call_tool(spec, "pid", {}).value for _ in range(3)}
        assert len(pids) == 1
        assert len(p.call_tool(spec, "big", {"size": 2 * 1024 * 1024}).value) == 2 * 1024 * 1024
        with pytest.raises(MCPToolError) as info:
            p.call_tool(spec, "slow", {"seconds": 30}, timeout=0.5)
        assert info.value.error_type == "timeout"
        assert p.call_tool(spec, "echo", {"message": "after"}).value == "after"


@pytest.mark.timeout(30)
def test_http_connection_refused_is_a_connection_error():
    spec = {"id": "down", "transport": "http", "url": f"http://127.0.0.1:{_free_port()}/mcp"}
    with MCPSessionPool(connect_timeout=10) as p:
        with pytest.raises(MCPToolError) as info:
            p.call_tool(spec, "echo", {"message": "x"})
    assert info.value.error_type == "connection"


@pytest.mark.timeout(40)
def test_mcp_server_time(pool):
    spec = {"id": "time", "command": sys.executable, "args": ["-m", "mcp_server_time"]}
    value = pool.call_tool(spec, "get_current_time", {"timezone": "UTC"}).value
    assert isinstance(value, dict)
    assert value["timezone"] == "UTC" and "datetime" in value


def _filesystem_command() -> list[str] | None:
    local = ROOT / "node_modules" / ".bin" / "mcp-server-filesystem"
    if local.exists() and shutil.which("node"):
        return [str(local)]
    if shutil.which("npx"):
        return ["npx", "-y", "@modelcontextprotocol/server-filesystem"]
    return None


@pytest.mark.timeout(60)
def test_filesystem_server_reads_json_as_parsed_value(tmp_path):
    cmd = _filesystem_command()
    if cmd is None:
        pytest.skip("node/npx not available: run `npm ci` in the repo root to install the filesystem server")
    data = {"items": [{"name": "a", "price": 1.5}, {"name": "b", "price": 2.25}]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    spec = {"id": "fs", "command": cmd[0], "args": [*cmd[1:], str(tmp_path)]}
    with MCPSessionPool(connect_timeout=45) as p:
        names = {t["name"] for t in p.list_tools(spec, timeout=45)}
        for tool in ("read_text_file", "read_file"):
            if tool in names:
                result = p.call_tool(spec, tool, {"path": str(path)})
                assert result.value == data
                assert result.raw["content"][0]["type"] == "text"
        assert names & {"read_text_file", "read_file"}


@pytest.mark.timeout(40)
def test_legacy_sse_transport():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, TEST_SERVER, "--sse", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:  # bounded by the test's timeout
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "the SSE test server exited before listening"
                time.sleep(0.05)
        spec = {"id": "legacy", "transport": "sse", "url": f"http://127.0.0.1:{port}/sse"}
        with MCPSessionPool() as p:
            assert p.call_tool(spec, "add", {"a": 1, "b": 2}).value == 3
            pid = p.call_tool(spec, "pid", {}).value
            assert p.call_tool(spec, "pid", {}).value == pid
            with pytest.raises(MCPToolError) as info:
                p.call_tool(spec, "slow", {"seconds": 30}, timeout=0.5)
            assert info.value.error_type == "timeout"
            # the SDK's SSE client caps one event at 1 MiB: reported clearly, not as a lost server
            with pytest.raises(MCPToolError) as info:
                p.call_tool(spec, "big", {"size": 2 * 1024 * 1024})
            assert info.value.error_type == "tool_error" and "SSE" in str(info.value)
            assert p.call_tool(spec, "echo", {"message": "again"}).value == "again"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()

"""OpenTelemetry traces: `goflow run --otlp-endpoint` against a real OTLP/HTTP receiver.

The receiver is an HTTP server started by the test that decodes what it gets with the
``opentelemetry-proto`` messages; the MCP server is tests/mcp_test_server.py over streamable
HTTP, which reports the ``traceparent`` header it received.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from goflow.observability.tracing import endpoint_from, mcp_traceparent, span_id, trace_id  # noqa: E402
from tests.test_mcp_inside import _start_http_server  # noqa: E402

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parent.parent


class _Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans.extend(scope_spans.spans)
                receiver.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = value.string_value if value.HasField("string_value") else value.int_value
    return out


def test_one_trace_per_run_with_a_span_per_attempt_and_mcp_call(tmp_path):
    receiver = _Receiver()
    mcp, url = _start_http_server()
    try:
        counter = tmp_path / "counter"
        flow = tmp_path / "traced.yaml"
        flow.write_text(textwrap.dedent(f"""
            name: traced
            variables:
              - {{name: items, type: array, default: [1, 2]}}
            servers:
              - {{id: web, transport: http, url: "{url}"}}
            nodes:
              - {{id: start, type: start}}
              - id: flaky
                type: python
                call: "flowlib:flaky"
                args: ["{counter}", 1]
                retry: {{max_attempts: 2, initial_delay: 10ms, on: [python_error]}}
              - id: each
                type: loop
                collection: items
                item: n
                body: [double]
              - {{id: double, type: python, call: "flowlib:add", args: ["${{n}}", "${{n}}"]}}
              - {{id: ask, type: mcp_tool, server: web, tool: headers_seen, parameters: {{}}, output: seen}}
              - {{id: end, type: end}}
            edges:
              - {{from: start, to: flaky}}
              - {{from: flaky, to: each}}
              - {{from: each, to: ask}}
              - {{from: ask, to: end}}
        """).lstrip())
        proc = subprocess.run([sys.executable, "-m", "goflow", "run", str(flow), "--json", "--workers", "1",
                               "--no-history", "--otlp-endpoint", receiver.url],
                              capture_output=True, text=True, timeout=100, cwd=REPO)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
    finally:
        mcp.terminate()
        mcp.wait(10)
        receiver.close()
    execution_id = result["execution_id"]
    spans = receiver.spans
    assert set(receiver.paths) == {"/v1/traces"}
    assert {s.trace_id for s in spans} == {trace_id(execution_id).to_bytes(16, "big")}, "one trace"
    by_name: dict[str, list] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    root = by_name.pop("execution traced")
    assert len(root) == 1 and root[0].parent_span_id == b""
    root = root[0]
    assert root.span_id == span_id(execution_id).to_bytes(8, "big")
    nodes = {name: group for name, group in by_name.items() if name.startswith("node ")}
    # two attempts of flaky, one per loop iteration of double, one span each for the rest
    assert sorted((name, len(group)) for name, group in nodes.items()) == [
        ("node ask", 1), ("node double", 2), ("node each", 1), ("node end", 1), ("node flaky", 2),
        ("node start", 1)]
    flaky = sorted(nodes["node flaky"], key=lambda s: _attrs(s)["goflow.attempt"])
    assert [_attrs(s)["goflow.attempt"] for s in flaky] == [1, 2]
    assert flaky[0].status.code == 2 and "transient failure" in flaky[0].status.message  # STATUS_CODE_ERROR
    assert _attrs(flaky[1])["goflow.retry.reason"] == "python_error" and flaky[1].status.code != 2
    assert all(_attrs(s)["goflow.worker"] for s in flaky)
    assert all(s.parent_span_id == root.span_id for name in ("node flaky", "node each", "node ask")
               for s in nodes[name])
    loop = nodes["node each"][0]
    assert all(s.parent_span_id == loop.span_id for s in nodes["node double"]), "loop bodies are the loop's children"
    assert sorted(_attrs(s)["goflow.index"] for s in nodes["node double"]) == [0, 1]
    assert {_attrs(s)["goflow.node.type"] for s in nodes["node double"]} == {"python"}
    calls = by_name["mcp web/headers_seen"]
    ask = nodes["node ask"][0]
    assert len(calls) == 1 and calls[0].parent_span_id == ask.span_id
    assert ask.start_time_unix_nano <= calls[0].start_time_unix_nano <= calls[0].end_time_unix_nano
    # the HTTP MCP server saw the traceparent of that MCP span
    expected = mcp_traceparent(execution_id, "ask", {}, 1)
    assert result["variables"]["seen"]["traceparent"] == expected
    assert expected.split("-")[2] == calls[0].span_id.hex()


def test_endpoint_from_flag_and_environment(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert endpoint_from(None) is None  # off by default
    assert endpoint_from("http://c:4318") == "http://c:4318/v1/traces"
    assert endpoint_from("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/")
    assert endpoint_from(None) == "http://env:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://full/traces")
    assert endpoint_from(None) == "http://full/traces"


def test_the_daemon_exports_a_trace_per_execution(tmp_path):
    from tests.test_daemon import Daemon, cli

    receiver = _Receiver()
    daemon = Daemon(tmp_path, "--local-workers", "1", "--otlp-endpoint", receiver.url).start()
    try:
        flow = tmp_path / "small.yaml"
        flow.write_text(textwrap.dedent("""
            name: small
            nodes:
              - {id: start, type: start}
              - {id: add, type: python, call: "flowlib:add", args: [1, 2]}
              - {id: end, type: end}
            edges:
              - {from: start, to: add}
              - {from: add, to: end}
        """).lstrip())
        ids = []
        for _ in range(2):
            done = cli("submit", str(flow), "--coordinator", daemon.control, "--wait", "--json")
            assert done.returncode == 0, done.stdout + done.stderr
            ids.append(json.loads(done.stdout)["execution_id"])
        assert daemon.stop() == 0  # a clean stop flushes the exporter
    finally:
        if daemon.alive():
            daemon.stop()
        receiver.close()
    traces = {}
    for span in receiver.spans:
        traces.setdefault(span.trace_id, []).append(span.name)
    assert set(traces) == {trace_id(i).to_bytes(16, "big") for i in ids}
    for names in traces.values():
        assert sorted(names) == ["execution small", "node add", "node end", "node start"]

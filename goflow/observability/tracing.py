"""OpenTelemetry traces built from the event stream (off by default; docs/observability.md).

:class:`EventTracer` is an event sink (like the history store): the reactor only appends
``(topic, payload)`` of the few event types it needs to a deque; a thread of its own decodes
them and drives the OpenTelemetry SDK, whose batch processor exports over OTLP/HTTP. So
tracing costs the reactor one prefix test and one append per event, and nothing at all
when it is off (no sink, no import of the SDK).

The trace of an execution:

* one **trace per execution**: the trace id is the execution id when it is 32 hex digits
  (goflow's generated ids), else derived from it; a root span ``execution <workflow>``
  from ``execution.started`` to its terminal event;
* one **span per node attempt** (``node <id>``), from its ``node.started`` to the event
  that ends the attempt (completed, failed, retrying, cancelled), with ``goflow.node.id``,
  ``goflow.node.type``, ``goflow.attempt``, ``goflow.worker``, ``goflow.retry.reason``
  (on a retry's attempt: the error type that caused it), loop/parallel context, and error
  status and message when it failed; nodes inside a loop or parallel branch are children
  of the container's span, the others of the root;
* one **child span per MCP call** (``mcp <server>/<tool>``, kind CLIENT) under its
  attempt's span, timed by the worker (``meta.mcp`` of the node's outcome).

Span ids are derived from (execution, node, context, attempt) by :func:`span_id`, so the
coordinator can hand a worker the ``traceparent`` of an MCP call (:func:`mcp_traceparent`)
before the span exists, and the HTTP MCP server's own spans join the same trace.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import deque
from typing import Any

import msgpack

log = logging.getLogger(__name__)

ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
_TRACED = (b"execution.", b"node.started/", b"node.completed/", b"node.failed/", b"node.retrying/",
           b"node.cancelled/")
_ENDS_ATTEMPT = ("node.completed", "node.failed", "node.retrying", "node.cancelled")
_CONTEXT_KEYS = ("loop", "index", "parallel", "branch")


# -- ids (shared by the coordinator and the tracer; no SDK needed) ------------------------------
def trace_id(execution_id: str) -> int:
    """The 128-bit trace id of an execution."""
    if len(execution_id) == 32:
        try:
            value = int(execution_id, 16)
            if value:
                return value
        except ValueError:
            pass
    return int.from_bytes(hashlib.blake2b(execution_id.encode(), digest_size=16).digest(), "big") or 1


def _derive(*parts: Any) -> int:
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") or 1


def context_key(context: dict | None) -> str:
    """Where a node ran (its loop iteration / parallel branch) as a stable string."""
    if not context:
        return ""
    return json.dumps([context.get(key) for key in _CONTEXT_KEYS], separators=(",", ":"), default=str)


def span_id(execution_id: str, node_id: str | None = None, context: dict | None = None,
            attempt: int | None = None, part: str = "") -> int:
    """The 64-bit span id of an execution's root (no node) or of one node attempt (``part``
    names a child of it, e.g. ``mcp``)."""
    if node_id is None:
        return _derive(execution_id, "execution")
    return _derive(execution_id, node_id, context_key(context), attempt, part)


def mcp_traceparent(execution_id: str, node_id: str, context: dict | None, attempt: int) -> str:
    """The W3C ``traceparent`` an MCP call of this node attempt sends (its span is the parent)."""
    return (f"00-{trace_id(execution_id):032x}-{span_id(execution_id, node_id, context, attempt, 'mcp'):016x}"
            f"-01")


def endpoint_from(value: str | None) -> str | None:
    """The OTLP/HTTP traces URL from ``--otlp-endpoint`` or the standard environment
    variables (a base URL gets ``/v1/traces``, as the OTLP exporter specification says)."""
    if value is None:
        full = os.environ.get(ENV_TRACES_ENDPOINT)
        if full:
            return full
        value = os.environ.get(ENV_ENDPOINT)
    if not value:
        return None
    value = value.rstrip("/")
    return value if value.endswith("/v1/traces") else value + "/v1/traces"


# -- the tracer ----------------------------------------------------------------------------------
class _PresetIds:
    """An SDK id generator that returns the ids we derived (set just before each span)."""

    def __init__(self) -> None:
        self.next_trace_id = 0
        self.next_span_id = 0

    def generate_trace_id(self) -> int:
        return self.next_trace_id

    def generate_span_id(self) -> int:
        return self.next_span_id

    def is_trace_id_random(self) -> bool:
        return False  # derived from the execution id (random only for goflow's generated ids)


class _Trace:
    """The open spans of one execution (dropped at its terminal event)."""

    __slots__ = ("root", "attempts", "by_node", "retry_reasons")

    def __init__(self, root: Any):
        self.root = root
        self.attempts: dict[tuple, Any] = {}      # (node_id, context key, attempt) -> span
        self.by_node: dict[str, Any] = {}          # node_id -> its latest open span (container parents)
        self.retry_reasons: dict[tuple, str] = {}  # (node_id, context key) -> error type of the last retry


class EventTracer:
    """An event sink that turns executions into OpenTelemetry traces exported over OTLP/HTTP."""

    def __init__(self, endpoint: str, *, service_name: str = "goflow", export_timeout: float = 10.0):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.endpoint = endpoint
        self._ids = _PresetIds()
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                                        id_generator=self._ids)
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint,
                                                                              timeout=export_timeout)))
        self._tracer = self._provider.get_tracer("goflow")
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._traces: dict[str, _Trace] = {}
        self.stats = {"spans": 0, "bad_events": 0}
        self._thread = threading.Thread(target=self._run, name="goflow-tracing", daemon=True)
        self._thread.start()

    # -- the sink (reactor thread): O(1), never blocks -------------------------------------------
    def sink(self, execution_id: str | None, topic: bytes, payload: bytes) -> None:
        if execution_id is not None and topic.startswith(_TRACED):
            self._queue.append((topic, payload))
            self._wake.set()

    def close(self) -> None:
        """Process what is queued, end open spans, flush the exporter."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=30)
        for trace in self._traces.values():
            for span in trace.attempts.values():
                span.end()
            trace.root.end()
        self._traces.clear()
        self._provider.shutdown()

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            while self._queue:
                topic, payload = self._queue.popleft()
                try:
                    self._on_event(msgpack.unpackb(payload, raw=False, strict_map_key=False))
                except Exception:  # a bad event must not stop tracing
                    self.stats["bad_events"] += 1
                    log.exception("tracing could not use an event on %r", topic)
            if self._closing and not self._queue:
                return

    def _start(self, name: str, trace_number: int, span_number: int, parent: Any, start_s: float,
               attributes: dict) -> Any:
        from opentelemetry import trace as api

        self._ids.next_trace_id, self._ids.next_span_id = trace_number, span_number
        context = api.set_span_in_context(parent) if parent is not None else None
        kind = api.SpanKind.CLIENT if name.startswith("mcp") else api.SpanKind.INTERNAL
        span = self._tracer.start_span(name, context=context, kind=kind, attributes=attributes,
                                       start_time=int(start_s * 1e9))
        self.stats["spans"] += 1
        return span

    @staticmethod
    def _fail(span: Any, error: dict | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        error = error or {}
        span.set_attribute("goflow.error.type", str(error.get("type", "error")))
        span.set_status(Status(StatusCode.ERROR, str(error.get("message", ""))[:1000]))

    def _on_event(self, event: dict) -> None:
        kind, execution_id, ts = event["type"], event["execution_id"], event["ts"]
        trace = self._traces.get(execution_id)
        if kind in ("execution.started", "execution.resumed"):
            if trace is None:
                root = self._start(f"execution {event.get('workflow')}", trace_id(execution_id),
                                   span_id(execution_id), None, ts,
                                   {"goflow.execution.id": execution_id, "goflow.workflow": event.get("workflow") or ""})
                self._traces[execution_id] = _Trace(root)
            return
        if trace is None:
            return
        if kind.startswith("execution."):  # terminal
            del self._traces[execution_id]
            for span in trace.attempts.values():
                span.end(end_time=int(ts * 1e9))
            if kind == "execution.failed":
                self._fail(trace.root, event.get("error"))
            trace.root.set_attribute("goflow.status", event.get("status") or kind.split(".")[1])
            trace.root.end(end_time=int(ts * 1e9))
            return
        node_id, meta, attempt = event["node_id"], event.get("meta") or {}, event.get("attempt") or 1
        context = {key: meta[key] for key in _CONTEXT_KEYS if key in meta}
        where = context_key(context)
        key = (node_id, where, attempt)
        if kind == "node.started":
            if meta.get("resumed"):
                return
            container = context.get("loop") if "loop" in context else context.get("parallel")
            parent = trace.by_node.get(container, trace.root) if container else trace.root
            attributes = {"goflow.node.id": node_id, "goflow.node.type": event.get("node_type") or "",
                          "goflow.attempt": attempt}
            for name, value in context.items():
                attributes[f"goflow.{name}"] = value if isinstance(value, (int, str)) else str(value)
            reason = trace.retry_reasons.get((node_id, where))
            if reason and attempt > 1:
                attributes["goflow.retry.reason"] = reason
            span = self._start(f"node {node_id}", trace_id(execution_id),
                               span_id(execution_id, node_id, context, attempt), parent, ts, attributes)
            trace.attempts[key] = span
            trace.by_node[node_id] = span
            return
        span = trace.attempts.pop(key, None)
        if span is None:
            return
        if trace.by_node.get(node_id) is span:
            del trace.by_node[node_id]
        if meta.get("worker"):
            span.set_attribute("goflow.worker", str(meta["worker"]))
        if event.get("node_type") == "mcp_tool":
            self._mcp_span(execution_id, node_id, context, attempt, span, event, ts)
        if kind == "node.retrying":
            error = event.get("error") or {}
            trace.retry_reasons[(node_id, where)] = str(error.get("type", "error"))
            self._fail(span, error)
        elif kind in ("node.failed", "node.cancelled"):
            self._fail(span, event.get("error"))
        span.set_attribute("goflow.status", kind.split(".")[1])
        span.end(end_time=int(ts * 1e9))

    def _mcp_span(self, execution_id: str, node_id: str, context: dict, attempt: int, parent: Any,
                  event: dict, ts: float) -> None:
        meta = event.get("meta") or {}
        call = meta.get("mcp") or {}
        started = call.get("started") or meta.get("started") or ts
        finished = call.get("finished") or meta.get("finished") or ts
        span = self._start(f"mcp {call.get('server', '?')}/{call.get('tool', '?')}", trace_id(execution_id),
                           span_id(execution_id, node_id, context, attempt, "mcp"), parent, started,
                           {"rpc.system": "mcp", "rpc.method": "tools/call",
                            "mcp.server": str(call.get("server", "")), "mcp.tool": str(call.get("tool", ""))})
        if event["type"] != "node.completed":
            self._fail(span, event.get("error"))
        span.end(end_time=int(max(finished, started) * 1e9))


def tracer_for(endpoint: str | None) -> EventTracer | None:
    """An :class:`EventTracer` when ``endpoint`` (or the standard environment) asks for one."""
    url = endpoint_from(endpoint)
    if url is None:
        return None
    try:
        return EventTracer(url)
    except ImportError as exc:
        from goflow.errors import GoflowError

        raise GoflowError(f"tracing to {url} needs the OpenTelemetry SDK and its OTLP exporter ({exc}): "
                          f"pip install 'goflow[otel]'") from None

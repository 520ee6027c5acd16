"""OpenTelemetry traces built from the event stream (off by default; docs/observability.md).

:class:`EventTracer` is an event sink (like the history store): the reactor only appends
the payloads of the few event types it needs to a deque; a thread of its own forwards them
to the **tracer process** (this module's :func:`main`), where :class:`SpanBuilder` drives
the OpenTelemetry SDK, whose batch processor exports over OTLP/HTTP. So tracing costs the
coordinator's process one prefix test and one append per event plus a batched pipe write,
the SDK's work runs on another CPU, and nothing at all happens when tracing is off (no
sink, no process, no import of the SDK).

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
MAX_QUEUED = 1_000_000
"""Events waiting for the tracer process at most (beyond: counted, not queued)."""


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
    """The event sink (coordinator process): forwards the traced events to the tracer process.

    The reactor's cost is one prefix test and one deque append per event; a forwarding
    thread writes them in batches (length-prefixed frames) to the stdin of a child process
    (``python -m goflow.observability.tracing URL``) that builds the spans with the
    OpenTelemetry SDK and exports them. So the SDK's per-span work (about 0.1 ms) never
    competes with the reactor for this process's GIL. At most :data:`MAX_QUEUED` events wait
    (more are counted in ``stats["dropped"]``, never blocking the reactor).
    """

    def __init__(self, endpoint: str):
        import importlib.util
        import subprocess
        import sys

        for module in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                raise ImportError(f"no module {module}")
        self.endpoint = endpoint
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._closing = False
        self.stats = {"forwarded": 0, "dropped": 0}
        from goflow.supervisor import spawn_managed

        # (Ctrl-C is the coordinator's, from the child's first instruction on: it ends at EOF)
        self._process = spawn_managed([sys.executable, "-m", "goflow.observability.tracing", endpoint],
                                      stdin=subprocess.PIPE)
        self._thread = threading.Thread(target=self._forward, name="goflow-tracing", daemon=True)
        self._thread.start()

    # -- the sink (reactor thread): O(1), never blocks -------------------------------------------
    def sink(self, execution_id: str | None, topic: bytes, payload: bytes) -> None:
        if execution_id is not None and topic.startswith(_TRACED):
            if len(self._queue) >= MAX_QUEUED:
                self.stats["dropped"] += 1
                return
            self._queue.append(payload)
            self._wake.set()

    def close(self, timeout: float = 15.0) -> None:
        """Forward what is queued, let the tracer process end its spans and flush its exporter."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=timeout)
        try:
            self._process.wait(timeout)
        except Exception:  # a stuck exporter must not hang the caller's shutdown
            log.warning("the tracer process did not finish its export in %.0fs; stopping it", timeout)
            self._process.kill()
            self._process.wait(5)

    def _forward(self) -> None:
        pipe = self._process.stdin
        assert pipe is not None
        try:
            while True:
                self._wake.wait(0.5)
                self._wake.clear()
                while self._queue:
                    frames = []
                    while self._queue and len(frames) < 1000:
                        payload = self._queue.popleft()
                        frames.append(len(payload).to_bytes(4, "big"))
                        frames.append(payload)
                    pipe.write(b"".join(frames))
                    self.stats["forwarded"] += len(frames) // 2
                pipe.flush()
                if self._closing and not self._queue:
                    return
        except (BrokenPipeError, OSError, ValueError) as exc:
            log.error("the tracer process went away (%s): tracing stops", exc)
            self._queue.clear()
        finally:
            try:
                pipe.close()
            except OSError:
                pass


class SpanBuilder:
    """Turns events into spans with the OpenTelemetry SDK (in the tracer process)."""

    def __init__(self, endpoint: str, *, service_name: str = "goflow", export_timeout: float = 10.0):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._ids = _PresetIds()
        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES are honoured (Resource.create reads them).
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
        self._provider = TracerProvider(resource=Resource.create(attributes), id_generator=self._ids)
        # A queue large enough that a burst of nodes is exported, not dropped, by the SDK.
        self._provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=endpoint, timeout=export_timeout), max_queue_size=1 << 20,
            max_export_batch_size=2048, schedule_delay_millis=500))
        self._tracer = self._provider.get_tracer("goflow")
        self._traces: dict[str, _Trace] = {}
        self.stats = {"spans": 0, "bad_events": 0}

    def feed(self, payload: bytes) -> None:
        try:
            self._on_event(msgpack.unpackb(payload, raw=False, strict_map_key=False))
        except Exception:  # a bad event must not stop tracing
            self.stats["bad_events"] += 1
            log.exception("tracing could not use an event")

    def close(self) -> None:
        """End what is still open (the stream ended mid-run) and flush the exporter."""
        for trace in self._traces.values():
            for span in trace.attempts.values():
                span.end()
            trace.root.end()
        self._traces.clear()
        self._provider.shutdown()

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


def main(argv: list[str] | None = None) -> int:
    """The tracer process: length-prefixed event payloads on stdin until EOF, spans to ``URL``."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's; we end at EOF
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m goflow.observability.tracing OTLP_TRACES_URL  (events on stdin)", file=sys.stderr)
        return 2
    builder = SpanBuilder(args[0])
    stream = sys.stdin.buffer
    try:
        while True:
            header = stream.read(4)
            if len(header) < 4:
                break
            payload = stream.read(int.from_bytes(header, "big"))
            builder.feed(payload)
    except KeyboardInterrupt:
        pass
    finally:
        builder.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prometheus metrics for the coordinator, fed from its published events.

:class:`Metrics` owns a dedicated :class:`prometheus_client.CollectorRegistry` (never the
process-global one, so several coordinators or tests never collide). It is fed two ways:

- ``observe_event(topic, payload)``: the coordinator's event sink (combine it with the
  history store's with :func:`goflow.history.store.combine_sinks`). It runs on the reactor
  thread, so it only appends to a bounded queue (~0.3 us); a daemon thread applies the
  queued events every ``interval`` seconds, and every scrape applies what is queued
  first, so a scrape always reflects every event observed before it. Applying decodes
  only the payload keys a metric needs (``msgpack.Unpacker.skip`` jumps over the
  rest, e.g. large ``meta`` values). Measured inline on the reactor it cost ~11 us per event, twice
  the publisher's own emit: hence the queue.
- ``set_gauge_source(fn)``: ``fn() -> {name: number}`` read at scrape time, on the HTTP
  thread, for state that is not an event (workers connected, subscriptions, control
  requests, store queue depth and write lag). :func:`coordinator_gauges` builds one.

``serve("127.0.0.1:9464")`` exposes ``/metrics`` over HTTP (loopback by default) and
returns a handle whose ``stop()`` shuts the server down. Labels never carry execution or
node ids (unbounded cardinality): only status, node type and event type.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import msgpack
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest, start_http_server

from goflow.states import TERMINAL_EVENT_TYPES

log = logging.getLogger("goflow.observability.metrics")

DEFAULT_ADDRESS = "127.0.0.1:9464"
NODE_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                         300.0, 1800.0, float("inf"))
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    5.0, 30.0, float("inf"))
WORKER_NODE_TYPES = frozenset({"python", "transform", "mcp_tool"})
_NODE_OUTCOMES = frozenset({"node.completed", "node.failed", "node.skipped", "node.cancelled"})
_WANTED = frozenset({"execution_id", "node_id", "node_type", "status", "attempt", "ts", "meta"})
_PENDING_CAP = 100_000

#: Scrape-time values a gauge source may return, and how they are exported.
SOURCE_METRICS: dict[str, tuple[str, str, str]] = {
    # key: (metric name, kind, help)
    "workers_connected": ("goflow_workers_connected", "gauge", "Workers connected to the coordinator"),
    "subscriptions": ("goflow_event_subscriptions", "gauge", "Active event subscriptions (topic prefixes)"),
    "control_requests": ("goflow_control_requests", "counter", "Control socket requests served"),
    "events_published": ("goflow_events_published", "counter", "Events sent on the XPUB socket"),
    "events_dropped": ("goflow_events_dropped", "counter", "Events the XPUB socket dropped"),
    "queued_tasks": ("goflow_tasks_queued", "gauge", "Tasks waiting for a worker"),
    "subscribed_bytes": ("goflow_event_subscribed_bytes", "gauge",
                         "Bytes of active subscription prefixes (bounded: see goflow.events.publisher)"),
    "refused_subscriptions": ("goflow_event_subscriptions_refused", "counter",
                              "Subscriptions refused because the subscription limits were reached"),
    "subscription_resets": ("goflow_event_subscription_resets", "counter",
                            "Times every subscriber connection was dropped to enforce the subscription limits"),
    "bad_worker_frames": ("goflow_bad_frames_workers", "counter", "Malformed frames dropped on the workers socket"),
    "bad_control_frames": ("goflow_bad_frames_control", "counter", "Malformed frames on the control socket"),
    "bad_subscription_messages": ("goflow_bad_frames_events", "counter",
                                  "Malformed (un)subscribe messages on the events socket"),
    "store_queue_depth": ("goflow_store_queue_depth", "gauge", "Events waiting to be written to the history"),
    "store_write_lag_seconds": ("goflow_store_write_lag_seconds", "gauge",
                                "Age of the oldest event not yet written to the history"),
    "store_dropped_events": ("goflow_store_dropped_events", "counter",
                             "Events dropped from the history (queue full)"),
    "store_healthy": ("goflow_store_healthy", "gauge", "1 while the history database is writable"),
    "store_events_written": ("goflow_store_events_written", "counter", "Events written to the history"),
}


class _SourceCollector:
    """Exports the gauge source's values at scrape time."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self):
        source = self.metrics._source
        if source is None:
            return
        try:
            values = source() or {}
        except Exception:
            log.exception("metrics gauge source failed")
            self.metrics._source_errors += 1
            return
        for key, value in values.items():
            spec = SOURCE_METRICS.get(key)
            if spec is None or value is None:
                continue
            name, kind, doc = spec
            if kind == "counter":
                family = CounterMetricFamily(name, doc)
            else:
                family = GaugeMetricFamily(name, doc)
            family.add_metric([], float(value))
            yield family


class _DrainFirst:
    """Registered before every metric, so a scrape applies the queued events first."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self):
        self.metrics.drain()
        return iter(())


class Metrics:
    """goflow's Prometheus metrics in a private registry (see module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, interval: float = 0.1,
                 queue_capacity: int = 100_000):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_DrainFirst(self))
        self.executions = Counter("goflow_executions", "Executions finished, by final status", ["status"],
                                  registry=r)
        self.executions_started = Counter("goflow_executions_started", "Executions started", registry=r)
        self.executions_running = Gauge("goflow_executions_running", "Executions running (from events)",
                                        registry=r)
        self.nodes = Counter("goflow_nodes", "Node runs finished, by status and node type", ["status", "type"],
                             registry=r)
        self.node_duration = Histogram("goflow_node_duration_seconds", "Node run duration (coordinator clock)",
                                       ["type"], buckets=NODE_DURATION_BUCKETS, registry=r)
        self.dispatch_latency = Histogram(
            "goflow_dispatch_latency_seconds",
            "node.started until the worker began the task (worker clock; exact for local workers)",
            buckets=DISPATCH_BUCKETS, registry=r)
        self.retries = Counter("goflow_node_retries", "Node attempts that failed and are retried", ["type"],
                               registry=r)
        self.events = Counter("goflow_events_observed", "Events seen by the metrics sink, by type", ["type"],
                              registry=r)
        self.workers_joined = Counter("goflow_workers_joined", "worker.joined events", registry=r)
        self.workers_lost = Counter("goflow_workers_lost", "worker.lost events", registry=r)
        self.bad_events = Counter("goflow_metrics_bad_events", "Events the metrics sink could not decode",
                                  registry=r)
        self.dropped = Counter("goflow_metrics_dropped_events",
                               "Events not counted because the metrics queue was full", registry=r)
        r.register(_SourceCollector(self))
        self.queue_capacity = max(1, int(queue_capacity))
        self.interval = float(interval)
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._drain_lock = threading.Lock()
        self._dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="goflow-metrics", daemon=True)
        self._thread.start()
        self._source: Callable[[], dict[str, Any]] | None = None
        self._source_errors = 0
        self._pending: OrderedDict[tuple, float] = OrderedDict()   # node.started ts per running attempt
        self._dispatch_from_events = True
        self._event_children: dict[bytes, Any] = {}
        self._running: set[str] = set()

    # -- feeding -----------------------------------------------------------------------------
    def set_gauge_source(self, source: Callable[[], dict[str, Any]] | None) -> None:
        """``source() -> {key: number}`` read at every scrape; keys from :data:`SOURCE_METRICS`."""
        self._source = source

    def observe_dispatch(self, seconds: float) -> None:
        """Exact dispatch latency from the coordinator (switches off the event-derived estimate)."""
        self._dispatch_from_events = False
        self.dispatch_latency.observe(max(0.0, seconds))

    def observe_event(self, topic: bytes | str, payload: bytes) -> None:
        """Queue one published event for the metrics (see :meth:`sink`)."""
        self.sink(None, topic, payload)

    @property
    def pending(self) -> int:
        """Events queued and not yet applied to the metrics."""
        return len(self._queue)

    def sink(self, execution_id: str | None, topic: bytes, payload: bytes) -> None:
        """Queue one published event (the event-sink signature). O(1), never blocks, never raises."""
        if len(self._queue) >= self.queue_capacity:
            self._dropped += 1
            return
        self._queue.append((topic, payload))

    def drain(self) -> int:
        """Apply every queued event now (any thread). Returns how many were applied."""
        q = self._queue
        applied = 0
        with self._drain_lock:
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                self.dropped.inc(dropped)
            while q:
                try:
                    topic, payload = q.popleft()
                except IndexError:
                    break
                applied += 1
                try:
                    self._observe(topic if isinstance(topic, bytes) else str(topic).encode(), payload)
                except Exception:
                    self.bad_events.inc()
        return applied

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.drain()
            except Exception:  # pragma: no cover - never die
                log.exception("metrics drain failed")

    def close(self) -> None:
        """Apply what is queued and stop the background thread."""
        self._stop.set()
        self._thread.join(5)
        self.drain()

    def _observe(self, topic: bytes, payload: bytes) -> None:
        cut = topic.find(b"/")
        etype = topic[:cut] if cut >= 0 else topic
        child = self._event_children.get(etype)
        if child is None:
            if len(self._event_children) >= 64:   # a misbehaving publisher cannot explode the labels
                etype = b"other"
                child = self._event_children.get(etype)
            if child is None:
                child = self._event_children[etype] = self.events.labels(etype.decode("utf-8", "replace"))
        child.inc()
        kind = etype.decode("ascii", "replace")
        if kind == "worker.joined":
            self.workers_joined.inc()
            return
        if kind == "worker.lost":
            self.workers_lost.inc()
            return
        if kind == "execution.started" or kind == "execution.resumed":
            ev = _decode(payload)
            eid = ev.get("execution_id")
            if kind == "execution.started":
                self.executions_started.inc()
            if eid not in self._running:
                self._running.add(eid)
                self.executions_running.inc()
            return
        if kind in TERMINAL_EVENT_TYPES:
            ev = _decode(payload)
            self.executions.labels(ev.get("status") or kind.split(".", 1)[1]).inc()
            eid = ev.get("execution_id")
            if eid in self._running:
                self._running.discard(eid)
                self.executions_running.dec()
            return
        if kind == "node.started":
            if not self._dispatch_from_events:
                return
            ev = _decode(payload)
            if ev.get("node_type") in WORKER_NODE_TYPES:
                self._pending[_key(ev)] = ev.get("ts") or time.time()
                if len(self._pending) > _PENDING_CAP:
                    self._pending.popitem(last=False)
            return
        if kind in _NODE_OUTCOMES:
            ev = _decode(payload)
            ntype = ev.get("node_type") or "unknown"
            meta = ev.get("meta") or {}
            if meta.get("resumed"):      # restored after a coordinator restart: not a run
                self._pending.pop(_key(ev), None)
                return
            self.nodes.labels(kind.split(".", 1)[1], ntype).inc()
            duration = meta.get("duration_s")
            if isinstance(duration, (int, float)) and kind != "node.skipped":
                self.node_duration.labels(ntype).observe(max(0.0, duration))
            started_ts = self._pending.pop(_key(ev), None) if self._pending else None
            worker_started = meta.get("started")
            if started_ts is not None and isinstance(worker_started, (int, float)) and self._dispatch_from_events:
                self.dispatch_latency.observe(max(0.0, worker_started - started_ts))
            return
        if kind == "node.retrying":
            ev = _decode(payload)
            self.retries.labels(ev.get("node_type") or "unknown").inc()
            self._pending.pop(_key(ev), None)

    # -- reading -----------------------------------------------------------------------------
    def render(self) -> bytes:
        """The exposition text (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def serve(self, address: str = DEFAULT_ADDRESS, *, insecure: bool = False) -> "MetricsServer":
        """Serve ``/metrics`` on ``host:port`` (port 0 = any free port) in a daemon thread.

        Under the bind policy of every listener: beyond loopback only with ``insecure``.
        """
        host, port = check_metrics_exposure(address, insecure=insecure)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


class MetricsServer:
    """Handle of a running metrics HTTP server."""

    def __init__(self, server: Any, thread: threading.Thread):
        self.server = server
        self.thread = thread
        self.host, self.port = server.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"``, ``":port"`` (loopback), ``"port"`` or ``"[v6]:port"`` -> (host, port)."""
    text = str(address).strip()
    if text.isdigit():
        return "127.0.0.1", int(text)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} must look like HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def check_metrics_exposure(address: str, *, insecure: bool = False) -> tuple[str, int]:
    """``(host, port)`` of ``address`` if the bind policy allows it (the metrics endpoint has no
    authentication, so beyond loopback it needs ``insecure``); else ExposureError."""
    from goflow.security import check_exposure

    host, port = parse_address(address)
    check_exposure(f"the metrics endpoint {address}", host, protected=insecure,
                   remedy="serve metrics on loopback (scrape through a proxy or an SSH tunnel), or run "
                          "goflow-coordinator with --insecure to accept the risk")
    return host, port


def coordinator_gauges(coordinator: Any, store: Any = None) -> Callable[[], dict[str, Any]]:
    """A gauge source reading a Coordinator's counters (and a Store's) at scrape time.

    Plain attribute reads from the HTTP thread, no call onto the reactor: the values may
    be a few microseconds stale, never inconsistent enough to matter for a gauge.
    """

    def source() -> dict[str, Any]:
        values: dict[str, Any] = {}
        try:
            values["workers_connected"] = len(coordinator.broker.workers.workers)
            publisher = coordinator.publisher
            values["subscriptions"] = publisher.subscription_count
            values["events_published"] = publisher._published
            values["events_dropped"] = publisher._dropped
            values["control_requests"] = coordinator.control.stats.get("requests", 0)
            values["queued_tasks"] = len(coordinator.broker.queue)
            values["subscribed_bytes"] = publisher._subscribed_bytes
            values["refused_subscriptions"] = publisher._refused_subscriptions
            values["subscription_resets"] = publisher._subscription_resets
            values["bad_subscription_messages"] = publisher._bad_subscription_messages
            values["bad_worker_frames"] = coordinator.broker.stats["bad_worker_frames"]
            values["bad_control_frames"] = coordinator.control.stats.get("bad_frames", 0)
        except Exception:   # a half-stopped coordinator
            pass
        if store is not None:
            values.update(store.gauges())
        return values

    return source


def _decode(payload: bytes) -> dict[str, Any]:
    """The payload keys metrics use, skipping everything else (large ``meta`` values)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(payload)
    size = unpacker.read_map_header()
    out: dict[str, Any] = {}
    for _ in range(size):
        key = unpacker.unpack()
        if key in _WANTED:
            out[key] = unpacker.unpack()
            if len(out) == len(_WANTED):
                break
        else:
            unpacker.skip()
    return out


def _key(ev: dict) -> tuple:
    meta = ev.get("meta") or {}
    return (ev.get("execution_id"), ev.get("node_id"), ev.get("attempt"), meta.get("loop"), meta.get("index"),
            meta.get("parallel"), meta.get("branch"))

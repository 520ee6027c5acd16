"""The one composition root: the parts of a running coordinator, built and torn down in order.

``goflow run`` / :func:`goflow.run` (through :class:`~goflow.coordinator.embedded.EmbeddedRuntime`)
and the ``goflow-coordinator`` daemon both build a :class:`Runtime`: the tracer and the
metrics endpoint first (a bad endpoint or a busy address fails before anything starts),
the history store, the coordinator (recording into the store, its events feeding store,
metrics and tracer), and local worker processes. Teardown is the reverse and the same for
both: the coordinator stops (cancelling what runs, shutting workers down, flushing events),
then the metrics endpoint, the tracer (exporting its last spans), and the store, which
writes what is queued before it closes.
"""

from __future__ import annotations

import os
from typing import Any

import zmq

from goflow.coordinator.coordinator import Coordinator
from goflow.coordinator.local_workers import LocalWorkerPool
from goflow.history.store import Store, combine_sinks
from goflow.security import check_endpoint_exposure

#: What to do instead, when a socket would listen beyond loopback unauthenticated. The daemon
#: checks its arguments first with its own flags in the message; this catches every other
#: path (``goflow run --publish/--control``, :func:`goflow.start`, ``EmbeddedRuntime``).
EXPOSURE_REMEDY = ("bind 127.0.0.1 or an ipc:// path (reach it from other machines through an SSH tunnel), or "
                   "serve other machines with goflow-coordinator and CURVE keys (docs/security.md)")


class Runtime:
    """A coordinator with its history store, metrics endpoint and local workers.

    ``coordinator`` holds :class:`Coordinator`'s keyword arguments (endpoints, limits,
    CURVE); ``db``: the history database (None: no history); ``metrics``: the address of
    the Prometheus endpoint (None: none); ``insecure``: let the coordinator's sockets (without
    ``curve``) and the metrics endpoint listen beyond loopback, else ExposureError before
    anything binds;
    ``otlp_endpoint``: where traces go (None: the
    standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` decides, unset: off); ``local_workers``: how many worker processes to
    start beside the coordinator, with ``pool`` the :class:`LocalWorkerPool` options.
    """

    def __init__(self, *, coordinator: dict[str, Any], db: str | os.PathLike | None = None,
                 metrics: str | None = None, insecure: bool = False, otlp_endpoint: str | None = None,
                 local_workers: int = 0,
                 pool: dict[str, Any] | None = None, context: zmq.Context | None = None):
        self.store: Store | None = None
        self.metrics = None
        self.metrics_server = None
        self.tracer = None
        self.pool: LocalWorkerPool | None = None
        for endpoint in (coordinator.get("workers_endpoint"), *coordinator.get("event_endpoints", ()),
                         *coordinator.get("control_endpoints", ())):
            if endpoint is not None:
                check_endpoint_exposure(endpoint, protected=insecure or coordinator.get("curve") is not None,
                                        remedy=EXPOSURE_REMEDY)
        try:
            from goflow.observability.tracing import tracer_for

            self.tracer = tracer_for(otlp_endpoint)
            if metrics:
                from goflow.observability.metrics import Metrics

                self.metrics = Metrics()
                self.metrics_server = self.metrics.serve(metrics, insecure=insecure)
            self.store = Store(db) if db is not None else None
            self.coordinator = Coordinator(
                **coordinator, context=context or zmq.Context.instance(), history=self.store,
                trace_context=self.tracer is not None,
                sink=combine_sinks(self.store.sink if self.store else None,
                                   self.metrics.sink if self.metrics else None,
                                   self.tracer.sink if self.tracer else None))
        except BaseException:
            self._close_observers()
            raise
        if self.metrics is not None:
            from goflow.observability.metrics import coordinator_gauges

            self.metrics.set_gauge_source(coordinator_gauges(self.coordinator, self.store))
        if local_workers:
            self.pool = LocalWorkerPool(self.coordinator.workers_endpoint, local_workers, **(pool or {}))
            self.coordinator.attach_local_pool(self.pool)

    def start(self) -> None:
        self.coordinator.start()
        if self.pool is not None:
            self.pool.start()

    def stop(self) -> None:
        """Stop everything, coordinator first; safe to call once whether or not it started."""
        try:
            self.coordinator.stop()
        finally:
            self._close_observers()

    def _close_observers(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
        if self.store is not None:
            self.store.close()

"""Observability fed from the event stream: Prometheus metrics (and, later, traces)."""

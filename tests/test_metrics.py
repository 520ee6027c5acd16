"""Prometheus metrics fed from published events, scraped over HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from goflow.observability.metrics import Metrics, coordinator_gauges, parse_address
from goflow.history.store import Store, combine_sinks
from tests.test_store import E2E, EmbeddedWithSink, Publisher

pytestmark = pytest.mark.timeout(90)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metrics():
    m = Metrics()
    yield m
    m.close()


def test_events_become_metrics_scraped_over_http(metrics):
    gauges = {"workers_connected": 3, "subscriptions": 2, "control_requests": 17, "store_queue_depth": 5,
              "store_write_lag_seconds": 0.25, "unknown_key": 1}
    metrics.set_gauge_source(lambda: gauges)
    pub = Publisher(metrics.sink)
    server = metrics.serve("127.0.0.1:0")
    try:
        pub.run(outcome="completed")
        pub.run(outcome="failed")
        pub.run(finish=False)
        pub.pub.emit("worker.joined", None, worker_id="w9", meta={"worker_id": "w9"})
        samples = scrape(server.url)
        assert server.host == "127.0.0.1"
    finally:
        server.stop()
        pub.close()
    assert value(samples, "goflow_executions_total", status="completed") == 1
    assert value(samples, "goflow_executions_total", status="failed") == 1
    assert value(samples, "goflow_executions_started_total") == 3
    assert value(samples, "goflow_executions_running") == 1
    # per run: fetch (2 attempts, 1 completed), 2 squares, end
    assert value(samples, "goflow_nodes_total", status="completed", type="python") == 3 * 3
    assert value(samples, "goflow_nodes_total", status="failed", type="python") == 1
    assert value(samples, "goflow_nodes_total", status="skipped", type="passthrough") == 3
    assert value(samples, "goflow_nodes_total", status="completed", type="end") == 1
    assert value(samples, "goflow_node_retries_total", type="python") == 3
    assert value(samples, "goflow_node_duration_seconds_count", type="python") == 3 * 3 + 1
    assert value(samples, "goflow_node_duration_seconds_bucket", type="python", le="0.001") == 2 * 3
    assert value(samples, "goflow_node_duration_seconds_sum", type="python") == pytest.approx(
        3 * (0.02 + 0.002) + 0.01)
    assert value(samples, "goflow_dispatch_latency_seconds_count") == 3   # fetch's worker 'started'
    assert value(samples, "goflow_events_observed_total", type="node.started") == 3 * 5 - 1
    assert value(samples, "goflow_workers_joined_total") == 1
    assert value(samples, "goflow_workers_connected") == 3
    assert value(samples, "goflow_event_subscriptions") == 2
    assert value(samples, "goflow_control_requests_total") == 17
    assert value(samples, "goflow_store_queue_depth") == 5
    assert value(samples, "goflow_store_write_lag_seconds") == 0.25
    assert not any("unknown" in name for name, _ in samples)
    # the server is gone after stop()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(server.url, timeout=1)


def test_private_registry_and_cheap_sink(metrics):
    assert REGISTRY.get_sample_value("goflow_executions_started_total") is None
    other = Metrics()          # a second instance does not collide
    other.close()
    metrics.close()            # the fixture's drain thread (every 0.1 s) would race the count below
    metrics = Metrics(interval=3600)
    pub = Publisher(None)
    for _ in range(20_000):
        metrics.observe_event(b"node.started/e/n/", b"\xc1")   # garbage payload, only queued
    assert metrics.pending == 20_000, "events must only be queued on the caller's (reactor) thread"
    metrics.drain()
    assert metrics.registry.get_sample_value("goflow_metrics_bad_events_total") == 20_000
    metrics.close()
    pub.close()


def test_full_queue_counts_drops():
    m = Metrics(queue_capacity=5, interval=60)
    try:
        for _ in range(8):
            m.sink(None, b"heartbeat/", b"\x80")
        # a scrape (get_sample_value collects) applies the queue first
        assert m.registry.get_sample_value("goflow_metrics_dropped_events_total") == 3
        assert m.registry.get_sample_value("goflow_events_observed_total", {"type": "heartbeat"}) == 5
    finally:
        m.close()


def test_a_failing_gauge_source_does_not_break_the_scrape(metrics):
    metrics.set_gauge_source(lambda: 1 / 0)
    text = metrics.render().decode()
    assert "goflow_executions_started_total" in text


def test_parse_address():
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    with pytest.raises(ValueError):
        parse_address("localhost")


def test_end_to_end_with_coordinator_and_store(tmp_path):
    from goflow.language.loader import load

    path = tmp_path / "e2e.yaml"
    path.write_text(E2E)
    workflow = load(path)
    store = Store(tmp_path / "history.db")
    metrics = Metrics()
    try:
        with EmbeddedWithSink(combine_sinks(store.sink, metrics.sink)) as rt:
            metrics.set_gauge_source(coordinator_gauges(rt.coordinator, store))
            server = metrics.serve("127.0.0.1:0")
            try:
                _, future = rt.coordinator.submit(workflow, {"counter": str(tmp_path / "c")},
                                                  execution_id=uuid.uuid4().hex)
                assert future.result(30)["status"] == "completed"
                assert store.flush(5)
                samples = scrape(server.url)
            finally:
                server.stop()
        assert value(samples, "goflow_executions_total", status="completed") == 1
        assert value(samples, "goflow_nodes_total", status="completed", type="python") == 5  # 3 squares, flaky, total
        assert value(samples, "goflow_nodes_total", status="completed", type="loop") == 1
        assert value(samples, "goflow_node_retries_total", type="python") == 1
        assert value(samples, "goflow_dispatch_latency_seconds_count") == 5   # each completed worker attempt
        assert value(samples, "goflow_workers_connected") == 2
        assert value(samples, "goflow_workers_joined_total") == 2
        assert value(samples, "goflow_events_published_total") >= value(
            samples, "goflow_events_observed_total", type="node.started")
        assert value(samples, "goflow_control_requests_total") >= 0
        assert value(samples, "goflow_store_healthy") == 1
        assert value(samples, "goflow_store_queue_depth") == 0
        assert value(samples, "goflow_store_events_written_total") > 0
    finally:
        metrics.close()
        store.close()

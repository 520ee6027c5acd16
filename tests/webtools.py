"""Helpers for the web gateway tests: a running gateway process and a plain SSE reader."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pytest

from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.web.server import GatewayProcess


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: dict


def read_sse(url: str, *, until: Callable[[list[SseEvent]], bool], headers: dict | None = None,
             timeout: float = 30.0) -> tuple[list[SseEvent], int]:
    """Read ``event: goflow`` messages from ``url`` until ``until(events)``; returns them and
    the number of heartbeat comments seen. Raises TimeoutError after ``timeout`` of silence."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    events: list[SseEvent] = []
    heartbeats = 0
    try:
        conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""), headers=headers or {})
        response = conn.getresponse()
        if response.status != 200:
            raise AssertionError(f"{url}: HTTP {response.status} {response.read()[:200]!r}")
        fields: dict[str, str] = {}
        while not until(events):
            try:
                raw = response.readline()
            except socket.timeout:
                raise TimeoutError(f"{url}: nothing for {timeout}s after {len(events)} events") from None
            if not raw:
                raise AssertionError(f"{url}: the stream ended after {len(events)} events")
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                heartbeats += 1
            elif line == "":
                if fields.get("event") == "goflow":
                    events.append(SseEvent(fields.get("id"), "goflow", json.loads(fields["data"])))
                fields = {}
            else:
                name, _, value = line.partition(": ")
                fields[name] = value
        return events, heartbeats
    finally:
        conn.close()


def get_json(url: str, *, method: str = "GET", body: dict | None = None, headers: dict | None = None
             ) -> tuple[int, dict]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        hdrs = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body)
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, parts.path + ("?" + parts.query if parts.query else ""), body=data, headers=hdrs)
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, (json.loads(text) if text else {})
    finally:
        conn.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_gateway(port: int, events: str, control: str | None, **kwargs) -> GatewayProcess:
    gateway = GatewayProcess(f"127.0.0.1:{port}", events, control, **kwargs)
    gateway.start()
    return gateway


def published_runtime(free_ports, **options) -> "Iterator[EmbeddedRuntime]":
    """An embedded runtime with 2 workers that also publishes on tcp (``events_tcp``,
    ``control_tcp``), as a gateway in another process reaches it; ``options`` go to it."""
    events_port, control_port = free_ports(2)
    rt = EmbeddedRuntime(workers=2, publish=[f"tcp://127.0.0.1:{events_port}"],
                         control=[f"tcp://127.0.0.1:{control_port}"], **options)
    with rt:
        rt.wait_for_workers(2)
        rt.events_tcp = f"tcp://127.0.0.1:{events_port}"
        rt.control_tcp = f"tcp://127.0.0.1:{control_port}"
        yield rt


@pytest.fixture
def gateways():
    """Start gateways with :func:`start_gateway`; every one started is stopped at the end."""
    started: list[GatewayProcess] = []

    def start(*args, **kwargs) -> GatewayProcess:
        gateway = start_gateway(*args, **kwargs)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()

"""A subscription flood on the events socket costs bounded memory; excess is refused and counted."""

from __future__ import annotations

import json
import os
import socket
import struct
import urllib.request

import pytest
import zmq

from goflow.events.publisher import MAX_SUBSCRIBED_BYTES
from tests.test_daemon import FLOW, cli, daemon, free_ports, workers, wait_for_workers  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(180)


class RawSubscriber:
    """A SUB peer speaking ZMTP 3.0 by hand, so the flood costs the test process nothing
    (a libzmq SUB socket would keep its own copy of every subscription)."""

    def __init__(self, endpoint: str):
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=2)
        self.sock.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
        self._read(64)  # the peer's greeting
        body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack("!I", 3) + b"SUB"
        self.sock.sendall(b"\x04" + bytes([len(body)]) + body)

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed by the daemon")
            data += chunk
        return data

    def subscribe(self, prefix: bytes) -> None:
        body = b"\x01" + prefix
        header = b"\x00" + bytes([len(body)]) if len(body) < 256 else b"\x02" + struct.pack("!Q", len(body))
        self.sock.sendall(header + body)

    def close(self) -> None:
        self.sock.close()


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _flood(endpoint: str, frames: int, size: int) -> RawSubscriber | None:
    """Send ``frames`` distinct SUBSCRIBE frames of ``size`` bytes, reconnecting whenever the
    daemon drops the connection; returns the connection still open (if any)."""
    sent, sub = 0, None
    while sent < frames:
        try:
            if sub is None:
                sub = RawSubscriber(endpoint)
            sub.subscribe(os.urandom(4) + sent.to_bytes(4, "big") + b"x" * (size - 8))
            sent += 1
        except OSError:
            if sub is not None:
                sub.close()
            sub = None
            sent += 1  # that frame was refused with its connection
    return sub


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not exported:\n{text}"
    return values[0]


def test_subscription_flood_is_bounded_refused_counted_and_subscribers_still_served(daemon, workers, tmp_path):
    metrics_port = free_ports(1)[0]
    d = daemon("--metrics", f"127.0.0.1:{metrics_port}")
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    workers(d.workers, "--concurrency", "1")
    wait_for_workers(d.control, 1)
    before = _rss_mb(d.proc.pid)

    # The reported attack: 2,000 SUBSCRIBE frames of 60 KB (120 MB of prefixes).
    held = _flood(d.events, 2000, 60_000)
    assert _metric(url, "goflow_event_subscribed_bytes") == 0  # none of them was ever taken
    # Prefixes of an acceptable size, but 2.5 MB of them, on connections kept open.
    subscribers = [held, _flood(d.events, 5000, 500)]
    while _metric(url, "goflow_event_subscription_resets_total") < 1:
        pass  # the daemon reads what is queued; pytest-timeout bounds the wait
    grown = _rss_mb(d.proc.pid) - before
    assert grown < 250, f"the daemon grew by {grown:.0f} MB under the flood"
    assert _metric(url, "goflow_event_subscriptions_refused_total") >= 1
    assert _metric(url, "goflow_event_subscribed_bytes") <= MAX_SUBSCRIBED_BYTES
    for sub in subscribers:
        if sub is not None:
            sub.close()

    # A well-behaved subscriber is still served, and runs still complete.
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.connect(d.events)
    sub.setsockopt(zmq.SUBSCRIBE, b"execution.completed/")
    while _metric(url, "goflow_event_subscriptions") < 1:
        pass
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    execution_id = json.loads(done.stdout)["execution_id"]
    assert sub.poll(30_000), "the completion was not delivered"
    assert sub.recv_multipart()[0] == f"execution.completed/{execution_id}/".encode()
    sub.close(0)

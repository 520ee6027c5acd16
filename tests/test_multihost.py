"""Three hosts (network namespaces on a bridge): a coordinator, two worker hosts, a subscriber.

A 200-node fan-out runs while one worker host is SIGKILLed and the other loses its link
for ~2 s; the run completes with every node's result right, and the subscriber (on the
host whose link was cut) gets the complete event stream after repair.

The hosts are the project's own test hosts inside this sandbox: 10.200.0.0/24 on a bridge
in its own namespace, no route anywhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from test_daemon import Daemon, WorkerGroup, child_env, free_ports

pytestmark = pytest.mark.timeout(120)

PYTHON = sys.executable
NODES = 200


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); running as uid %d" % os.geteuid()
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"gfprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """``count`` namespaces with 10.200.0.N/24 on veth pairs to a bridge namespace."""

    def __init__(self, count: int):
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"gfbr{tag}"
        self.names = [f"gfh{n}{tag}" for n in range(1, count + 1)]
        self.addresses = [f"10.200.0.{n}" for n in range(1, count + 1)]
        self.veths = {name: (f"gv{n}{tag}", f"gb{n}{tag}") for n, name in enumerate(self.names, 1)}

    def create(self) -> None:
        _ip("netns", "add", self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for name, address in zip(self.names, self.addresses):
            inside, outside = self.veths[name]
            _ip("netns", "add", name)
            _ip("link", "add", inside, "netns", name, "type", "veth", "peer", "name", outside, "netns", self.bridge)
            _ip("-n", self.bridge, "link", "set", outside, "master", "br0")
            _ip("-n", self.bridge, "link", "set", outside, "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", name, "link", "set", inside, "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def link(self, name: str, state: str) -> None:
        _ip("-n", name, "link", "set", self.veths[name][0], state)

    def kill_all(self, name: str) -> list[int]:
        pids = [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def destroy(self) -> None:
        for name in [*self.names, self.bridge]:
            self.kill_all(name)
        time.sleep(0.2)
        for name in [*self.names, self.bridge]:
            _ip("netns", "del", name, check=False)

    @staticmethod
    def exec(name: str) -> list[str]:
        return ["ip", "netns", "exec", name]


SUBSCRIBER = textwrap.dedent("""
    import json, sys, time
    from goflow.events.monitor import Monitor

    events, control, out = sys.argv[1:4]
    monitor = Monitor(events, control, control_timeout=15.0)
    seen = []
    print("subscribing", flush=True)
    for ev in monitor.subscribe(since="start", timeout=50, until=lambda ev: ev.is_terminal):
        if ev.execution_id and len(seen) < 150:
            time.sleep(0.02)  # fall behind early so the publisher's tiny HWM drops events
        if ev.execution_id:
            seen.append([ev.execution_id, ev.eseq, ev.seq, ev.type, ev.node_id, ev.status])
    json.dump({"events": seen, "stats": monitor.stats, "losses": list(monitor.losses),
               "timed_out": monitor.timed_out}, open(out, "w"))
""")


def _flow(count: int) -> str:
    lines = ["name: fanout200", "nodes:", "  - {id: start, type: start}"]
    for i in range(count):
        lines.append(f'  - {{id: n{i}, type: python, call: "flowlib:timed", args: [0.1, {i}], output: o{i}}}')
    lines += ["  - {id: end, type: end, return: done}", "edges:"]
    for i in range(count):
        lines.append(f"  - {{from: start, to: n{i}}}")
        lines.append(f"  - {{from: n{i}, to: end}}")
    return "\n".join(lines) + "\n"


def test_multihost_worker_killed_and_link_cut(tmp_path):
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    hosts = Hosts(3)
    coordinator_host, worker_host_a, worker_host_b = hosts.names
    try:
        hosts.create()
        d = Daemon(tmp_path, "--insecure", "--liveness", "3", "--sndhwm", "20", host=hosts.addresses[0],
                   ports=free_ports(3),
                   prefix=hosts.exec(coordinator_host)).start()
        common = ["--concurrency", "2", "--coordinator-liveness", "3", "--max-backoff", "2"]
        group_a = WorkerGroup(tmp_path, d.workers, *common, "--name", "hostA", prefix=hosts.exec(worker_host_a))
        group_b = WorkerGroup(tmp_path, d.workers, *common, "--name", "hostB", prefix=hosts.exec(worker_host_b))
        script = tmp_path / "subscriber.py"
        script.write_text(SUBSCRIBER)
        stream_file = tmp_path / "stream.json"
        subscriber = subprocess.Popen([*hosts.exec(worker_host_b), PYTHON, str(script), d.events, d.control,
                                       str(stream_file)], env=child_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        assert subscriber.stdout.readline().strip() == "subscribing"

        # Wait until all four worker processes joined (from the coordinator's host).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = subprocess.run([*hosts.exec(coordinator_host), PYTHON, "-m", "goflow", "workers",
                                      "--coordinator", d.control, "--json"], capture_output=True, text=True,
                                     env=child_env(), timeout=30)
            if listing.returncode == 0 and len(json.loads(listing.stdout)) >= 4:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"workers did not join: {listing.stdout} {listing.stderr}")

        flow = tmp_path / "fanout.yaml"
        flow.write_text(_flow(NODES))
        started = time.monotonic()
        submit = subprocess.Popen([*hosts.exec(coordinator_host), PYTHON, "-m", "goflow", "submit",
                                   str(flow), "--coordinator", d.control, "--wait", "--json"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        # Kill host A once it has finished some of the work (not after a fixed time: on a loaded
        # machine the submission may not even have started), so the work spans both hosts.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listing = subprocess.run([*hosts.exec(coordinator_host), PYTHON, "-m", "goflow", "workers",
                                      "--coordinator", d.control, "--json"], capture_output=True, text=True,
                                     env=child_env(), timeout=30)
            workers = json.loads(listing.stdout) if listing.returncode == 0 else []
            if any(w["worker_id"].startswith("hostA") and w["completed"] >= 1 for w in workers):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"host A never completed a node: {listing.stdout} {listing.stderr}")
        killed = hosts.kill_all(worker_host_a)  # host A: every process SIGKILLed mid-run
        assert killed
        time.sleep(0.5)
        hosts.link(worker_host_b, "down")  # host B (a worker and the subscriber): cable pulled
        time.sleep(2.0)
        hosts.link(worker_host_b, "up")

        out, err = submit.communicate(timeout=60)
        elapsed = time.monotonic() - started
        assert submit.returncode == 0, f"{out}\n{err}\n{d.log()[-3000:]}"
        result = json.loads(out)
        assert result["status"] == "completed" and result["result"] == "done"
        values = result["variables"]
        for i in range(NODES):
            assert values[f"o{i}"]["value"] == i, f"node n{i}: {values.get(f'o{i}')}"
        pids = {values[f"o{i}"]["pid"] for i in range(NODES)}
        assert len(pids) >= 3, "the work should have been spread over both hosts' processes"

        subscriber.wait(timeout=60)
        stream = json.loads(stream_file.read_text())
        assert not stream["timed_out"]
        mine = [e for e in stream["events"] if e[0] == result["execution_id"]]
        eseqs = [e[1] for e in mine]
        assert eseqs == list(range(1, len(eseqs) + 1)), "the subscriber's stream has holes or duplicates"
        assert mine[-1][3] == "execution.completed"
        completed = {e[4] for e in mine if e[3] == "node.completed"}
        assert {f"n{i}" for i in range(NODES)} <= completed
        assert stream["stats"]["lost"] == 0, stream["losses"]
        assert stream["stats"]["repaired"] > 0, "no drop was forced: the repair path went untested"
        print(f"multihost: {elapsed:.1f}s, killed {len(killed)} processes on host A, "
              f"subscriber stats {stream['stats']}")
        group_b.stop()
        group_a.stop(signal.SIGKILL, timeout=1)
        assert d.stop() == 0
    finally:
        hosts.destroy()

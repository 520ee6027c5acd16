"""goflow-coordinator, goflow-worker and the client commands: real processes, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from goflow.control.framing import ControlClient, ControlTimeout

pytestmark = pytest.mark.timeout(90)

PYTHON = sys.executable
BIN = Path(sys.executable).parent
TESTS_DIR = Path(__file__).resolve().parent


# -- helpers (also used by test_security.py and test_multihost.py) --------------------------------
def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Daemon:
    """``python -m goflow.coordinator.daemon`` on free loopback ports (or the given endpoints)."""

    def __init__(self, tmp: Path, *args: str, host: str = "127.0.0.1", ports: list[int] | None = None,
                 prefix: list[str] | None = None):
        self.ports = ports or free_ports(3)
        self.control = f"tcp://{host}:{self.ports[0]}"
        self.events = f"tcp://{host}:{self.ports[1]}"
        self.workers = f"tcp://{host}:{self.ports[2]}"
        self.args = list(args)
        self.prefix = prefix or []
        self.log_path = tmp / f"daemon-{self.ports[0]}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Daemon":
        command = [*self.prefix, PYTHON, "-m", "goflow.coordinator.daemon", "--control-endpoint", self.control,
                   "--events-endpoint", self.events, "--workers-endpoint", self.workers, "--log-format", "json",
                   *self.args]
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, stderr=self.log_file, stdout=self.log_file, env=child_env())
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if "coordinator ready" in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log_file.close()
        return code


class WorkerGroup:
    """``goflow-worker`` (the supervisor) connected to ``endpoint``."""

    def __init__(self, tmp: Path, endpoint: str, *args: str, prefix: list[str] | None = None):
        self.log_path = tmp / f"worker-{time.monotonic_ns()}.log"
        command = [*(prefix or []), str(BIN / "goflow-worker"), "--connect", endpoint, "--stop-grace", "5", *args]
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(command, stderr=self.log_file, stdout=self.log_file, env=child_env(),
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        self.log_file.close()
        return code


def cli(*args: str, timeout: float = 60.0, env: dict | None = None, prefix: list[str] | None = None
        ) -> subprocess.CompletedProcess:
    """``goflow COMMAND ...`` with the remote commands (python -m goflow)."""
    return subprocess.run([*(prefix or []), PYTHON, "-m", "goflow", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or child_env())


def wait_for_workers(control: str, count: int, timeout: float = 20.0, curve: dict | None = None) -> list[dict]:
    deadline = time.monotonic() + timeout
    workers: list[dict] = []
    with ControlClient(control, timeout=2.0, curve=curve) as client:
        while time.monotonic() < deadline:
            try:
                workers = client.request("workers")["workers"]
            except ControlTimeout:
                continue
            if len(workers) >= count:
                return workers
            time.sleep(0.1)
    raise AssertionError(f"only {len(workers)} of {count} workers joined")


def wait_until(predicate, what: str, timeout: float = 30.0):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def running_nodes(control: str, execution_id: str) -> list[str]:
    with ControlClient(control, timeout=10.0) as client:
        return client.request("execution", execution_id=execution_id)["running"]


def scrape(url: str) -> dict[str, float]:
    """A Prometheus exposition as {metric line name: value} (labels kept in the name)."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def wait_until_finished(control: str, execution_id: str, timeout: float = 60.0) -> dict:
    """The ``execution`` reply once the execution reached a terminal state."""
    deadline = time.monotonic() + timeout
    with ControlClient(control, timeout=2.0) as client:
        while time.monotonic() < deadline:
            try:
                execution = client.request("execution", execution_id=execution_id)
            except ControlTimeout:
                continue
            if execution["status"] in ("completed", "failed", "cancelled"):
                return execution
            time.sleep(0.05)
    raise AssertionError(f"execution {execution_id} did not finish")


FLOW = """\
name: remote-diamond
variables:
  - {name: n, type: number, default: 1}
nodes:
  - {id: start, type: start}
  - {id: a, type: python, call: "flowlib:timed", args: [0.2, a], output: a_out}
  - {id: b, type: python, call: "flowlib:timed", args: [0.2, b], output: b_out}
  - {id: sum, type: python, call: "flowlib:add", args: ["${n}", 10], output: total}
  - {id: end, type: end, return: "${total}"}
edges:
  - {from: start, to: a}
  - {from: start, to: b}
  - {from: a, to: sum}
  - {from: b, to: sum}
  - {from: sum, to: end}
"""


@pytest.fixture
def daemon(tmp_path):
    started: list[Daemon] = []

    def make(*args: str, **options) -> Daemon:
        d = Daemon(tmp_path, *args, **options).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop(signal.SIGKILL)


@pytest.fixture
def workers(tmp_path):
    started: list[WorkerGroup] = []

    def make(endpoint: str, *args: str, **options) -> WorkerGroup:
        group = WorkerGroup(tmp_path, endpoint, *args, **options)
        started.append(group)
        return group

    yield make
    for group in started:
        group.stop()


# -- tests ------------------------------------------------------------------------------------
def test_submit_wait_json_runs_on_remote_workers(daemon, workers, tmp_path):
    d = daemon()
    group = workers(d.workers, "--concurrency", "2", "--name", "remote")
    joined = wait_for_workers(d.control, 2)
    assert sorted(w["worker_id"] for w in joined) == ["remote-1", "remote-2"]
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    done = cli("submit", str(flow), "--coordinator", d.control, "--var", "n=5", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"execution_id", "workflow", "status", "result", "variables", "error", "duration_s"}
    assert result["status"] == "completed" and result["result"] == 15 and result["error"] is None
    worker_pids = {w["pid"] for w in joined}
    assert {result["variables"]["a_out"]["pid"], result["variables"]["b_out"]["pid"]} <= worker_pids
    assert d.proc.pid not in worker_pids
    # The same object as `goflow run --json` prints for the same workflow.
    local = subprocess.run([PYTHON, "-m", "goflow", "run", str(flow), "--var", "n=5", "--json", "--workers", "1"],
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert set(json.loads(local.stdout)) == set(result)

    # status / ls / env GOFLOW_COORDINATOR
    eid = result["execution_id"]
    status = cli("status", eid[:8], "--json", env=child_env(GOFLOW_COORDINATOR=d.control))
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "completed"
    listing = cli("ls", "--coordinator", d.control, "--json")
    assert eid in [e["execution_id"] for e in json.loads(listing.stdout)]
    plain = cli("submit", str(flow), "--coordinator", d.control)
    assert plain.returncode == 0 and len(plain.stdout.strip()) == 32
    missing = cli("status", "does-not-exist", "--coordinator", d.control)
    assert missing.returncode == 1 and "not_found" in missing.stderr
    assert group.stop() == 0


def test_submit_invalid_workflow_prints_every_problem(daemon, tmp_path):
    d = daemon()
    flow = tmp_path / "bad.yaml"
    flow.write_text("name: bad\nnodes:\n  - {id: start, type: start}\n  - {id: x, type: python}\n"
                    "  - {id: end, type: end}\nedges:\n  - {from: start, to: nowhere}\n")
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) >= 2, done.stderr
    for line in lines:
        file, line_no, col, rest = line.split(":", 3)
        assert file == str(flow) and int(line_no) >= 1 and int(col) >= 1, line
    unreachable = cli("ls", "--coordinator", f"tcp://127.0.0.1:{free_ports(1)[0]}", "--request-timeout", "0.5")
    assert unreachable.returncode == 3


def test_wait_exit_codes_failed_and_cancelled(daemon, workers, tmp_path):
    d = daemon()
    workers(d.workers, "--concurrency", "1")
    wait_for_workers(d.control, 1)
    failing = tmp_path / "fail.yaml"
    failing.write_text('name: failing\nnodes:\n  - {id: start, type: start}\n'
                       '  - {id: bad, type: python, call: "flowlib:fail", args: [nope]}\n  - {id: end, type: end}\n'
                       'edges:\n  - {from: start, to: bad}\n  - {from: bad, to: end}\n')
    done = cli("submit", str(failing), "--coordinator", d.control, "--wait", "--json")
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["status"] == "failed" and result["error"]["node_id"] == "bad"

    slow = tmp_path / "slow.yaml"
    slow.write_text('name: slow\nnodes:\n  - {id: start, type: start}\n'
                    '  - {id: wait, type: python, call: "flowlib:timed", args: [20]}\n  - {id: end, type: end}\n'
                    'edges:\n  - {from: start, to: wait}\n  - {from: wait, to: end}\n')
    waiting = subprocess.Popen([PYTHON, "-m", "goflow", "submit", str(slow), "--coordinator", d.control,
                                "--wait", "--json", "--events", d.events], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + 20
    eid = None
    while time.monotonic() < deadline and eid is None:
        listing = json.loads(cli("ls", "--coordinator", d.control, "--json", "--status", "running").stdout)
        eid = next((e["execution_id"] for e in listing if e["workflow"] == "slow"), None)
        time.sleep(0.1)
    assert eid, "the slow execution never showed up"
    cancelled = cli("cancel", eid, "--coordinator", d.control)
    assert cancelled.returncode == 0, cancelled.stderr
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130, err
    assert json.loads(out)["status"] == "cancelled"


def test_non_loopback_bind_needs_curve_or_insecure(tmp_path):
    ports = free_ports(3)
    refused = subprocess.run([PYTHON, "-m", "goflow.coordinator.daemon", "--workers-endpoint", f"tcp://0.0.0.0:{ports[0]}",
                              "--control-endpoint", f"tcp://127.0.0.1:{ports[1]}",
                              "--events-endpoint", f"tcp://127.0.0.1:{ports[2]}"],
                             capture_output=True, text=True, timeout=30, env=child_env())
    assert refused.returncode == 2
    assert "refusing to bind tcp://0.0.0.0" in refused.stderr
    d = Daemon(tmp_path, "--insecure", host="0.0.0.0").start()
    try:
        assert "INSECURE" in d.log()
        assert d.stop() == 0
    finally:
        d.stop(signal.SIGKILL)


def test_metrics_endpoint_is_under_the_same_bind_policy(tmp_path):
    """--metrics beyond loopback is refused like any other listener (it has no authentication)."""
    ports = free_ports(4)
    refused = subprocess.run([PYTHON, "-m", "goflow.coordinator.daemon", "--workers-endpoint", f"tcp://127.0.0.1:{ports[0]}",
                              "--control-endpoint", f"tcp://127.0.0.1:{ports[1]}",
                              "--events-endpoint", f"tcp://127.0.0.1:{ports[2]}", "--metrics", f"0.0.0.0:{ports[3]}"],
                             capture_output=True, text=True, timeout=30, env=child_env())
    assert refused.returncode == 2, refused.stderr
    assert f"refusing to bind the metrics endpoint 0.0.0.0:{ports[3]} without authentication" in refused.stderr
    from goflow.observability.metrics import Metrics
    from goflow.security import ExposureError

    metrics = Metrics()
    try:
        with pytest.raises(ExposureError, match="metrics endpoint"):
            metrics.serve(f"0.0.0.0:{ports[3]}")
        server = metrics.serve("127.0.0.1:0")
        server.stop()
    finally:
        metrics.close()


def test_busy_cpu_work_does_not_get_the_worker_declared_dead(daemon, workers, tmp_path):
    d = daemon("--liveness", "2")
    workers(d.workers, "--concurrency", "1")
    wait_for_workers(d.control, 1)
    flow = tmp_path / "spin.yaml"
    flow.write_text('name: spin\nnodes:\n  - {id: start, type: start}\n'
                    '  - {id: spin, type: python, call: "flowlib:spin", args: [5], output: loops}\n'
                    '  - {id: end, type: end, return: "${loops}"}\n'
                    'edges:\n  - {from: start, to: spin}\n  - {from: spin, to: end}\n')
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["result"] > 0
    with ControlClient(d.control) as client:
        execution = client.request("execution", execution_id=result["execution_id"])
    assert execution["nodes"]["spin"]["attempt"] == 1, "the node was retried: its worker was declared lost"
    assert "worker.lost" not in d.log()


def test_node_holding_the_gil_longer_than_the_liveness_completes_in_one_attempt(daemon, workers, tmp_path):
    """No thread of the worker's interpreter runs while the node holds the GIL, yet the worker
    must not be declared lost: liveness must not need that interpreter."""
    d = daemon("--liveness", "1")
    workers(d.workers, "--concurrency", "1", "--heartbeat-interval", "0.2")
    (joined,) = wait_for_workers(d.control, 1)
    flow = tmp_path / "gil.yaml"
    flow.write_text('name: gil\nnodes:\n  - {id: start, type: start}\n'
                    '  - {id: hold, type: python, call: "flowlib:hold_gil", args: [4], output: held}\n'
                    '  - {id: end, type: end, return: "${held}"}\n'
                    'edges:\n  - {from: start, to: hold}\n  - {from: hold, to: end}\n')
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait", "--json")
    assert done.returncode == 0, done.stdout + done.stderr + d.log()
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["result"] == "held"
    with ControlClient(d.control) as client:
        execution = client.request("execution", execution_id=result["execution_id"])
    assert execution["nodes"]["hold"]["attempt"] == 1, "the node was retried: its worker was declared lost"
    assert "worker.lost" not in d.log()
    assert _worker_names(d.control) == [joined["worker_id"]], "the worker was replaced"


def _worker_names(control: str) -> list[str]:
    with ControlClient(control, timeout=10.0) as client:
        return [w["worker_id"] for w in client.request("workers")["workers"]]


def test_stopped_worker_is_still_declared_lost(daemon, workers, tmp_path):
    """A worker process that is SIGSTOPped (truly hung) is caught by the liveness check."""
    d = daemon("--liveness", "1")
    group = workers(d.workers, "--concurrency", "1", "--heartbeat-interval", "0.2")
    (joined,) = wait_for_workers(d.control, 1)
    os.kill(joined["pid"], signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 30
        while joined["worker_id"] in _worker_names(d.control) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert joined["worker_id"] not in _worker_names(d.control)
        assert f"worker.lost {joined['worker_id']}: silent for" in d.log()
    finally:
        os.kill(joined["pid"], signal.SIGCONT)
    group.stop()


def test_sigterm_to_a_worker_finishes_what_it_holds_takes_nothing_new_costs_no_attempt(daemon, workers, tmp_path):
    """Graceful worker stop (SIGTERM to goflow-worker): the running node completes on the
    draining worker, later nodes go to another worker, no node spends a second attempt."""
    d = daemon("--liveness", "3")
    first = workers(d.workers, "--concurrency", "1", "--name", "first")
    wait_for_workers(d.control, 1)
    marker = tmp_path / "started"
    flow = tmp_path / "drain.yaml"
    flow.write_text(f"""\
name: drain
nodes:
  - {{id: start, type: start}}
  - {{id: slow, type: python, call: "flowlib:write_then_sleep", args: ["{marker}", 2], output: s,
      retry: {{max_attempts: 3, on: [python_error]}}}}
  - {{id: after, type: python, call: "flowlib:echo", args: [after], output: a}}
  - {{id: end, type: end, return: "${{a}}"}}
edges:
  - {{from: start, to: slow}}
  - {{from: slow, to: after}}
  - {{from: after, to: end}}
""")
    eid = cli("submit", str(flow), "--coordinator", d.control).stdout.strip()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), d.log()
    first.proc.send_signal(signal.SIGTERM)  # drain while "slow" runs
    workers(d.workers, "--concurrency", "1", "--name", "second")
    assert first.proc.wait(30) == 0, first.log()
    execution = wait_until_finished(d.control, eid)
    assert execution["status"] == "completed", (execution, d.log(), first.log())
    assert {node: run["attempt"] for node, run in execution["nodes"].items()
            if node in ("slow", "after")} == {"slow": 1, "after": 1}
    ran_on = {r["node_id"]: r["worker"] for r in execution["records"] if r["status"] == "completed"}
    assert ran_on["slow"] == "first-1" and ran_on["after"] == "second-1", ran_on


def _garbage(endpoint: str) -> None:
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    payloads = [[os.urandom(512), b"\xff" + b"\x00" * 8 + b"\x7f" + os.urandom(64)],  # not even ZMTP
                [b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00NULL" + b"\x00" * 16 + b"\x00" + b"\x00" * 31,
                 b"\x04\xff" + os.urandom(300)]]                                  # a greeting, then junk
    for chunks in payloads:
        try:
            with socket.create_connection((host, int(port)), timeout=2) as raw:
                for chunk in chunks:
                    raw.sendall(chunk)
                    time.sleep(0.05)
        except OSError:  # the daemon hanging up on us is the expected outcome
            pass


def test_garbage_on_every_socket_never_crashes_the_daemon(daemon, workers, tmp_path):
    metrics_port = free_ports(1)[0]
    d = daemon("--metrics", f"127.0.0.1:{metrics_port}")
    workers(d.workers, "--concurrency", "1")
    wait_for_workers(d.control, 1)
    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(d.workers)
        junk = [[b""], [b"\xc1"], [os.urandom(100)], [msgpack.packb([1, 2])], [msgpack.packb({"t": 5})],
                [msgpack.packb({"t": "ready", "v": 1, "credits": "many", "labels": [1]})],
                [msgpack.packb({"t": "ready", "v": "x"})], [msgpack.packb({"t": "result", "id": {"a": 1}})],
                [msgpack.packb({"t": "heartbeat"}), b"extra"], [msgpack.packb({"t": "bye"})],
                [b"a", b"b", b"c"], [msgpack.packb({"t": "result", "id": 2**63})]]
        for frames in junk:
            dealer.send_multipart(frames)
        control = ctx.socket(zmq.DEALER)
        control.setsockopt(zmq.LINGER, 0)
        control.connect(d.control)
        for frames in [[b""], [b"\xc1\xc1"], [msgpack.packb("op")], [msgpack.packb({"op": 7})],
                       [msgpack.packb({"op": "status", "execution_id": [1]})], [b"", b"x", b"y"],
                       [msgpack.packb({"op": "submit", "workflow": 5})],
                       [msgpack.packb({"op": "replay", "execution_id": "x", "from_eseq": -1})],
                       [msgpack.packb({"op": "submit", "workflow": "{{{", "variables": []})]]:
            control.send_multipart(frames)
        xsub = ctx.socket(zmq.XSUB)
        xsub.setsockopt(zmq.LINGER, 0)
        xsub.connect(d.events)
        for frame in [b"", b"\x07junk", b"\x01", b"\x00never-subscribed", os.urandom(200), b"\x01x" * 1000]:
            xsub.send(frame)
        for endpoint in (d.workers, d.control, d.events):
            _garbage(endpoint)
        # Every socket's garbage was seen, counted and exported (not a fixed wait).
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        counters = ("goflow_bad_frames_workers_total", "goflow_bad_frames_control_total",
                    "goflow_bad_frames_events_total")
        wait_until(lambda: all(scrape(url).get(name, 0) >= 1 for name in counters), "the garbage counters")
    finally:
        ctx.destroy(linger=0)
    assert d.alive()
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 11
    assert d.stop() == 0


def test_sigterm_drains_and_exits_0(daemon, workers, tmp_path):
    d = daemon("--grace", "10")
    workers(d.workers, "--concurrency", "1")
    wait_for_workers(d.control, 1)
    flow = tmp_path / "one.yaml"
    flow.write_text('name: one\nnodes:\n  - {id: start, type: start}\n'
                    '  - {id: work, type: python, call: "flowlib:timed", args: [1.5, w], output: w}\n'
                    '  - {id: end, type: end, return: "${w.value}"}\n'
                    'edges:\n  - {from: start, to: work}\n  - {from: work, to: end}\n')
    eid = cli("submit", str(flow), "--coordinator", d.control).stdout.strip()
    wait_until(lambda: running_nodes(d.control, eid) == ["work"], "the node to run")
    assert d.stop(signal.SIGTERM) == 0
    records = d.log_records()
    assert any("draining" in r["msg"] for r in records)
    drained = [r for r in records if "unfinished" in r]
    assert drained and drained[-1]["unfinished"] == [], "the running node should have finished within the grace"

    # A node longer than the grace: the execution is cancelled and logged as unfinished.
    d2 = daemon("--grace", "0.5")
    workers(d2.workers, "--concurrency", "1")
    wait_for_workers(d2.control, 1)
    slow = tmp_path / "slow.yaml"
    slow.write_text(flow.read_text().replace("[1.5, w]", "[30, w]"))
    eid = cli("submit", str(slow), "--coordinator", d2.control).stdout.strip()
    wait_until(lambda: running_nodes(d2.control, eid) == ["work"], "the node to run")
    assert d2.stop(signal.SIGTERM) == 0
    drained = [r for r in d2.log_records() if "unfinished" in r]
    assert drained[-1]["unfinished"] == [eid]


def test_coordinator_restart_workers_reconnect_and_monitor_sees_new_epoch(daemon, workers, tmp_path):
    from goflow.events.monitor import Monitor

    d = daemon()
    group = workers(d.workers, "--concurrency", "2", "--coordinator-liveness", "1.5")
    wait_for_workers(d.control, 2)
    monitor = Monitor(d.events, d.control, control_timeout=1.0)
    seen: list = []
    stop = threading.Event()

    def follow() -> None:  # ONE subscription across the restart (repair failures are counted, not raised)
        for event in monitor.subscribe(until=lambda event: stop.is_set()):
            seen.append(event)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    wait_until(lambda: monitor.stats["heartbeats"], "the subscriber's first heartbeat")
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait", "--json")
    assert done.returncode == 0
    first = json.loads(done.stdout)["execution_id"]
    wait_until(lambda: any(e.type == "execution.completed" and e.execution_id == first for e in seen),
               "the first execution's completion at the subscriber")
    old_epochs = {e.epoch for e in seen}
    assert d.stop(signal.SIGKILL) != 0
    d2 = daemon(ports=d.ports)
    wait_for_workers(d2.control, 2, timeout=30)
    done = cli("submit", str(flow), "--coordinator", d2.control, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not monitor.stats["epoch_changes"]:
        time.sleep(0.1)
    stop.set()
    thread.join(5)
    assert monitor.stats["epoch_changes"] >= 1
    assert {e.epoch for e in seen} - old_epochs, "no event of the new coordinator reached the subscriber"
    assert "lost the coordinator; reconnecting" in group.log()
    assert any(e.type == "execution.completed" for e in seen)
    monitor.close()


def test_db_records_submissions_and_events(daemon, workers, tmp_path):
    from goflow.history.store import Store

    db = tmp_path / "history.sqlite"
    d = daemon("--db", str(db))
    workers(d.workers, "--concurrency", "1")
    wait_for_workers(d.control, 1)
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    eid = json.loads(done.stdout)["execution_id"]
    assert d.stop() == 0
    store = Store(db, readonly=True)
    try:
        execution = store.get_execution(eid)
        assert execution["status"] == "completed"
        assert "flowlib:add" in str(execution)
    finally:
        store.close()

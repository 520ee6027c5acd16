"""CURVE keys, the authenticator, and a CURVE coordinator refusing what it must refuse."""

from __future__ import annotations

import re
import json
import logging
import shutil
import signal
import socket
import stat
import threading
import time

import pytest
import zmq

from goflow import security
from goflow.control.framing import ControlClient, ControlTimeout
from test_daemon import FLOW, Daemon, WorkerGroup, cli, wait_for_workers  # noqa: F401 (fixtures below)
from test_daemon import daemon, workers  # noqa: F401  pytest fixtures

pytestmark = pytest.mark.timeout(120)


def test_generate_and_load_keys(tmp_path):
    public_file, secret_file = security.generate_keypair(tmp_path / "keys", "alice")
    assert public_file.name == "alice.key" and secret_file.name == "alice.key_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert "secret-key" not in public_file.read_text()
    public, secret = security.load_secret(secret_file)
    assert len(public) == 40 and len(secret) == 40
    assert security.load_public(public_file) == public
    with pytest.raises(security.KeyFileError):
        security.load_secret(public_file)
    with pytest.raises(security.KeyFileError):
        security.load_public(tmp_path / "missing.key")
    with pytest.raises(FileExistsError):
        security.generate_keypair(tmp_path / "keys", "alice")
    server_public, _ = security.generate_keypair(tmp_path / "keys", "server")
    curve = security.client_curve(server_public, secret_file)
    assert curve == {"server_public": security.load_public(server_public), "public": public, "secret": secret}


def test_keys_generate_command(tmp_path):
    done = cli("keys", "generate", "bob", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bob.key").exists()
    assert stat.S_IMODE((tmp_path / "bob.key_secret").stat().st_mode) == 0o600
    again = cli("keys", "generate", "bob", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_authenticator_skips_bad_files_and_reloads(tmp_path, caplog):
    auth_dir = tmp_path / "authorized"
    security.generate_keypair(auth_dir, "a")
    (auth_dir / "broken.key").write_text("not a certificate")
    ctx = zmq.Context()
    try:
        with caplog.at_level(logging.INFO, logger="goflow.security"):
            auth = security.Authenticator(ctx, auth_dir)
        assert len(auth.names) == 1
        assert any("skipping" in r.getMessage() for r in caplog.records)
        security.generate_keypair(auth_dir, "b")
        assert auth.reload() == 2
        shutil.rmtree(auth_dir)
        assert auth.reload() == 2, "an unreadable directory must keep the previous keys"
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def keys(tmp_path):
    keydir, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()
    server_public, server_secret = security.generate_keypair(keydir, "server")
    paths = {"server_public": server_public, "server_secret": server_secret, "authorized": authorized}
    for name in ("worker", "client", "stranger", "latecomer"):
        public, secret = security.generate_keypair(keydir, name)
        paths[name] = secret
        if name in ("worker", "client"):
            shutil.copy(public, authorized / public.name)
    return paths


def _curve_args(keys):
    return ["--curve-secret-key", str(keys["server_secret"]), "--authorized-keys", str(keys["authorized"])]


def _client_keys(keys, name):
    return ["--curve-server-key", str(keys["server_public"]), "--curve-secret-key", str(keys[name])]


def _sub_receives(endpoint, curve, seconds=2.0) -> int:
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        if curve:
            sub.curve_serverkey, sub.curve_publickey, sub.curve_secretkey = (
                curve["server_public"], curve["public"], curve["secret"])
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        received, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sub.poll(100):
                sub.recv_multipart()
                received += 1
        return received
    finally:
        ctx.destroy(linger=0)


def test_curve_coordinator_admits_only_authorized_keys(daemon, workers, keys, tmp_path):  # noqa: F811
    d = daemon(*_curve_args(keys), host="0.0.0.0")
    good = security.client_curve(keys["server_public"], keys["client"])
    stranger = security.client_curve(keys["server_public"], keys["stranger"])
    local = d.control.replace("0.0.0.0", "127.0.0.1")
    events = d.events.replace("0.0.0.0", "127.0.0.1")
    worker_ep = d.workers.replace("0.0.0.0", "127.0.0.1")

    # workers: an unknown key never joins; an authorized one does.
    workers(worker_ep, "--concurrency", "1", "--name", "intruder", *_client_keys(keys, "stranger"))
    workers(worker_ep, "--concurrency", "1", "--name", "plain")
    workers(worker_ep, "--concurrency", "1", "--name", "trusted", *_client_keys(keys, "worker"))
    joined = wait_for_workers(local, 1, curve=good)
    stranger_key = security.load_secret(keys["stranger"])[0].decode()
    deadline = time.monotonic() + 30
    while f"refused CURVE client key {stranger_key} from 127.0.0.1 on the workers socket" not in d.log() \
            and time.monotonic() < deadline:
        time.sleep(0.05)  # the intruder tried and was refused (a wait on that event, not a fixed sleep)
    assert f"refused CURVE client key {stranger_key} from 127.0.0.1 on the workers socket" in d.log(), d.log()
    with ControlClient(local, curve=good) as client:
        names = [w["worker_id"] for w in client.request("workers")["workers"]]
    assert names == ["trusted-1"], names

    # control: unknown key and plaintext get no reply at all.
    with ControlClient(local, curve=stranger, timeout=1.0) as client, pytest.raises(ControlTimeout):
        client.request("list")
    with ControlClient(local, timeout=1.0) as client, pytest.raises(ControlTimeout):
        client.request("list")
    refused = cli("ls", "--coordinator", local, "--request-timeout", "1", *_client_keys(keys, "stranger"))
    assert refused.returncode == 3

    # events: heartbeats flow every second to the authorized subscriber only.
    assert _sub_receives(events, good) >= 1
    assert _sub_receives(events, stranger) == 0
    assert _sub_receives(events, None) == 0

    # The authorized client runs a workflow end to end (on the authorized worker).
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    done = cli("submit", str(flow), "--coordinator", local, "--events", events, "--wait", "--json",
               *_client_keys(keys, "client"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["result"] == 11
    assert result["variables"]["a_out"]["pid"] == joined[0]["pid"]

    # Refusals are logged with the public key only.
    stranger_public, stranger_secret = security.load_secret(keys["stranger"])
    log = d.log()
    assert stranger_public.decode() in log and "refused CURVE client key" in log
    assert stranger_secret.decode() not in log
    assert d.stop() == 0


def test_sighup_reload_admits_a_new_key(daemon, keys):  # noqa: F811
    d = daemon(*_curve_args(keys))
    latecomer = security.client_curve(keys["server_public"], keys["latecomer"])
    with ControlClient(d.control, curve=latecomer, timeout=1.0) as client, pytest.raises(ControlTimeout):
        client.request("list")
    shutil.copy(keys["latecomer"].with_suffix(".key"), keys["authorized"] / "latecomer.key")
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "added 1" not in d.log():
        time.sleep(0.05)
    with ControlClient(d.control, curve=latecomer, timeout=3.0) as client:
        assert client.request("list")["executions"] == []
    # ... and removing a key refuses it again for new connections.
    (keys["authorized"] / "latecomer.key").unlink()
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "removed 1" not in d.log():
        time.sleep(0.05)
    with ControlClient(d.control, curve=latecomer, timeout=1.0) as client, pytest.raises(ControlTimeout):
        client.request("list")
    assert d.alive() and d.stop() == 0


def test_local_workers_authenticate_with_the_coordinator_key(daemon, keys, tmp_path):  # noqa: F811
    d = daemon(*_curve_args(keys), "--local-workers", "2")
    good = security.client_curve(keys["server_public"], keys["client"])
    assert len(wait_for_workers(d.control, 2, curve=good)) == 2
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW)
    done = cli("submit", str(flow), "--coordinator", d.control, "--wait", "--json", *_client_keys(keys, "client"))
    assert done.returncode == 0, done.stderr
    assert d.stop() == 0


def test_role_directories_confine_keys_to_one_socket(daemon, workers, keys, tmp_path):  # noqa: F811
    """A dashboard's key (subscribers/) can watch but not submit; a worker's (workers/) can
    join but neither submit nor watch; a client's (clients/) can submit."""
    keydir = tmp_path / "role-keys"
    for role, name in (("subscribers", "watcher"), ("workers", "runner"), ("clients", "submitter")):
        public, secret = security.generate_keypair(keydir, name)
        (keys["authorized"] / role).mkdir(exist_ok=True)
        shutil.copy(public, keys["authorized"] / role / public.name)
        keys[name] = secret
    d = daemon(*_curve_args(keys))
    watcher = security.client_curve(keys["server_public"], keys["watcher"])
    runner = security.client_curve(keys["server_public"], keys["runner"])
    submitter = security.client_curve(keys["server_public"], keys["submitter"])

    assert _sub_receives(d.events, watcher) >= 1
    assert _sub_receives(d.events, runner) == 0
    for curve in (watcher, runner):
        with ControlClient(d.control, curve=curve, timeout=1.0) as client, pytest.raises(ControlTimeout):
            client.request("list")
    with ControlClient(d.control, curve=submitter, timeout=3.0) as client:
        assert client.request("list")["executions"] == []

    workers(d.workers, "--concurrency", "1", "--name", "role-runner", *_client_keys(keys, "runner"))
    workers(d.workers, "--concurrency", "1", "--name", "role-watcher", *_client_keys(keys, "watcher"))
    wait_for_workers(d.control, 1, curve=submitter)
    # The watcher's worker is refused on the workers socket, and the log names where its key is.
    watcher_key = security.load_public(keydir / "watcher.key").decode()

    def refusals() -> list[str]:
        return [line for line in d.log().splitlines()
                if f"refused CURVE client key {watcher_key}" in line and "on the workers socket" in line]

    deadline = time.monotonic() + 30
    while not refusals() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refusals(), d.log()
    assert (f"it is in {keys['authorized'] / 'subscribers'}/, which does not admit it on the workers socket; "
            f"to admit it there, put it in {keys['authorized'] / 'workers'}/ or {keys['authorized']}/") in refusals()[0]
    with ControlClient(d.control, curve=submitter) as client:
        names = [w["worker_id"] for w in client.request("workers")["workers"]]
    assert names == ["role-runner-1"], names
    assert d.stop() == 0


def test_reload_keys_control_op_admits_a_new_key(daemon, keys):  # noqa: F811
    d = daemon(*_curve_args(keys))
    client = security.client_curve(keys["server_public"], keys["client"])
    latecomer = security.client_curve(keys["server_public"], keys["latecomer"])
    shutil.copy(keys["latecomer"].with_suffix(".key"), keys["authorized"] / "latecomer.key")
    with ControlClient(d.control, curve=client, timeout=3.0) as admin:
        assert admin.request("reload_keys")["keys"] >= 3
    with ControlClient(d.control, curve=latecomer, timeout=3.0) as late:
        assert late.request("list")["executions"] == []
    assert d.stop() == 0


def _wait_for_lines(group: WorkerGroup, text: str, count: int, timeout: float = 30.0) -> str:
    """The supervisor's log once ``text`` appears ``count`` times in it (a wait on that state)."""
    deadline = time.monotonic() + timeout
    while group.log().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(group.log())
        time.sleep(0.05)
    return group.log()


def test_a_worker_whose_key_is_refused_says_so_once_and_joins_once_admitted(daemon, workers, keys):  # noqa: F811
    """The refused handshake is never retried by ZeroMQ: the worker must exit (77) instead of
    waiting for a coordinator it cannot reach, its supervisor say why and how to fix it (once,
    however many retries), and a key admitted later (SIGHUP) let the next retry join."""
    d = daemon(*_curve_args(keys))
    group = workers(d.workers, "--concurrency", "1", "--name", "refused", "--max-backoff", "1",
                    *_client_keys(keys, "stranger"))
    public_file = keys["stranger"].with_suffix(".key")
    stranger_key = security.load_secret(keys["stranger"])[0].decode()
    log = _wait_for_lines(group, "was refused by the coordinator", 3)   # three refused starts
    assert log.count(f"refused this worker's CURVE key {stranger_key} ({public_file})") == 1, log
    assert f"the coordinator at {d.workers} refused" in log and "--authorized-keys" in log, log
    assert "lost the coordinator" not in log, log       # it never had one: no misleading reason
    shutil.copy(public_file, keys["authorized"] / public_file.name)
    d.proc.send_signal(signal.SIGHUP)
    good = security.client_curve(keys["server_public"], keys["client"])
    joined = wait_for_workers(d.control, 1, curve=good, timeout=30)
    assert [w["worker_id"].split(".")[0] for w in joined] == ["refused-1"]
    assert group.stop() == 0


def test_a_worker_at_a_port_that_speaks_no_zmtp_says_so_instead_of_waiting_for_a_coordinator(workers):  # noqa: F811
    """A port that accepts and closes every connection (a wrong port, another service) fails
    each handshake with no reason given. The worker says what it did say for a CURVE
    mismatch, within a few seconds, instead of 'lost the coordinator' after the 10 s
    liveness window (it never had one)."""
    listener = socket.create_server(("127.0.0.1", 0))
    closing = threading.Event()

    def accept_and_close() -> None:
        while not closing.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connection.close()

    threading.Thread(target=accept_and_close, daemon=True).start()
    endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        group = workers(endpoint, "--concurrency", "1", "--name", "astray", "--max-backoff", "1")
        log = _wait_for_lines(group, "failed its handshake", 2)   # two failed starts
        assert log.count(f"the handshake with {endpoint} failed") == 1, log
        assert "not a goflow coordinator's workers endpoint" in log, log
        assert "lost the coordinator" not in log, log
        assert group.stop() == 0
    finally:
        closing.set()
        listener.close()


def test_a_worker_without_keys_at_a_curve_coordinator_says_which_side_lacks_them(daemon, workers, keys):  # noqa: F811
    d = daemon(*_curve_args(keys))
    group = workers(d.workers, "--concurrency", "1", "--name", "plain", "--max-backoff", "1")
    log = _wait_for_lines(group, "failed its handshake", 2)   # two failed starts
    assert log.count(f"the handshake with {d.workers} failed: the coordinator there requires CURVE: "
                     f"pass --curve-server-key") == 1, log
    assert "lost the coordinator" not in log, log
    assert group.stop() == 0



@pytest.mark.parametrize("flag,endpoint,exposed", [
    ("--publish", "tcp://0.0.0.0:{port}", True), ("--control", "tcp://[::]:{port}", True),
    ("--publish", "tcp://*:{port}", True), ("--control", "tcp://127.0.0.1:{port}", False)])
def test_goflow_run_refuses_to_listen_beyond_loopback_and_runs_nothing(tmp_path, free_ports, flag, endpoint, exposed):
    """goflow run has no authentication: a --publish/--control beyond loopback would let anyone who
    reaches the port submit code to its workers (the control socket accepts ``submit``). The
    loopback case runs the same flow, so the marker proves what the refusal prevented."""
    marker = tmp_path / "ran"
    (tmp_path / "flow.yaml").write_text(
        "name: exposed\nnodes:\n  - {id: start, type: start}\n"
        f"  - {{id: touch, type: python, call: \"flowlib:write_file\", args: [\"{marker}\", x]}}\n"
        "  - {id: end, type: end}\nedges:\n  - {from: start, to: touch}\n  - {from: touch, to: end}\n")
    endpoint = endpoint.format(port=free_ports(1)[0])
    proc = cli("run", str(tmp_path / "flow.yaml"), "--workers", "1", "--no-history", "--linger", "0", flag, endpoint)
    if not exposed:
        assert proc.returncode == 0 and marker.exists(), proc.stdout + proc.stderr
        return
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"refusing to bind {endpoint} without authentication" in proc.stderr
    assert "127.0.0.1" in proc.stderr and "goflow-coordinator" in proc.stderr  # the fix
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_the_python_api_refuses_an_exposed_endpoint_before_starting_anything(write_flow, free_ports):
    import goflow

    flow = write_flow(FLOW)
    before = set(threading.enumerate())
    with pytest.raises(security.ExposureError, match="refusing to bind tcp://0.0.0.0"):
        goflow.start(flow, publish=[f"tcp://0.0.0.0:{free_ports(1)[0]}"], history=False)
    assert {t for t in threading.enumerate() if t not in before and t.is_alive()} == set()


@pytest.mark.parametrize("endpoint, problem", [
    ("nonsense", "must look like tcp://HOST:PORT"),
    ("tcp://", "must look like tcp://HOST:PORT"),
    ("foo://x", "unknown transport 'foo'"),
    ("tcp://127.0.0.1", "has no port"),
    ("tcp://127.0.0.1:abc", "port 'abc' must be a number"),
    ("tcp://127.0.0.1:70000", "port '70000' must be a number"),
])
def test_a_malformed_endpoint_is_named_with_what_is_wrong(endpoint, problem):
    from goflow.security import endpoint_host

    with pytest.raises(ValueError, match=re.escape(problem)):
        endpoint_host(endpoint)
    assert endpoint_host("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert endpoint_host("tcp://*:*") == "*" and endpoint_host("tcp://[::1]:1") == "::1"
    assert endpoint_host("ipc:///tmp/x") is None

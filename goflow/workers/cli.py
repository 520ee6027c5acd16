"""``goflow-worker``: worker processes connected to a coordinator, under a supervisor.

``goflow-worker --connect tcp://HOST:5557 --concurrency N`` starts N worker processes
(each one ``python -m goflow.workers --single ...``, running one task at a time) and keeps
them running: a child that exits is restarted after an exponential backoff (0.5 s doubling
up to ``--max-backoff``, reset once a child stayed up for a minute). Exit code 75 means the
child heard nothing from the coordinator for ``--coordinator-liveness`` seconds (the
coordinator restarted or the network broke): it is restarted at once so it reconnects.
SIGTERM/SIGINT stop the children cleanly and exit 0: SIGTERM to each, which drains it (the
coordinator sends it nothing new; it finishes every task it holds, says goodbye; no node
loses an attempt); SIGKILL after ``--stop-grace``.

``python -m goflow.workers ...`` (how the embedded coordinator starts local workers) and
``--single`` run one worker process in the foreground, without a supervisor.
"""

from __future__ import annotations

from goflow import __version__

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from goflow import protocol
from goflow.supervisor import EXIT_KEY_REFUSED, EXIT_SECURITY_MISMATCH, WorkerProcesses


log = logging.getLogger("goflow.worker")


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"label {part!r} must look like key=value")
        labels[key.strip()] = value.strip()
    return labels


def _worker_name(text: str) -> str:
    """A --name the coordinator will accept with a process number appended (NAME-12)."""
    if not protocol.WORKER_NAME.fullmatch(f"{text}-1000"):
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: 1-123 characters of A-Z a-z 0-9 . _ : @ -")
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _endpoint_problem(endpoint: str, *, probe: bool) -> str | None:
    """Why --connect ``endpoint`` cannot work (None when it can): the check the coordinator
    applies to its own endpoints (goflow.security), then, with ``probe``, ZeroMQ's (it refuses
    e.g. ``foo://x`` or a port that is no number). Nothing is sent: the peer need not be up."""
    import zmq

    from goflow.security import endpoint_host

    try:
        endpoint_host(endpoint)
    except ValueError as exc:
        return str(exc)
    if not probe:
        return None
    context = zmq.Context()
    try:
        with context.socket(zmq.DEALER) as socket_:
            socket_.setsockopt(zmq.LINGER, 0)
            socket_.connect(endpoint)
    except zmq.ZMQError as exc:
        return str(exc)
    finally:
        context.term()
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="goflow-worker", description="Run goflow worker processes connected to a "
                                                                       "coordinator (goflow-coordinator).")
    parser.add_argument("--version", action="version", version=f"goflow-worker {__version__}")
    parser.add_argument("--connect", required=True, metavar="ENDPOINT",
                        help="the coordinator's workers endpoint, e.g. tcp://host:5557")
    parser.add_argument("--concurrency", type=_positive_int, default=None, metavar="N",
                        help="worker processes to run (default: CPU count); each runs one task at a time")
    parser.add_argument("--name", type=_worker_name, help="worker name prefix (default: the host name); processes "
                                                          "are NAME-1, NAME-2... (A-Z a-z 0-9 . _ : @ -)")
    parser.add_argument("--labels", type=_labels, default={}, metavar="K=V,...",
                        help="labels matched by nodes' worker selectors")
    parser.add_argument("--curve-server-key", metavar="FILE",
                        help="the coordinator's public key file (NAME.key); env GOFLOW_CURVE_SERVER_KEY")
    parser.add_argument("--curve-secret-key", metavar="FILE",
                        help="this worker's key pair (NAME.key_secret); env GOFLOW_CURVE_SECRET_KEY")
    parser.add_argument("--credits", type=_positive_int, default=protocol.DEFAULT_CREDITS,
                        help=f"tasks each process accepts in advance (default {protocol.DEFAULT_CREDITS}; "
                             f"only tasks measured short are queued behind another)")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, metavar="SECONDS",
                        help="worker -> coordinator heartbeats (default 0.5)")
    parser.add_argument("--coordinator-liveness", type=float, default=10.0, metavar="SECONDS",
                        help="a process that hears nothing from the coordinator this long reconnects (default 10)")
    parser.add_argument("--max-backoff", type=float, default=30.0, metavar="SECONDS",
                        help="cap of the restart backoff (default 30)")
    parser.add_argument("--stop-grace", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long a running task may finish before SIGKILL (default 30)")
    parser.add_argument("--status-file", metavar="PATH",
                        help="write the supervisor's status (JSON) here every second (for health probes)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    return parser


def _curve(args: argparse.Namespace) -> dict | None:
    from goflow.security import client_curve_from

    try:
        return client_curve_from(args.curve_server_key, args.curve_secret_key)
    except ValueError as exc:
        raise SystemExit(f"goflow-worker: {exc}") from None


def _invoked_as_module() -> bool:
    """``python -m goflow.workers``: the embedded coordinator's LocalWorkerPool wants one process."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == "goflow.workers.__main__"


def run_single(args: argparse.Namespace) -> int:
    """One worker process in the foreground. SIGTERM: drain (finish what it holds), say goodbye, exit 0."""
    from goflow.workers.lifetime import die_with_parent
    from goflow.workers.runtime import Worker

    curve = _curve(args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the supervisor / coordinator
    die_with_parent()
    worker = Worker(args.connect, worker_id=args.name, credits=args.credits, labels=args.labels,
                    heartbeat_interval=args.heartbeat_interval, coordinator_liveness=args.coordinator_liveness,
                    curve=curve)
    signal.signal(signal.SIGTERM, lambda signum, frame: worker.drain())
    return worker.run()


# -- supervisor -------------------------------------------------------------------------------
class Supervisor:
    """``goflow-worker``: keep ``count`` worker processes running until SIGTERM/SIGINT."""

    def __init__(self, args: argparse.Namespace, count: int):
        self.args = args
        self.count = count
        self.processes = WorkerProcesses(count, self.command, prefix=args.name or socket.gethostname(),
                                         max_backoff=args.max_backoff, log=log)
        self.stopping = False
        self.stop_signal: int | None = None

    def command(self, name: str) -> list[str]:
        args = self.args
        command = [sys.executable, "-m", "goflow.workers", "--single", "--connect", args.connect,
                   "--name", name, "--credits", str(args.credits),
                   "--heartbeat-interval", str(args.heartbeat_interval),
                   "--coordinator-liveness", str(args.coordinator_liveness)]
        if args.labels:
            command += ["--labels", ",".join(f"{k}={v}" for k, v in args.labels.items())]
        server = args.curve_server_key or os.environ.get("GOFLOW_CURVE_SERVER_KEY")
        secret = self._secret_key()
        if server and secret:
            command += ["--curve-server-key", os.path.abspath(server), "--curve-secret-key", os.path.abspath(secret)]
        return command

    def _secret_key(self) -> str | None:
        """This worker's key pair file: the option, else ``GOFLOW_CURVE_SECRET_KEY``."""
        return self.args.curve_secret_key or os.environ.get("GOFLOW_CURVE_SECRET_KEY")

    def _refusal_hint(self) -> str:
        """What to do when the coordinator refuses our key (told once: every retry would repeat it)."""
        from goflow.security import PUBLIC_SUFFIX, SECRET_SUFFIX, load_secret

        secret = self._secret_key() or ""
        public_file = secret[: -len(SECRET_SUFFIX)] + PUBLIC_SUFFIX if secret.endswith(SECRET_SUFFIX) else None
        key = load_secret(secret)[0].decode() if secret else "?"
        return (f"the coordinator at {self.args.connect} refused this worker's CURVE key {key}"
                f"{f' ({public_file})' if public_file else ''}: copy that public key file into the "
                f"coordinator's --authorized-keys directory (or its workers/ subdirectory) and send the "
                f"coordinator SIGHUP to re-read it; the workers retry with backoff (at most --max-backoff "
                f"{self.args.max_backoff:g}s) until it admits them")

    def _mismatch_hint(self) -> str:
        """What to do when the handshake fails on the mechanism (told once, as the refusal)."""
        keyed = bool(self._secret_key())
        fix = ("the coordinator there runs without CURVE: drop --curve-server-key and --curve-secret-key, "
               "or start it with --curve-secret-key and --authorized-keys" if keyed else
               "the coordinator there requires CURVE: pass --curve-server-key (its public key file) and "
               "--curve-secret-key (this worker's key pair, authorized there)")
        return (f"the handshake with {self.args.connect} failed: {fix} (or it is not a goflow coordinator's "
                f"workers endpoint); the workers retry with backoff")

    def _signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_signal = signum
        else:  # a second signal: stop waiting
            self.processes.kill()

    def write_status(self) -> None:
        path = self.args.status_file
        if not path:
            return
        status = {"pid": os.getpid(), "ts": time.time(), "connect": self.args.connect,
                  "restarts": self.processes.restarts,
                  "children": [{"name": c.name, "pid": c.process.pid if c.process else None,
                                "alive": bool(c.process and c.process.poll() is None)}
                               for c in self.processes.children]}
        tmp = f"{path}.tmp"
        try:
            Path(tmp).write_text(json.dumps(status))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", path, exc)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        log.info("supervising %d worker process(es) connected to %s", self.count, self.args.connect,
                 extra={"fields": {"concurrency": self.count, "connect": self.args.connect}})
        self.processes.start()
        next_status = 0.0
        hints = {EXIT_KEY_REFUSED: self._refusal_hint, EXIT_SECURITY_MISMATCH: self._mismatch_hint}
        while not self.stopping:
            for _, code in self.processes.poll():
                hint = hints.pop(code, None)   # each handshake failure's fix is told once, not per retry
                if hint is not None:
                    log.error("%s", hint())
            now = time.monotonic()
            if now >= next_status:
                self.write_status()
                next_status = now + 1.0
            time.sleep(0.1)
        return self.shutdown()

    def shutdown(self) -> int:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "stop"
        log.info("%s: stopping %d worker process(es) (grace %gs)", name, len(self.processes.alive()),
                 self.args.stop_grace)
        self.processes.stop(self.args.stop_grace)
        if self.args.status_file:
            try:
                os.unlink(self.args.status_file)
            except OSError:
                pass
        log.info("stopped")
        return 0


def _setup_logging(fmt: str) -> None:
    from goflow.logging_setup import setup_logging

    setup_logging(fmt)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    single = args.single or _invoked_as_module()
    # Checked once here, not in every child the supervisor would restart (a single process
    # skips ZeroMQ's own check: its endpoint comes from a supervisor or a coordinator).
    problem = _endpoint_problem(args.connect, probe=not single)
    if problem:
        parser.error(f"argument --connect: {problem}")
    if single:
        try:
            return run_single(args)
        except KeyboardInterrupt:
            return 130
    _setup_logging(args.log_format)
    _curve(args)  # fail fast on bad key files, before any child starts
    count = args.concurrency or os.cpu_count() or 1
    return Supervisor(args, count).run()


if __name__ == "__main__":
    sys.exit(main())

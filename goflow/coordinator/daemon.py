"""``goflow-coordinator``: the coordinator as a long-running service (docs/deployment.md).

Binds three sockets: workers (ROUTER, where ``goflow-worker`` connects), events (XPUB,
``goflow watch`` / Monitor) and control (ROUTER, ``goflow submit/status/cancel/ls``). By
default all on 127.0.0.1 (ports 5557, 5556, 5555). Binding anything that is not loopback
requires CURVE (``--curve-secret-key`` + ``--authorized-keys``) or an explicit
``--insecure``.

Signals: SIGTERM/SIGINT drain (no new executions, running nodes get ``--grace`` seconds,
whatever is still running is cancelled and logged) and exit 0; SIGHUP re-reads the
authorized-keys directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from goflow import __version__
from goflow.logging_setup import setup_logging
from goflow.security import ExposureError, check_endpoint_exposure, is_loopback_endpoint

DEFAULT_CONTROL = "tcp://127.0.0.1:5555"
DEFAULT_EVENTS = "tcp://127.0.0.1:5556"
DEFAULT_WORKERS = "tcp://127.0.0.1:5557"
DEFAULT_GRACE = 30.0
DEFAULT_LIVENESS = 5.0

log = logging.getLogger("goflow.coordinator.daemon")
PRUNE_INTERVAL_S = 3600.0


# -- arguments ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goflow-coordinator",
        description="Run the goflow coordinator as a service: workers connect to it, clients submit to it.")
    parser.add_argument("--version", action="version", version=f"goflow-coordinator {__version__}")
    parser.add_argument("--workers-endpoint", default=DEFAULT_WORKERS, metavar="ENDPOINT",
                        help=f"where goflow-worker processes connect (default {DEFAULT_WORKERS})")
    parser.add_argument("--events-endpoint", action="append", default=None, metavar="ENDPOINT",
                        help=f"where events are published; repeatable (default {DEFAULT_EVENTS})")
    parser.add_argument("--control-endpoint", action="append", default=None, metavar="ENDPOINT",
                        help=f"where control requests are served; repeatable (default {DEFAULT_CONTROL})")
    parser.add_argument("--db", metavar="PATH", help="record submissions and events in this SQLite file; on "
                                                     "start, resume the executions it holds unfinished")
    parser.add_argument("--sndhwm", type=int, default=None, metavar="EVENTS",
                        help="events queued per subscriber before the publisher drops (default 10000; "
                             "subscribers repair drops from the replay log)")
    parser.add_argument("--progress-interval", type=float, default=0.1, metavar="SECONDS",
                        help="at most one progress.update per execution this often (default 0.1)")
    parser.add_argument("--max-value-bytes", type=int, default=None, metavar="BYTES",
                        help="larger values in events become $omitted markers (default 4096)")
    parser.add_argument("--keep-days", type=float, default=None, metavar="DAYS",
                        help="with --db: delete executions finished more than DAYS ago (at start, then hourly)")
    parser.add_argument("--metrics", metavar="ADDRESS",
                        help="serve Prometheus metrics on ADDRESS, e.g. 127.0.0.1:9464")
    parser.add_argument("--http", metavar="HOST:PORT",
                        help="serve the live web dashboard and its HTTP API on HOST:PORT, e.g. 127.0.0.1:8080 "
                             "(other than loopback needs --http-token or --http-token-file)")
    from goflow.web.server import add_token_arguments

    add_token_arguments(parser)
    parser.add_argument("--otlp-endpoint", metavar="URL", default=None,
                        help="export OpenTelemetry traces over OTLP/HTTP to URL (a trace per execution; "
                             "default $OTEL_EXPORTER_OTLP_ENDPOINT, else off)")
    parser.add_argument("--local-workers", type=int, default=0, metavar="N",
                        help="also run N worker processes on this machine (default 0)")
    parser.add_argument("--curve-secret-key", metavar="FILE",
                        help="the coordinator's CURVE key pair (NAME.key_secret, from `goflow keys generate`)")
    parser.add_argument("--authorized-keys", metavar="DIR",
                        help="directory of client public keys (*.key) admitted on every socket")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding non-loopback addresses without CURVE (anyone who can reach the "
                             "ports can run code on the workers)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="stderr log format (json: one object per line)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="SECONDS",
                        help=f"on SIGTERM, how long running nodes may finish (default {DEFAULT_GRACE:g})")
    parser.add_argument("--liveness", type=float, default=DEFAULT_LIVENESS, metavar="SECONDS",
                        help=f"declare a worker lost after this long without a heartbeat "
                             f"(default {DEFAULT_LIVENESS:g})")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="SECONDS",
                        help="coordinator heartbeats to workers and subscribers (default 1)")
    return parser


def check_args(args: argparse.Namespace) -> list[str]:
    """Configuration errors (empty when fine). Fills default endpoints."""
    errors = []
    args.events_endpoint = args.events_endpoint or [DEFAULT_EVENTS]
    args.control_endpoint = args.control_endpoint or [DEFAULT_CONTROL]
    endpoints = [args.workers_endpoint, *args.events_endpoint, *args.control_endpoint]
    exposed = []
    for endpoint in endpoints:
        try:
            if not is_loopback_endpoint(endpoint):
                exposed.append(endpoint)
        except ValueError as exc:
            errors.append(str(exc))
    if bool(args.curve_secret_key) != bool(args.authorized_keys):
        errors.append("--curve-secret-key and --authorized-keys go together")
    elif args.authorized_keys and not os.path.isdir(args.authorized_keys):
        errors.append(f"--authorized-keys {args.authorized_keys}: not a directory")
    for endpoint in exposed:
        try:
            check_endpoint_exposure(endpoint, protected=bool(args.curve_secret_key) or args.insecure,
                                    remedy="give --curve-secret-key and --authorized-keys, or --insecure to accept the risk")
        except ExposureError as exc:
            errors.append(str(exc))
    if args.metrics:
        from goflow.observability.metrics import check_metrics_exposure

        try:
            check_metrics_exposure(args.metrics, insecure=args.insecure)
        except ValueError as exc:
            errors.append(str(exc))
    if args.local_workers < 0:
        errors.append("--local-workers must be >= 0")
    if args.grace < 0 or args.liveness <= 0 or args.heartbeat_interval <= 0:
        errors.append("--grace must be >= 0, --liveness and --heartbeat-interval > 0")
    args.exposed = exposed
    if args.keep_days is not None and not args.db:
        errors.append("--keep-days needs --db (it prunes the history store)")
    args.http_token_value = None
    if args.http:
        from goflow.web.server import AddressError, parse_address, read_token
        from goflow.web.server import check_exposure as check_http_exposure

        try:
            args.http_token_value = read_token(args.http_token, args.http_token_file)
            check_http_exposure(parse_address(args.http)[0], args.http_token_value)
        except AddressError as exc:
            errors.append(str(exc))
    return errors


def connectable(endpoint: str) -> str:
    """An endpoint this machine can connect to for one it binds (``*`` and ``0.0.0.0`` -> loopback)."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard):]
    return endpoint


def _start_gateway(args: argparse.Namespace) -> Any:
    """``--http``: the dashboard in its own process, fronting this daemon (submit and cancel)."""
    from goflow.web.server import GatewayProcess

    gateway = GatewayProcess(args.http, connectable(args.events_endpoint[0]),
                             connectable(args.control_endpoint[0]), token=args.http_token_value, db=args.db,
                             allow_control=True, curve_secret_key=args.curve_secret_key)
    url = gateway.start()
    log.info("dashboard: %s", url, extra={"fields": {"dashboard": url}})
    return gateway


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    errors = check_args(args)
    if errors:
        for error in errors:
            log.error(error)
        return 2
    if args.exposed and not args.curve_secret_key:
        log.warning("INSECURE: %s bound without authentication or encryption; anyone who can reach these ports "
                    "can submit workflows and run code on the workers", ", ".join(args.exposed),
                    extra={"fields": {"endpoints": args.exposed}})

    import zmq

    from goflow import security

    context = zmq.Context()
    authenticator = None
    curve = None
    try:
        if args.curve_secret_key:
            curve = security.server_curve(args.curve_secret_key)
            authenticator = security.Authenticator(context, args.authorized_keys, extra_keys=[curve["public"]])
            authenticator.start()
    except (security.KeyFileError, OSError) as exc:
        log.error("cannot load keys: %s", exc)
        context.destroy(linger=0)
        return 2

    from goflow.coordinator.runtime import Runtime
    from goflow.errors import GoflowError

    secret_file = args.curve_secret_key
    try:
        runtime = Runtime(
            coordinator={"workers_endpoint": args.workers_endpoint, "event_endpoints": args.events_endpoint,
                         "control_endpoints": args.control_endpoint, "curve": curve,
                         "worker_liveness": args.liveness, "heartbeat_interval": args.heartbeat_interval,
                         "sndhwm": args.sndhwm, "progress_interval": args.progress_interval,
                         **({"max_value_bytes": args.max_value_bytes} if args.max_value_bytes else {})},
            db=args.db, metrics=args.metrics, insecure=args.insecure, otlp_endpoint=args.otlp_endpoint, context=context,
            local_workers=args.local_workers or 0,
            # With CURVE, local workers authenticate with the coordinator's own key pair.
            pool={"extra_args": ["--curve-server-key", secret_file, "--curve-secret-key", secret_file]
                  if secret_file else []})
    except (zmq.ZMQError, OSError, ValueError, GoflowError) as exc:
        log.error("cannot start: %s" if isinstance(exc, GoflowError) else "cannot bind: %s", exc)
        if authenticator is not None:
            authenticator.stop()
        context.destroy(linger=0)
        return 2
    coordinator, store = runtime.coordinator, runtime.store
    if authenticator is not None:
        def reload_keys(request: dict) -> dict:
            """Control op ``reload_keys``: re-read the authorized keys (as SIGHUP does)."""
            return {"keys": authenticator.reload()}

        coordinator.control.register("reload_keys", reload_keys)

    stop = threading.Event()
    received: list[int] = []

    def on_stop(signum: int, frame: Any) -> None:
        received.append(signum)
        stop.set()

    def on_hup(signum: int, frame: Any) -> None:
        coordinator.call_soon(_reload_servers(coordinator))
        if authenticator is None:
            log.info("SIGHUP: no authorized keys to reload (CURVE is off)")
            return
        threading.Thread(target=authenticator.reload, name="goflow-reload-keys", daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)

    runtime.start()
    gateway = None
    exit_code = 0
    if args.http:
        try:
            gateway = _start_gateway(args)
        except RuntimeError as exc:
            log.error("%s", exc)
            exit_code = 2
            stop.set()
    if store is not None:
        from goflow.coordinator.recovery import recover

        recovery = recover(coordinator, store)
        if recovery.resumed or recovery.failed:
            log.info("recovery: %d execution(s) resumed, %d could not be resumed", len(recovery.resumed),
                     len(recovery.failed), extra={"fields": {"resumed": recovery.resumed,
                                                             "unresumable": recovery.failed}})
    log.info("coordinator ready: workers %s, events %s, control %s%s", coordinator.workers_endpoint,
             ", ".join(args.events_endpoint), ", ".join(args.control_endpoint),
             " (CURVE)" if curve else "",
             extra={"fields": {"epoch": coordinator.epoch, "workers_endpoint": coordinator.workers_endpoint,
                               "events_endpoints": args.events_endpoint,
                               "control_endpoints": args.control_endpoint, "curve": bool(curve),
                               "pid": os.getpid()}})
    next_prune = time.monotonic()
    while not stop.wait(0.5):
        if store is not None and args.keep_days is not None and time.monotonic() >= next_prune:
            next_prune = time.monotonic() + PRUNE_INTERVAL_S
            try:
                pruned = store.prune(args.keep_days)
                if pruned:
                    log.info("pruned %d execution(s) older than %g days", pruned, args.keep_days)
            except Exception:
                log.exception("pruning the history failed")

    signame = signal.Signals(received[0]).name if received else "stop"
    log.info("%s: draining (grace %gs)", signame, args.grace, extra={"fields": {"grace": args.grace}})
    started = time.monotonic()
    unfinished: list[str] = []
    try:
        unfinished = coordinator.drain(args.grace)
    except Exception:
        log.exception("drain failed")
    if unfinished:
        log.warning("%d execution(s) unfinished at shutdown, cancelled: %s", len(unfinished), ", ".join(unfinished),
                    extra={"fields": {"unfinished": unfinished}})
    else:
        log.info("drained in %.2fs: nothing unfinished", time.monotonic() - started,
                 extra={"fields": {"unfinished": []}})
    try:
        if gateway is not None:
            gateway.stop()
        runtime.stop()
    except Exception:
        log.exception("stopping failed")
    finally:
        if authenticator is not None:
            authenticator.stop()
        context.destroy(linger=0)
    log.info("coordinator stopped")
    return exit_code


def _reload_servers(coordinator: Any) -> Callable[[], None]:
    """A reactor call that re-reads the MCP server registry (SIGHUP), logging the outcome."""

    def reload() -> None:
        try:
            log.info("SIGHUP: %d registered MCP server(s)", coordinator.servers.reload())
        except Exception as exc:  # a broken servers.yaml keeps the previous registry
            log.error("SIGHUP: cannot reload the MCP server registry: %s", exc)

    return reload


if __name__ == "__main__":
    sys.exit(main())

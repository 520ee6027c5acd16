"""Client commands for a running ``goflow-coordinator``: submit, status, cancel, ls, workers, keys.

Every command takes ``--coordinator ENDPOINT`` (the control endpoint; env
``GOFLOW_COORDINATOR``, default tcp://127.0.0.1:5555) and, for a CURVE coordinator,
``--curve-server-key FILE --curve-secret-key FILE`` (env ``GOFLOW_CURVE_SERVER_KEY`` /
``GOFLOW_CURVE_SECRET_KEY``).

Exit codes: 0 ok (with ``--wait``: completed), 1 failed / timed out / not found,
2 usage or invalid workflow, 3 the coordinator cannot be reached (or refused the key),
4 (with ``--wait``) completed but its history could not be recorded completely,
130 cancelled (with ``--wait``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from goflow.cli.common import (LISTED_STATUSES, parse_vars, positive_seconds, print_problems, string_variables,
                               time_text)
from goflow.states import TERMINAL_STATUSES

DEFAULT_COORDINATOR = "tcp://127.0.0.1:5555"
EXIT_UNREACHABLE = 3
PROBE_TIMEOUT_S = 2.0
"""How long the connect check before the first request may take (a refused port answers at once)."""


# -- connection options ---------------------------------------------------------------------
def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", metavar="ENDPOINT", default=None,
                        help=f"the coordinator's control endpoint (env GOFLOW_COORDINATOR; default "
                             f"{DEFAULT_COORDINATOR})")
    parser.add_argument("--curve-server-key", metavar="FILE", default=None,
                        help="the coordinator's public key file (env GOFLOW_CURVE_SERVER_KEY)")
    parser.add_argument("--curve-secret-key", metavar="FILE", default=None,
                        help="your key pair file, NAME.key_secret (env GOFLOW_CURVE_SECRET_KEY)")
    parser.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for each reply from the coordinator (default 10)")


class UsageError(Exception):
    pass


def _endpoint(args: argparse.Namespace) -> str:
    return args.coordinator or os.environ.get("GOFLOW_COORDINATOR") or DEFAULT_COORDINATOR


def _curve(args: argparse.Namespace) -> dict | None:
    from goflow.security import client_curve_from

    try:
        return client_curve_from(args.curve_server_key, args.curve_secret_key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _client(args: argparse.Namespace):
    from goflow.control.framing import ControlClient

    return ControlClient(_endpoint(args), timeout=args.request_timeout, curve=_curve(args))


def _unreachable(command: str, args: argparse.Namespace, exc: Exception) -> int:
    hint = " (is it running? with CURVE, is your public key in its authorized keys?)"
    print(f"goflow {command}: no reply from the coordinator at {_endpoint(args)}{hint}: {exc}", file=sys.stderr)
    return EXIT_UNREACHABLE


def _listening(endpoint: str) -> str | None:
    """Why nothing can answer at ``endpoint`` (None when something listens, or when this
    cannot be told without a request). ZeroMQ would wait for a peer that never comes; a
    plain connect tells at once."""
    import socket

    scheme, _, address = endpoint.partition("://")
    if scheme == "ipc":
        return None if os.path.exists(address) else f"no socket file {address}"
    if scheme != "tcp":
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            return None
    except ValueError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _run(command: str, args: argparse.Namespace, body) -> int:
    from goflow.control.framing import ControlError, ControlTimeout

    try:
        client = _client(args)
    except UsageError as exc:
        print(f"goflow {command}: {exc}", file=sys.stderr)
        return 2
    problem = _listening(_endpoint(args))
    if problem is not None:
        client.close()
        print(f"goflow {command}: no coordinator at {_endpoint(args)} ({problem}); start one with "
              f"goflow-coordinator, or point --coordinator / GOFLOW_COORDINATOR at it", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        return body(client)
    except ControlTimeout as exc:
        return _unreachable(command, args, exc)
    except ControlError as exc:
        print(f"goflow {command}: {exc.type}: {exc.message}", file=sys.stderr)
        return 1 if exc.type == "not_found" else 2
    finally:
        client.close()


# -- submit ---------------------------------------------------------------------------------
def _print_problems(problems: list[dict], file: str) -> None:
    from goflow.language.problems import Problem

    for p in problems:
        try:
            problem = Problem(**{k: p.get(k) for k in ("file", "line", "column", "severity", "message", "node")})
            print(str(problem), file=sys.stderr)
        except TypeError:
            print(f"{file}:{p.get('line', 0)}:{p.get('column', 0)}: {p.get('severity', 'error')}: "
                  f"{p.get('message')}", file=sys.stderr)


def _wait_polling(client: Any, execution_id: str) -> str:
    from goflow.control.framing import ControlTimeout

    delay, misses = 0.05, 0
    while True:
        try:
            status = client.request("status", execution_id=execution_id).get("status")
            misses = 0
        except ControlTimeout:
            misses += 1
            if misses >= 3:
                raise
            continue
        if status in TERMINAL_STATUSES:
            return status
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)


def _wait_events(client: Any, args: argparse.Namespace, execution_id: str, started: float) -> str:
    """Follow the execution's events (printing node lines with --watch) until its terminal event."""
    from goflow.cli.run_display import plain_line
    from goflow.events.filter import EventFilter
    from goflow.events.monitor import Monitor

    monitor = Monitor(args.events, _endpoint(args), curve=_curve(args), control_timeout=args.request_timeout)
    show = args.watch and not args.json
    since: int | str = "start"
    try:
        while True:
            stream = monitor.subscribe(EventFilter(executions=[execution_id]), reliable=True, since=since,
                                       timeout=2.0, until=lambda event: event.is_terminal)
            for event in stream:
                since = event.eseq + 1   # after an idle spell, go on from here (never reprint)
                if event.type == "execution.started":
                    started = event.ts
                if show:
                    line = plain_line(event, started)
                    if line:
                        print(line, flush=True)
                if event.is_terminal:
                    return event.status or "failed"
            # Idle for 2 s: make sure it did not end while we were not listening.
            status = client.request("status", execution_id=execution_id).get("status")
            if status in TERMINAL_STATUSES:
                return status
    finally:
        monitor.close()


def cmd_submit(args: argparse.Namespace) -> int:
    from goflow.control.framing import ControlError, ControlTimeout
    from goflow.coordinator.embedded import EXIT_CODES

    from goflow.language.loader import read

    loaded = read(args.file)   # as goflow run reads it: missing, too big, not UTF-8 are said here
    if not loaded.text and loaded.problems:
        print_problems(loaded.problems)
        return 2
    text = loaded.text
    try:   # the daemon validates; the declared types only say which --var values are text
        variables = parse_vars(args.var, args.input, string_variables(loaded.workflow))
    except ValueError as exc:
        print(f"goflow submit: {exc}", file=sys.stderr)
        return 2
    if args.watch and not args.events and not os.environ.get("GOFLOW_EVENTS"):
        print("goflow submit: --watch needs --events ENDPOINT (or env GOFLOW_EVENTS)", file=sys.stderr)
        return 2
    args.events = args.events or os.environ.get("GOFLOW_EVENTS")
    wait = args.wait or args.watch

    def body(client: Any) -> int:
        request: dict[str, Any] = {"workflow": text, "name": args.file, "variables": variables}
        if args.timeout is not None:
            request["timeout"] = args.timeout
        try:
            reply = client.request("submit", **request)
        except ControlError as exc:
            if exc.type == "invalid_workflow":
                _print_problems(exc.details.get("problems") or [], args.file)
                return 2
            if isinstance(exc, ControlTimeout):
                raise
            print(f"{args.file}: error: {exc.message}" if exc.type == "bad_request"
                  else f"goflow submit: {exc.type}: {exc.message}", file=sys.stderr)
            return 2
        execution_id = reply["execution_id"]
        if not wait:
            if args.json:
                print(json.dumps({"execution_id": execution_id, "workflow": reply.get("workflow")}))
            else:
                print(execution_id)
            return 0
        if not args.json:
            print(f"submitted {reply.get('workflow')}: execution {execution_id}", file=sys.stderr)
        started = time.time()
        try:
            if args.events:
                status = _wait_events(client, args, execution_id, started)
            else:
                status = _wait_polling(client, execution_id)
        except KeyboardInterrupt:
            client.request("cancel", execution_id=execution_id, reason="interrupted (Ctrl-C) by the submitter")
            status = _wait_polling(client, execution_id)
        from goflow.cli.run import _summary, report_history_problem
        from goflow.handle import result_from_control

        result = result_from_control(client, execution_id)
        if args.json:
            print(json.dumps(result.to_dict(), default=str))
        else:
            _summary(result)
        report_history_problem(result)
        return result.exit_code if result.status else EXIT_CODES.get(status, 1)

    return _run("submit", args, body)


# -- status, cancel, ls, workers --------------------------------------------------------------
def _progress_text(summary: dict) -> str:
    progress = summary.get("progress") or {}
    done, total = progress.get("resolved"), progress.get("total")
    if done is None:
        return ""
    return f"{done}/{total}" if total else str(done)


def cmd_status(args: argparse.Namespace) -> int:
    def body(client: Any) -> int:
        summary = client.request("status", execution_id=args.execution_id)
        summary = {k: v for k, v in summary.items() if k not in ("id", "ok")}
        if args.json:
            print(json.dumps(summary, default=str))
            return 0
        print(f"{summary.get('execution_id')}  {summary.get('workflow')}  {summary.get('status')}  "
              f"progress {_progress_text(summary) or '-'}  started {time_text(summary.get('started_at'))}  "
              f"finished {time_text(summary.get('finished_at'))}")
        error = summary.get("error")
        if error:
            where = f" at node '{error.get('node_id')}'" if error.get("node_id") else ""
            print(f"  error{where}: {error.get('type')}: {error.get('message')}")
        problem = (summary.get("history") or {}).get("problem")
        if problem:
            print(f"  history incomplete: {problem}")
        return 0

    return _run("status", args, body)


def cmd_cancel(args: argparse.Namespace) -> int:
    def body(client: Any) -> int:
        reply = client.request("cancel", execution_id=args.execution_id, reason=args.reason)
        if args.json:
            print(json.dumps({"execution_id": reply.get("execution_id"), "status": reply.get("status")}))
        else:
            print(f"{reply.get('execution_id')}  {reply.get('status')}")
        return 0

    return _run("cancel", args, body)


def cmd_ls(args: argparse.Namespace) -> int:
    def body(client: Any) -> int:
        executions = client.request("list").get("executions") or []
        if args.status:
            executions = [e for e in executions if e.get("status") in args.status]
        executions.sort(key=lambda e: e.get("started_at") or 0)
        if args.json:
            print(json.dumps(executions, default=str))
            return 0
        if not executions:
            print("no executions")
            return 0
        print(f"{'EXECUTION':32}  {'WORKFLOW':24}  {'STATUS':10}  {'PROGRESS':9}  STARTED")
        for e in executions:
            print(f"{str(e.get('execution_id')):32}  {str(e.get('workflow'))[:24]:24}  {str(e.get('status')):10}  "
                  f"{_progress_text(e):9}  {time_text(e.get('started_at'))}")
        return 0

    return _run("ls", args, body)


def cmd_workers(args: argparse.Namespace) -> int:
    def body(client: Any) -> int:
        workers = client.request("workers").get("workers") or []
        if args.json:
            print(json.dumps(workers, default=str))
            return 0
        if not workers:
            print("no workers connected")
        for w in workers:
            labels = ",".join(f"{k}={v}" for k, v in (w.get("labels") or {}).items())
            print(f"{w.get('worker_id', '?')}  host={w.get('host')}  pid={w.get('pid')}  "
                  f"credits={w.get('credits')}  in_hand={w.get('in_hand')}  completed={w.get('completed')}  "
                  f"{labels}".rstrip())
        return 0

    return _run("workers", args, body)


# -- keys -----------------------------------------------------------------------------------
def cmd_keys_generate(args: argparse.Namespace) -> int:
    from goflow.security import generate_keypair

    try:
        public, secret = generate_keypair(args.dir, args.name, overwrite=args.force)
    except (FileExistsError, ValueError, OSError) as exc:
        print(f"goflow keys generate: {exc}", file=sys.stderr)
        return 2
    print(f"public key (share it; copy it into the coordinator's authorized-keys directory): {public}")
    print(f"secret key (keep it; mode 0600): {secret}")
    return 0


# -- registration ---------------------------------------------------------------------------
def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser("submit", help="submit a workflow to a running coordinator",
                              description="Submit a workflow to a goflow-coordinator. Prints the execution id, or "
                                          "with --wait follows it to its end and exits with its exit code "
                                          "(0 completed, 1 failed/timed out, 130 cancelled).")
    p.add_argument("file", help="the workflow YAML file")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                   help="set a variable (VALUE is parsed as JSON when valid JSON, else taken as a string)")
    p.add_argument("--input", metavar="FILE.json", help="a JSON object of variables")
    p.add_argument("--timeout", type=positive_seconds, default=None, metavar="SECONDS", help="execution timeout")
    p.add_argument("--wait", action="store_true", help="wait for the end; exit with the run's exit code")
    p.add_argument("--watch", action="store_true", help="print node events while waiting (implies --wait; "
                                                        "needs --events)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: {execution_id, workflow}, or with --wait the same object as "
                        "`goflow run --json`")
    p.add_argument("--events", metavar="ENDPOINT", default=None,
                   help="the coordinator's events endpoint (env GOFLOW_EVENTS): follow events instead of polling")
    _connection_options(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("status", help="show an execution's status on a coordinator")
    p.add_argument("execution_id", metavar="ID", help="execution id (a unique prefix of 4+ characters works)")
    p.add_argument("--json", action="store_true")
    _connection_options(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("cancel", help="cancel an execution on a coordinator")
    p.add_argument("execution_id", metavar="ID")
    p.add_argument("--reason", default="cancelled by request (goflow cancel)")
    p.add_argument("--json", action="store_true")
    _connection_options(p)
    p.set_defaults(func=cmd_cancel)

    p = subparsers.add_parser("ls", help="list a coordinator's executions")
    p.add_argument("--status", action="append", default=None, choices=LISTED_STATUSES,
                   help="only executions with this status (repeatable)")
    p.add_argument("--json", action="store_true")
    _connection_options(p)
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("workers", help="list the workers connected to a coordinator")
    p.add_argument("--json", action="store_true")
    _connection_options(p)
    p.set_defaults(func=cmd_workers)

    keys = subparsers.add_parser("keys", help="manage CURVE key pairs", description="Manage CURVE key pairs.")
    key_commands = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    p = key_commands.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (secret, mode 0600)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--dir", default=".", help="directory to write to (default: the current directory)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    p.set_defaults(func=cmd_keys_generate)
    keys.set_defaults(func=lambda args: (keys.print_help(sys.stderr), 2)[1])

"""``goflow run FILE``: run a workflow on an embedded coordinator with local workers."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Iterator

from goflow.cli.common import parse_vars, positive_seconds, print_problems, string_variables
from goflow.events import ids as execution_ids
from goflow.language.loader import check, read
from goflow.security import ExposureError
from goflow.coordinator.embedded import EXIT_CODES, EmbeddedRuntime, ExecutionResult


DEFAULT_LINGER_S = 10.0
"""How long a published run keeps serving its subscribers after its end, at most."""
CANCEL_WAIT_S = 15.0
"""After Ctrl-C, how long ``goflow run`` waits for the cancelled run to end."""


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("run", help="run a workflow with local workers",
                                   description="Run a workflow on an embedded coordinator with local worker processes.")
    parser.add_argument("file", help="the workflow YAML file")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="set a variable (VALUE is parsed as JSON when valid JSON, else taken as a string)")
    parser.add_argument("--input", metavar="FILE.json", help="a JSON object of variables")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU count)")
    parser.add_argument("--timeout", type=positive_seconds, default=None, metavar="SECONDS",
                        help="execution timeout, > 0 (default: none)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object with the outcome")
    parser.add_argument("--watch", action="store_true", help="show the full event view (as goflow watch)")
    parser.add_argument("--publish", action="append", default=[], metavar="ENDPOINT",
                        help="also publish events on ENDPOINT (e.g. tcp://127.0.0.1:5556)")
    parser.add_argument("--control", action="append", default=[], metavar="ENDPOINT",
                        help="also serve control requests (replay, progress, ...) on ENDPOINT")
    parser.add_argument("--sndhwm", type=int, default=None, metavar="EVENTS",
                        help="events queued per subscriber before the publisher drops (default 10000)")
    parser.add_argument("--progress-interval", type=float, default=0.1, metavar="SECONDS",
                        help="at most one progress.update per execution this often (default 0.1)")
    parser.add_argument("--max-value-bytes", type=int, default=None, metavar="BYTES",
                        help="larger values in events become $omitted markers (default 4096)")
    parser.add_argument("--await-subscribers", type=int, default=0, metavar="N",
                        help="wait until N subscriptions (topic prefixes, not sockets) reach the publisher "
                             "before starting")
    parser.add_argument("--linger", type=float, default=DEFAULT_LINGER_S, metavar="SECONDS",
                        help="with --publish/--control: after the run, keep serving replay and queries until "
                             f"every subscription has closed, at most SECONDS (default {DEFAULT_LINGER_S:g}; "
                             "0: exit at once)")
    parser.add_argument("--execution-id", metavar="ID", default=None,
                        help="use this execution id (default: a random one), so subscribers know it beforehand")
    parser.add_argument("--await-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long --await-subscribers waits (default 30)")
    parser.add_argument("--db", metavar="PATH", default=None,
                        help="record the run in this history database (default: $GOFLOW_HOME/history.db "
                             "or ~/.local/share/goflow/history.db)")
    parser.add_argument("--no-history", action="store_true", help="do not record the run in the history")
    parser.add_argument("--otlp-endpoint", metavar="URL", default=None,
                        help="export an OpenTelemetry trace of the run over OTLP/HTTP to URL "
                             "(default $OTEL_EXPORTER_OTLP_ENDPOINT, else off)")
    parser.add_argument("--metrics", metavar="ADDRESS", default=None,
                        help="serve Prometheus metrics on ADDRESS (e.g. 127.0.0.1:9464) while the run lasts")
    parser.add_argument("--http", metavar="HOST:PORT", default=None,
                        help="serve the live web dashboard on HOST:PORT while the run lasts (docs/web.md)")
    from goflow.web.server import add_token_arguments

    add_token_arguments(parser)
    parser.set_defaults(func=main)


def _refuse(args: argparse.Namespace, error_type: str, message: str, problems: list | None = None) -> int:
    """A run that cannot start: the message on stderr and, with --json, the one JSON object
    on stdout (``status`` ``invalid``, ``error.type`` says why). Exit code 2."""
    print(message, file=sys.stderr)
    if args.json:
        error: dict[str, Any] = {"type": error_type, "message": message, "node_id": None}
        if problems is not None:
            error["problems"] = [problem.to_dict() for problem in problems]
        print(json.dumps({"execution_id": None, "workflow": None, "status": "invalid", "result": None,
                          "variables": {}, "error": error, "duration_s": 0.0}))
    return 2


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """Check the arguments, start the runtime, then load the workflow while the local
    workers start (their imports overlap the parse: the load of a big workflow takes
    seconds), run it and stop. A file that cannot be run stops the runtime at once."""
    try:
        variables = parse_vars(args.var, args.input)
    except ValueError as exc:
        return _refuse(args, "bad_request", f"goflow run: {exc}")
    if args.workers is not None and args.workers < 1:
        return _refuse(args, "bad_request", "goflow run: --workers must be at least 1")
    try:
        if args.execution_id is not None:
            execution_ids.checked(args.execution_id)
    except ValueError as exc:
        return _refuse(args, "bad_request", f"goflow run: --execution-id: {exc}")
    loaded = None
    regular = Path(args.file).is_file()
    if not regular:   # missing, a directory, a pipe (/dev/stdin, <(...)): read once, before anything starts
        loaded = check(read(args.file))
        if loaded.errors:
            return _invalid(args, loaded)

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        from goflow.history.store import default_db_path

        runtime = EmbeddedRuntime(workers=args.workers, publish=args.publish, control=args.control,
                                  python_paths=[str(Path(args.file).resolve().parent if regular else Path.cwd())],
                                  db=None if args.no_history else (args.db or default_db_path()),
                                  metrics=args.metrics, sndhwm=args.sndhwm,
                                  progress_interval=args.progress_interval, max_value_bytes=args.max_value_bytes,
                                  otlp_endpoint=args.otlp_endpoint)
    except ExposureError as exc:  # --publish/--control/--metrics beyond loopback
        signal.signal(signal.SIGTERM, previous)
        return _refuse(args, "bad_request", f"goflow run: {exc}")
    except Exception as exc:  # e.g. the publish endpoint is in use
        signal.signal(signal.SIGTERM, previous)
        return _refuse(args, "unavailable", f"goflow run: cannot start the coordinator: {exc}")
    code: int | None = None
    try:
        with runtime:
            if loaded is None:
                loaded = check(read(args.file))
                if loaded.errors:
                    return _invalid(args, loaded)
            from goflow.coordinator.plan import VariablesError, initial_variables

            variables = parse_vars(args.var, args.input, string_variables(loaded.workflow))  # parsed above: no error
            try:
                initial_variables(loaded.workflow, variables)
            except VariablesError as exc:
                return _refuse(args, "bad_request", f"{args.file}: error: {exc}; pass {var_hint(exc)}")
            except ValueError as exc:
                return _refuse(args, "bad_request", f"{args.file}: error: {exc}")
            gateway = _start_gateway(runtime, args)
            if gateway is False:
                return 2
            try:
                code = _run(runtime, loaded.workflow, variables, args, loaded.text)
                return code
            finally:
                if gateway is not None:
                    gateway.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if code == EXIT_CODES["cancelled"] or isinstance(sys.exc_info()[1], KeyboardInterrupt):
            # Exiting on Ctrl-C: one more, once the interpreter has dropped its handlers on the
            # way out, would kill it by SIGINT instead of letting it exit with status 130.
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def var_hint(exc: Any) -> str:
    """The ``--var`` options that fix a :class:`~goflow.coordinator.plan.VariablesError`."""
    import shlex

    from goflow.coordinator.plan import VARIABLE_EXAMPLES

    return " ".join([f"--var {name}=VALUE" for name in exc.missing]
                    + [f"--var {m.name}={shlex.quote(_var_text(VARIABLE_EXAMPLES[m.expected]))}"
                       for m in exc.mismatched])


def _var_text(value: Any) -> str:
    """How ``--var`` spells ``value``: text as it is (a string variable takes its text), else JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _invalid(args: argparse.Namespace, loaded: Any) -> int:
    """A workflow with problems: every problem on stderr (and in the --json object); exit 2."""
    print_problems(loaded.problems, stream=sys.stderr)
    if args.json:
        errors = [p for p in loaded.problems if p.severity == "error"]
        return _refuse(args, "invalid_workflow", f"{args.file}: {len(errors)} problem(s)", loaded.problems)
    return 2


def _start_gateway(runtime: EmbeddedRuntime, args: argparse.Namespace) -> Any:
    """``--http``: the dashboard in its own process (None without it, False when it cannot start)."""
    if not args.http:
        return None
    from goflow.web.server import AddressError, GatewayProcess, read_token

    try:
        gateway = GatewayProcess(args.http, runtime.events_endpoint, runtime.control_endpoint,
                                 token=read_token(args.http_token, args.http_token_file),
                                 db=str(runtime.store.path) if runtime.store is not None else None)
        url = gateway.start()
    except (AddressError, RuntimeError) as exc:
        print(f"goflow run: {exc}", file=sys.stderr)
        return False
    if not args.json:
        print(f"dashboard: {url}", file=sys.stderr)
    return gateway


def _await_subscribers(runtime: EmbeddedRuntime, count: int, timeout: float, quiet: bool) -> None:
    if count <= 0:
        return
    deadline = time.monotonic() + timeout
    publisher = runtime.coordinator.publisher
    tty = sys.stderr.isatty()   # a log file gets one line, not a \r-rewritten one
    if not quiet and not tty:
        print(f"goflow run: waiting up to {timeout:g}s for {count} subscription(s)", file=sys.stderr, flush=True)
    while time.monotonic() < deadline:
        seen = runtime.coordinator.call(lambda: publisher.subscription_count)
        if seen >= count:
            if not quiet and tty:
                print(file=sys.stderr)
            return
        if not quiet and tty:
            print(f"\rwaiting for {count} subscription(s): {seen} so far, "
                  f"{deadline - time.monotonic():4.1f}s left", end="", file=sys.stderr, flush=True)
        time.sleep(0.05)
    if not quiet:
        print(("\n" if tty else "") + f"goflow run: only {publisher.subscription_count} subscription(s) after "
              f"{timeout:g}s; starting anyway", file=sys.stderr)


def _linger(runtime: EmbeddedRuntime, seconds: float) -> None:
    """Keep the event log and control socket up after the run, so a subscriber that is
    behind can still repair its gap and query: until every subscription has closed
    (subscribers close after the terminal event), at most ``seconds``; Ctrl-C ends it."""
    publisher = runtime.coordinator.publisher
    deadline = time.monotonic() + seconds
    try:
        remaining = runtime.coordinator.call(lambda: publisher.subscription_count)
        if remaining:
            print(f"goflow run: serving replay and queries until {remaining} subscription(s) close, at most "
                  f"{seconds:g}s (--linger)", file=sys.stderr, flush=True)
        while remaining and time.monotonic() < deadline:
            time.sleep(0.05)
            remaining = runtime.coordinator.call(lambda: publisher.subscription_count)
    except KeyboardInterrupt:
        pass


def _run(runtime: EmbeddedRuntime, workflow: Any, variables: dict, args: argparse.Namespace,
         workflow_text: str | None = None) -> int:
    _await_subscribers(runtime, args.await_subscribers, args.await_timeout, args.json)
    runtime.wait_for_workers(runtime.worker_count, timeout=30)
    execution_id = execution_ids.given_or_new(args.execution_id)
    if args.publish or args.control:
        print(f"goflow run: execution {execution_id}", file=sys.stderr, flush=True)
    display = None
    if not args.json:
        from goflow.cli.run_display import DisplayProcess

        display = DisplayProcess(runtime.events_endpoint, runtime.control_endpoint, execution_id, full=args.watch)
        display.start()
    started = time.monotonic()
    future = runtime.submit(workflow, variables, timeout=args.timeout, execution_id=execution_id,
                            source=workflow_text)
    with contextlib.ExitStack() as shield:
        try:
            try:
                summary = future.result()
            except KeyboardInterrupt:
                summary = _cancel(runtime, future, execution_id)
        finally:
            shield.enter_context(_interrupts_deferred())   # from here a Ctrl-C must not cost the summary line
            if display is not None:
                display.stop()
        if isinstance(summary, str):   # what is known of a run we stopped waiting for
            result = ExecutionResult(execution_id, workflow.name, "cancelled", duration_s=time.monotonic() - started,
                                     error={"type": "cancelled", "message": f"interrupted (Ctrl-C); {summary}"})
        else:
            result = ExecutionResult.from_summary(summary)
        if args.json:
            print(json.dumps(result.to_dict(), default=str))
        else:
            _summary(result)
        sys.stdout.flush()
    report_history_problem(result)
    if (args.publish or args.control) and args.linger > 0:
        _linger(runtime, args.linger)
    return result.exit_code


def _cancel(runtime: EmbeddedRuntime, future: Future, execution_id: str) -> dict | str:
    """Ctrl-C: cancel the run and return its outcome, or why it was not awaited (a second
    Ctrl-C, or no end within ``CANCEL_WAIT_S``)."""
    try:
        runtime.coordinator.cancel(execution_id, "interrupted (Ctrl-C)")
        return future.result(timeout=CANCEL_WAIT_S)
    except KeyboardInterrupt:
        return "interrupted again while cancelling: its end was not awaited"
    except FutureTimeout:
        return f"still cancelling after {CANCEL_WAIT_S:g}s: its end was not awaited"


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C is ignored inside (from the main thread; elsewhere nothing changes)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:   # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def report_history_problem(result: ExecutionResult) -> None:
    """Tell the user (stderr) that this run's history is incomplete, and why."""
    if result.history_problem:
        print(f"goflow: warning: the history of execution {result.execution_id} is incomplete: "
              f"{result.history_problem}", file=sys.stderr)


def _summary(result: ExecutionResult) -> None:
    stream = sys.stdout
    mark = {"completed": "✓", "failed": "✗", "timed_out": "✗", "cancelled": "■"}.get(result.status, "?")
    print(f"{mark} {result.workflow}: {result.status} in {result.duration_s:.2f}s (execution {result.execution_id})",
          file=stream)
    if result.error:
        where = f" at node '{result.error.get('node_id')}'" if result.error.get("node_id") else ""
        print(f"  error{where}: {result.error.get('type')}: {result.error.get('message')}", file=stream)
    if result.status == "completed":
        text = json.dumps(result.result, default=str, ensure_ascii=False)
        if stream.isatty() and len(text) > 600:
            text = text[:600] + f"… ({len(text)} characters; --json prints all of it)"
        print("  result: " + text, file=stream)

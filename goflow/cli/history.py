"""History commands: ``goflow executions``, ``goflow execution``, ``goflow logs``, ``goflow prune``.

They read the SQLite history (:mod:`goflow.history.store`) written by a coordinator; ``--db`` picks
the file (default :func:`goflow.history.store.default_db_path`). ``goflow logs --follow`` joins the
live stream of a running execution through the reliable :class:`goflow.events.monitor.Monitor`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from typing import TYPE_CHECKING, Any, Iterable

from goflow.events.codec import decode_event
from goflow.cli.common import HISTORY_STATUSES, endpoint, positive_int, time_text, with_execution_id
from goflow.cli.event_lines import duration_text, log_line, short_text
from goflow.events.types import Event

if TYPE_CHECKING:
    from goflow.history.store import Store

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


# -- parsers ---------------------------------------------------------------------------------
def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser("executions", help="list past and running executions from the history",
                              description="List executions recorded in the history database, newest first.")
    p.add_argument("--workflow", metavar="NAME", help="only executions of this workflow")
    p.add_argument("--status", metavar="S", choices=HISTORY_STATUSES,
                   help=f"only this status ({', '.join(HISTORY_STATUSES)})")
    p.add_argument("--since", metavar="WHEN", help="started within 30m / 24h / 7d, or since an ISO date/time")
    p.add_argument("--limit", type=positive_int, default=50, metavar="N",
                   help="at most N executions, N >= 1 (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON array")
    _db_flag(p)
    p.set_defaults(func=executions_command)

    p = subparsers.add_parser("execution", help="show one execution: nodes, attempts, result, variables",
                              description="Show one execution from the history (an id or a prefix of 4+ chars).")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="one JSON object (workflow text included)")
    _db_flag(p)
    p.set_defaults(func=execution_command)

    p = subparsers.add_parser("logs", help="the event log of an execution",
                              description="Print an execution's events in order from the history; with "
                                          "--follow, keep printing live events until the run ends.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="follow a running execution until it ends")
    p.add_argument("--type", metavar="T", action="append", dest="types", default=None,
                   help="only events of this type (repeatable)")
    p.add_argument("--node", metavar="ID", action="append", dest="nodes", default=None,
                   help="only events of this node (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per event (as goflow watch --json)")
    p.add_argument("--events", metavar="EP", default=None, type=endpoint,
                   help="coordinator event endpoint for --follow (default $GOFLOW_EVENTS)")
    p.add_argument("--coordinator", "--control", dest="control", metavar="EP", default=None, type=endpoint,
                   help="coordinator control endpoint for --follow (default $GOFLOW_COORDINATOR)")
    _db_flag(p)
    p.set_defaults(func=logs_command)

    p = subparsers.add_parser("prune", help="delete old executions from the history",
                              description="Delete executions that finished more than N days ago.")
    p.add_argument("--keep-days", type=float, required=True, metavar="N")
    _db_flag(p)
    p.set_defaults(func=prune_command)


def _db_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", default=None,
                   help="history database (default $GOFLOW_HOME/history.db or ~/.local/share/goflow/history.db)")


def _open(args: argparse.Namespace, command: str) -> Store | None:
    """The history store of ``--db`` (None when there is none, said on stderr). A path that
    is not a history database ends the command: what is wrong on stderr, exit 1."""
    from goflow.history.store import HistoryError, default_db_path, open_store

    path = args.db or str(default_db_path())
    if os.path.isdir(path):
        _unusable(args, command, path, "it is a directory")
    try:
        store = open_store(path)
    except HistoryError as exc:
        print(f"goflow {command}: {exc}", file=sys.stderr)
        return None
    try:
        store.execution_status("")   # the file is read lazily: find out now, not mid-command
    except sqlite3.Error as exc:
        store.close()
        _unusable(args, command, path, f"opening {path}: {type(exc).__name__}: {exc}")   # as `goflow run --db` says
    return store


def _unusable(args: argparse.Namespace, command: str, path: str, why: str) -> None:
    """Say that ``path`` is no history database, and how to pick one; exit 1."""
    what = f"--db {path}" if args.db else f"the history database {path}"
    print(f"goflow {command}: {what} is not a goflow history database ({why}); --db must name the "
          f"history.db file that goflow run or goflow-coordinator --db writes", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


# -- formatting helpers ------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        import base64

        return {"$base64": base64.b64encode(bytes(obj)).decode()}
    return str(obj)


def _tty() -> bool:
    return sys.stdout.isatty()


def _table(headers: list[str], rows: list[list[str]], *, title: str | None = None) -> None:
    """A rich table on a terminal, aligned plain text otherwise. Cells are never truncated."""
    if _tty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, show_edge=False, header_style="bold")
        for header in headers:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    if title:
        print(title)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


# -- goflow executions -------------------------------------------------------------------------
def executions_command(args: argparse.Namespace) -> int:
    from goflow.history.store import parse_since

    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"goflow executions: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = _open(args, "executions")
    if store is None:
        if args.json:
            print("[]")
        return EXIT_OK
    try:
        import time

        rows = store.list_executions(workflow=args.workflow, status=args.status,
                                     since=None if since is None else time.time() - since, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([with_execution_id(r) for r in rows], default=_json_default, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no executions", file=sys.stderr)
        return EXIT_OK
    _table(["EXECUTION", "WORKFLOW", "STATUS", "DURATION", "STARTED"],
           [[r["id"], r.get("workflow") or "-", r["status"], duration_text(r.get("duration_s")),
             time_text(r.get("started_at") or r.get("submitted_at"))] for r in rows])
    return EXIT_OK


# -- goflow execution --------------------------------------------------------------------------
def execution_command(args: argparse.Namespace) -> int:
    from goflow.history.store import HistoryError

    store = _open(args, "execution")
    if store is None:
        return EXIT_ERROR
    try:
        data = store.get_execution(args.id)
    except HistoryError as exc:
        print(f"goflow execution: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        store.close()
    if args.json:
        print(json.dumps(with_execution_id(data), default=_json_default, ensure_ascii=False))
        return EXIT_OK
    _print_execution(data)
    return EXIT_OK


def _print_execution(d: dict) -> None:
    print(f"execution  {d['id']}")
    print(f"workflow   {d.get('workflow') or '-'}" + (f"  (sha256 {d['workflow_hash'][:12]})"
                                                       if d.get("workflow_hash") else ""))
    print(f"status     {d['status']}")
    print(f"started    {time_text(d.get('started_at'))}")
    print(f"finished   {time_text(d.get('finished_at'))}")
    print(f"duration   {duration_text(d.get('duration_s'))}")
    if d.get("error"):
        err = d["error"]
        where = f" at node '{err.get('node_id')}'" if err.get("node_id") else ""
        print(f"error      {err.get('type')}{where}: {err.get('message')}")
    if d["status"] == "completed" or d.get("result") is not None:
        print(f"result     {short_text(d.get('result'), 200)}")
    rows = []
    for n in d.get("nodes") or []:
        ctx = n.get("context") or {}
        node = n["node_id"] + (f"[{ctx['index']}]" if "index" in ctx else "") \
            + (f"<branch {ctx['branch']}>" if "branch" in ctx else "")
        detail = ""
        if n.get("error"):
            e = n["error"]
            detail = f"{e.get('type')}: {e.get('message')}" if "type" in e else short_text(e)
        elif n.get("output") is not None:
            detail = "→ " + short_text(n["output"], 60)
        rows.append([node, n.get("node_type") or "-", str(n.get("attempt")), n["status"], n.get("worker") or "-",
                     duration_text(n.get("duration_s")), detail])
    print()
    if rows:
        _table(["NODE", "TYPE", "ATTEMPT", "STATUS", "WORKER", "DURATION", "OUTPUT / ERROR"], rows)
    else:
        print("no node runs recorded")
    variables = d.get("variables_out") if d.get("variables_out") is not None else d.get("inputs")
    if variables:
        print()
        _table(["VARIABLE", "VALUE"], [[k, short_text(v, 100)] for k, v in variables.items()],
               title="variables" + ("" if d.get("variables_out") is not None else " (inputs)"))


# -- goflow logs -------------------------------------------------------------------------------
def _event_json(event: Event) -> str:
    return json.dumps(event.to_wire_dict(), default=_json_default, separators=(",", ":"))


class _Printer:
    def __init__(self, as_json: bool, types: Iterable[str] | None, nodes: Iterable[str] | None):
        self.as_json = as_json
        self.types = frozenset(types) if types else None
        self.nodes = frozenset(nodes) if nodes else None
        self.base_ts: float | None = None

    def __call__(self, event: Event) -> None:
        if self.base_ts is None:
            self.base_ts = event.ts
        if self.types is not None and event.type not in self.types:
            return
        if self.nodes is not None and event.node_id not in self.nodes:
            return
        out = _event_json(event) if self.as_json else log_line(event, self.base_ts)
        sys.stdout.write(out + "\n")
        sys.stdout.flush()


def logs_command(args: argparse.Namespace) -> int:
    from goflow.history.store import AmbiguousId, NotFound
    from goflow.states import TERMINAL_EVENT_TYPES, TERMINAL_STATUSES

    store = _open(args, "logs")
    execution_id = args.id
    stored: list[tuple[str, bytes]] = []
    status = None
    if store is not None:
        try:
            execution_id = store.resolve_id(args.id)
            stored = store.events(execution_id, with_topic=True)
            status = store.execution_status(execution_id)
        except AmbiguousId as exc:
            print(f"goflow logs: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except NotFound:
            if not args.follow:
                print(f"goflow logs: no execution {args.id!r} in the history", file=sys.stderr)
                return EXIT_ERROR
        finally:
            store.close()
    elif not args.follow:
        return EXIT_ERROR
    printer = _Printer(args.json, args.types, args.nodes)
    last = None
    try:
        for topic, payload in stored:
            event = decode_event(topic, payload)
            printer(event)
            last = event
    except BrokenPipeError:
        return EXIT_OK
    finished = status in TERMINAL_STATUSES or (
        last is not None and last.type in TERMINAL_EVENT_TYPES)
    if not args.follow or finished:
        return EXIT_OK
    events_ep = args.events or os.environ.get("GOFLOW_EVENTS")
    control_ep = args.control or os.environ.get("GOFLOW_COORDINATOR")
    if not events_ep:
        print(f"goflow logs: execution {execution_id} has not finished; to follow it pass --events EP "
              f"(and --coordinator EP) or set GOFLOW_EVENTS / GOFLOW_COORDINATOR", file=sys.stderr)
        return EXIT_ERROR
    return _follow(execution_id, last, printer, events_ep, control_ep)


def _follow(execution_id: str, last: Event | None, printer: _Printer, events_ep: str,
            control_ep: str | None) -> int:
    from goflow.control.framing import ControlError
    from goflow.errors import GoflowError
    from goflow.events.filter import EventFilter
    from goflow.events.monitor import Monitor

    # Continue right after the last stored event (the coordinator's replay log may have
    # evicted the beginning); from the first event when the store has nothing yet.
    since: Any = "start" if last is None or last.eseq is None else last.eseq + 1
    monitor = Monitor(events_ep, control_ep)
    try:
        if last is not None and last.is_terminal:
            return EXIT_OK
        for event in monitor.subscribe(EventFilter(executions=[execution_id]), since=since,
                                       until=lambda e: e.is_terminal):
            printer(event)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except (ControlError, GoflowError, ValueError) as exc:
        print(f"goflow logs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        monitor.close()
    if monitor.stats.get("lost") or monitor.stats.get("truncated"):
        print(f"goflow logs: {monitor.stats.get('lost', 0) + monitor.stats.get('truncated', 0)} event(s) "
              f"could not be recovered", file=sys.stderr)
    return EXIT_OK


# -- goflow prune ------------------------------------------------------------------------------
def prune_command(args: argparse.Namespace) -> int:
    if args.keep_days < 0:
        print("goflow prune: --keep-days must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    store = _open(args, "prune")
    if store is None:
        return EXIT_ERROR
    try:
        count = store.prune(args.keep_days)
    finally:
        store.close()
    print(f"pruned {count} execution(s) that finished more than {args.keep_days:g} day(s) ago")
    return EXIT_OK

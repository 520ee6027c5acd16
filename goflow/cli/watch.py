"""``goflow watch``: follow a coordinator's event stream.

On a terminal: a live view (progress bar per execution, running nodes, the last events,
failures in red, repaired/lost counters). With ``--json`` or when stdout is not a tty:
one JSON object per line, the payload as published plus ``"topic"``.

:class:`LiveView` is reusable in-process (``goflow run --watch``): ``feed(event)`` then
``render()`` (a rich renderable) or use it as the renderable of ``rich.live.Live``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections import OrderedDict, deque
from typing import Any, Callable

from goflow.events.filter import EventFilter
from goflow.events.types import TERMINAL_TYPES, Event

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

_STYLE = {
    "failed": "bold red", "cancelled": "yellow", "completed": "green", "skipped": "dim",
    "retrying": "yellow", "started": "cyan", "lost": "red",
}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(obj)).decode()}
    return str(obj)


def event_json(event: Event) -> str:
    """One line of ``--json`` output: the payload as published plus ``topic``."""
    return json.dumps(event.model_dump(), default=_json_default, separators=(",", ":"))


class _ExecState:
    __slots__ = ("execution_id", "workflow", "status", "completed", "total", "percent",
                 "running", "failed_nodes", "started_ts", "error")

    def __init__(self, execution_id: str):
        self.execution_id = execution_id
        self.workflow: str | None = None
        self.status = "running"
        self.completed = 0
        self.total: int | None = None
        self.percent: float | None = None
        self.running: OrderedDict[str, str | None] = OrderedDict()
        self.failed_nodes: list[str] = []
        self.started_ts: float | None = None
        self.error: str | None = None


class LiveView:
    """State of a live watch display, built from events. Cheap to feed; render on a timer."""

    def __init__(self, *, max_events: int = 15, max_executions: int = 20,
                 stats: Callable[[], dict] | dict | None = None):
        self.max_events = max_events
        self.max_executions = max_executions
        self.executions: OrderedDict[str, _ExecState] = OrderedDict()
        self.recent: deque[Event] = deque(maxlen=max_events)
        self.counts = {"events": 0, "failures": 0}
        self._stats = stats
        self.workers: dict[str, str] = {}

    def _exec(self, eid: str) -> _ExecState:
        st = self.executions.get(eid)
        if st is None:
            st = self.executions[eid] = _ExecState(eid)
            while len(self.executions) > self.max_executions:
                # forget the oldest finished execution first
                victim = next((k for k, v in self.executions.items() if v.status != "running"),
                              next(iter(self.executions)))
                del self.executions[victim]
        return st

    def feed(self, event: Event) -> None:
        t = event.type
        if t == "heartbeat":
            return
        self.counts["events"] += 1
        self.recent.append(event)
        if t in ("worker.joined", "worker.lost"):
            wid = (event.meta or {}).get("worker_id") or "?"
            self.workers[wid] = "up" if t == "worker.joined" else "lost"
            return
        if event.execution_id is None:
            return
        st = self._exec(event.execution_id)
        st.workflow = event.workflow or st.workflow
        meta = event.meta or {}
        if t == "execution.started" or t == "execution.resumed":
            st.status = "running"
            st.started_ts = st.started_ts or event.ts
            if isinstance(meta.get("total_nodes"), int):
                st.total = meta["total_nodes"]
        elif t in TERMINAL_TYPES:
            st.status = event.status or t.split(".", 1)[1]
            st.running.clear()
            if event.error:
                st.error = f"{event.error.get('type')}: {event.error.get('message')}"
            if t == "execution.completed" and st.total:
                st.completed = st.total
                st.percent = 100.0
        elif t == "node.started" and event.node_id:
            st.running[event.node_id] = event.node_type
        elif t in ("node.completed", "node.failed", "node.skipped") and event.node_id:
            st.running.pop(event.node_id, None)
            if t == "node.failed":
                st.failed_nodes.append(event.node_id)
        elif t == "progress.update":
            total = meta.get("total", meta.get("total_nodes"))
            done = meta.get("completed", 0) or 0
            done += (meta.get("failed", 0) or 0) + (meta.get("skipped", 0) or 0)
            if isinstance(total, (int, float)) and total > 0:
                st.total = int(total)
                st.completed = int(done)
            pct = meta.get("percent")
            if isinstance(pct, (int, float)):
                st.percent = float(pct)
            elif st.total:
                st.percent = min(100.0, 100.0 * st.completed / st.total)
        if t in ("execution.failed", "node.failed"):
            self.counts["failures"] += 1

    def stats(self) -> dict:
        if callable(self._stats):
            return self._stats()
        return self._stats or {}

    def _event_line(self, ev: Event):
        from rich.text import Text
        clock = time.strftime("%H:%M:%S", time.localtime(ev.ts)) + f".{int(ev.ts * 1000) % 1000:03d}"
        kind = ev.type.split(".", 1)[-1]
        style = _STYLE.get(kind, "")
        text = Text(f"{clock} ")
        text.append(f"{ev.type:<20}", style=style)
        where = ev.execution_id or (ev.meta or {}).get("worker_id") or ""
        if ev.node_id:
            where = f"{where[:12]} {ev.node_id}"
        text.append(f" {where}")
        if ev.error:
            text.append(f"  {ev.error.get('message', '')}"[:120], style="red")
        return text

    def render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text
        table = Table(expand=True, show_edge=False, box=None, padding=(0, 1))
        table.add_column("execution", no_wrap=True, ratio=2)
        table.add_column("status", no_wrap=True)
        table.add_column("progress", ratio=3)
        table.add_column("%", justify="right", no_wrap=True)
        table.add_column("running", ratio=3)
        for st in self.executions.values():
            pct = st.percent if st.percent is not None else (100.0 if st.status == "completed" else 0.0)
            style = _STYLE.get(st.status, "")
            name = st.execution_id if not st.workflow else f"{st.workflow} {st.execution_id[:12]}"
            running = ", ".join(st.running) or (st.error or "")
            table.add_row(name, Text(st.status, style=style),
                          ProgressBar(total=100, completed=pct, width=None,
                                      complete_style="red" if st.status == "failed" else "green"),
                          f"{pct:.0f}%", Text(running[:80], style="red" if st.error else ""))
        lines = [self._event_line(e) for e in self.recent]
        s = self.stats()
        footer = Text(f"events {self.counts['events']}   failures {self.counts['failures']}   "
                      f"repaired {s.get('repaired', 0)}   ")
        footer.append(f"lost {s.get('lost', 0)}", style="bold red" if s.get("lost") else "")
        if s.get("epoch_changes"):
            footer.append(f"   coordinator restarts {s['epoch_changes']}", style="yellow")
        return Group(table, Text(""), *lines, Text(""), footer)

    def __rich__(self):
        return self.render()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "watch", help="follow a coordinator's event stream",
        description="Follow the event stream published at EVENTS_ENDPOINT. Gaps are repaired "
                    "through --control when given; unrepairable loss is counted and reported.")
    p.add_argument("events_endpoint", metavar="EVENTS_ENDPOINT",
                   help="the coordinator's event (PUB) endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--control", metavar="EP", help="control endpoint (enables gap repair and history)")
    p.add_argument("--execution", metavar="ID", action="append", default=None,
                   help="only this execution (repeatable); with --control its history is shown first")
    p.add_argument("--type", metavar="T", action="append", dest="types", default=None,
                   help="only events of this type (repeatable), e.g. node.failed")
    p.add_argument("--node", metavar="ID", action="append", dest="nodes", default=None,
                   help="only events of this node (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (default when not a tty)")
    p.add_argument("--exit-on-finish", action="store_true",
                   help="exit when every --execution has finished")
    p.set_defaults(func=handler)
    return p


def handler(args: argparse.Namespace) -> int:
    from goflow.control.framing import ControlError
    from goflow.events.monitor import Monitor
    try:
        filt = EventFilter(types=args.types, executions=args.execution, nodes=args.nodes)
    except ValueError as exc:
        print(f"goflow watch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    monitor = Monitor(args.events_endpoint, args.control)
    since = "start" if (args.control and args.execution) else "now"
    pending = set(args.execution or ())
    until = None
    if getattr(args, "exit_on_finish", False) and pending:
        def until(ev: Event) -> bool:
            if ev.type in TERMINAL_TYPES:
                pending.discard(ev.execution_id)
            return not pending
        # terminal events must reach us even with --type
        if filt.types:
            filt = EventFilter(types=[*filt.types, *TERMINAL_TYPES], executions=args.execution,
                               nodes=args.nodes)
    as_json = args.json or not sys.stdout.isatty()
    try:
        stream = monitor.subscribe(filt, reliable=True, since=since, until=until)
        if as_json:
            out = sys.stdout
            for ev in stream:
                out.write(event_json(ev) + "\n")
                out.flush()
        else:
            from rich.live import Live
            view = LiveView(stats=lambda: monitor.stats)
            with Live(view, refresh_per_second=8, screen=False):
                for ev in stream:
                    view.feed(ev)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ControlError, ValueError) as exc:
        print(f"goflow watch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        monitor.close()
    if monitor.stats["lost"]:
        print(f"goflow watch: {monitor.stats['lost']} event(s) could not be repaired", file=sys.stderr)
    return EXIT_OK

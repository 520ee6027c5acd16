"""The live terminal view of runs (``goflow run`` and ``goflow watch`` on a terminal).

:class:`RunView` is built from events: per execution, a row per node (state, attempt,
duration, worker, loop position or parallel branch, last note), retries and failures kept
on screen, noise (``variable.changed``, ``progress.update``, ``node.log``...) counted
instead of listed, the preflight phase, and a final summary. Feeding is O(1) per event;
rendering touches a bounded number of rows.

Threads: :class:`LiveDisplay` gives the view to rich's refresh thread alone. The reader
only puts events into a thread-safe queue; the view is fed and rendered inside rich's
``get_renderable`` (always called under ``Live``'s lock), so no state is shared between
the reader and the render thread.
"""

from __future__ import annotations

import queue
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import IO, Any, Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from goflow.cli.event_lines import duration_text, short_text
from goflow.events.types import TERMINAL_TYPES, Event

SHORT_ID = 8
"""Execution ids are shown by their first 8 characters in every view."""
NOISE_TYPES = frozenset({"variable.changed", "progress.update", "condition.evaluated", "loop.iteration",
                         "node.log", "node.progress", "heartbeat"})
"""Counted, never listed: they come by the thousand and bury what matters."""
STYLE = {"running": "cyan", "completed": "green", "failed": "bold red", "retrying": "yellow",
         "cancelled": "yellow", "skipped": "dim", "timed_out": "bold red", "preflight": "magenta"}
MARK = {"completed": "✓", "failed": "✗", "timed_out": "✗", "cancelled": "■"}


def short_id(execution_id: str | None) -> str:
    return (execution_id or "-")[:SHORT_ID]


@dataclass
class NodeRow:
    """What the table shows of one node id (the instances of a loop body share a row)."""

    order: int
    node_id: str
    node_type: str | None
    state: str = "running"
    attempt: int = 1
    started: float | None = None
    duration: float | None = None
    worker: str | None = None
    where: str = ""
    note: str = ""
    running: int = 0
    done: int = 0


class ExecutionView:
    """One execution's state as the events tell it."""

    def __init__(self, execution_id: str, *, max_failures: int = 6, max_recent: int = 200):
        self.execution_id = execution_id
        self.workflow: str | None = None
        self.status = "running"
        self.phase = "running"
        self.preflight: list[str] = []
        self.started: float | None = None
        self.finished: float | None = None
        self.progress: dict[str, Any] = {}
        self.rows: dict[str, NodeRow] = {}
        self.running: OrderedDict[str, None] = OrderedDict()
        self.recent: deque[str] = deque(maxlen=max_recent)
        self.failures: deque[str] = deque(maxlen=max_failures)
        self.loops: dict[str, tuple[int, int]] = {}
        self.noise: Counter[str] = Counter()
        self.last_variable: str | None = None
        self.counts = Counter()
        self.error: dict | None = None
        self.result: Any = None

    # -- feeding -----------------------------------------------------------------------------
    def feed(self, event: Event) -> None:
        t, meta = event.type, event.meta or {}
        self.workflow = event.workflow or self.workflow
        if t in NOISE_TYPES:
            self.noise[t] += len(meta.get("lines") or ()) if t == "node.log" else 1
            self._noise(event, t, meta)
            return
        if t in ("execution.started", "execution.resumed"):
            self.status = "running"
            self.started = self.started or event.ts
            self.preflight = list(meta.get("preflight") or [])
            self.phase = "preflight" if self.preflight else "running"
            self.progress.setdefault("total", meta.get("total_nodes"))
            return
        if t in TERMINAL_TYPES:
            self.status = event.status or t.split(".", 1)[1]
            self.phase = self.status
            self.finished = event.ts
            self.error = event.error
            self.result = meta.get("result")
            if event.error and t != "execution.completed":
                self._failure(f"execution {self.status}: {event.error.get('type')}: {event.error.get('message')}")
            return
        if event.node_id is None:
            return
        self.phase = "running"
        row = self.rows.get(event.node_id)
        if row is None:
            row = self.rows[event.node_id] = NodeRow(len(self.rows), event.node_id, event.node_type)
        row.where = _where(meta, self.loops) or row.where
        if t == "node.started":
            row.state, row.attempt, row.started, row.duration = "running", event.attempt or 1, event.ts, None
            row.running += 1
            self.running[row.node_id] = None
        elif t in ("node.completed", "node.failed", "node.cancelled", "node.retrying", "node.skipped"):
            self._ended(row, event, t, meta)
        elif t == "loop.started":
            self.loops[row.node_id] = (0, int(meta.get("count") or 0))
            row.note = f"{meta.get('count')} items, {meta.get('max_parallel')} at a time"
        elif t == "loop.completed":
            count = int(meta.get("count") or 0)
            self.loops[row.node_id] = (int(meta.get("iterations") or 0), count)

    def _noise(self, event: Event, t: str, meta: dict) -> None:
        if t == "progress.update":
            self.progress = meta
            self.phase = meta.get("phase") or self.phase
        elif t == "variable.changed":
            self.last_variable = meta.get("name")
        elif t == "loop.iteration" and event.node_id:
            done, count = self.loops.get(event.node_id, (0, 0))
            self.loops[event.node_id] = (max(done, int(meta.get("index") or 0) + 1), count)
        elif event.node_id and event.node_id in self.rows:
            row = self.rows[event.node_id]
            if t == "node.log" and meta.get("lines"):
                row.note = short_text(str(meta["lines"][-1].get("text", "")).strip(), 60)
            elif t == "node.progress":   # the hook for node.progress: shown in the node's row
                total = meta.get("total")
                row.note = f"{meta.get('progress')}/{total}" if total is not None else str(meta.get("progress"))
                if meta.get("message"):
                    row.note += f" {short_text(meta['message'], 40)}"

    def _ended(self, row: NodeRow, event: Event, t: str, meta: dict) -> None:
        state = t.split(".", 1)[1]
        row.state, row.attempt = state, event.attempt or row.attempt
        if t != "node.skipped":
            row.running = max(0, row.running - 1)
            row.done += t == "node.completed"
        if not row.running:
            self.running.pop(row.node_id, None)
        duration = meta.get("duration_s")
        row.duration = duration if isinstance(duration, (int, float)) else (
            event.ts - row.started if row.started is not None and t != "node.skipped" else None)
        row.worker = meta.get("worker") or row.worker
        self.counts[state] += 1
        error = event.error or {}
        if t == "node.retrying":
            row.note = f"retry {meta.get('next_attempt')}/{meta.get('max_attempts')} in " \
                       f"{duration_text(meta.get('delay_s'))}: {error.get('type')}"
            self._failure(f"{row.node_id} attempt {event.attempt} failed (retrying): {error.get('type')}: "
                          f"{error.get('message')}")
        elif t == "node.failed":
            row.note = f"{error.get('type')}: {short_text(str(error.get('message')), 60)}"
            self._failure(f"{row.node_id} failed{_at(meta)}: {error.get('type')}: {error.get('message')}")
        elif t == "node.cancelled":
            row.note = short_text(str(meta.get("reason") or ""), 60)
        elif t == "node.skipped":
            row.note = short_text(str(meta.get("reason") or ""), 60)
        else:
            row.note = "" if row.note.startswith("retry") else row.note
        self.recent.append(row.node_id)

    def _failure(self, text: str) -> None:
        self.failures.append(short_text(text, 160))

    # -- rendering ---------------------------------------------------------------------------
    def visible_rows(self, limit: int) -> list[NodeRow]:
        """Every row when they fit; else running and failed rows first, then the latest."""
        if len(self.rows) <= limit:
            return list(self.rows.values())
        chosen: dict[str, NodeRow] = {}
        for node_id in self.running:
            if len(chosen) >= limit:
                break
            chosen[node_id] = self.rows[node_id]
        for node_id in reversed(self.recent):
            if len(chosen) >= limit:
                break
            chosen.setdefault(node_id, self.rows[node_id])
        return sorted(chosen.values(), key=lambda row: row.order)

    def header(self, now: float) -> Table:
        progress = self.progress
        total = progress.get("total") or 0
        resolved = progress.get("resolved") or 0
        if self.status == "completed":
            resolved = total
        end = self.finished or now
        elapsed = end - self.started if self.started else 0.0
        grid = Table.grid(padding=(0, 2))
        phase = self.phase if self.status == "running" else self.status
        grid.add_row(Text(f"{self.workflow or '?'} {short_id(self.execution_id)}", style="bold"),
                     Text(phase, style=STYLE.get(phase, "")), Text(duration_text(elapsed), style="dim"))
        counts = self.counts
        grid.add_row(ProgressBar(total=max(total, 1), completed=min(resolved, max(total, 1)), width=30,
                                 complete_style="red" if self.status in ("failed", "timed_out") else "green"),
                     Text(f"{resolved}/{total} nodes"),
                     Text(f"done {counts['completed']}  failed {counts['failed']}  retries {counts['retrying']}  "
                          f"cancelled {counts['cancelled']}  skipped {counts['skipped']}"))
        return grid

    def table(self, limit: int, now: float) -> Table:
        table = Table(show_edge=False, box=None, padding=(0, 1), header_style="bold")
        for column in ("NODE", "TYPE", "STATE", "ATTEMPT", "DURATION", "WORKER", "WHERE", "NOTE"):
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=64 if column == "NOTE" else None)
        for row in self.visible_rows(limit):
            duration = row.duration if row.state != "running" else (now - row.started if row.started else None)
            where = row.where
            if row.node_id in self.loops:
                done, count = self.loops[row.node_id]
                where = f"{done}/{count}"
            elif row.done > 1 or row.running > 1:
                where = f"{where} ({row.done} done, {row.running} running)".strip()
            table.add_row(row.node_id, row.node_type or "-", Text(row.state, style=STYLE.get(row.state, "")),
                          str(row.attempt), duration_text(duration), row.worker or "-", where, row.note)
        return table

    def render(self, limit: int, now: float) -> Group:
        parts: list[Any] = [self.header(now)]
        if self.phase == "preflight":
            parts.append(Text(f"preflight: checking MCP server(s) {', '.join(self.preflight)} before the first "
                              f"node", style="magenta"))
        if self.rows:
            parts.append(self.table(limit, now))
        for failure in self.failures:
            parts.append(Text(failure, style="red"))
        if self.noise:
            noise = ", ".join(f"{count} {kind}" for kind, count in sorted(self.noise.items()))
            last = f" (last variable: {self.last_variable})" if self.last_variable else ""
            parts.append(Text(f"also: {noise}{last}", style="dim"))
        return Group(*parts)

    def summary(self) -> str:
        """One line for after the live view: outcome, duration, what happened."""
        elapsed = (self.finished or time.time()) - (self.started or time.time())
        counts = self.counts
        return (f"{MARK.get(self.status, '?')} {self.workflow} {short_id(self.execution_id)}: {self.status} in "
                f"{duration_text(elapsed)} - {counts['completed']} node runs done, {counts['failed']} failed, "
                f"{counts['retrying']} retries, {counts['cancelled']} cancelled, {counts['skipped']} skipped")


def _where(meta: dict, loops: dict[str, tuple[int, int]]) -> str:
    """A node run's place: ``loop[i/N]`` inside a loop, ``par#b`` inside a parallel branch."""
    parts = []
    if meta.get("parallel") is not None:
        parts.append(f"{meta['parallel']}#{meta.get('branch')}")
    if meta.get("loop") is not None:
        count = loops.get(meta["loop"], (0, 0))[1]
        parts.append(f"{meta['loop']}[{int(meta.get('index') or 0) + 1}/{count}]")
    return " ".join(parts)


def _at(meta: dict) -> str:
    where = _where(meta, {})
    return f" ({where})" if where else ""


class RunView:
    """Every execution a stream shows (``goflow watch``) or the one of ``goflow run``."""

    def __init__(self, *, max_rows: int = 25, max_executions: int = 20, recent_events: int = 0,
                 stats: Callable[[], dict] | None = None):
        self.max_rows = max_rows
        self.max_executions = max_executions
        self.executions: OrderedDict[str, ExecutionView] = OrderedDict()
        self.recent: deque[str] = deque(maxlen=recent_events) if recent_events else deque(maxlen=0)
        self.workers: dict[str, str] = {}
        self.events = 0
        self._stats = stats

    def feed(self, event: Event) -> None:
        if event.type == "heartbeat":
            return
        self.events += 1
        if event.type in ("worker.joined", "worker.lost"):
            self.workers[(event.meta or {}).get("worker_id") or "?"] = event.type.split(".", 1)[1]
            return
        if event.execution_id is None:
            return
        view = self.executions.get(event.execution_id)
        if view is None:
            view = self.executions[event.execution_id] = ExecutionView(event.execution_id)
            while len(self.executions) > self.max_executions:   # forget the oldest finished first
                victim = next((k for k, v in self.executions.items() if v.status != "running"),
                              next(iter(self.executions)))
                del self.executions[victim]
        view.feed(event)
        if self.recent.maxlen and event.type not in NOISE_TYPES:
            self.recent.append(_event_line(event))

    def render(self) -> Group:
        now = time.time()
        parts: list[Any] = []
        views = list(self.executions.values())
        if len(views) > 1:
            overview = Table(show_edge=False, box=None, padding=(0, 1), header_style="bold")
            for column in ("EXECUTION", "WORKFLOW", "STATUS", "NODES", "FAILED"):
                overview.add_column(column, no_wrap=True)
            for view in views:
                progress = view.progress
                overview.add_row(short_id(view.execution_id), view.workflow or "-",
                                 Text(view.phase, style=STYLE.get(view.phase, "")),
                                 f"{progress.get('resolved') or 0}/{progress.get('total') or 0}",
                                 str(view.counts["failed"]))
            parts += [overview, Text("")]
        focus = next((v for v in reversed(views) if v.status == "running"), views[-1] if views else None)
        if focus is not None:
            parts.append(focus.render(self.max_rows, now))
        if self.recent:
            parts += [Text(""), *(Text(line, style="dim") for line in self.recent)]
        stats = self._stats() if self._stats else {}
        if stats:
            footer = Text(f"events {self.events}   repaired {stats.get('repaired', 0)}   ", style="dim")
            footer.append(f"lost {stats.get('lost', 0)}", style="bold red" if stats.get("lost") else "dim")
            if stats.get("epoch_changes"):
                footer.append(f"   coordinator restarts {stats['epoch_changes']}", style="yellow")
            parts.append(footer)
        return Group(*parts)

    def summaries(self) -> list[str]:
        return [view.summary() for view in self.executions.values()]


def _event_line(event: Event) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(event.ts))
    where = short_id(event.execution_id) + (f" {event.node_id}" if event.node_id else "")
    error = f"  {event.error.get('type')}: {event.error.get('message')}" if event.error else ""
    return short_text(f"{clock} {event.type:<20} {where}{error}", 140)


class LiveDisplay:
    """A :class:`RunView` on a terminal. :meth:`put` is the reader's only entry (thread-safe);
    the view is fed and rendered by rich alone, under its lock."""

    def __init__(self, view: RunView, stream: IO[str], *, refresh_per_second: float = 4):
        self.view = view
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.live = Live(console=Console(file=stream), get_renderable=self._renderable,
                         refresh_per_second=refresh_per_second, transient=False, redirect_stdout=False,
                         redirect_stderr=False)

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def _renderable(self) -> Group:
        while True:
            try:
                self.view.feed(self._queue.get_nowait())
            except queue.Empty:
                break
        return self.view.render()

    def __enter__(self) -> "LiveDisplay":
        self.live.start(refresh=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.stop()   # a last refresh: everything put so far is on screen

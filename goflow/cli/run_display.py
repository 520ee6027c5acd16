"""What ``goflow run`` shows while a run goes on: a live panel on a terminal, lines otherwise."""

from __future__ import annotations

import time
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from goflow.cli.event_lines import log_line
from goflow.events.types import Event

NODE_EVENTS = ("node.started", "node.completed", "node.failed", "node.skipped", "node.retrying")


def plain_line(event: Event, started: float) -> str | None:
    """The log line of a node or execution event (None for the others)."""
    if event.type not in NODE_EVENTS and not event.type.startswith("execution."):
        return None
    return log_line(event, started)


class RunPanel:
    """The live panel: progress, running nodes, retries, elapsed time, recent failures."""

    def __init__(self, workflow: str):
        self.workflow = workflow
        self.started = time.time()
        self.progress: dict[str, Any] = {}
        self.failures: list[str] = []
        self.status = "running"

    def feed(self, event: Event) -> None:
        if event.type == "progress.update":
            self.progress = event.meta or {}
        elif event.type == "node.failed" and event.error:
            self.failures.append(f"{event.node_id}: {event.error.get('type')}: {event.error.get('message')}")
        elif event.type.startswith("execution.") and event.status:
            self.status = event.status

    def render(self) -> Group:
        progress = self.progress
        total, resolved = progress.get("total", 0), progress.get("resolved", 0)
        table = Table.grid(padding=(0, 2))
        table.add_row(Text(f"{self.workflow}", style="bold"), Text(self.status),
                      Text(f"{time.time() - self.started:6.1f}s", style="dim"))
        bar = ProgressBar(total=max(total, 1), completed=resolved, width=40)
        table.add_row(bar, Text(f"{resolved}/{total} nodes"),
                      Text(f"done {progress.get('completed', 0)}  failed {progress.get('failed', 0)}  "
                           f"skipped {progress.get('skipped', 0)}  retries {progress.get('retries', 0)}"))
        running = progress.get("running_nodes") or []
        lines = [table, Text("running: " + (", ".join(running[:12]) + (" …" if len(running) > 12 else "")
                                            if running else "-"), style="cyan")]
        for failure in self.failures[-5:]:
            lines.append(Text(failure, style="red"))
        return Group(*lines)


def live_panel(workflow: str, stream: IO[str]) -> tuple[RunPanel, Live]:
    panel = RunPanel(workflow)
    live = Live(panel.render(), console=Console(file=stream), refresh_per_second=10,
                get_renderable=panel.render, transient=False)
    return panel, live

"""One readable line per event: what ``goflow logs`` prints and ``goflow run`` prints off a terminal."""

from __future__ import annotations

import json
from typing import Any

from goflow.events.types import Event


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 120:
        return f"{int(minutes)}m{secs:04.1f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes):02d}m"


def short_text(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def log_line(event: Event, base_ts: float | None) -> str:
    """One readable line: time offset, type, node, short detail (a ``node.log`` event: one
    line per output line it carries, plus one for the lines it says were dropped)."""
    offset = f"+{event.ts - base_ts:.3f}s" if base_ts is not None else f"{event.ts:.3f}"
    offset = offset.rjust(10)
    meta = event.meta or {}
    node = event.node_id or "-"
    if event.node_id and meta.get("index") is not None:
        node += f"[{meta['index']}]"
    if event.type == "node.log":
        return node_log_lines(offset, node, meta)
    detail: list[str] = []
    t = event.type
    if event.attempt and event.attempt > 1 and t.startswith("node."):
        detail.append(f"attempt={event.attempt}")
    if t == "execution.started":
        detail.append(f"inputs={short_text(meta.get('inputs'), 60)}")
    elif t == "execution.completed":
        detail.append(f"result={short_text(meta.get('result'), 60)}")
    elif t == "node.completed":
        if meta.get("worker"):
            detail.append(f"worker={meta['worker']}")
        if meta.get("output") is not None:
            detail.append(f"output={short_text(meta['output'], 50)}")
    elif t == "node.skipped":
        detail.append(f"({meta.get('reason', '')})")
    elif t == "node.retrying":
        detail.append(f"next attempt {meta.get('next_attempt')} in {meta.get('delay_s', 0):.2f}s")
    elif t == "variable.changed":
        detail.append(f"{meta.get('name')} = {short_text(meta.get('value'), 50)} ({meta.get('scope')})")
    elif t == "condition.evaluated":
        detail.append(f"{meta.get('kind')}: {meta.get('expression')} -> {meta.get('result')}")
    elif t == "loop.started":
        detail.append(f"count={meta.get('count')}")
    elif t == "loop.iteration":
        detail.append(f"index={meta.get('index')} item={short_text(meta.get('item'), 40)}")
    elif t == "loop.completed":
        detail.append(f"iterations={meta.get('iterations')}" + (" broken" if meta.get("broken") else ""))
    elif t == "node.progress":
        total = f"/{meta['total']}" if meta.get("total") is not None else ""
        detail.append(f"{meta.get('progress')}{total}" + (f" {meta['message']}" if meta.get("message") else ""))
    elif t == "progress.update":
        detail.append(f"{meta.get('resolved')}/{meta.get('total')} ({meta.get('percent')}%)")
    if t.startswith(("node.completed", "node.failed", "execution.")) and meta.get("duration_s") is not None:
        detail.append(duration_text(meta["duration_s"]))
    if event.error:
        detail.append(f"{event.error.get('type')}: {event.error.get('message')}")
    return f"{offset}  {t:<20} {node:<16} {' '.join(detail)}".rstrip()


def node_log_lines(offset: str, node: str, meta: dict) -> str:
    """``node.log``: ``<offset>  node.log  <node>  <stream> [<level>] <text>`` per line."""
    out = [f"{offset}  {'node.log':<20} {node:<16} {line.get('stream')} [{line.get('level')}] {line.get('text')}"
           for line in meta.get("lines") or ()]
    if meta.get("dropped"):
        out.append(f"{offset}  {'node.log':<20} {node:<16} ({meta['dropped']} line(s) dropped: over the log bound)")
    return "\n".join(out)

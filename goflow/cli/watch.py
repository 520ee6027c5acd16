"""``goflow watch``: follow a coordinator's event stream.

On a terminal: the live view of :mod:`goflow.cli.run_view` (executions, the node table of
the latest running one, failures kept, noise counted, repaired/lost counters) and, at the
end, one summary line per execution. With ``--json`` or when stdout is not a tty: one JSON
object per line, the payload as published plus ``"topic"``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

from goflow.cli.common import endpoint
from goflow.events.filter import EventFilter
from goflow.events.types import TERMINAL_TYPES, Event

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(obj)).decode()}
    return str(obj)


def event_json(event: Event) -> str:
    """One line of ``--json`` output: the payload as published plus ``topic``."""
    return json.dumps(event.model_dump(), default=_json_default, separators=(",", ":"))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "watch", help="follow a coordinator's event stream",
        description="Follow the event stream published at EVENTS_ENDPOINT. Gaps are repaired "
                    "through --control when given; unrepairable loss is counted and reported.")
    p.add_argument("events_endpoint", metavar="EVENTS_ENDPOINT", type=endpoint,
                   help="the coordinator's event (PUB) endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--control", metavar="EP", type=endpoint, help="control endpoint (enables gap repair and history)")
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
    import zmq

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
            return not pending   # terminal events pass every filter (EventFilter)
    as_json = args.json or not sys.stdout.isatty()
    try:
        stream = monitor.subscribe(filt, reliable=True, since=since, until=until)
        if as_json:
            out = sys.stdout
            for ev in stream:
                out.write(event_json(ev) + "\n")
                out.flush()
        else:
            from goflow.cli.run_view import LiveDisplay, RunView

            view = RunView(recent_events=10, stats=lambda: dict(monitor.stats))
            try:
                with LiveDisplay(view, sys.stdout) as display:
                    for ev in stream:
                        display.put(ev)
            finally:   # the live view has stopped: its state is ours now
                for line in view.summaries():
                    print(line)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ControlError, ValueError, zmq.ZMQError) as exc:   # ZMQError: e.g. an endpoint ZeroMQ refuses
        print(f"goflow watch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        monitor.close()
    if monitor.stats["lost"]:
        print(f"goflow watch: {monitor.stats['lost']} event(s) could not be repaired", file=sys.stderr)
    return EXIT_OK

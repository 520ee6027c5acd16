"""``goflow-worker``: run worker processes connected to a coordinator."""

from __future__ import annotations

import argparse
import sys

from goflow.workers.runtime import serve


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"label {part!r} must look like key=value")
        labels[key.strip()] = value.strip()
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="goflow-worker", description="Run a goflow worker.")
    parser.add_argument("--connect", required=True, help="the coordinator's workers endpoint, e.g. tcp://host:5555")
    parser.add_argument("--name", help="worker id (default: generated)")
    parser.add_argument("--credits", type=int, default=4, help="tasks held in hand (default 4)")
    parser.add_argument("--labels", type=_labels, default={}, help="k=v,... for node worker selectors")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    try:
        return serve(args.connect, worker_id=args.name, credits=args.credits, labels=args.labels,
                     heartbeat_interval=args.heartbeat_interval)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""History writer figures: a fan-out run with outputs recorded to a real file, then its
events replayed into a fresh store with nothing else running.

    .venv/bin/python bench/history_bench.py [--nodes 10000] [--workers 2]

Prints one JSON object: the run's wall time, the history file's size after close, the
writer's counters during the run (events written, seconds spent writing, batches, the
deepest queue, how often back-pressure held dispatch) and the replay's events/s (the
writer's sustainable rate on this machine). ``docs/history.md`` reports a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from goflow.coordinator.embedded import EmbeddedRuntime  # noqa: E402
from goflow.history.store import Store  # noqa: E402
from goflow.language.loader import load  # noqa: E402


def fan_out_with_outputs(count: int) -> str:
    nodes = "".join(f"  - {{id: n{i}, type: python, call: 'operator:add', args: [{i}, 1], output: o{i}}}\n"
                    for i in range(count))
    edges = "".join(f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}\n" for i in range(count))
    return (f"name: fan{count}\nnodes:\n  - {{id: start, type: start}}\n  - {{id: end, type: end}}\n" + nodes
            + "edges:\n" + edges)


def file_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file() and not p.name.endswith(".state"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="goflow-history-bench-"))
    db = work / "history.db"
    workflow = load("fan.yaml", text=fan_out_with_outputs(args.nodes))

    started = time.perf_counter()
    runtime = EmbeddedRuntime(workers=args.workers, db=db)
    with runtime:
        runtime.wait_for_workers(args.workers)
        execution_id, future = runtime.coordinator.submit(workflow, {})
        summary = future.result()
        ran = time.perf_counter() - started
    wall = time.perf_counter() - started
    store = runtime.store
    run_stats = {**store.stats, "max_queue_depth": store.max_queue_depth}

    replay_db = work / "replay.db"
    source = Store(db, start=False, readonly=True)
    events = source.events(execution_id, with_topic=True)
    source.close()
    replay = Store(replay_db)
    begin = time.perf_counter()
    for topic, payload in events:
        replay.sink(execution_id, topic, payload)
    replay.close()
    replayed = time.perf_counter() - begin

    print(json.dumps({
        "nodes": args.nodes, "workers": args.workers, "status": summary["status"],
        "recorded": (summary.get("history") or {}).get("recorded"),
        "run_to_result_s": round(ran, 2), "run_wall_s": round(wall, 2),
        "events": len(events), "history_bytes": file_bytes(db),
        "bytes_per_event": round(file_bytes(db) / max(1, len(events)), 1),
        "writer_during_run": {"events_written": run_stats["events_written"], "batches": run_stats["batches"],
                              "write_seconds": round(run_stats["write_seconds"], 2),
                              "events_per_write_second": round(run_stats["events_written"]
                                                               / max(1e-9, run_stats["write_seconds"])),
                              "max_queue_depth": run_stats["max_queue_depth"],
                              "backlogged": run_stats["backlogged"], "dropped": run_stats["dropped_from_history"]},
        "replay_events_per_s": round(len(events) / replayed), "replay_bytes": file_bytes(replay_db),
    }, indent=1))
    for path in work.iterdir():
        path.unlink()
    os.rmdir(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

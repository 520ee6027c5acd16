"""End to end: `goflow run` as a whole process against bare process pools making the same calls.

  e2e_bench.py --shape fanout --n 10000 [--no-history] [--profile OUT.txt]
  e2e_bench.py --pools --shape fanout --n 10000

Shapes (every node calls ``operator:add`` and writes an output):
  fanout  start -> N python nodes -> end
  chain   start -> n0 -> n1 -> ... -> end
  loop    a loop over N items (max_parallel 64) whose body node writes an output
goflow: ``goflow run FILE --workers 2 --json`` in a fresh GOFLOW_HOME (history on, the default
database there), timed from spawn to exit; peak memory, sampled from /proc every 20 ms, is
goflow run's RSS and the PSS summed over it and all its children; the history size is the
database's files after exit.
Pools: ProcessPoolExecutor(2) and multiprocessing.Pool(2) calling operator.add the same number
of times in the same pattern (all at once / one after the other / at most 64 in flight),
timed from pool creation to shutdown. Both sides also report CPU seconds (user + system, the
process tree's): on a shared machine the wall clock of one run varies 2x, CPU time much less.
Prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

WINDOW = 64


def workflow(shape: str, n: int) -> str:
    lines = ["name: e2e-" + shape, "nodes:", "  - {id: start, type: start}", "  - {id: end, type: end}"]
    if shape == "loop":
        items = ", ".join(str(i) for i in range(n))
        lines[1:1] = ["variables:", f"  - {{name: items, type: array, default: [{items}]}}"]
        lines += [f"  - {{id: each, type: loop, collection: items, item: it, body: [work], max_parallel: {WINDOW},"
                  " output: outs}",
                  "  - {id: work, type: python, call: 'operator:add', args: ['${it}', 1], output: o}",
                  "edges:", "  - {from: start, to: each}", "  - {from: each, to: end}"]
        return "\n".join(lines) + "\n"
    lines += [f"  - {{id: n{i}, type: python, call: 'operator:add', args: [{i}, 1], output: o{i}}}"
              for i in range(n)]
    lines.append("edges:")
    if shape == "fanout":
        for i in range(n):
            lines += [f"  - {{from: start, to: n{i}}}", f"  - {{from: n{i}, to: end}}"]
    else:
        chain = ["start", *(f"n{i}" for i in range(n)), "end"]
        lines += [f"  - {{from: {a}, to: {b}}}" for a, b in zip(chain, chain[1:])]
    return "\n".join(lines) + "\n"


def _children_cpu() -> float:
    """User + system CPU seconds of every waited-for descendant (goflow run and its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- RSS of a process tree, from /proc --------------------------------------------------------------
def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's), from /proc."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def _status_kib(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(sum of PSS over root and its descendants, RSS of root) in KiB.

    PSS, not RSS, for the sum: a child forked from a big parent (before it execs a worker,
    or a worker's forked control lane) shares its pages, which RSS would count twice."""
    total, stack, seen = 0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += _status_kib(pid, "smaps_rollup", "Pss:")
        stack += child_pids(pid)
    return total, _status_kib(root, "status", "VmRSS:")


def run_goflow(shape: str, n: int, history: bool, profile: str | None) -> dict:
    home = tempfile.mkdtemp(prefix="goflow-e2e-")
    try:
        path = os.path.join(home, "flow.yaml")
        with open(path, "w") as fh:
            fh.write(workflow(shape, n))
        env = dict(os.environ, GOFLOW_HOME=home)
        cmd = [sys.executable, "-m", "goflow", "run", path, "--workers", "2", "--json"]
        if profile:
            cmd = [sys.executable, "-m", "cProfile", "-o", profile + ".prof", "-m", "goflow", "run", path,
                   "--workers", "2", "--json"]
        if not history:
            cmd.append("--no-history")
        peak = [0, 0]
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=home)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                total, own = tree_memory_kib(proc.pid)
                peak[0], peak[1] = max(peak[0], total), max(peak[1], own)
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate(timeout=1800)
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
        done.set()
        sampler.join()
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        outcome = json.loads(lines[-1]) if lines else {}
        db = sum(os.path.getsize(os.path.join(home, f)) for f in os.listdir(home) if f.startswith("history.db"))
        if profile:
            import pstats

            with open(profile, "w") as fh:
                pstats.Stats(profile + ".prof", stream=fh).sort_stats("cumulative").print_stats(60)
                pstats.Stats(profile + ".prof", stream=fh).sort_stats("tottime").print_stats(40)
        return {"shape": shape, "n": n, "history": history, "status": outcome.get("status"),
                "exit": proc.returncode, "wall_s": wall, "cpu_s": cpu, "nodes_per_s": n / wall,
                "peak_tree_pss_mib": peak[0] / 1024, "peak_rss_cli_mib": peak[1] / 1024,
                "history_bytes": db, "stderr_tail": err.decode(errors="replace")[-500:] if proc.returncode else ""}
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- the pools -----------------------------------------------------------------------------------------
def _calls(submit, shape: str, n: int) -> None:
    """``submit(i) -> future-like with .result()``; the call pattern of ``shape``."""
    if shape == "chain":
        for i in range(n):
            submit(i).result()
    elif shape == "loop":
        pending = []
        for i in range(n):
            if len(pending) >= WINDOW:
                pending.pop(0).result()
            pending.append(submit(i))
        for f in pending:
            f.result()
    else:
        for f in [submit(i) for i in range(n)]:
            f.result()


class _Async:
    def __init__(self, r):
        self.r = r

    def result(self):
        return self.r.get()


def run_pools(shape: str, n: int) -> dict:
    import multiprocessing
    import operator
    from concurrent.futures import ProcessPoolExecutor

    cpu0, t0 = _own_cpu() + _children_cpu(), time.perf_counter()
    with ProcessPoolExecutor(2) as ex:
        _calls(lambda i: ex.submit(operator.add, i, 1), shape, n)
    ppe = time.perf_counter() - t0
    cpu1, t0 = _own_cpu() + _children_cpu(), time.perf_counter()
    with multiprocessing.Pool(2) as pool:
        _calls(lambda i: _Async(pool.apply_async(operator.add, (i, 1))), shape, n)
    mp = time.perf_counter() - t0
    cpu2 = _own_cpu() + _children_cpu()
    return {"shape": shape, "n": n, "ppe_s": ppe, "mp_s": mp, "ppe_cpu_s": cpu1 - cpu0, "mp_cpu_s": cpu2 - cpu1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["fanout", "chain", "loop"], required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--pools", action="store_true", help="measure the pools instead of goflow")
    ap.add_argument("--no-history", action="store_true")
    ap.add_argument("--profile", metavar="OUT.txt", help="cProfile goflow run's main process into OUT.txt")
    a = ap.parse_args()
    result = run_pools(a.shape, a.n) if a.pools else run_goflow(a.shape, a.n, not a.no_history, a.profile)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

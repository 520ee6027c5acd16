"""Peer measurements, one round of one peer. Run with bench/.venv's python (bench/run.py does it).

  peer_bench.py PEER --n 10000 --chain-n 1000 --window 64

PEER: ppe (ProcessPoolExecutor(2)), mp (multiprocessing.Pool(2)), dask (LocalCluster 2 procs x 1
thread), ray (local, num_cpus=2, 127.0.0.1). Workloads, same as goflow's:
  fanout  N independent no-op tasks, submitted one by one, then all gathered
  window  N no-op tasks with at most `window` in flight (goflow's loop with max_parallel)
  chain   `chain_n` dependent tasks (ppe/mp: client-driven submit(prev).result();
          dask: submit(f, prev_future); ray: f.remote(prev_ref))
Prints one JSON object on its last stdout line. Start-up = pool/cluster creation + one warm-up
round trip per worker; excluded from the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from noop_tasks import noop  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- ProcessPoolExecutor / multiprocessing.Pool ------------------------------------------------------
def run_ppe(a):
    from concurrent.futures import ProcessPoolExecutor, wait
    t0 = time.perf_counter()
    ex = ProcessPoolExecutor(2)
    wait([ex.submit(noop, i) for i in range(4)])
    startup = time.perf_counter() - t0
    try:
        def fanout():
            wait([ex.submit(noop, i) for i in range(a.n)])

        def window():
            sem = threading.Semaphore(a.window)
            rel = lambda _f: sem.release()  # noqa: E731
            futs = []
            for i in range(a.n):
                sem.acquire()
                f = ex.submit(noop, i)
                f.add_done_callback(rel)
                futs.append(f)
            wait(futs)

        def chain():
            prev = None
            for _ in range(a.chain_n):
                prev = ex.submit(noop, prev).result()

        return startup, fanout, window, chain, ex.shutdown
    except Exception:
        ex.shutdown()
        raise


def run_mp(a):
    import multiprocessing as mp
    t0 = time.perf_counter()
    pool = mp.Pool(2)
    for r in [pool.apply_async(noop, (i,)) for i in range(4)]:
        r.get()
    startup = time.perf_counter() - t0

    def fanout():
        rs = [pool.apply_async(noop, (i,)) for i in range(a.n)]
        for r in rs:
            r.get()

    def window():
        sem = threading.Semaphore(a.window)
        rel = lambda _v: sem.release()  # noqa: E731
        rs = []
        for i in range(a.n):
            sem.acquire()
            rs.append(pool.apply_async(noop, (i,), callback=rel, error_callback=rel))
        for r in rs:
            r.get()

    def chain():
        prev = None
        for _ in range(a.chain_n):
            prev = pool.apply_async(noop, (prev,)).get()

    def close():
        pool.close()
        pool.join()

    return startup, fanout, window, chain, close


# -- dask.distributed ------------------------------------------------------------------------------------
def run_dask(a):
    import logging

    from dask.distributed import Client, LocalCluster, as_completed, wait
    logging.getLogger("distributed").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    client.gather([client.submit(noop, i, pure=False) for i in range(4)])
    startup = time.perf_counter() - t0

    def fanout():
        wait([client.submit(noop, i, pure=False) for i in range(a.n)])

    def window():
        first = [client.submit(noop, i, pure=False) for i in range(min(a.window, a.n))]
        ac = as_completed(first)
        nxt = len(first)
        for _f in ac:
            if nxt < a.n:
                ac.add(client.submit(noop, nxt, pure=False))
                nxt += 1

    def chain():
        prev = client.submit(noop, None, pure=False)
        for _ in range(a.chain_n - 1):
            prev = client.submit(noop, prev, pure=False)
        prev.result()

    def close():
        client.close()
        cluster.close()

    return startup, fanout, window, chain, close


# -- ray --------------------------------------------------------------------------------------------------
def run_ray(a):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    f = ray.remote(noop)
    ray.get([f.remote(i) for i in range(4)])
    startup = time.perf_counter() - t0

    def fanout():
        ray.get([f.remote(i) for i in range(a.n)])

    def window():
        pending = [f.remote(i) for i in range(min(a.window, a.n))]
        nxt = len(pending)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            if nxt < a.n:
                pending.append(f.remote(nxt))
                nxt += 1

    def chain():
        prev = f.remote(None)
        for _ in range(a.chain_n - 1):
            prev = f.remote(prev)
        ray.get(prev)

    return startup, fanout, window, chain, ray.shutdown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=["ppe", "mp", "dask", "ray"])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--chain-n", type=int, default=1_000)
    ap.add_argument("--window", type=int, default=64)
    a = ap.parse_args()
    startup, fanout, window, chain, close = globals()[f"run_{a.peer}"](a)
    try:
        res = {"peer": a.peer, "startup_s": startup}
        for name, fn, n in (("fanout", fanout, a.n), ("window", window, a.n), ("chain", chain, a.chain_n)):
            wall = timed(fn)
            res[name] = {"wall_s": wall, "nodes_per_s": n / wall}
    finally:
        close()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

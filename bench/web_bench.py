"""The web gateway under load (bench/run.py's ``gateway`` section; nothing here is a test).

  .venv/bin/python bench/web_bench.py gateway [--n 10000] [--clients 1,100] [--reps 3]

Per rep, on one embedded coordinator with 2 local workers and an N-node fan-out:

- ``none``: the run with no gateway (the reactor's dispatch rate, nodes/s, and the reactor
  thread's CPU time per node);
- ``raw``: the same run with one plain SUB process draining everything (what any
  subscriber costs the publisher, which the gateway cannot avoid being);
- ``gateway``: the same run with a gateway process attached (caught up) and one SSE client
  reading the execution's stream: the cost of the gateway to the engine, paired with
  ``none`` in alternating order. Wall-clock rates on a shared 2-core machine swing by tens
  of percent between runs; the reactor's CPU time per node does not depend on other load;
- for each client count K: K SSE clients (one separate process, asyncio) connected before
  the run read it live; events/s per client and in all, and lossless = every client got
  exactly the execution's events (its last eseq), ending with the terminal event;
- ``replay``: after the run, K clients read the whole execution from the gateway's ring.

Prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from gf_bench import fanout_yaml, load_text  # noqa: E402

from goflow.coordinator.embedded import EmbeddedRuntime  # noqa: E402
from goflow.web.server import GatewayProcess  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the SSE client process ------------------------------------------------------------------
async def _read_one(port: int, query: str, started: float) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(f"GET /api/events?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    count, first, tail = 0, None, b""
    terminals = (b'"type":"execution.completed"', b'"type":"execution.failed"', b'"type":"execution.cancelled"')
    try:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            data = tail + chunk
            found = data.count(b"\nid: ") - tail.count(b"\nid: ")
            if found and first is None:
                first = time.time()
            count += found
            if any(t in data for t in terminals):
                break
            tail = data[-64:]
    finally:
        writer.close()
    return {"events": count, "first": first, "last": time.time(), "started": started}


async def _clients(port: int, count: int, query: str) -> list[dict]:
    started = time.time()
    return await asyncio.gather(*(_read_one(port, query, started) for _ in range(count)))


def cmd_clients(a) -> None:
    """Child process: print "ready", read ``count`` streams to their terminal event, print JSON.

    It stands for browsers, which run elsewhere: at a lower CPU priority, so that on a small
    machine it takes what the engine leaves rather than competing with it."""
    os.nice(10)
    print("ready", flush=True)
    results = asyncio.run(_clients(a.port, a.count, a.query))
    print(json.dumps(results), flush=True)


def spawn_clients(port: int, count: int, query: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, "clients", "--port", str(port), "--count", str(count),
                             "--query", query], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def collect(proc: subprocess.Popen, timeout: float = 600) -> list[dict]:
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


# -- one measured run --------------------------------------------------------------------
def reactor_cpu(rt) -> float:
    """CPU seconds the coordinator's reactor thread has used (immune to other processes'
    load, unlike wall time on a shared machine)."""
    if not hasattr(rt, "reactor_ident"):   # ask the reactor thread who it is
        import threading

        rt.reactor_ident = rt.coordinator.call(threading.get_ident)
    return time.clock_gettime(time.pthread_getcpuclockid(rt.reactor_ident))


def run_fanout(rt, workflow, eid: str | None = None) -> tuple[float, float]:
    """One run to its end (it must complete): its wall time and the reactor's CPU time."""
    start, cpu = time.perf_counter(), reactor_cpu(rt)
    _, future = rt.coordinator.submit(workflow, {}, execution_id=eid or uuid.uuid4().hex)
    status = future.result(timeout=600)["status"]
    if status != "completed":
        raise RuntimeError(f"the benchmark run {status}")
    return time.perf_counter() - start, reactor_cpu(rt) - cpu


#: A plain subscriber of everything (niced, draining): what any subscriber costs the publisher.
RAW_SUB = ("import os, sys, zmq\nos.nice(10)\ns = zmq.Context().socket(zmq.SUB)\ns.setsockopt(zmq.RCVHWM, 0)\n"
           "s.setsockopt(zmq.SUBSCRIBE, b'')\ns.connect(sys.argv[1])\nprint('ready', flush=True)\n"
           "while True:\n    s.recv_multipart()\n")


def wait_subscribed(rt, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while rt.coordinator.call(lambda: rt.coordinator.publisher.subscription_count) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the subscriber did not subscribe")
        time.sleep(0.02)


def wait_caught_up(rt, port: int, timeout: float = 120.0) -> None:
    """Until the gateway holds every event published so far (its start-up replay is done):
    the steady state of an attached gateway, which is what the cost compares."""
    import urllib.request

    last = rt.coordinator.call(lambda: rt.coordinator.publisher.last_seq)
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/metrics") as response:
            if (json.load(response)["last_seq"] or 0) >= last:
                return
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not catch up")
        time.sleep(0.05)


def last_eseq(rt, eid: str) -> int:
    from goflow.events.monitor import Monitor

    with Monitor(rt.events_tcp, rt.control_tcp) as mon:
        return mon.request("replay", execution_id=eid, from_eseq=2 ** 62)["last_eseq"]


def summarise(clients: list[dict], expected: int, t0: float) -> dict:
    counts = [c["events"] for c in clients]
    spans = [c["last"] - t0 for c in clients]
    per_client = [c["events"] / s for c, s in zip(clients, spans) if s > 0]
    return {"clients": len(clients), "expected_events": expected, "lossless": all(n == expected for n in counts),
            "min_events": min(counts), "max_events": max(counts),
            "per_client_events_per_s": statistics.median(per_client) if per_client else None,
            "all_clients_events_per_s": sum(counts) / max(spans) if spans and max(spans) > 0 else None,
            "last_client_done_s": max(spans)}


def cmd_gateway(a) -> dict:
    counts = [int(x) for x in a.clients.split(",") if x]
    workflow = load_text(fanout_yaml(a.n), "fanout")
    out: dict = {"n": a.n, "clients": counts, "reps": []}
    ports = [free_port(), free_port()]
    rt = EmbeddedRuntime(workers=2, publish=[f"tcp://127.0.0.1:{ports[0]}"], control=[f"tcp://127.0.0.1:{ports[1]}"],
                         python_paths=[BENCH_DIR])
    with rt:
        rt.events_tcp, rt.control_tcp = f"tcp://127.0.0.1:{ports[0]}", f"tcp://127.0.0.1:{ports[1]}"
        rt.wait_for_workers(2)
        run_fanout(rt, workflow)   # warm-up: imports, worker start
        for r in range(a.reps):
            rep: dict = {}
            order = ["none", "raw", "gateway"]
            order = order[r % 3:] + order[:r % 3]
            for mode in order:
                if mode == "none":
                    wall, cpu = run_fanout(rt, workflow)
                    rep["none_nodes_per_s"], rep["none_reactor_us_per_node"] = a.n / wall, 1e6 * cpu / a.n
                    continue
                if mode == "raw":
                    sub = subprocess.Popen([sys.executable, "-c", RAW_SUB, rt.events_tcp], stdout=subprocess.PIPE,
                                           text=True)
                    try:
                        assert sub.stdout is not None and sub.stdout.readline().strip() == "ready"
                        wait_subscribed(rt)
                        wall, cpu = run_fanout(rt, workflow)
                    finally:
                        sub.kill()
                        sub.wait()
                    rep["raw_nodes_per_s"], rep["raw_reactor_us_per_node"] = a.n / wall, 1e6 * cpu / a.n
                    continue
                port = free_port()
                gateway = GatewayProcess(f"127.0.0.1:{port}", rt.events_tcp, rt.control_tcp)
                gateway.start()
                try:
                    wait_caught_up(rt, port)
                    eid = uuid.uuid4().hex
                    clients = spawn_clients(port, 1, f"execution={eid}")
                    wall, cpu = run_fanout(rt, workflow, eid)
                    rep["gateway_nodes_per_s"], rep["gateway_reactor_us_per_node"] = a.n / wall, 1e6 * cpu / a.n
                    collect(clients)
                finally:
                    gateway.stop()
            rep["cost_pct"] = 100 * (1 - rep["gateway_nodes_per_s"] / rep["none_nodes_per_s"])
            rep["reactor_cpu_cost_pct"] = 100 * (rep["gateway_reactor_us_per_node"] / rep["none_reactor_us_per_node"] - 1)
            rep["reactor_cpu_cost_vs_raw_pct"] = 100 * (rep["gateway_reactor_us_per_node"]
                                                        / rep["raw_reactor_us_per_node"] - 1)
            port = free_port()
            gateway = GatewayProcess(f"127.0.0.1:{port}", rt.events_tcp, rt.control_tcp)
            gateway.start()
            try:
                wait_caught_up(rt, port)
                for k in counts:
                    eid = uuid.uuid4().hex
                    clients = spawn_clients(port, k, f"execution={eid}")
                    t0 = time.time()
                    run_fanout(rt, workflow, eid)
                    live = collect(clients)
                    expected = last_eseq(rt, eid)
                    rep[f"live_{k}"] = summarise(live, expected, t0)
                    t1 = time.time()
                    replay = collect(spawn_clients(port, k, f"execution={eid}"))
                    rep[f"replay_{k}"] = summarise(replay, expected, t1)
            finally:
                gateway.stop()
            out["reps"].append(rep)
            print(json.dumps({"rep": r, **rep}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gateway")
    g.add_argument("--n", type=int, default=10_000)
    g.add_argument("--clients", default="1,100")
    g.add_argument("--reps", type=int, default=3)
    c = sub.add_parser("clients")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--query", required=True)
    a = ap.parse_args()
    if a.cmd == "clients":
        cmd_clients(a)
        return
    print(json.dumps(cmd_gateway(a)))


if __name__ == "__main__":
    main()

"""goflow measurements. Run with the project venv's python (bench/run.py does it).

Every sub-command prints ONE JSON object on its last stdout line. Sub-commands:

  dispatch  one round: runtime start-up, 10k fan-out / 10k loop (max_parallel 64) / 1k chain
            with one raw SUB process attached (and once with a SUB thread in-process, for
            reference), then the fan-out with no subscriber and with one
            stalled subscriber (slow-subscriber impact)
  emission  EventPublisher.emit cost with 0 / 1 / 10 / stalled subscribers
  delivery  PUB->SUB events/s through Monitor (typed) and raw pyzmq+msgpack
  latency   worker 'finished' -> event in a separate subscriber process
  scale     a large fan-out or loop: wall time, peak RSS growth per finished node
  validate  goflow.language.loader.check(goflow.language.loader.parse(text)) for an N-node workflow
  mcp       mcp-server-time calls/s, pooled vs fresh session
  profile   cProfile of Coordinator._loop during one workload
  anatomy   where engine-only dispatch time goes: one --n fan-out with a draining subscriber
            process, as shipped and with the events built but never sent ("unsent") or not
            built at all ("silent"), the bench patching EventPublisher; wall, and CPU of the
            reactor thread, the workers and the subscriber, read from /proc
  inside    node.log on dispatch (nodes printing --lines lines vs none) and tracing on vs off
            (a --n fan-out exporting to a local OTLP/HTTP sink), alternating, as ratios
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import msgpack  # noqa: E402
import zmq  # noqa: E402

from e2e_bench import child_pids  # noqa: E402
from stats import pct  # noqa: E402

CALL = "noop_tasks:noop"


# -- workflow generators ---------------------------------------------------------------------
def fanout_yaml(n: int) -> str:
    out = ['version: "1.0"', f"name: fanout-{n}", "nodes:", "  - {id: start, type: start}",
           "  - {id: end, type: end}"]
    out += [f'  - {{id: n{i}, type: python, call: "{CALL}"}}' for i in range(n)]
    out.append("edges:")
    for i in range(n):
        out.append(f"  - {{from: start, to: n{i}}}")
        out.append(f"  - {{from: n{i}, to: end}}")
    return "\n".join(out) + "\n"


def chain_yaml(n: int) -> str:
    out = ['version: "1.0"', f"name: chain-{n}", "nodes:", "  - {id: start, type: start}",
           "  - {id: end, type: end}"]
    out += [f'  - {{id: n{i}, type: python, call: "{CALL}"}}' for i in range(n)]
    out.append("edges:")
    prev = "start"
    for i in range(n):
        out.append(f"  - {{from: {prev}, to: n{i}}}")
        prev = f"n{i}"
    out.append(f"  - {{from: {prev}, to: end}}")
    return "\n".join(out) + "\n"


def loop_yaml(max_parallel: int) -> str:
    return f"""version: "1.0"
name: loop
variables:
  - {{name: items, type: array, default: []}}
nodes:
  - {{id: start, type: start}}
  - id: each
    type: loop
    collection: "${{items}}"
    item: item
    body: [body]
    max_parallel: {max_parallel}
  - id: body
    type: python
    call: "{CALL}"
    args: ["${{item}}"]
  - {{id: end, type: end}}
edges:
  - {{from: start, to: each}}
  - {{from: each, to: end}}
"""


def load_text(text: str, name: str):
    from goflow.language.loader import load
    return load(name, text=text)


# -- helpers ----------------------------------------------------------------------------------
def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RawSubscriber(threading.Thread):
    """A raw pyzmq SUB that only receives (the 'one subscriber attached' of the dispatch runs)."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        super().__init__(daemon=True, name="bench-sub")
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.count = 0
        self._halt = threading.Event()

    def run(self) -> None:
        sock, recv = self.sock, self.sock.recv_multipart
        while not self._halt.is_set():
            if sock.poll(50):
                while True:
                    try:
                        recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.count += 1
        sock.close(0)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


STALLED_SUB = r"""
import sys, time, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, int(sys.argv[2]))
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()       # never reads the socket; exits when the parent closes stdin
"""

DRAIN_SUB = r"""
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, 100000)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect(sys.argv[1])
print("ready", flush=True)
p = zmq.Poller(); p.register(s, zmq.POLLIN); p.register(sys.stdin, zmq.POLLIN)
n = 0
while True:
    ev = dict(p.poll(1000))
    if s in ev:
        while True:
            try:
                s.recv_multipart(zmq.NOBLOCK); n += 1
            except zmq.Again:
                break
    if sys.stdin.fileno() in ev or sys.stdin in ev:
        break
"""


def spawn_sub(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", line
    return proc


def end_sub(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except Exception:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_subscriptions(rt, count: int, timeout: float = 10.0) -> None:
    pub = rt.coordinator.publisher
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rt.coordinator.call(lambda: pub.subscription_count) >= count:
            return
        time.sleep(0.01)
    raise RuntimeError(f"subscriptions did not reach {count}")


def run_once(rt, workflow, variables=None) -> dict:
    t0 = time.perf_counter()
    eid, fut = rt.coordinator.submit(workflow, variables or {})
    summary = fut.result(timeout=600)
    wall = time.perf_counter() - t0
    counts = rt.coordinator.call(lambda: dict(rt.coordinator.executions[eid].counts)
                                 if eid in rt.coordinator.executions else {})
    return {"wall_s": wall, "status": summary["status"], "completed": counts.get("completed"),
            "failed": counts.get("failed"), "eid": eid}


def new_runtime(**kw):
    from goflow.coordinator.embedded import EmbeddedRuntime
    t0 = time.perf_counter()
    rt = EmbeddedRuntime(workers=2, python_paths=[BENCH_DIR], **kw)
    rt.__enter__()
    if not rt.wait_for_workers(2):
        rt.close()
        raise RuntimeError("workers did not join")
    return rt, time.perf_counter() - t0


# -- dispatch (1) + slow subscriber (5) -------------------------------------------------------
def cmd_dispatch(a) -> dict:
    t0 = time.perf_counter()
    wf_fan = load_text(fanout_yaml(a.n), "fanout.yaml")
    wf_loop = load_text(loop_yaml(a.max_parallel), "loop.yaml")
    wf_chain = load_text(chain_yaml(a.chain_n), "chain.yaml")
    load_s = time.perf_counter() - t0
    items = list(range(a.n))
    from goflow.protocol import DEFAULT_CREDITS

    rt, startup = new_runtime(**({"credits": a.credits} if a.credits else {}))
    out = {"startup_s": startup, "load_s": load_s, "n": a.n, "chain_n": a.chain_n,
           "credits": a.credits or DEFAULT_CREDITS}
    try:
        # warm-up: one tiny execution so imports in the workers are done
        run_once(rt, load_text(fanout_yaml(4), "warm.yaml"))
        # One subscriber attached, as a user attaches one: another process (goflow watch, a
        # dashboard) draining everything.
        sub = spawn_sub(DRAIN_SUB, rt.events_endpoint)
        wait_subscriptions(rt, 1)
        for name, wf, var, n in (("fanout", wf_fan, None, a.n), ("loop", wf_loop, {"items": items}, a.n),
                                 ("chain", wf_chain, None, a.chain_n)):
            r = run_once(rt, wf, var)
            r["nodes_per_s"] = n / r["wall_s"]
            out[f"{name}_1sub"] = r
        end_sub(sub)
        wait_subscriptions_zero(rt)
        # For reference: the subscriber as a thread of the coordinator's own process (it then
        # competes with the reactor for the GIL on every send).
        thread = RawSubscriber(rt.coordinator.context, rt.events_endpoint)
        thread.start()
        wait_subscriptions(rt, 1)
        r = run_once(rt, wf_fan)
        time.sleep(0.05)
        r["events_received"] = thread.count
        r["nodes_per_s"] = a.n / r["wall_s"]
        out["fanout_1sub_thread"] = r
        thread.stop()
        wait_subscriptions_zero(rt)
        if not a.no_slowsub:
            order = (["none", "stalled"] if a.round % 2 == 0 else ["stalled", "none"]) * a.pairs
            for k, cfg in enumerate(order):
                proc = None
                if cfg == "stalled":
                    proc = spawn_sub(STALLED_SUB, rt.events_endpoint, str(a.stalled_rcvhwm))
                    wait_subscriptions(rt, 1)
                st0 = rt.coordinator.call(rt.coordinator.publisher.stats)
                r = run_once(rt, wf_fan)
                st1 = rt.coordinator.call(rt.coordinator.publisher.stats)
                r["nodes_per_s"] = a.n / r["wall_s"]
                r["events_published"] = st1["published"] - st0["published"]
                r["events_dropped"] = st1["dropped"] - st0["dropped"]
                out.setdefault(f"fanout_{cfg}_all", []).append(r)
                out[f"fanout_{cfg}"] = r
                if proc is not None:
                    end_sub(proc)
                    wait_subscriptions_zero(rt)
    finally:
        rt.close()
    return out


# -- inside: node.log and tracing costs -------------------------------------------------------
def _calls_yaml(n: int, call: str, args: str = "") -> str:
    out = ['version: "1.0"', f"name: calls-{n}", "nodes:", "  - {id: start, type: start}",
           "  - {id: end, type: end}"]
    out += [f'  - {{id: n{i}, type: python, call: "{call}"{args}}}' for i in range(n)]
    out.append("edges:")
    for i in range(n):
        out.append(f"  - {{from: start, to: n{i}}}")
        out.append(f"  - {{from: n{i}, to: end}}")
    return "\n".join(out) + "\n"


class _OtlpSink:
    """A local OTLP/HTTP endpoint that accepts and discards spans (counts requests)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cmd_inside(a) -> dict:
    out: dict = {"n": a.n, "log_nodes": a.log_nodes, "lines": a.lines, "reps": a.reps}
    quiet = load_text(_calls_yaml(a.log_nodes, CALL), "quiet.yaml")
    chatty = load_text(_calls_yaml(a.log_nodes, "noop_tasks:print_lines", f", args: [{a.lines}]"), "chatty.yaml")
    fan = load_text(fanout_yaml(a.n), "fanout.yaml")
    rt, _ = new_runtime()
    try:
        run_once(rt, load_text(fanout_yaml(4), "warm.yaml"))
        sub = spawn_sub(DRAIN_SUB, rt.events_endpoint)
        wait_subscriptions(rt, 1)
        for rep in range(a.reps):
            for name, wf in ((("quiet", quiet), ("chatty", chatty)) if rep % 2 == 0 else
                             (("chatty", chatty), ("quiet", quiet))):
                st0 = rt.coordinator.call(lambda: dict(rt.coordinator.node_output.stats))
                r = run_once(rt, wf)
                st1 = rt.coordinator.call(lambda: dict(rt.coordinator.node_output.stats))
                r["nodes_per_s"] = a.log_nodes / r["wall_s"]
                r["log_events"] = st1["log_batches"] - st0["log_batches"]
                r["log_lines"] = st1["log_lines"] - st0["log_lines"]
                out.setdefault(f"log_{name}", []).append(r)
        for rep in range(a.reps):
            r = run_once(rt, fan)
            r["nodes_per_s"] = a.n / r["wall_s"]
            out.setdefault("trace_off", []).append(r)
        end_sub(sub)
    finally:
        rt.close()
    otlp = _OtlpSink()
    rt, _ = new_runtime(otlp_endpoint=otlp.url)
    try:
        run_once(rt, load_text(fanout_yaml(4), "warm.yaml"))
        sub = spawn_sub(DRAIN_SUB, rt.events_endpoint)
        wait_subscriptions(rt, 1)
        for rep in range(a.reps):
            r = run_once(rt, fan)
            r["nodes_per_s"] = a.n / r["wall_s"]
            out.setdefault("trace_on", []).append(r)
        end_sub(sub)
    finally:
        rt.close()
        out["otlp_requests"] = otlp.requests
        otlp.close()
    return out


def wait_subscriptions_zero(rt, timeout: float = 10.0) -> None:
    pub = rt.coordinator.publisher
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rt.coordinator.call(lambda: pub.subscription_count) == 0:
            return
        time.sleep(0.01)


# -- emission (2) -------------------------------------------------------------------------------
def _emit_loop(pub, n: int, eid: str) -> list[int]:
    pc = time.perf_counter_ns
    emit = pub.emit
    samples = [0] * n
    for i in range(n):
        now = time.time()
        meta = {"started": now, "finished": now, "worker": "w-1", "output": None, "duration_s": 0.0001}
        t = pc()
        emit("node.completed", eid, node_id=f"n{i}", node_type="python", status="completed", attempt=1,
             meta=meta)
        samples[i] = pc() - t
    return samples


def cmd_emission(a) -> dict:
    from goflow.events.publisher import EventPublisher
    ctx = zmq.Context.instance()
    tmp = tempfile.mkdtemp(prefix="gfbench-")
    endpoint = f"ipc://{tmp}/ev"
    pub = EventPublisher(ctx, [endpoint])
    pub.open_execution("e" * 32, "bench")
    results: dict[str, list] = {}
    configs = ["0", "1", "10", "stalled"]
    try:
        for rep in range(a.reps):
            for cfg in configs[rep % 4:] + configs[:rep % 4]:
                procs = []
                if cfg == "stalled":
                    procs.append(spawn_sub(STALLED_SUB, endpoint, "10"))
                elif cfg != "0":
                    procs += [spawn_sub(DRAIN_SUB, endpoint) for _ in range(int(cfg))]
                want = len(procs)
                deadline = time.monotonic() + 10
                while pub.subscription_count < want and time.monotonic() < deadline:
                    pub.on_readable()
                    time.sleep(0.005)
                time.sleep(0.05)
                st0 = pub.stats()
                s = _emit_loop(pub, a.n, "e" * 32)
                st1 = pub.stats()
                for p in procs:
                    end_sub(p)
                deadline = time.monotonic() + 10
                while pub.subscription_count > 0 and time.monotonic() < deadline:
                    pub.on_readable()
                    time.sleep(0.005)
                results.setdefault(cfg, []).append({
                    "p50_ns": pct(s, 50), "p99_ns": pct(s, 99), "p999_ns": pct(s, 99.9), "max_ns": max(s),
                    "mean_ns": sum(s) / len(s), "dropped": st1["dropped"] - st0["dropped"], "n": a.n})
    finally:
        pub.close(0)
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return {"configs": results}


# -- delivery (3) -------------------------------------------------------------------------------
EIDS = [f"{i:x}" * 32 for i in range(10)]  # 10 executions: one of them = a 10 % prefix filter
EIDS = [e[:32] for e in EIDS]


def cmd_pub(a) -> None:
    """Publisher process: a real EventPublisher, lossless (SNDHWM=0)."""
    from goflow.events.publisher import EventPublisher
    ctx = zmq.Context()
    pub = EventPublisher(ctx, [a.endpoint], sndhwm=0)
    for e in EIDS:
        pub.open_execution(e, "bench")
    print("bound", flush=True)
    deadline = time.monotonic() + 30
    while pub.subscription_count < a.subs and time.monotonic() < deadline:
        pub.on_readable()
        time.sleep(0.002)
    time.sleep(0.1)
    t0 = time.time()
    emit = pub.emit
    for i in range(a.n):
        now = time.time()
        emit("node.completed", EIDS[i % 10], node_id=f"n{i}", node_type="python", status="completed",
             attempt=1, meta={"started": now, "finished": now, "worker": "w-1", "output": None,
                              "duration_s": 0.0001})
    t1 = time.time()
    print(json.dumps({"t_start": t0, "t_end": t1, "published": pub.stats()["published"]}), flush=True)
    sys.stdin.read()   # keep the socket open until the parent says we are done
    pub.close(2000)


def cmd_sub(a) -> None:
    """Subscriber process: count `expect` node.completed events, decoded."""
    ctx = zmq.Context()
    expect = a.expect
    first = last = None
    count = 0
    if a.mode == "typed":
        from goflow.events.filter import EventFilter
        from goflow.events.monitor import Monitor
        mon = Monitor(a.endpoint, context=ctx, rcvhwm=0)
        filt = EventFilter(executions=[EIDS[0]]) if a.filter else None
        it = mon.subscribe(filt, reliable=False, timeout=a.timeout)
        print("ready", flush=True)     # the publisher waits until every SUB has subscribed
        for ev in it:                  # the generator connects on its first next()
            if ev.type != "node.completed":
                continue
            count += 1
            if first is None:
                if a.drain:            # everything else is queued here: time the drain alone
                    sys.stdin.readline()
                first = time.time()
                count = 0
                expect -= 1
            if count >= expect:
                break
        last = time.time()
        it.close()
        if first is not None:
            count += 1                 # the first event, consumed before the clock started
    else:
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, f"node.completed/{EIDS[0]}/".encode() if a.filter else b"")
        s.connect(a.endpoint)
        print("ready", flush=True)
        if a.drain:
            sys.stdin.readline()      # wait until the publisher is done: measure the drain alone
        # the leanest raw consumer: blocking recv() per frame (no poll per event, no
        # recv_multipart wrapper), msgpack.unpackb per payload, RCVTIMEO ends it
        s.setsockopt(zmq.RCVTIMEO, int(a.timeout * 1000))
        unpackb = msgpack.unpackb
        recv = s.recv
        try:
            recv()                    # topic of the first event
            first = time.time()
            ev = unpackb(recv())
            count = 1 if ev["type"] == "node.completed" else 0
            while count < expect:
                recv()
                ev = unpackb(recv())
                if ev["type"] == "node.completed":
                    count += 1
        except zmq.Again:
            pass
        last = time.time()
        s.close(0)
    print(json.dumps({"count": count, "first": first, "last": last}), flush=True)


def cmd_delivery(a) -> dict:
    scenarios = [  # (mode, transport, subs, filter); "drain" = subscriber starts after the publisher ends
        ("raw", "ipc", 1, False), ("typed", "ipc", 1, False),
        ("raw", "ipc", 1, "drain"), ("typed", "ipc", 1, "drain"),
        ("raw", "tcp", 1, False), ("typed", "tcp", 1, False),
        ("raw", "ipc", 10, False), ("typed", "ipc", 10, False),
        ("raw", "ipc", 1, True), ("typed", "ipc", 1, True),
    ]
    if a.quick:
        scenarios = [s for s in scenarios if s[1] == "ipc" or s[0] == "raw"]
    results: dict[str, list] = {}
    me = os.path.abspath(__file__)
    for rep in range(a.reps):
        for mode, transport, subs, filt in scenarios:
            drain = filt == "drain"
            filt = filt is True
            key = f"{mode}/{transport}/{subs}sub/{'10%' if filt else 'all'}" + ("/drain" if drain else "")
            tmp = tempfile.mkdtemp(prefix="gfbench-")
            if transport == "ipc":
                endpoint = f"ipc://{tmp}/ev"
            else:
                import socket
                with socket.socket() as sk:
                    sk.bind(("127.0.0.1", 0))
                    port = sk.getsockname()[1]
                endpoint = f"tcp://127.0.0.1:{port}"
            pub = subprocess.Popen([sys.executable, me, "_pub", "--endpoint", endpoint, "--subs", str(subs),
                                    "--n", str(a.n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert pub.stdout.readline().strip() == "bound"
            expect = a.n // 10 if filt else a.n
            sub_procs = []
            for _ in range(subs):
                cmd = [sys.executable, me, "_sub", "--endpoint", endpoint, "--mode", mode, "--expect", str(expect),
                       "--timeout", "10"]
                if filt:
                    cmd.append("--filter")
                if drain:
                    cmd.append("--drain")
                p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
                assert p.stdout.readline().strip() == "ready"
                sub_procs.append(p)
            pub_res = json.loads(pub.stdout.readline())
            if drain:
                time.sleep(0.5)        # let the last events reach the subscriber's queue
            for p in sub_procs if drain else ():
                try:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                except BrokenPipeError:
                    pass
            subs_res = []
            for p in sub_procs:
                line = p.stdout.read().strip().splitlines()[-1]
                p.wait(30)
                subs_res.append(json.loads(line))
            pub.stdin.close()
            pub.wait(10)
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            rates = [r["count"] / (r["last"] - r["first"]) for r in subs_res if r["first"] and r["last"] > r["first"]]
            last = max((r["last"] or 0) for r in subs_res)
            results.setdefault(key, []).append({
                "per_sub_events_per_s": sorted(rates)[len(rates) // 2] if rates else None,
                "all_subs_events_per_s": sum(rates),
                "published_per_s_sustained": None if drain else (a.n / (last - pub_res["t_start"]) if last else None),
                "publisher_emit_per_s": a.n / (pub_res["t_end"] - pub_res["t_start"]),
                "delivered_pct": 100.0 * sum(r["count"] for r in subs_res) / (expect * subs),
            })
    return {"scenarios": results, "n": a.n}


# -- latency (4) ----------------------------------------------------------------------------------
LAT_SUB = r"""
import json, sys, time, zmq, msgpack
ctx = zmq.Context()
s = ctx.socket(zmq.SUB)
s.setsockopt(zmq.RCVHWM, 0)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.SUBSCRIBE, b"node.completed/")
s.setsockopt(zmq.SUBSCRIBE, b"execution.")
s.connect(sys.argv[1])
print("ready", flush=True)
lat, pub_part, sub_part = [], [], []
while s.poll(30000):
    topic, payload = s.recv_multipart()
    now = time.time()
    ev = msgpack.unpackb(payload)
    if ev["type"] == "node.completed":
        fin = (ev.get("meta") or {}).get("finished")
        if fin:
            lat.append(now - fin); pub_part.append(ev["ts"] - fin); sub_part.append(now - ev["ts"])
    elif ev["type"] in ("execution.completed", "execution.failed"):
        break
print(json.dumps({"lat": lat, "coord": pub_part, "wire": sub_part}), flush=True)
"""


def cmd_latency(a) -> dict:
    rt, _ = new_runtime()
    out = {}
    try:
        run_once(rt, load_text(fanout_yaml(4), "warm.yaml"))
        for name, text, n in (("chain", chain_yaml(a.chain_n), a.chain_n), ("fanout", fanout_yaml(a.n), a.n)):
            wf = load_text(text, f"{name}.yaml")
            per = []
            for rep in range(a.reps):
                proc = subprocess.Popen([sys.executable, "-c", LAT_SUB, rt.events_endpoint],
                                        stdout=subprocess.PIPE, text=True)
                assert proc.stdout.readline().strip() == "ready"
                wait_subscriptions(rt, 2)
                run_once(rt, wf)
                data = json.loads(proc.stdout.read().strip().splitlines()[-1])
                proc.wait(10)
                wait_subscriptions_zero(rt)
                lat = data["lat"]
                per.append({"p50_us": pct(lat, 50) * 1e6, "p99_us": pct(lat, 99) * 1e6, "n": len(lat),
                            "coord_p50_us": pct(data["coord"], 50) * 1e6, "coord_p99_us": pct(data["coord"], 99) * 1e6,
                            "wire_p50_us": pct(data["wire"], 50) * 1e6, "wire_p99_us": pct(data["wire"], 99) * 1e6})
            out[name] = per
    finally:
        rt.close()
    return out


# -- scale (6) ------------------------------------------------------------------------------------
def cmd_scale(a) -> dict:
    t0 = time.perf_counter()
    if a.kind == "fanout":
        text = fanout_yaml(a.n)
        variables = None
    else:
        text = loop_yaml(a.max_parallel)
        variables = {"items": list(range(a.n))}
    wf = load_text(text, f"{a.kind}.yaml")
    del text
    load_s = time.perf_counter() - t0
    rt, startup = new_runtime()
    try:
        run_once(rt, load_text(fanout_yaml(4), "warm.yaml"))
        gc.collect()
        peak_unreset = maxrss_bytes()
        # Loading a 100k-node YAML peaks far above the run: reset the kernel's peak-RSS mark
        # (Linux /proc/self/clear_refs "5"; getrusage's ru_maxrss follows it) so the
        # before/after difference is the execution's own peak growth.
        reset = reset_peak_rss()
        rss0, peak0 = current_rss_bytes(), maxrss_bytes()
        r = run_once(rt, wf, variables)
        peak1 = maxrss_bytes()
        rss1 = current_rss_bytes()
        pub_stats = rt.coordinator.call(rt.coordinator.publisher.stats)
        pub = rt.coordinator.publisher
        log_bytes = rt.coordinator.call(lambda: sum(len(t) + len(p) for _, t, p in pub._ring))
        records = rt.coordinator.call(lambda: len(rt.coordinator.executions[r["eid"]].records))
    finally:
        rt.close()
    finished = r["completed"] or 0
    r.update({"kind": a.kind, "n": a.n, "load_s": load_s, "startup_s": startup, "nodes_per_s": a.n / r["wall_s"],
              "peak_rss_before": peak0, "peak_rss_after": peak1, "rss_before": rss0, "rss_after": rss1,
              "peak_growth_per_node_B": (peak1 - peak0) / finished if finished else None,
              "rss_growth_per_node_B": (rss1 - rss0) / finished if finished else None,
              "events_published": pub_stats["published"], "log_events": pub_stats["log_events"],
              "ring_events": pub_stats["ring_events"], "event_log_payload_bytes": log_bytes,
              "records": records, "peak_reset": reset, "peak_rss_after_load": peak_unreset})
    return r


def cmd_validate(a) -> dict:
    from goflow.language.loader import check, parse
    text = fanout_yaml(a.n)
    times, parse_t = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        loaded = parse(text, "v.yaml")
        t1 = time.perf_counter()
        check(loaded)
        t2 = time.perf_counter()
        assert not loaded.errors, loaded.problems[:3]
        times.append(t2 - t0)
        parse_t.append(t1 - t0)
    return {"n": a.n, "total_s": times, "parse_s": parse_t}


# -- MCP (7) ---------------------------------------------------------------------------------------
def cmd_mcp(a) -> dict:
    from goflow.workers.executors.mcp import MCPSessionPool
    spec = {"id": "time", "command": sys.executable, "args": ["-m", "mcp_server_time"]}
    out = {"pooled_calls_per_s": [], "fresh_calls_per_s": [], "pooled_first_call_s": []}
    for rep in range(a.reps):
        with MCPSessionPool() as pool:
            t0 = time.perf_counter()
            pool.call_tool(spec, "get_current_time", {"timezone": "UTC"})
            out["pooled_first_call_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(a.n):
                pool.call_tool(spec, "get_current_time", {"timezone": "UTC"})
            out["pooled_calls_per_s"].append(a.n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(a.fresh_n):
            pool = MCPSessionPool()
            try:
                pool.call_tool(spec, "get_current_time", {"timezone": "UTC"})
            finally:
                pool.close()
        out["fresh_calls_per_s"].append(a.fresh_n / (time.perf_counter() - t0))
    return out


# -- profile ---------------------------------------------------------------------------------------
def cmd_profile(a) -> dict:
    import cProfile
    import io
    import pstats
    from goflow.coordinator.reactor import Reactor
    prof = cProfile.Profile()
    original = Reactor._loop

    def profiled(self):          # wraps the reactor thread only; goflow's code is unchanged
        prof.runcall(original, self)

    Reactor._loop = profiled
    wf = load_text(fanout_yaml(a.n) if a.kind == "fanout" else chain_yaml(a.n), "p.yaml")
    rt, _ = new_runtime()
    sub = None
    try:
        run_once(rt, load_text(fanout_yaml(4), "warm.yaml"))
        if not a.no_sub:
            sub = RawSubscriber(rt.coordinator.context, rt.events_endpoint)
            sub.start()
            wait_subscriptions(rt, 1)
        r = run_once(rt, wf)
    finally:
        if sub is not None:
            sub.stop()
        rt.close()
        Reactor._loop = original
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(25)
    buf.write("\n\n=== by cumulative ===\n")
    st.sort_stats("cumulative").print_stats(35)
    with open(a.out, "w") as fh:
        fh.write(f"# cProfile of Reactor._loop (reactor thread only), {a.kind} n={a.n}, "
                 f"{'no subscriber' if a.no_sub else '1 raw SUB thread in-process'}, wall (profiled) {r['wall_s']:.3f}s\n"
                 f"# (includes start-up and the warm-up execution; the workload dominates)\n")
        fh.write(buf.getvalue())
    return {"kind": a.kind, "n": a.n, "sub": not a.no_sub, "wall_s_profiled": r["wall_s"], "file": a.out}


# -- anatomy: what the events cost engine-only dispatch ----------------------------------------
def _proc_cpu_s(path: str) -> float:
    """User + system CPU seconds from a /proc .../stat file."""
    with open(path) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _unsent_flush(self) -> None:
    self._outbox.clear()


def _silent_emit(self, *args, **kwargs) -> int:
    self._seq += 1
    return self._seq


ANATOMY_VARIANTS = {
    "shipped": {},
    "unsent": {"flush": _unsent_flush},    # built, packed, logged, queued; never sent
    "silent": {"emit": _silent_emit},      # only numbered: no payload, no log, no send
}


def cmd_anatomy(a) -> dict:
    """One fan-out per variant and rep, interleaved, each in a fresh runtime: what a user's
    subscriber and the events cost the reactor, which is dispatch's critical path."""
    from goflow.events.publisher import EventPublisher
    wf = load_text(fanout_yaml(a.n), "anatomy.yaml")
    runs: dict[str, list[dict]] = {name: [] for name in ANATOMY_VARIANTS}
    for rep in range(a.reps):
        names = list(ANATOMY_VARIANTS)
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            rt, _ = new_runtime()
            originals = {attr: getattr(EventPublisher, attr) for attr in ANATOMY_VARIANTS[name]}
            try:
                run_once(rt, load_text(fanout_yaml(4), "warm.yaml"))
                sub = spawn_sub(DRAIN_SUB, rt.events_endpoint)
                wait_subscriptions(rt, 1)
                thread = next(t for t in threading.enumerate() if t.name == rt.coordinator.reactor.name)
                reactor = f"/proc/self/task/{thread.native_id}/stat"
                workers = [pid for pid in child_pids(os.getpid()) if pid != sub.pid]
                stats = [reactor, f"/proc/{sub.pid}/stat", *(f"/proc/{pid}/stat" for pid in workers)]
                before = [_proc_cpu_s(path) for path in stats]
                for attr, patch in ANATOMY_VARIANTS[name].items():
                    setattr(EventPublisher, attr, patch)
                try:
                    r = run_once(rt, wf)
                finally:
                    for attr, original in originals.items():
                        setattr(EventPublisher, attr, original)
                cpu = [_proc_cpu_s(path) - b for path, b in zip(stats, before)]
                end_sub(sub)
            finally:
                rt.close()
            runs[name].append({"wall_s": r["wall_s"], "status": r["status"], "nodes_per_s": a.n / r["wall_s"],
                               "reactor_cpu_s": cpu[0], "subscriber_cpu_s": cpu[1], "workers_cpu_s": sum(cpu[2:])})
    return {"n": a.n, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--chain-n", type=int, default=1_000)
    ap.add_argument("--fresh-n", type=int, default=10)
    ap.add_argument("--max-parallel", type=int, default=64)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--stalled-rcvhwm", type=int, default=10)
    ap.add_argument("--no-slowsub", action="store_true")
    ap.add_argument("--no-sub", action="store_true")
    ap.add_argument("--pairs", type=int, default=1, help="none/stalled pairs per dispatch round")
    ap.add_argument("--credits", type=int, help="EmbeddedRuntime credits (default: its own, goflow.protocol.DEFAULT_CREDITS)")
    ap.add_argument("--kind", default="fanout")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--endpoint")
    ap.add_argument("--subs", type=int, default=1)
    ap.add_argument("--mode", default="raw")
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--filter", action="store_true")
    ap.add_argument("--drain", action="store_true")
    ap.add_argument("--out", default="/dev/null")
    ap.add_argument("--log-nodes", type=int, default=200)
    ap.add_argument("--lines", type=int, default=1000)
    a = ap.parse_args()
    if a.cmd == "_pub":
        return cmd_pub(a)
    if a.cmd == "_sub":
        return cmd_sub(a)
    fn = globals()[f"cmd_{a.cmd}"]
    res = fn(a)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

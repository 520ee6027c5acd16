"""goflow benchmark suite: `make bench` (full, < 10 min) or `make bench-quick` (< 2 min).

  .venv/bin/python bench/run.py [--quick] [--only NAME ...] [--reps N] [--skip-peers]

Sections (names for --only): dispatch, anatomy, emission, delivery, latency, scale, mcp, inside, e2e,
gateway, profile. anatomy is engine-only dispatch with its events as shipped, built but never
sent, and not built (what the events and a subscriber cost the reactor). e2e is `goflow run`
as a whole process (bench/e2e_bench.py) against bare pools in the same run; gateway is the web
dashboard's gateway under load (bench/web_bench.py).
goflow parts run in subprocesses of THIS interpreter (the project venv); the peers (dask,
ray, ProcessPoolExecutor, multiprocessing) run in subprocesses of bench/.venv's python, which
this script creates and fills on first use (a failed install skips that peer, with a message).
Writes bench/results/<timestamp>.json and bench/results/latest.json. Benchmarks never assert
on time; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PEER_VENV = os.path.join(BENCH, ".venv")
PEER_PY = os.path.join(PEER_VENV, "bin", "python")
RESULTS = os.path.join(BENCH, "results")
GF = os.path.join(BENCH, "gf_bench.py")
PEERS_SCRIPT = os.path.join(BENCH, "peer_bench.py")
SECTIONS = ["dispatch", "anatomy", "emission", "delivery", "latency", "scale", "mcp", "inside", "e2e", "gateway",
            "profile"]
E2E = os.path.join(BENCH, "e2e_bench.py")
WEB = os.path.join(BENCH, "web_bench.py")
# Versions measured in /work/shared/reference/measured-limits.md; pinned so runs compare.
PEER_PACKAGES = {"dask": ["dask[distributed]==2026.8.0"], "ray": ["ray==2.60.0"]}

ENV = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
           PYTHONPATH=BENCH + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- subprocess plumbing ------------------------------------------------------------------------------
def run_json(cmd: list[str], timeout: float) -> dict | None:
    """Run cmd in its own process group; return the JSON on its last stdout line (None on failure)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        log(f"TIMEOUT after {timeout:.0f}s: {' '.join(cmd[1:4])}")
        return None
    finally:
        try:                      # whatever the child left in its group (ray/dask helpers)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        log(f"FAILED ({proc.returncode}): {' '.join(cmd[1:4])}\n{err[-2000:]}")
        return None
    return json.loads(lines[-1])


def gf(*args: str, timeout: float = 300) -> dict | None:
    return run_json([sys.executable, GF, *args], timeout)


# -- peer environment -----------------------------------------------------------------------------------
def ensure_peer_venv() -> dict[str, bool]:
    """Create bench/.venv and install the peers once; returns which peers are importable."""
    available = {"ppe": False, "mp": False, "dask": False, "ray": False}
    if not os.path.exists(PEER_PY):
        log("creating bench/.venv for the peers")
        r = subprocess.run([sys.executable, "-m", "venv", PEER_VENV])
        if r.returncode != 0:
            log("could not create bench/.venv: every peer is skipped")
            return available
    available["ppe"] = available["mp"] = True
    for peer, pkgs in PEER_PACKAGES.items():
        if subprocess.run([PEER_PY, "-c", f"import {peer}"], capture_output=True).returncode == 0:
            available[peer] = True
            continue
        log(f"installing {peer} into bench/.venv (once; cached there)")
        r = subprocess.run([PEER_PY, "-m", "pip", "install", "-q", *pkgs], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"SKIPPING peer {peer}: pip install {' '.join(pkgs)} failed:\n{r.stderr[-1500:]}")
            continue
        available[peer] = subprocess.run([PEER_PY, "-c", f"import {peer}"], capture_output=True).returncode == 0
    return available


def peer_versions() -> dict:
    code = ("import json,sys\nout={'python':sys.version.split()[0]}\n"
            "for m in ('dask','distributed','ray','cloudpickle','tornado'):\n"
            "  try:\n    out[m]=__import__(m).__version__\n  except Exception:\n    out[m]=None\n"
            "print(json.dumps(out))")
    try:
        return json.loads(subprocess.run([PEER_PY, "-c", code], capture_output=True, text=True, timeout=120).stdout)
    except Exception:
        return {}


# -- machine ---------------------------------------------------------------------------------------------
def machine() -> dict:
    import msgpack
    import zmq
    cpu = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as fh:
            ram = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "ram_bytes": ram, "ram_gib": round(ram / 2 ** 30, 1) if ram else None,
            "kernel": platform.release(), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)),
            "msgpack_c_extension": not msgpack.Packer.__module__.endswith("fallback")}


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def spread(vals):
    vals = [v for v in vals if v is not None]
    return {"median": med(vals), "min": min(vals) if vals else None, "max": max(vals) if vals else None,
            "n": len(vals), "values": vals}


# -- sections ----------------------------------------------------------------------------------------------
def sec_dispatch(cfg, peers) -> dict:
    rounds: dict[str, list] = {"goflow": []}
    order = ["goflow"] + [p for p in ("mp", "ppe", "dask", "ray") if peers.get(p)]
    slow_reps = cfg["slow_peer_reps"]
    # goflow and the process pools interleave round by round; dask and ray run after all of
    # them, so the background processes their clusters start (ray's raylet and GCS, dask's
    # nanny) cannot outlive a round into the next goflow or pool round and skew those ratios.
    fast = [p for p in order if p not in ("dask", "ray")]
    slow = [p for p in order if p in ("dask", "ray")]
    schedule = [(r, p) for r in range(cfg["reps"]) for p in fast] + \
               [(r, p) for r in range(slow_reps) for p in slow]
    for r, sysname in schedule:
        log(f"dispatch round {r + 1}/{cfg['reps']}: {sysname}")
        if sysname == "goflow":
            res = gf("dispatch", "--n", str(cfg["n"]), "--chain-n", str(cfg["chain_n"]), "--round", str(r),
                     "--pairs", str(cfg["slowsub_pairs"]), timeout=300)
        else:
            res = run_json([PEER_PY, PEERS_SCRIPT, sysname, "--n", str(cfg["n"]), "--chain-n",
                            str(cfg["chain_n"]), "--window", "64"], timeout=400)
        rounds.setdefault(sysname, []).append(res)
    out: dict = {"n": cfg["n"], "chain_n": cfg["chain_n"], "raw": rounds, "summary": {}}
    s = out["summary"]
    g = [x for x in rounds["goflow"] if x]
    s["goflow"] = {
        "fanout": spread([x["fanout_1sub"]["nodes_per_s"] for x in g]),
        "loop": spread([x["loop_1sub"]["nodes_per_s"] for x in g]),
        "chain": spread([x["chain_1sub"]["nodes_per_s"] for x in g]),
        "startup_s": spread([x["startup_s"] for x in g]),
        "fanout_status": [x["fanout_1sub"]["status"] for x in g],
        "fanout_sub_thread": spread([x["fanout_1sub_thread"]["nodes_per_s"] for x in g]),
        "events_per_fanout_node": med([x["fanout_1sub_thread"]["events_received"] / cfg["n"] for x in g]),
    }
    if g and "fanout_none" in g[0]:
        pairs = [(n_["nodes_per_s"], s_["nodes_per_s"]) for x in g
                 for n_, s_ in zip(x["fanout_none_all"], x["fanout_stalled_all"])]
        s["slowsub"] = {
            "none": spread([p[0] for p in pairs]),
            "stalled": spread([p[1] for p in pairs]),
            "paired_cost_pct": spread([100 * (1 - b / a) for a, b in pairs]),
            "cost_pct_of_medians": None,
        }
        a, b = s["slowsub"]["none"]["median"], s["slowsub"]["stalled"]["median"]
        s["slowsub"]["cost_pct_of_medians"] = 100 * (1 - b / a) if a and b else None
    for p in order[1:]:
        pr = [x for x in rounds.get(p, []) if x]
        if not pr:
            s[p] = None
            continue
        s[p] = {"fanout": spread([x["fanout"]["nodes_per_s"] for x in pr]),
                "loop": spread([x["window"]["nodes_per_s"] for x in pr]),
                "chain": spread([x["chain"]["nodes_per_s"] for x in pr]),
                "startup_s": spread([x["startup_s"] for x in pr])}
    ratios = {}
    for p in order[1:]:
        if s.get(p):
            ratios[p] = {w: (s["goflow"][w]["median"] / s[p][w]["median"]) if s[p][w]["median"] else None
                         for w in ("fanout", "loop", "chain")}
    out["ratios_goflow_over_peer"] = ratios
    return out


def sec_anatomy(cfg, peers) -> dict:
    """Engine-only dispatch with the events as shipped, built but unsent, and not built."""
    log(f"anatomy: {cfg['anatomy_n']:,}-node fan-out x {cfg['anatomy_reps']} per variant")
    res = gf("anatomy", "--n", str(cfg["anatomy_n"]), "--reps", str(cfg["anatomy_reps"]), timeout=600)
    if not res:
        return {"error": "gf_bench.py anatomy failed"}
    summary = {name: {key: spread([r[key] for r in runs])
                      for key in ("wall_s", "nodes_per_s", "reactor_cpu_s", "workers_cpu_s", "subscriber_cpu_s")}
               for name, runs in res["runs"].items()}
    return {"n": res["n"], "raw": res["runs"], "summary": summary}


def sec_emission(cfg, peers) -> dict:
    log("emission")
    res = gf("emission", "--n", str(cfg["emit_n"]), "--reps", str(cfg["emit_reps"]), timeout=300) or {}
    out = {"n": cfg["emit_n"], "raw": res, "summary": {}}
    for k, reps in (res.get("configs") or {}).items():
        out["summary"][k] = {m: spread([r[m] / 1000 for r in reps]) for m in ("p50_ns", "p99_ns", "mean_ns")}
    return out


def sec_delivery(cfg, peers) -> dict:
    log("delivery")
    args = ["delivery", "--n", str(cfg["deliv_n"]), "--reps", str(cfg["deliv_reps"])]
    if cfg["quick"]:
        args.append("--quick")
    res = gf(*args, timeout=420) or {}
    out = {"n": cfg["deliv_n"], "raw": res, "summary": {}}
    for k, reps in (res.get("scenarios") or {}).items():
        out["summary"][k] = {m: spread([r[m] for r in reps]) for m in
                             ("per_sub_events_per_s", "all_subs_events_per_s", "published_per_s_sustained",
                              "publisher_emit_per_s", "delivered_pct")}
    return out


def sec_latency(cfg, peers) -> dict:
    log("latency")
    res = gf("latency", "--n", str(cfg["lat_n"]), "--chain-n", str(cfg["chain_n"]), "--reps", str(cfg["lat_reps"]),
             timeout=300) or {}
    out = {"raw": res, "summary": {}}
    for k, reps in res.items():
        out["summary"][k] = {m: spread([r[m] for r in reps]) for m in
                             ("p50_us", "p99_us", "coord_p50_us", "coord_p99_us", "wire_p50_us", "wire_p99_us")}
    return out


def sec_scale(cfg, peers) -> dict:
    out = {}
    for kind in ("fanout", "loop"):
        log(f"scale {kind} n={cfg['scale_n']}")
        out[kind] = gf("scale", "--kind", kind, "--n", str(cfg["scale_n"]), timeout=600)
    log(f"validate n={cfg['validate_n']}")
    v = gf("validate", "--n", str(cfg["validate_n"]), "--reps", str(cfg["validate_reps"]), timeout=300)
    out["validate"] = v
    if v:
        out["validate_summary"] = {"total_s": spread(v["total_s"]), "parse_s": spread(v["parse_s"])}
    return out


def sec_mcp(cfg, peers) -> dict:
    log("mcp")
    res = gf("mcp", "--n", str(cfg["mcp_n"]), "--fresh-n", str(cfg["mcp_fresh_n"]), "--reps", str(cfg["mcp_reps"]),
             timeout=300) or {}
    return {"raw": res, "summary": {k: spread(v) for k, v in res.items()}}


def sec_inside(cfg, peers) -> dict:
    """node.log on dispatch (nodes printing 1,000 lines vs none) and tracing on vs off."""
    log("inside")
    res = gf("inside", "--n", str(cfg["inside_n"]), "--log-nodes", str(cfg["inside_log_nodes"]), "--lines", "1000",
             "--reps", str(cfg["inside_reps"]), timeout=600) or {}
    out = {"raw": res, "summary": {}}
    if res:
        s = out["summary"]
        for key in ("log_quiet", "log_chatty", "trace_off", "trace_on"):
            s[key] = spread([r["nodes_per_s"] for r in res.get(key) or []])
        quiet, chatty = s["log_quiet"]["median"], s["log_chatty"]["median"]
        off, on = s["trace_off"]["median"], s["trace_on"]["median"]
        s["log_slowdown"] = quiet / chatty if quiet and chatty else None
        s["trace_slowdown"] = off / on if off and on else None
        s["log_events_per_chatty_run"] = med([r["log_events"] for r in res.get("log_chatty") or []])
        s["log_lines_per_chatty_run"] = med([r["log_lines"] for r in res.get("log_chatty") or []])
        s["log_nodes"], s["lines"], s["n"] = res.get("log_nodes"), res.get("lines"), res.get("n")
    return out


def sec_e2e(cfg, peers) -> dict:
    """`goflow run` whole (history on, outputs) vs ProcessPoolExecutor/mp.Pool doing the same calls."""
    runs = []
    for shape, n in cfg["e2e_runs"]:
        log(f"e2e {shape} n={n}: goflow run")
        g = run_json([sys.executable, E2E, "--shape", shape, "--n", str(n)], timeout=1800)
        log(f"e2e {shape} n={n}: pools")
        p = run_json([sys.executable, E2E, "--pools", "--shape", shape, "--n", str(n)], timeout=900)
        row = {"shape": shape, "n": n, "goflow": g, "pools": p}
        if g and p and g["wall_s"]:
            row["ratio_ppe"] = p["ppe_s"] / g["wall_s"]      # goflow speed as a fraction of the pool's
            row["ratio_mp"] = p["mp_s"] / g["wall_s"]
            row["us_per_node"] = 1e6 * g["wall_s"] / n
            if g.get("cpu_s") and p.get("ppe_cpu_s"):        # the same on CPU seconds (less noisy)
                row["cpu_ratio_ppe"] = p["ppe_cpu_s"] / g["cpu_s"]
        runs.append(row)
    linearity = {}
    for shape in {r["shape"] for r in runs}:
        rows = sorted((r for r in runs if r["shape"] == shape and r.get("us_per_node")), key=lambda r: r["n"])
        if len(rows) >= 2:
            linearity[shape] = {"small_n": rows[0]["n"], "large_n": rows[-1]["n"],
                                "per_node_ratio": rows[-1]["us_per_node"] / rows[0]["us_per_node"]}
    return {"runs": runs, "linearity": linearity}


def sec_gateway(cfg, peers) -> dict:
    """The web gateway (bench/web_bench.py): SSE events/s to 1 and 100 clients during an
    N-node fan-out, lossless; the engine's dispatch rate with and without the gateway."""
    log(f"gateway n={cfg['gateway_n']}")
    res = run_json([sys.executable, WEB, "gateway", "--n", str(cfg["gateway_n"]), "--clients", "1,100",
                    "--reps", str(cfg["gateway_reps"])], timeout=1200) or {}
    reps = res.get("reps") or []
    out: dict = {"n": cfg["gateway_n"], "raw": res, "summary": {}}
    if not reps:
        return out
    s = out["summary"]
    s["none_nodes_per_s"] = spread([r["none_nodes_per_s"] for r in reps])
    s["gateway_nodes_per_s"] = spread([r["gateway_nodes_per_s"] for r in reps])
    s["cost_pct"] = spread([r["cost_pct"] for r in reps])
    s["none_reactor_us_per_node"] = spread([r["none_reactor_us_per_node"] for r in reps])
    s["gateway_reactor_us_per_node"] = spread([r["gateway_reactor_us_per_node"] for r in reps])
    s["reactor_cpu_cost_pct"] = spread([r["reactor_cpu_cost_pct"] for r in reps])
    s["raw_nodes_per_s"] = spread([r["raw_nodes_per_s"] for r in reps])
    s["raw_reactor_us_per_node"] = spread([r["raw_reactor_us_per_node"] for r in reps])
    s["reactor_cpu_cost_vs_raw_pct"] = spread([r["reactor_cpu_cost_vs_raw_pct"] for r in reps])
    for key in ("live_1", "live_100", "replay_1", "replay_100"):
        s[key] = {m: spread([r[key][m] for r in reps]) for m in ("per_client_events_per_s", "all_clients_events_per_s")}
        s[key]["lossless"] = all(r[key]["lossless"] for r in reps)
        s[key]["events"] = reps[0][key]["expected_events"]
    return out


def sec_profile(cfg, peers) -> dict:
    out = {}
    stamp = cfg["stamp"]
    for name, kind, n, extra in (("fanout", "fanout", cfg["n"], []), ("fanout-nosub", "fanout", cfg["n"], ["--no-sub"]),
                                 ("chain", "chain", cfg["chain_n"], [])):
        log(f"profile {name}")
        path = os.path.join(RESULTS, f"profile-{name}-{stamp}.txt")
        out[name] = gf("profile", "--kind", kind, "--n", str(n), "--out", path, *extra, timeout=300)
    return out


# -- goals and table ----------------------------------------------------------------------------------------
def goals(results) -> list[dict]:
    rows = []

    def add(name, value, goal, reach, higher=True, unit=""):
        if value is None:
            rows.append({"goal": name, "value": None, "met": None, "unit": unit})
            return
        met = value >= goal if higher else value <= goal
        headroom = (value / goal - 1) * 100 if higher else (1 - value / goal) * 100
        row = {"goal": name, "value": value, "target": goal, "unit": unit, "met": met,
               "headroom_pct": headroom}
        if reach is not None:
            row["reach"] = reach
            row["reach_met"] = value >= reach if higher else value <= reach
        rows.append(row)

    d = (results.get("dispatch") or {}).get("summary") or {}
    g = d.get("goflow") or {}
    add("independent nodes/s (10k fan-out, 1 sub)", (g.get("fanout") or {}).get("median"), 10_000, 15_000,
        unit="nodes/s")
    add("chain nodes/s (1k chain, 1 sub)", (g.get("chain") or {}).get("median"), 2_000, 3_000, unit="nodes/s")
    e = (results.get("emission") or {}).get("summary") or {}
    for k in ("0", "1", "10", "stalled"):
        if k in e:
            add(f"emit p50, {k} subscriber(s)", e[k]["p50_ns"]["median"], 10.0, None, higher=False, unit="us")
    dl = (results.get("delivery") or {}).get("summary") or {}
    for k in ("raw/ipc/1sub/all", "raw/tcp/1sub/all"):
        if k in dl:
            add(f"delivery {k}", dl[k]["per_sub_events_per_s"]["median"], 100_000, None, unit="events/s")
    for k in ("typed/ipc/1sub/all", "typed/tcp/1sub/all"):
        if k in dl:
            add(f"delivery {k}", dl[k]["per_sub_events_per_s"]["median"], 50_000, None, unit="events/s")
    ss = d.get("slowsub") or {}
    if ss:
        add("stalled subscriber dispatch cost (median of paired rounds)", ss["paired_cost_pct"]["median"], 5.0,
            None, higher=False, unit="%")
    sc = results.get("scale") or {}
    for kind in ("fanout", "loop"):
        r = sc.get(kind)
        if r:
            rows.append({"goal": f"{r['n']:,}-node {kind} completes", "value": r["status"],
                         "met": r["status"] == "completed" and (r.get("failed") or 0) == 0})
            add(f"{kind} coordinator peak RSS growth per finished node", r["peak_growth_per_node_B"], 1024.0, None,
                higher=False, unit="B")
    for p in ("mp",):
        ratio = ((results.get("dispatch") or {}).get("ratios_goflow_over_peer") or {}).get(p) or {}
        if ratio.get("fanout") is not None:
            add(f"engine-only fan-out / {p}", ratio["fanout"], 1.0, None, unit="x")
    e2e = results.get("e2e") or {}
    pairs = [r.get("ratio_ppe") for r in e2e.get("runs") or () if r["shape"] == "fanout" and r["n"] == 20_000]
    if any(x is not None for x in pairs):   # the median of the interleaved pairs
        add("e2e 20k fan-out (outputs, history) / ProcessPoolExecutor", med([x for x in pairs if x is not None]),
            0.5, None, unit="x")
    for r in e2e.get("runs") or ():
        g = r.get("goflow") or {}
        if r["shape"] == "fanout" and r["n"] == 100_000:
            add("e2e 100k fan-out wall", g.get("wall_s"), 30.0, None, higher=False, unit="s")
            add("e2e 100k fan-out peak memory (goflow run + workers, PSS)", g.get("peak_tree_pss_mib"), 600.0, None,
                higher=False, unit="MiB")
    for shape, lin in sorted((e2e.get("linearity") or {}).items()):
        add(f"e2e {shape}: per-node cost {lin['large_n']:,} / {lin['small_n']:,}", lin["per_node_ratio"], 1.3, None,
            higher=False, unit="x")
    return rows


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 10_000:
        return f"{v / 1000:,.1f}k"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def sp(d):
    if not d or d.get("median") is None:
        return "-"
    return f"{fmt(d['median'])} ({fmt(d['min'])}-{fmt(d['max'])}, n={d['n']})"


def table(results) -> str:
    L = []
    d = results.get("dispatch")
    if d:
        s = d["summary"]
        L.append(f"## Dispatch, 2 workers (nodes/s, median (min-max, reps)); fan-out/loop N={d['n']:,}, chain {d['chain_n']:,}")
        L.append("| system | fan-out | loop / window 64 | chain | start-up s |")
        L.append("|---|---|---|---|---|")
        for name in ("goflow", "mp", "ppe", "dask", "ray"):
            if s.get(name):
                x = s[name]
                label = {"goflow": "goflow (events on, 1 raw SUB)", "mp": "multiprocessing.Pool(2).apply_async",
                         "ppe": "ProcessPoolExecutor(2).submit", "dask": "dask.distributed LocalCluster 2x1",
                         "ray": "ray local num_cpus=2"}[name]
                L.append(f"| {label} | {sp(x['fanout'])} | {sp(x['loop'])} | {sp(x['chain'])} | {sp(x['startup_s'])} |")
        if d.get("ratios_goflow_over_peer"):
            L.append("")
            L.append("| goflow / peer (ratio of medians) | fan-out | loop | chain |")
            L.append("|---|---|---|---|")
            for p, r in d["ratios_goflow_over_peer"].items():
                L.append(f"| {p} | {fmt(r['fanout'])}x | {fmt(r['loop'])}x | {fmt(r['chain'])}x |")
        if s.get("slowsub"):
            ss = s["slowsub"]
            L.append("")
            L.append(f"## Slow subscriber: {d['n']:,}-node fan-out nodes/s (same runtime, order alternates per round)")
            L.append("| no subscriber | 1 stalled subscriber (RCVHWM 10) | cost, paired runs % (median, range) |")
            L.append("|---|---|---|")
            L.append(f"| {sp(ss['none'])} | {sp(ss['stalled'])} | {sp(ss['paired_cost_pct'])} |")
    an = results.get("anatomy")
    if an and an.get("summary"):
        L.append("")
        L.append(f"## Anatomy of engine-only dispatch: one {an['n']:,}-node fan-out, 1 draining subscriber process "
                 f"(median (min-max, reps); CPU s from /proc)")
        L.append("| events | wall s | nodes/s | reactor thread CPU | workers CPU | subscriber CPU |")
        L.append("|---|---|---|---|---|---|")
        labels = {"shipped": "as shipped", "unsent": "built and logged, never sent", "silent": "none (emit only numbers)"}
        for name, x in an["summary"].items():
            L.append(f"| {labels.get(name, name)} | {sp(x['wall_s'])} | {sp(x['nodes_per_s'])} | {sp(x['reactor_cpu_s'])} "
                     f"| {sp(x['workers_cpu_s'])} | {sp(x['subscriber_cpu_s'])} |")
    e = results.get("emission")
    if e and e.get("summary"):
        L.append("")
        L.append(f"## EventPublisher.emit cost (us per call; {e['n']:,} calls per rep)")
        L.append("| subscribers | p50 | p99 | mean |")
        L.append("|---|---|---|---|")
        for k, v in e["summary"].items():
            L.append(f"| {k} | {sp(v['p50_ns'])} | {sp(v['p99_ns'])} | {sp(v['mean_ns'])} |")
    dl = results.get("delivery")
    if dl and dl.get("summary"):
        L.append("")
        L.append(f"## Delivery, lossless (SNDHWM=0, RCVHWM=0), {dl['n']:,} events published per rep")
        L.append("| decoder/transport/subs/filter | received+decoded events/s per subscriber | all subscribers | "
                 "published events/s sustained | publisher emit loop events/s | delivered % |")
        L.append("|---|---|---|---|---|---|")
        for k, v in dl["summary"].items():
            L.append(f"| {k} | {sp(v['per_sub_events_per_s'])} | {sp(v['all_subs_events_per_s'])} | "
                     f"{sp(v['published_per_s_sustained'])} | {sp(v['publisher_emit_per_s'])} | {sp(v['delivered_pct'])} |")
    la = results.get("latency")
    if la and la.get("summary"):
        L.append("")
        L.append("## Latency: worker 'finished' -> event in a separate subscriber process (us)")
        L.append("| workload | p50 | p99 | worker->emit p50 | emit->subscriber p50 |")
        L.append("|---|---|---|---|---|")
        for k, v in la["summary"].items():
            L.append(f"| {k} | {sp(v['p50_us'])} | {sp(v['p99_us'])} | {sp(v['coord_p50_us'])} | {sp(v['wire_p50_us'])} |")
    sc = results.get("scale")
    if sc:
        L.append("")
        L.append("## Scale")
        L.append("| workload | status | wall s | nodes/s | load s | peak RSS before -> after MiB | peak growth B/finished node | RSS growth B/node |")
        L.append("|---|---|---|---|---|---|---|---|")
        for kind in ("fanout", "loop"):
            r = sc.get(kind)
            if r:
                L.append(f"| {kind} {r['n']:,} | {r['status']} ({r['completed']:,} completed) | {r['wall_s']:.2f} | "
                         f"{fmt(r['nodes_per_s'])} | {r['load_s']:.2f} | {r['peak_rss_before'] / 2**20:.0f} -> "
                         f"{r['peak_rss_after'] / 2**20:.0f} | {fmt(r['peak_growth_per_node_B'])} | "
                         f"{fmt(r['rss_growth_per_node_B'])} |")
        if sc.get("validate_summary"):
            v = sc["validate_summary"]
            L.append(f"\nvalidate (parse+check) of a {sc['validate']['n']:,}-node workflow: {sp(v['total_s'])} s "
                     f"(parse alone {sp(v['parse_s'])} s)")
    e2e = results.get("e2e")
    if e2e and e2e.get("runs"):
        L.append("")
        L.append("## End to end: `goflow run FILE --workers 2 --json` (history on, every node writes an output) "
                 "vs pools making the same calls")
        L.append("| shape | N | status | wall s | CPU s | nodes/s | us/node | peak MiB (goflow run RSS, + workers PSS) | "
                 "history MB | PPE s (CPU s) | mp.Pool s | goflow / PPE | goflow / mp | CPU: goflow / PPE |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in e2e["runs"]:
            g, p = r.get("goflow") or {}, r.get("pools") or {}
            L.append(f"| {r['shape']} | {r['n']:,} | {g.get('status', 'FAILED')} | {fmt(g.get('wall_s'))} | "
                     f"{fmt(g.get('cpu_s'))} | {fmt(g.get('nodes_per_s'))} | {fmt(r.get('us_per_node'))} | "
                     f"{fmt(g.get('peak_rss_cli_mib'))}, {fmt(g.get('peak_tree_pss_mib'))} | "
                     f"{fmt((g.get('history_bytes') or 0) / 1e6)} | {fmt(p.get('ppe_s'))} ({fmt(p.get('ppe_cpu_s'))}) | "
                     f"{fmt(p.get('mp_s'))} | {fmt(r.get('ratio_ppe'))}x | {fmt(r.get('ratio_mp'))}x | "
                     f"{fmt(r.get('cpu_ratio_ppe'))}x |")
        for shape, lin in sorted((e2e.get("linearity") or {}).items()):
            L.append(f"\n{shape}: per-node cost at {lin['large_n']:,} = {lin['per_node_ratio']:.2f}x that at "
                     f"{lin['small_n']:,}")
    gw = results.get("gateway")
    if gw and gw.get("summary"):
        s = gw["summary"]
        L.append("")
        L.append(f"## Web gateway: {gw['n']:,}-node fan-out, SSE clients in one separate process")
        L.append("| measure | no subscriber | 1 raw SUB | gateway + 1 SSE client | gateway cost % vs none | vs raw SUB |")
        L.append("|---|---|---|---|---|---|")
        L.append(f"| engine nodes/s (wall) | {sp(s['none_nodes_per_s'])} | {sp(s['raw_nodes_per_s'])} | "
                 f"{sp(s['gateway_nodes_per_s'])} | {sp(s['cost_pct'])} | |")
        L.append(f"| reactor thread CPU us per node | {sp(s['none_reactor_us_per_node'])} | "
                 f"{sp(s['raw_reactor_us_per_node'])} | {sp(s['gateway_reactor_us_per_node'])} | "
                 f"{sp(s['reactor_cpu_cost_pct'])} | {sp(s['reactor_cpu_cost_vs_raw_pct'])} |")
        L.append("")
        L.append("| SSE clients | events per client | lossless | events/s per client | events/s all clients |")
        L.append("|---|---|---|---|---|")
        for key, label in (("live_1", "1, live during the run"), ("live_100", "100, live during the run"),
                           ("replay_1", "1, after the run (from the ring)"),
                           ("replay_100", "100, after the run (from the ring)")):
            v = s[key]
            L.append(f"| {label} | {v['events']:,} | {'yes' if v['lossless'] else 'NO'} | "
                     f"{sp(v['per_client_events_per_s'])} | {sp(v['all_clients_events_per_s'])} |")
    m = results.get("mcp")
    if m and m.get("summary"):
        s = m["summary"]
        L.append("")
        L.append("## MCP (mcp-server-time, get_current_time)")
        L.append("| pooled calls/s | fresh session per call, calls/s | pooled first call (spawn+init) s |")
        L.append("|---|---|---|")
        L.append(f"| {sp(s.get('pooled_calls_per_s'))} | {sp(s.get('fresh_calls_per_s'))} | "
                 f"{sp(s.get('pooled_first_call_s'))} |")
    ins = results.get("inside")
    if ins and ins.get("summary"):
        s = ins["summary"]
        L.append("")
        L.append(f"## Inside a running node (2 workers, 1 draining subscriber; nodes/s, median (min-max, reps))")
        L.append(f"| workload | off | on | slowdown (off/on) |")
        L.append("|---|---|---|---|")
        L.append(f"| node.log: {s['log_nodes']:,} nodes, none vs each printing {s['lines']:,} lines "
                 f"({fmt(s['log_lines_per_chatty_run'])} lines in {fmt(s['log_events_per_chatty_run'])} node.log events) | "
                 f"{sp(s['log_quiet'])} | {sp(s['log_chatty'])} | {fmt(s['log_slowdown'])}x |")
        L.append(f"| tracing: {s['n']:,}-node fan-out, off vs OTLP/HTTP to a local sink | {sp(s['trace_off'])} | "
                 f"{sp(s['trace_on'])} | {fmt(s['trace_slowdown'])}x |")
    gl = results.get("goals")
    if gl:
        L.append("")
        L.append("## Goals")
        L.append("| goal | measured | target | met | headroom |")
        L.append("|---|---|---|---|---|")
        for r in gl:
            met = {True: "MET", False: "MISSED", None: "-"}[r["met"]]
            if r.get("reach") is not None:
                met += f" (reach {fmt(r['reach'])}: {'yes' if r['reach_met'] else 'no'})"
            head = f"{r['headroom_pct']:+.0f}%" if r.get("headroom_pct") is not None else "-"
            L.append(f"| {r['goal']} | {fmt(r['value'])} {r.get('unit', '')} | {fmt(r.get('target'))} | {met} | {head} |")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer reps, smaller N, peers ppe+mp only (< 2 min)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, metavar="NAME", help=f"sections: {', '.join(SECTIONS)}")
    ap.add_argument("--reps", type=int, help="repetitions of the dispatch rounds (others scale from it)")
    ap.add_argument("--skip-peers", action="store_true", help="goflow only")
    a = ap.parse_args()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    q = a.quick
    cfg = {"quick": q, "stamp": stamp,
           "reps": a.reps or (2 if q else 5), "slow_peer_reps": 3,
           "n": 5_000 if q else 10_000, "chain_n": 500 if q else 1_000,
           "emit_n": 20_000 if q else 100_000, "emit_reps": 2 if q else 4, "slowsub_pairs": 1 if q else 2,
           "deliv_n": 30_000 if q else 60_000, "deliv_reps": 1 if q else 3,
           "lat_n": 2_000 if q else 10_000, "lat_reps": 1 if q else 3,
           "scale_n": 20_000 if q else 100_000, "validate_n": 10_000, "validate_reps": 1 if q else 3,
           "mcp_n": 50 if q else 200, "mcp_fresh_n": 3 if q else 5, "mcp_reps": 1 if q else 2,
           "inside_n": 2_000 if q else 5_000, "inside_log_nodes": 50 if q else 200, "inside_reps": 2 if q else 4,
           "e2e_runs": [("fanout", 2_000), ("fanout", 10_000)] if q else
           [(shape, n) for shape in ("fanout", "chain", "loop") for n in (10_000, 100_000)] + [("fanout", 20_000)] * 3,
           "gateway_n": 2_000 if q else 10_000, "gateway_reps": 1 if q else 3,
           "anatomy_n": 5_000 if q else 20_000, "anatomy_reps": 1 if q else 3}
    if a.reps:
        cfg["slow_peer_reps"] = min(3, a.reps)
    sections = a.only or [s for s in SECTIONS if not (q and s == "profile")]
    os.makedirs(RESULTS, exist_ok=True)
    t0 = time.time()
    peers = {"ppe": False, "mp": False, "dask": False, "ray": False}
    if "dispatch" in sections and not a.skip_peers:
        peers = ensure_peer_venv()
        if q:
            peers["dask"] = peers["ray"] = False
        missing = [p for p in ("dask", "ray") if not peers[p] and not q]
        if missing:
            log(f"peers skipped: {', '.join(missing)} (install failed or unavailable; see above)")
    results: dict = {"timestamp": stamp, "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
                     "config": cfg, "machine": machine(), "peers_available": peers}
    if peers.get("ppe"):
        results["peer_env"] = peer_versions()
    for s in sections:
        t = time.time()
        try:
            results[s] = globals()[f"sec_{s}"](cfg, peers)
        except Exception as exc:  # one broken section must not lose the others
            log(f"section {s} failed: {type(exc).__name__}: {exc}")
            results[s] = {"error": f"{type(exc).__name__}: {exc}"}
        results.setdefault("section_seconds", {})[s] = time.time() - t
    results["goals"] = goals(results)
    results["total_seconds"] = time.time() - t0
    path = os.path.join(RESULTS, f"{stamp}.json")
    for p in (path, os.path.join(RESULTS, "latest.json")):
        with open(p, "w") as fh:
            json.dump(results, fh, indent=1)
    m = results["machine"]
    print(f"# goflow benchmark {stamp} ({'quick' if q else 'full'}, {results['total_seconds']:.0f} s)")
    print(f"machine: {m['nproc']} vCPU {m['cpu_model']}, {m['ram_gib']} GiB, Python {m['python']}, "
          f"pyzmq {m['pyzmq']} / libzmq {m['libzmq']}, msgpack {m['msgpack']}")
    if results.get("peer_env"):
        print(f"peers: {results['peer_env']}")
    print()
    print(table(results))
    print(f"\nJSON: {os.path.relpath(path, ROOT)} (and bench/results/latest.json)")


if __name__ == "__main__":
    main()

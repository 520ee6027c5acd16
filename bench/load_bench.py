"""Loading figures: parse, validate and compile a generated workflow, each step timed.

    .venv/bin/python bench/load_bench.py [--nodes 10000 100000] [--shape fanout|chain|jq]

One fresh process per size (so peak RSS is that size's), printing one JSON line each: wall
and CPU seconds of ``parse`` (YAML + schema), ``check`` (semantic validation) and
``compile_plan``, the file's size and the process's peak RSS. CPU time is reported next to
wall time because on a shared VM the wall time mostly measures the neighbours.
``docs/performance.md`` reports a run. ``fanout``: start -> N python nodes -> end (3 N
YAML mappings); ``chain``: N python nodes in a row; ``jq``: N transforms with the same
``jq(".a")`` program and guard condition (what the expression cache is for).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def workflow_text(shape: str, n: int) -> str:
    from gf_bench import chain_yaml, fanout_yaml

    if shape == "fanout":
        return fanout_yaml(n)
    if shape == "chain":
        return chain_yaml(n)
    lines = ["name: jq", "variables:", "  - {name: d, default: {a: 1}}", "nodes:", "  - {id: start, type: start}",
             "  - {id: end, type: end}"]
    lines += [f"  - {{id: t{i}, type: transform, input: \"${{d}}\", expression: 'jq(\".a\")', output: o{i}, "
              f"condition: \"d.a > 0\"}}" for i in range(n)]
    lines.append("edges:")
    for i in range(n):
        lines += [f"  - {{from: start, to: t{i}}}", f"  - {{from: t{i}, to: end}}"]
    return "\n".join(lines) + "\n"


def measure(shape: str, n: int) -> dict:
    from goflow.coordinator.plan import compile_plan
    from goflow.language.loader import check, parse

    text = workflow_text(shape, n)
    result: dict = {"shape": shape, "nodes": n, "file_bytes": len(text.encode())}
    steps = {"parse": lambda: parse(text, f"{shape}.yaml"), "check": lambda: check(loaded),
             "compile_plan": lambda: compile_plan(loaded.workflow)}
    loaded = None
    for name, step in steps.items():
        wall, cpu = time.perf_counter(), time.process_time()
        value = step()
        result[f"{name}_s"] = round(time.perf_counter() - wall, 3)
        result[f"{name}_cpu_s"] = round(time.process_time() - cpu, 3)
        if name == "parse":
            loaded = value
    assert loaded is not None and not loaded.errors, loaded.errors[:3] if loaded else None
    result["total_s"] = round(sum(result[f"{name}_s"] for name in steps), 3)
    result["total_cpu_s"] = round(sum(result[f"{name}_cpu_s"] for name in steps), 3)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--shape", choices=("fanout", "chain", "jq"), default="fanout")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the per-size child
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.shape, args.nodes[0])))
        return
    for n in args.nodes:
        subprocess.run([sys.executable, __file__, "--one", "--shape", args.shape, "--nodes", str(n)], check=True)


if __name__ == "__main__":
    main()

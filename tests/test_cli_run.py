"""``goflow run`` and ``goflow validate`` as a user runs them: real subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

GOFLOW = [sys.executable, "-m", "goflow"]

SIMPLE = """
name: simple
variables:
  - {name: n, type: number, default: 1}
  - {name: s, type: string, default: x}
nodes:
  - {id: start, type: start}
  - {id: add, type: python, call: "flowlib:add", args: ["${n}", 1], output: total}
  - {id: end, type: end, return: {total: "${total}", s: "${s}"}}
edges:
  - {from: start, to: add}
  - {from: add, to: end}
"""


def goflow(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GOFLOW, *args], capture_output=True, text=True, timeout=timeout)


def test_run_json_prints_exactly_one_object(write_flow):
    path = write_flow(SIMPLE)
    proc = goflow("run", str(path), "--json", "--workers", "1", "--var", "n=5", "--var", "s=abc")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # nothing else on stdout
    assert set(data) == {"execution_id", "workflow", "status", "result", "variables", "error", "duration_s"}
    assert data["status"] == "completed"
    assert data["result"] == {"total": 6, "s": "abc"}
    assert data["error"] is None


def test_var_values_parse_as_json_else_text(write_flow):
    path = write_flow(SIMPLE)
    proc = goflow("run", str(path), "--json", "--workers", "1", "--var", "n=2.5", "--var", "s=[1]")
    data = json.loads(proc.stdout)
    assert data["result"] == {"total": 3.5, "s": "[1]"}  # s is declared a string: its --var text as it is


def test_input_file_supplies_variables(write_flow, tmp_path):
    path = write_flow(SIMPLE)
    (tmp_path / "in.json").write_text(json.dumps({"n": 10}))
    proc = goflow("run", str(path), "--json", "--workers", "1", "--input", str(tmp_path / "in.json"))
    assert json.loads(proc.stdout)["result"]["total"] == 11


def test_failed_run_exits_1_with_error_object(write_flow):
    path = write_flow("""
        name: failing
        nodes:
          - {id: start, type: start}
          - {id: bad, type: python, call: "flowlib:fail", args: [kaput]}
          - {id: end, type: end}
        edges:
          - {from: start, to: bad}
          - {from: bad, to: end}
    """)
    proc = goflow("run", str(path), "--json", "--workers", "1")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["status"] == "failed"
    assert data["error"] == {"type": "python_error", "message": "ValueError: kaput", "node_id": "bad"}


def test_invalid_workflow_exits_2_and_names_the_problem(write_flow):
    path = write_flow("""
        name: broken
        nodes:
          - {id: start, type: start}
          - {id: end, type: end}
          - {id: p, type: parallel, merge_strateg: wait_all, branches: [[start]]}
        edges:
          - {from: start, to: end}
    """)
    proc = goflow("run", str(path))
    assert proc.returncode == 2
    assert "unknown key 'merge_strateg' in node 'p'; did you mean 'merge_strategy'?" in proc.stderr
    assert f"{path}:5:" in proc.stderr


def test_missing_required_variable_exits_2(write_flow):
    path = write_flow("""
        name: req
        variables:
          - {name: who, required: true}
        nodes:
          - {id: start, type: start}
          - {id: end, type: end}
        edges:
          - {from: start, to: end}
    """)
    proc = goflow("run", str(path), "--json")
    assert proc.returncode == 2
    assert "who" in proc.stderr and "--var who=" in proc.stderr
    refused = json.loads(proc.stdout)   # --json: the one object says why nothing ran
    assert refused["status"] == "invalid" and "--var who=" in refused["error"]["message"]


def test_plain_output_has_one_line_per_node_event(write_flow):
    path = write_flow(SIMPLE)
    proc = goflow("run", str(path), "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    started = [line for line in lines if "node.started" in line]
    finished = [line for line in lines if "node.completed" in line]
    assert len(started) == 3 and len(finished) == 3
    assert any("completed" in line and "simple" in line for line in lines[-3:])


def _worker_pids(parent_pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"local-{parent_pid}-" in cmdline:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_cancels_cleanly_and_leaves_no_process(write_flow, signum):
    path = write_flow("""
        name: long
        nodes:
          - {id: start, type: start}
          - {id: a, type: python, call: "flowlib:spin", args: [60]}
          - {id: b, type: python, call: "flowlib:stuck_in_c", args: [60]}
          - {id: end, type: end}
        edges:
          - {from: start, to: a}
          - {from: start, to: b}
          - {from: a, to: end}
          - {from: b, to: end}
    """)
    proc = subprocess.Popen([*GOFLOW, "run", str(path), "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if sum("node.started" in entry and (" a" in entry or " b" in entry) for entry in seen) >= 2:
            break
    workers = _worker_pids(proc.pid)
    while len(workers) < 2 and time.monotonic() < deadline:   # a worker (re)started just now may not
        time.sleep(0.05)                                       # show its own command line yet
        workers = _worker_pids(proc.pid)
    assert workers, "no worker processes found"
    tempdirs = {Path(arg.split("ipc://", 1)[1]).parent for pid in workers
                for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if "ipc://" in arg}
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "cancelled" in out
    deadline = time.monotonic() + 30  # they exit on their own (parent-death signal), not necessarily at once
    while [pid for pid in workers if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in workers if _alive(pid)], "worker processes survived the run"
    assert tempdirs and not any(d.exists() for d in tempdirs), "the private temporary directory was left behind"


def test_validate_reports_all_problems_and_exit_codes(write_flow, tmp_path):
    good = write_flow(SIMPLE, "good.yaml")
    bad = write_flow("""
        name: bad
        nodes:
          - {id: start, type: start}
          - {id: orphan1, type: passthrough}
          - {id: orphan2, type: passthrough}
          - {id: end, type: end}
        edges:
          - {from: start, to: end}
    """, "bad.yaml")
    ok = goflow("validate", str(good))
    assert ok.returncode == 0 and "valid" in ok.stdout
    proc = goflow("validate", str(good), str(bad))
    assert proc.returncode == 2
    assert f"{bad}:4:5: error: node 'orphan1' is unreachable" in proc.stdout
    assert f"{bad}:5:5: error: node 'orphan2' is unreachable" in proc.stdout
    as_json = json.loads(goflow("validate", "--json", str(bad)).stdout)
    assert {p["node"] for p in as_json} == {"orphan1", "orphan2"}
    assert all(set(p) == {"file", "line", "column", "severity", "message", "node"} for p in as_json)


@pytest.mark.parametrize("content, expected", [
    ("", "the file is empty"),
    ("name: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a YAML mapping"),
])
def test_validate_non_workflow_files_get_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "x.yaml"
    path.write_text(content)
    proc = goflow("validate", str(path))
    assert proc.returncode == 2
    assert expected in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sum(": error:" in line for line in proc.stdout.splitlines()) == 1


def test_validate_missing_file(tmp_path):
    proc = goflow("validate", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "no such file" in proc.stdout


@pytest.mark.parametrize("example, expected", [
    ("demo.yaml", lambda result: "Revenue" in result["summary"] and len(result["scores"]) == 8),
    ("goflow-parser-dialect.yaml", lambda result: result == ["#0: high", "#1: low"]),
])
def test_examples_run(example, expected):
    path = Path(__file__).resolve().parent.parent / "examples" / example
    proc = goflow("run", str(path), "--json", "--workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expected(json.loads(proc.stdout)["result"])

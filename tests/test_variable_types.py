"""Supplied variables are checked against their declared types before an execution starts.

GoFlow never checks them at run time (docs/compatibility.md): a wrong value surfaced late,
in a node, after retries. Here the CLI, the Python API and a daemon's ``submit`` all refuse
it up front, naming the variable, its type, the value and the fix (a secret's value never).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import goflow
from goflow.control.framing import ControlClient, ControlError
from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.coordinator.plan import Mismatch, VariablesError, initial_variables
from goflow.language.loader import check, parse
from test_daemon import Daemon, child_env

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parent.parent

# The `mark` node writes a file: a refused run must leave it unwritten (nothing ran).
FLOW = """
name: typed
variables:
  - {name: n, type: number, required: true}
  - {name: flag, type: boolean, default: false}
  - {name: marker, type: string, default: ""}
nodes:
  - {id: start, type: start}
  - {id: mark, type: python, call: "flowlib:write_file", args: ["${marker}", "ran"]}
  - {id: end, type: end, return: {n: "${n}", flag: "${flag}"}}
edges:
  - {from: start, to: mark}
  - {from: mark, to: end}
"""

SECRET_FLOW = """
name: secretive
variables:
  - {name: token, type: string, secret: true, required: true}
nodes:
  - {id: start, type: start}
  - {id: end, type: end}
edges:
  - {from: start, to: end}
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goflow", *args], capture_output=True, text=True, timeout=60)


def workflow_of(text: str):
    loaded = check(parse(text, "flow.yaml"))
    assert not loaded.errors, loaded.problems
    return loaded.workflow


# -- the CLI ----------------------------------------------------------------------------------
def test_cli_refuses_a_number_variable_given_text_before_anything_runs(write_flow, tmp_path):
    marker = tmp_path / "ran.txt"
    proc = run_cli("run", str(write_flow(FLOW)), "--json", "--workers", "1", "--no-history",
                   "--var", "n=hello", "--var", f"marker={marker}")
    assert proc.returncode == 2, proc.stderr
    refused = json.loads(proc.stdout)
    assert refused["status"] == "invalid" and refused["execution_id"] is None
    assert refused["error"]["type"] == "bad_request"
    message = refused["error"]["message"]
    assert "variable 'n' is declared as a number but was given the string \"hello\"" in message
    assert "supply a number" in message and message in proc.stderr
    assert not marker.exists()


def test_cli_refuses_a_boolean_that_is_not_true_or_false(write_flow, tmp_path):
    proc = run_cli("run", str(write_flow(FLOW)), "--workers", "1", "--no-history",
                   "--var", "n=3", "--var", "flag=maybe", "--var", f"marker={tmp_path / 'ran.txt'}")
    assert proc.returncode == 2
    assert "variable 'flag' is declared as a boolean but was given the string \"maybe\": supply true or false" \
        in proc.stderr
    assert not (tmp_path / "ran.txt").exists()


def test_cli_text_converted_to_the_declared_type_runs(write_flow, tmp_path):
    proc = run_cli("run", str(write_flow(FLOW)), "--json", "--workers", "1", "--no-history",
                   "--var", "n=3", "--var", "flag=true", "--var", f"marker={tmp_path / 'ran.txt'}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["result"] == {"n": 3, "flag": True}
    assert (tmp_path / "ran.txt").read_text() == "ran"


def test_cli_var_for_a_string_variable_is_its_text(write_flow):
    """``--var marker=42`` for ``type: string`` is the text "42" (GoFlow's --var gives text),
    not the number 42 refused as a mistyped string; other types still parse as JSON."""
    proc = run_cli("run", str(write_flow(FLOW.replace('"${marker}", "ran"', '"/dev/null", "${marker}"'))),
                   "--json", "--workers", "1", "--no-history", "--var", "n=3", "--var", "marker=42")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["variables"]["marker"], data["result"]["n"]) == ("42", 3)


def test_cli_demo_with_a_text_order_count_is_refused_without_attempts():
    proc = run_cli("run", str(REPO / "examples" / "demo.yaml"), "--json", "--workers", "1", "--no-history",
                   "--var", "order_count=abc")
    assert proc.returncode == 2
    refused = json.loads(proc.stdout)
    assert refused["status"] == "invalid" and refused["execution_id"] is None
    assert "variable 'order_count' is declared as a number but was given the string \"abc\"" \
        in refused["error"]["message"]


def test_cli_never_echoes_a_secret_value(write_flow, tmp_path):
    (tmp_path / "in.json").write_text('{"token": 987654321}')   # JSON: a number (a --var would be text)
    proc = run_cli("run", str(write_flow(SECRET_FLOW)), "--json", "--workers", "1", "--no-history",
                   "--input", str(tmp_path / "in.json"))
    assert proc.returncode == 2
    assert "variable 'token' is declared as a string but was given a number (not shown: the variable is secret)" \
        in proc.stderr
    assert "987654321" not in proc.stderr + proc.stdout


# -- the Python API ---------------------------------------------------------------------------
def test_api_refuses_a_wrong_type_naming_variable_type_value_and_fix(write_flow, tmp_path):
    path = write_flow(FLOW)
    marker = tmp_path / "ran.txt"
    with pytest.raises(VariablesError) as refused:
        goflow.run(path, {"n": "hello", "flag": "maybe", "marker": str(marker)}, workers=1, history=False)
    assert isinstance(refused.value, ValueError)
    assert refused.value.mismatched == (Mismatch("n", "number", "string"), Mismatch("flag", "boolean", "string"))
    assert refused.value.names == ("n", "flag")
    message = str(refused.value)
    assert "'n' is declared as a number but was given the string \"hello\": supply a number, e.g. 3" in message
    assert "'flag' is declared as a boolean" in message and "--var" not in message
    with pytest.raises(VariablesError, match="variable 'n' is declared as a number but was given the boolean true"):
        goflow.start(path, {"n": True}, workers=1, history=False)
    assert not marker.exists()


def test_api_missing_required_variable_gives_no_cli_advice(write_flow):
    with pytest.raises(VariablesError) as refused:
        goflow.run(write_flow(FLOW), workers=1, history=False)
    assert str(refused.value) == "missing required variable 'n' (a number): supply a value for it"
    assert refused.value.missing == ("n",) and refused.value.mismatched == ()


def test_api_reports_missing_and_mismatched_together(write_flow):
    with pytest.raises(VariablesError) as refused:
        goflow.run(write_flow(FLOW), {"flag": 1}, workers=1, history=False)
    assert refused.value.names == ("n", "flag")
    assert str(refused.value).startswith("missing required variable 'n' (a number): supply a value for it; "
                                         "variable 'flag' is declared as a boolean but was given the number 1")


def test_api_secret_value_is_not_in_the_error(write_flow):
    with pytest.raises(VariablesError) as refused:
        goflow.run(write_flow(SECRET_FLOW), {"token": ["hunter2-secret"]}, workers=1, history=False)
    assert "hunter2" not in str(refused.value) and "was given an array (not shown" in str(refused.value)


# -- one policy: supplied values pass exactly when the same value passes as a default ------------
CASES = [("number", 3), ("number", 2.5), ("number", "3"), ("number", True), ("boolean", False), ("boolean", 0),
         ("boolean", "true"), ("string", "x"), ("string", 5), ("object", {"a": 1}), ("object", [1]),
         ("array", [1]), ("array", {"a": 1}), ("any", "x"), ("any", {"a": [1]}), ("number", None)]


@pytest.mark.parametrize(("declared", "value"), CASES, ids=[f"{d}={json.dumps(v)}" for d, v in CASES])
def test_supplied_values_follow_the_default_check(declared, value):
    as_default = check(parse(f"name: t\nvariables: [{{name: v, type: {declared}, default: {json.dumps(value)}}}]\n"
                             "nodes: [{id: start, type: start}, {id: end, type: end}]\n"
                             "edges: [{from: start, to: end}]\n", "t.yaml"))
    default_ok = not as_default.errors
    workflow = workflow_of(f"name: t\nvariables: [{{name: v, type: {declared}}}]\n"
                           "nodes: [{id: start, type: start}, {id: end, type: end}]\n"
                           "edges: [{from: start, to: end}]\n")
    try:
        initial_variables(workflow, {"v": value})
        supplied_ok = True
    except VariablesError:
        supplied_ok = False
    assert supplied_ok == default_ok
    assert supplied_ok == (value is None or declared == "any" or (type(value).__name__, declared) in {
        ("int", "number"), ("float", "number"), ("bool", "boolean"), ("str", "string"), ("dict", "object"),
        ("list", "array")})


# -- a coordinator's submit -----------------------------------------------------------------
def test_control_submit_refuses_a_wrong_type_with_bad_request():
    with EmbeddedRuntime(workers=1) as runtime, ControlClient(runtime.control_endpoint, timeout=10) as client:
        with pytest.raises(ControlError) as refused:
            client.request("submit", workflow=FLOW, name="typed.yaml", variables={"n": "hello"})
        assert refused.value.type == "bad_request"
        assert "variable 'n' is declared as a number but was given the string \"hello\"" in str(refused.value)
        assert "--var" not in str(refused.value)
        assert client.request("executions")["executions"] == []


def test_daemon_submit_refuses_a_wrong_type_from_the_cli_and_the_api(tmp_path, write_flow):
    daemon = Daemon(tmp_path).start()
    try:
        path = write_flow(FLOW)
        proc = subprocess.run([sys.executable, "-m", "goflow", "submit", str(path), "--coordinator", daemon.control,
                               "--var", "n=3", "--var", "flag=maybe"],
                              capture_output=True, text=True, timeout=60, env=child_env())
        assert proc.returncode == 2
        assert "variable 'flag' is declared as a boolean but was given the string \"maybe\"" in proc.stderr
        proc = subprocess.run([sys.executable, "-m", "goflow", "submit", str(path), "--coordinator", daemon.control,
                               "--var", "n=3", "--var", "marker=42", "--json"],
                              capture_output=True, text=True, timeout=60, env=child_env())
        assert proc.returncode == 0, proc.stderr   # accepted: marker's --var text is a string, as for goflow run
        with pytest.raises(ControlError) as refused:
            goflow.start(path, {"n": [1]}, coordinator=daemon.control, events=daemon.events)
        assert refused.value.type == "bad_request"
        assert "variable 'n' is declared as a number but was given the array [1]" in str(refused.value)
    finally:
        daemon.stop()

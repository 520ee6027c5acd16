"""Bad input at the command line gets a clear message and its exit code, never a traceback:
real subprocesses of goflow, goflow-worker; real pipes, files and signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.timeout(180)

GOFLOW = [sys.executable, "-m", "goflow"]
BIN = Path(sys.executable).parent

QUICK = """
name: quick
nodes:
  - {id: start, type: start}
  - {id: add, type: python, call: "flowlib:add", args: [2, 3], output: total}
  - {id: end, type: end, return: "${total}"}
edges:
  - {from: start, to: add}
  - {from: add, to: end}
"""


def goflow(*args: str, timeout: float = 60, **options) -> subprocess.CompletedProcess:
    return subprocess.run([*GOFLOW, *args], capture_output=True, text=True, timeout=timeout, **options)


def refused(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """``done`` exited ``code``, said each of ``words`` on stderr, and showed no traceback."""
    assert done.returncode == code, (done.returncode, done.stderr)
    for word in words:
        assert word in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# -- 1. a workflow from a pipe or FIFO --------------------------------------------------------
def test_run_reads_a_workflow_from_stdin():
    done = goflow("run", "/dev/stdin", "--json", "--workers", "1", input=QUICK)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "completed" and json.loads(done.stdout)["result"] == 5


def test_run_reads_a_workflow_from_a_fifo(tmp_path):
    """As ``goflow run <(cat flow.yaml)`` hands it over: a named pipe, read once."""
    fifo = tmp_path / "flow.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(QUICK,), daemon=True)
    writer.start()
    done = goflow("run", str(fifo), "--json", "--workers", "1")
    writer.join(10)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"] == 5


def test_run_of_an_invalid_workflow_from_stdin_names_the_problem():
    done = goflow("run", "/dev/stdin", input="name: bad\nnodes:\n  - {id: a, type: nope}\n")
    refused(done, 2, "/dev/stdin", "nope")


# -- 2. endpoints and history files ------------------------------------------------------------
@pytest.mark.parametrize("argv", [["notanendpoint"], ["tcp://127.0.0.1:1", "--control", "notanendpoint"]])
def test_watch_refuses_a_malformed_endpoint(argv):
    done = goflow("watch", *argv, timeout=30)
    refused(done, 2, "'notanendpoint' must look like tcp://HOST:PORT")


def test_watch_reports_an_endpoint_zeromq_refuses():
    refused(goflow("watch", "tcp://a b:5555", timeout=30), 1, "goflow watch:", "tcp://a b:5555")


@pytest.mark.parametrize("command", [["executions"], ["executions", "--json"], ["execution", "abcd"],
                                     ["logs", "abcd"], ["prune", "--keep-days", "1"]])
@pytest.mark.parametrize("kind", ["directory", "garbage"])
def test_history_commands_name_a_file_that_is_no_history_database(tmp_path, command, kind):
    if kind == "directory":
        db, why = tmp_path, "it is a directory"
    else:
        db, why = tmp_path / "notes.db", "file is not a database"
        db.write_text("these are notes, not a SQLite database\n" * 10)
    done = goflow(*command, "--db", str(db), timeout=30)
    refused(done, 1, f"--db {db} is not a goflow history database", why, "--db must name")
    assert done.stdout == ""


@pytest.mark.parametrize("endpoint, message", [("nonsense", "'nonsense' must look like tcp://HOST:PORT"),
                                               ("foo://x", "unknown transport 'foo'"),
                                               ("tcp://127.0.0.1:port", "port 'port' must be a number"),
                                               ("tcp://a b:5555", "Invalid argument")])
def test_worker_refuses_a_bad_connect_endpoint_instead_of_restarting_forever(endpoint, message):
    proc = subprocess.Popen([str(BIN / "goflow-worker"), "--connect", endpoint, "--concurrency", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 2,
            "argument --connect", message)
    assert "restarting" not in err


# -- 3. --timeout -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_run_timeout_must_be_a_positive_number(write_flow, value):
    done = goflow("run", str(write_flow(QUICK)), "--timeout", value, timeout=30)
    refused(done, 2, "argument --timeout", repr(value))
    assert "execution" not in done.stdout   # nothing ran


def test_run_timeout_still_bounds_the_run(write_flow):
    path = write_flow(QUICK.replace('"flowlib:add", args: [2, 3]', '"flowlib:spin", args: [60]'))
    done = goflow("run", str(path), "--json", "--workers", "1", "--timeout", "0.5")
    assert done.returncode == 1 and json.loads(done.stdout)["status"] == "timed_out"


# -- 4. goflow executions --status / --limit ----------------------------------------------------
def test_executions_status_and_limit_are_checked(write_flow):
    run = json.loads(goflow("run", str(write_flow(QUICK)), "--json", "--workers", "1").stdout)
    bogus = goflow("executions", "--status", "bogus")
    refused(bogus, 2, "argument --status", "invalid choice: 'bogus'", "'timed_out'", "'submitted'")
    for limit in ("0", "-1"):
        refused(goflow("executions", "--limit", limit), 2, "argument --limit", "at least 1")
    listed = json.loads(goflow("executions", "--status", "completed", "--limit", "1", "--json").stdout)
    assert [row["execution_id"] for row in listed] == [run["execution_id"]]


# -- 5. a second Ctrl-C while cancelling ----------------------------------------------------------
def test_a_second_ctrl_c_while_cancelling_still_prints_the_summary(write_flow):
    path = write_flow(QUICK.replace('"flowlib:add", args: [2, 3]', '"flowlib:spin", args: [60]'))
    proc = subprocess.Popen([*GOFLOW, "run", str(path), "--workers", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as a shell's
    for line in proc.stdout:   # lines of events (stdout is no terminal): wait until the node runs
        if "node.started" in line and " add" in line:
            break
    for pause in (0.05, 0.1, 0):   # Ctrl-C in a terminal, three times in quick succession
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(pause)
    out, err = proc.communicate(timeout=60)
    # 130, or killed by a Ctrl-C that lands while the interpreter exits (after the summary): a
    # shell reports both as 130.
    assert proc.returncode in (130, -signal.SIGINT), (out, err)
    assert re.search(r"^■ quick: cancelled in .*\(execution [0-9a-f]{32}\)$", out, re.M), out
    assert "Traceback" not in err


# -- 6. README ------------------------------------------------------------------------------------
def test_readme_says_how_json_output_gives_times(write_flow):
    goflow("run", str(write_flow(QUICK)), "--workers", "1")
    listed = json.loads(goflow("executions", "--json").stdout)
    assert isinstance(listed[0]["started_at"], float)   # unix seconds, as in events
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert "every time is local ISO 8601" not in readme
    assert "in `--json` output they are unix seconds" in readme


def test_readme_python_example_comment_is_its_output():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Python API: watch your own run", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    head, comment = re.search(r"((?s:.*)print\(result\.status, sorted\(attempts\)\)\n)((?:#.*\n)+)", code).groups()
    said = " ".join(line.lstrip("# ").strip() for line in comment.splitlines())
    done = subprocess.run([sys.executable, "-c", head], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == said


# -- goflow submit reads a file as goflow run does -------------------------------------------------
def test_submit_names_a_file_that_is_not_utf8_and_a_timeout_that_is_not_positive(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: x\nnodes: [\xe9]\n")
    done = goflow("submit", str(latin1), "--coordinator", "tcp://127.0.0.1:9")
    refused(done, 2, f"{latin1}:2:9", "not UTF-8", "save the file as UTF-8")
    refused(goflow("submit", str(latin1), "--coordinator", "tcp://127.0.0.1:9", "--timeout", "-1"), 2,
            "argument --timeout", "> 0")


def test_a_workflow_from_a_pipe_past_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    """A pipe has no size to check before reading: at most one byte past the limit is read."""
    import goflow.language.loader as loader

    monkeypatch.setattr(loader, "MAX_BYTES", 1000)
    fifo = tmp_path / "flow.yaml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(b"#" * 5000))   # fits the pipe's buffer
    writer.start()
    loaded = loader.read(fifo)
    writer.join(10)
    assert len(loaded.problems) == 1
    assert loaded.problems[0].message.startswith("the file is more than the limit; the limit is ")

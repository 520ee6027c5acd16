"""Ctrl-C at any moment of ``goflow run`` (real processes, real signals), and the problems of
files that are not UTF-8 text or hide a duplicate node id behind another problem.

Ctrl-C contract: the parent owns it; every child it manages (history writer, run display,
workers) starts with SIGINT ignored or blocked from its first instruction, and runs with it
ignored and unblocked (so what it starts in turn gets no blocked mask).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from goflow.cli.run_display import DisplayProcess
from goflow.history.store import Store
from goflow.language.loader import check, read
from goflow.supervisor import WorkerProcesses

pytestmark = pytest.mark.timeout(90)

GOFLOW = [sys.executable, "-m", "goflow"]
WAIT_S = 30.0
"""Bound of every wait for something to happen (a failure bound, not a timing assertion)."""

LONG_RUN = """
name: long
nodes:
  - {id: start, type: start}
  - {id: a, type: python, call: "flowlib:stuck_in_c", args: [60]}
  - {id: b, type: python, call: "flowlib:stuck_in_c", args: [60]}
  - {id: end, type: end}
edges:
  - {from: start, to: a}
  - {from: start, to: b}
  - {from: a, to: end}
  - {from: b, to: end}
"""


# -- helpers ---------------------------------------------------------------------------------
def signal_sets(pid: int) -> tuple[set[int], set[int]] | None:
    """``(ignored, blocked)`` signal numbers of ``pid`` from /proc (None once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    if fields.get("State", "").startswith("Z"):
        return None

    def bits(name: str) -> set[int]:
        mask = int(fields[name], 16)
        return {n for n in range(1, 65) if mask >> (n - 1) & 1}

    return bits("SigIgn"), bits("SigBlk")


def assert_immune_from_spawn_on(pid: int, signums: tuple[int, ...] = (signal.SIGINT,)) -> None:
    """Right after spawn, and at every look until the child runs its own code: each of
    ``signums`` is ignored or blocked. Once up: ignored, and not blocked."""
    deadline = time.monotonic() + WAIT_S
    while True:
        sets = signal_sets(pid)
        assert sets is not None, f"process {pid} ended before it was seen up"
        ignored, blocked = sets
        for signum in signums:
            assert signum in ignored or signum in blocked, (
                f"{signal.Signals(signum).name} neither ignored nor blocked in {pid}: a Ctrl-C now kills it")
        if all(s in ignored for s in signums) and not any(s in blocked for s in signums):
            return
        if time.monotonic() > deadline:   # a bound on the wait, not a timing assertion
            pytest.fail(f"process {pid} never came up with its signals ignored")
        time.sleep(0.002)


def children(pid: int) -> dict[int, list[str]]:
    """The live child processes of ``pid``: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = [arg.decode(errors="replace") for arg in fh.read().split(b"\0") if arg]
        except (OSError, IndexError):
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            found[int(entry)] = command
    return found


def wait_gone(pids: list[int]) -> list[int]:
    """Wait (bounded) until none of ``pids`` lives; returns those still alive."""
    deadline = time.monotonic() + WAIT_S
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if signal_sets(pid) is not None]
        time.sleep(0.02)
    return alive


def worker_command(endpoint: str):
    return lambda name: [sys.executable, "-m", "goflow.workers", "--single", "--connect", endpoint, "--name", name]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # as a shell starts a job, whatever pytest inherited


# -- Ctrl-C: every managed child is immune from its first instruction ------------------------
def test_the_history_writer_starts_with_the_group_signals_ignored(tmp_path):
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP reach a process group; the writer must outlive its
    parent to commit what it drained, so none of them may kill it, not even as it starts."""
    store = Store(tmp_path / "history.db")
    try:
        assert_immune_from_spawn_on(store.writer_pid, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    finally:
        store.close()


def test_the_run_display_starts_with_sigint_ignored(tmp_path):
    display = DisplayProcess(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control", "0" * 32, full=False)
    display.start()
    try:
        assert display.process is not None
        assert_immune_from_spawn_on(display.process.pid)
    finally:
        display.process.kill()
        display.stop()


def test_the_tracer_process_starts_with_sigint_ignored():
    pytest.importorskip("opentelemetry.sdk")
    from goflow.observability.tracing import EventTracer

    tracer = EventTracer("http://127.0.0.1:9/v1/traces")   # nothing is exported: no span is made
    try:
        assert_immune_from_spawn_on(tracer._process.pid)
    finally:
        tracer.close()


def test_supervised_workers_start_with_sigint_ignored(tmp_path):
    processes = WorkerProcesses(2, worker_command(f"ipc://{tmp_path}/workers"), prefix="sigint")
    processes.start()
    try:
        for child in processes.children:
            assert_immune_from_spawn_on(child.process.pid)
    finally:
        processes.kill()
        processes.stop(grace=0.0)


DIES_WITH_PARENT = """
import ctypes, json, os, subprocess, sys
ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)   # PR_SET_CHILD_SUBREAPER: orphans come to us
parent = subprocess.Popen([sys.executable, "-c", '''
import os, sys
from goflow.supervisor import WorkerProcesses
pool = WorkerProcesses(1, lambda name: [sys.executable, "-m", "goflow.workers", "--single", "--connect",
                                        sys.argv[1], "--name", name], prefix="orphan")
pool.start()
print(pool.children[0].process.pid, flush=True)
os._exit(0)   # gone while its worker is still starting: no stop(), no goodbye
''', sys.argv[1]], stdout=subprocess.PIPE, text=True)
worker = int(parent.stdout.readline())
parent.wait()
_, status = os.waitpid(worker, 0)
print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}))
"""


def test_a_worker_whose_parent_dies_while_it_starts_does_not_outlive_it(tmp_path):
    """A worker now survives the Ctrl-C its parent gets; if that parent then dies without
    stopping it (even before the worker ran any of its own code), the worker must go with
    it: killed by the parent-death signal, or leaving at once (exit 1) when the parent was
    already gone. It used to live on until its coordinator liveness ran out (exit 75)."""
    proc = subprocess.run([sys.executable, "-c", DIES_WITH_PARENT, f"ipc://{tmp_path}/workers"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome in ({"signal": signal.SIGKILL, "code": None}, {"signal": None, "code": 1}), outcome


def test_goflow_worker_run_by_hand_still_stops_on_ctrl_c(tmp_path):
    """A hand-run ``goflow-worker`` is a top-level process: Ctrl-C (SIGINT to its group) is
    its to handle; its children ignore it and are stopped by it (SIGTERM, then SIGKILL after
    --stop-grace: with no coordinator there, their drain cannot end). It exits 0."""
    program = Path(sys.executable).with_name("goflow-worker")
    proc = subprocess.Popen([str(program), "--connect", f"ipc://{tmp_path}/workers", "--concurrency", "2",
                             "--stop-grace", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + WAIT_S
        workers: dict[int, list[str]] = {}
        while len(workers) < 2:
            assert proc.poll() is None, proc.communicate()
            if time.monotonic() > deadline:
                pytest.fail("goflow-worker did not start its workers")
            workers = {pid: command for pid, command in children(proc.pid).items() if "goflow.workers" in command}
        for pid in workers:
            assert_immune_from_spawn_on(pid)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert not wait_gone(list(workers)), "worker processes outlived goflow-worker"


# -- Ctrl-C: end to end ----------------------------------------------------------------------
@pytest.mark.parametrize("moment", ["goflow.history.writer", "goflow.workers", "goflow.cli.run_display"])
def test_ctrl_c_as_a_child_starts_cancels_cleanly(write_flow, moment):
    """SIGINT to the whole process group (a terminal's Ctrl-C) the moment the test sees the
    child ``moment`` exist, that is while it starts: `interrupted` or the cancelled summary,
    exit 130, no traceback, the history writer intact, no process left."""
    path = write_flow(LONG_RUN)
    proc = subprocess.Popen([*GOFLOW, "run", str(path), "--workers", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_sigint)
    seen: dict[int, list[str]] = {}
    try:
        deadline = time.monotonic() + WAIT_S
        while not any(moment in command for command in seen.values()):
            assert proc.poll() is None, proc.communicate()
            if time.monotonic() > deadline:
                pytest.fail(f"no {moment} child seen: {seen}")
            seen.update(children(proc.pid))
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    seen.update(children(proc.pid))
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err or "cancelled" in out, (out, err)
    for bad in ("Traceback", "Fatal Python error", "KeyboardInterrupt", "history"):
        assert bad not in err, err
    assert not wait_gone(list(seen)), "child processes outlived goflow run"


def test_ctrl_c_while_a_command_imports_its_module_says_interrupted(write_flow):
    """Building the parser imports the command's module (most of a short command's time): a
    Ctrl-C there ends with `interrupted` and 130 too. The SIGINT is sent by an audit hook the
    moment the run command's module imports goflow.events, a moment every `goflow run` goes
    through (at startup, the audit's Ctrl-C at 0.3 s)."""
    path = write_flow(LONG_RUN)
    script = textwrap.dedent("""
        import os, signal, sys
        def hook(event, args):
            if event == "import" and args[0] == "goflow.events" and "goflow.cli.run" in sys.modules:
                os.kill(os.getpid(), signal.SIGINT)
        sys.addaudithook(hook)
        from goflow.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, "run", str(path)], capture_output=True, text=True,
                          timeout=60, preexec_fn=_default_sigint)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "interrupted", proc.stderr


def test_a_ctrl_c_landing_in_import_system_code_is_not_lost():
    """CPython drops an exception raised in a weakref callback (the import system's module
    locks have one): a KeyboardInterrupt raised there by Python's own handler was lost, and
    the run went on to its end. goflow's handler (which ``goflow.cli.main`` installs) delivers
    it again, outside that code."""
    script = textwrap.dedent("""
        import signal, sys, time, weakref
        import goflow.cli
        signal.signal(signal.SIGINT, goflow.cli._on_sigint)
        space = {"signal": signal}
        exec(compile("def cb(ref):\\n    signal.raise_signal(signal.SIGINT)\\n",
                     "<frozen importlib._bootstrap>", "exec"), space)
        class Thing: pass
        thing = Thing()
        ref = weakref.ref(thing, space["cb"])
        try:
            del thing                      # the callback runs now, called from C
            for _ in range(3000):
                time.sleep(0.01)
        except KeyboardInterrupt:
            print("interrupted")
        else:
            print("lost")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          preexec_fn=_default_sigint)
    assert proc.stdout.strip() == "interrupted", (proc.stdout, proc.stderr)
    assert "Exception ignored" not in proc.stderr, proc.stderr


# -- files that are not UTF-8 ----------------------------------------------------------------
def only_problem(path: Path):
    problems = check(read(path)).problems
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_a_latin1_byte_is_reported_at_its_line_and_column(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: x\nnodes:\n  - {id: start, type: start}\n"
                     b"  - {id: end, type: end, description: \"caf\xe9\"}\n")
    problem = only_problem(path)
    assert (problem.line, problem.column) == (4, 43)
    assert "0xe9" in problem.message and "save the file as UTF-8" in problem.message


def test_the_column_of_a_bad_byte_counts_characters_and_crlf_is_one_line_break(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes("name: x\r\ndescription: \"é – \xff\"\r\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    problem = only_problem(path)
    assert (problem.line, problem.column) == (2, 19)


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_utf16_or_utf32_file_is_named_as_such(tmp_path, encoding, name):
    path = tmp_path / "wide.yaml"
    path.write_bytes("name: x\nnodes: []\n".encode(encoding))   # (Python writes the byte order mark)
    problem = only_problem(path)
    assert (problem.line, problem.column) == (1, 1)
    assert name in problem.message and "save the file as UTF-8" in problem.message


def test_a_nul_character_is_one_problem_at_its_position(tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"name: x\0\n")
    problem = only_problem(path)
    assert (problem.line, problem.column) == (1, 8)
    assert "NUL" in problem.message and "\n" not in problem.message and "position" not in problem.message


def test_a_control_character_after_multibyte_text_is_located_by_characters(tmp_path):
    """libyaml reports a refused character by its byte offset: the column must count characters."""
    path = tmp_path / "bell.yaml"
    path.write_bytes("name: ééé\ndescription: \"héllo\x07\"\n".encode("utf-8"))
    problem = only_problem(path)
    assert (problem.line, problem.column) == (2, 20)
    assert "U+0007" in problem.message and "\\x07" in problem.message


def test_utf16_without_a_byte_order_mark_is_recognised(tmp_path):
    path = tmp_path / "bare16.yaml"
    path.write_bytes("name: x\n".encode("utf-16-le"))
    problem = only_problem(path)
    assert "UTF-16" in problem.message and "save the file as UTF-8" in problem.message


def test_goflow_validate_prints_each_encoding_problem_on_one_located_line(tmp_path):
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"name: x\0\n")
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    proc = subprocess.run([*GOFLOW, "validate", str(nul), str(latin)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if ": error: " in line]
    assert [line.split(": error: ")[0] for line in lines] == [f"{nul}:1:8", f"{latin}:1:10"], lines
    assert not [line for line in (proc.stdout + proc.stderr).splitlines() if "position" in line]


def test_crlf_files_still_load(tmp_path):
    path = tmp_path / "crlf.yaml"
    path.write_bytes(b"name: x\r\nnodes:\r\n  - {id: start, type: start}\r\n  - {id: end, type: end}\r\n"
                     b"edges:\r\n  - {from: start, to: end}\r\n")
    loaded = check(read(path))
    assert not loaded.problems and "\r" not in loaded.text


# -- a duplicate node id is reported even when a copy has problems of its own ----------------
def messages(text: str, tmp_path: Path) -> list[tuple[int, str]]:
    path = tmp_path / "flow.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return [(p.line, p.message) for p in check(read(path)).problems]


def test_a_duplicate_id_behind_an_invalid_first_copy_is_reported_with_it(tmp_path):
    found = messages("""
        name: dupid-hidden
        nodes:
          - {id: start, type: start}
          - {id: t, type: passthrough, timeout: 5 parsecs}
          - {id: t, type: passthrough}
          - {id: end, type: end}
        edges:
          - {from: start, to: t}
          - {from: t, to: end}
    """, tmp_path)
    assert [line for line, _ in found] == [4, 5], found
    assert "invalid 'timeout'" in found[0][1]
    assert found[1][1].startswith("duplicate node id 't'")


def test_a_duplicate_id_behind_an_invalid_second_copy_is_reported_with_it(tmp_path):
    found = messages("""
        name: dupid-second
        nodes:
          - {id: start, type: start}
          - {id: t, type: passthrough}
          - {id: t, type: passthrough, timeout: 5 parsecs}
          - {id: end, type: end}
        edges:
          - {from: start, to: t}
          - {from: t, to: end}
    """, tmp_path)
    assert [line for line, _ in found] == [5, 5], found
    assert {message.split(":")[0] for _, message in found} == {"invalid 'timeout' in node 't'",
                                                              "duplicate node id 't'; node ids must be unique"}


def test_a_duplicate_id_after_a_dropped_node_is_reported_at_its_own_line(tmp_path):
    """The duplicate's line is the repeating entry's, not shifted by a node dropped before it."""
    found = messages("""
        name: dupid-shifted
        nodes:
          - {id: start, type: start}
          - {id: broken, type: passthrough, timeout: soon}
          - {id: t, type: passthrough}
          - {id: t, type: passthrough}
          - {id: end, type: end}
        edges:
          - {from: start, to: broken}
          - {from: broken, to: t}
          - {from: t, to: end}
    """, tmp_path)
    assert [line for line, _ in found] == [4, 6], found
    assert found[1][1].startswith("duplicate node id 't'")

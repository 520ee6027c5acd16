"""The live terminal views, read off a real pseudo-terminal (pyte parses the screen), and
their threading: rich's refresh thread and the reader share nothing but a queue."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pyte
import pytest

import goflow
from goflow.cli.run_view import LiveDisplay, RunView
from goflow.events.types import Event

pytestmark = pytest.mark.timeout(120)

COLUMNS, LINES = 140, 60

FLOW = """
name: ptyflow
variables:
  - {name: items, type: array, default: [1, 2, 3]}
nodes:
  - {id: start, type: start}
  - id: flaky
    type: python
    call: "flowlib:flaky"
    args: ["%s", 2]
    output: attempt
    retry: {max_attempts: 3, initial_delay: 10ms, jitter: false, on: [python_error]}
  - {id: each, type: loop, collection: items, item: x, body: [double]}
  - {id: double, type: python, call: "flowlib:add", args: ["${x}", "${x}"], output: d}
  - {id: par, type: parallel, branches: [[left], [right]]}
  - {id: left, type: python, call: "flowlib:echo", args: [l]}
  - {id: right, type: python, call: "flowlib:echo", args: [r]}
  - {id: end, type: end, return: "${attempt}"}
edges:
  - {from: start, to: flaky}
  - {from: flaky, to: each}
  - {from: each, to: par}
  - {from: par, to: end}
"""


class PtyRun:
    """``goflow ARGS`` on a pseudo-terminal of COLUMNS x LINES in a session of its own (so a
    signal to its process group is what the terminal's Ctrl-C sends); a thread feeds the
    output to a pyte screen."""

    def __init__(self, *args: str):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(LINES)}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "goflow", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, close_fds=True, start_new_session=True)
        os.close(slave)
        self.master = master
        self.screen = pyte.Screen(COLUMNS, LINES)
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        stream = pyte.ByteStream(self.screen)
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:   # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            with self.lock:
                stream.feed(chunk)
        os.close(self.master)

    def rows(self) -> list[str]:
        with self.lock:
            return [line.rstrip() for line in self.screen.display]

    def wait_for(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.rows()):
            if time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}:\n" + "\n".join(self.rows()))
            time.sleep(0.05)

    def finish(self) -> tuple[int, list[str]]:
        """Wait for the end of the output; the exit code and the final screen's rows."""
        self.reader.join(60)
        return self.proc.wait(30), self.rows()


def run_in_pty(*args: str) -> tuple[int, list[str]]:
    """Run ``goflow ARGS`` on a pseudo-terminal to its end; the final screen's rows."""
    return PtyRun(*args).finish()


def row_of(rows: list[str], node: str) -> list[str]:
    return next(line.split() for line in rows if line.split()[:1] == [node])


def test_goflow_run_on_a_terminal_shows_nodes_loops_branches_retries_and_a_summary(write_flow, tmp_path):
    path = write_flow(FLOW % (tmp_path / "counter"))
    code, rows = run_in_pty("run", str(path), "--workers", "2")
    screen = "\n".join(rows)
    assert code == 0, screen
    header = next(line for line in rows if line.startswith("ptyflow "))
    assert "completed" in header
    assert row_of(rows, "NODE") == ["NODE", "TYPE", "STATE", "ATTEMPT", "DURATION", "WORKER", "WHERE", "NOTE"]
    flaky = row_of(rows, "flaky")
    assert flaky[1:4] == ["python", "completed", "3"]          # the third attempt succeeded
    assert row_of(rows, "each")[1:3] == ["loop", "completed"] and "3/3" in row_of(rows, "each")
    double = row_of(rows, "double")
    assert double[1:3] == ["python", "completed"] and "each[3/3]" in double and "(3" in double
    assert "par#0" in row_of(rows, "left") and "par#1" in row_of(rows, "right")
    assert any(w.startswith("worker") or "-" in w for w in row_of(rows, "left"))
    retries = [line for line in rows if line.startswith("flaky attempt ")]   # kept on screen
    assert [line.split(": ", 1)[0] for line in retries] == ["flaky attempt 1 failed (retrying)",
                                                            "flaky attempt 2 failed (retrying)"]
    assert all("ConnectionError" in line for line in retries)
    noise = next(line for line in rows if line.startswith("also: "))      # counted, not listed
    assert "11 variable.changed" in noise and "3 loop.iteration" in noise
    assert not any("variable.changed" in line for line in rows if not line.startswith("also: "))
    counts = next(line for line in rows if "nodes  done" in line)
    assert "5/5 nodes" in counts and "done 10" in counts and "retries 2" in counts and "failed 0" in counts
    assert any(line.startswith("✓ ptyflow: completed") for line in rows)
    ids = {line.split()[1] for line in rows if line.startswith("ptyflow ")}
    assert all(len(short) == 8 for short in ids)


def test_the_reader_never_touches_what_rich_renders():
    """The `deque mutated during iteration` crash: a reader feeding thousands of events while
    rich refreshes 100 times a second. Everything put arrives, nothing raises."""
    view = RunView()
    sink = open(os.devnull, "w")
    total = 20_000
    errors: list[BaseException] = []

    def reader(display: LiveDisplay) -> None:
        try:
            for i in range(total):
                node = f"n{i % 50}"
                etype = "node.started" if i % 2 == 0 else "node.completed"
                display.put(Event(type=etype, ts=1.0 + i, epoch="e", seq=i + 1, eseq=i + 1, execution_id="E1",
                                  workflow="w", node_id=node, node_type="python", attempt=1, meta={}))
        except BaseException as exc:
            errors.append(exc)

    with LiveDisplay(view, sink, refresh_per_second=100) as display:
        threads = [threading.Thread(target=reader, args=(display,))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    sink.close()
    assert not errors
    assert view.events == total
    assert view.executions["E1"].counts["completed"] == total // 2


def test_the_preflight_phase_is_visible_before_the_first_node(write_flow):
    """An MCP workflow: until its servers are checked, the view says so."""
    path = write_flow(f"""
        name: pre
        servers:
          - id: testsrv
            command: {sys.executable}
            args: ["{os.path.join(os.path.dirname(__file__), 'mcp_test_server.py')}"]
        nodes:
          - {{id: start, type: start}}
          - {{id: call, type: mcp_tool, server: testsrv, tool: echo, parameters: {{message: hi}}}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: call}}
          - {{from: call, to: end}}
    """)
    from rich.console import Console

    view = RunView()
    screens = []
    with goflow.start(path, workers=1, history=False) as handle:
        for event in handle.events():
            view.feed(event)
            if event.type in ("execution.started", "node.started"):
                console = Console(record=True, width=120, file=open(os.devnull, "w"))
                console.print(view.render())
                screens.append((event.type, console.export_text()))
        assert handle.result().ok, handle.result().error
    before, first_node = screens[0], next(s for s in screens if s[0] == "node.started")
    assert "preflight: checking MCP server(s) testsrv" in before[1] and "pre " in before[1]
    assert "preflight" in before[1].splitlines()[0]
    assert "preflight:" not in first_node[1]


def test_goflow_watch_on_a_terminal_follows_a_published_run_to_its_summary(write_flow, tmp_path):
    from tests.conftest import pick_free_ports

    path = write_flow(FLOW % (tmp_path / "counter"))
    events_port, control_port = pick_free_ports(2)
    events, control = f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{control_port}"
    run = subprocess.Popen([sys.executable, "-m", "goflow", "run", str(path), "--json", "--workers", "2",
                            "--publish", events, "--control", control, "--execution-id", "watched-run-1",
                            "--await-subscribers", "1", "--linger", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, rows = run_in_pty("watch", events, "--control", control, "--execution", "watched-run-1",
                            "--exit-on-finish")
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert code == 0, "\n".join(rows)
    assert row_of(rows, "flaky")[1:4] == ["python", "completed", "3"]
    assert "3/3" in row_of(rows, "each")
    assert any(line.startswith("✓ ptyflow watched-: completed") for line in rows), "\n".join(rows)


GATED_FLOW = """
name: gated
nodes:
  - {id: start, type: start}
  - {id: gate, type: python, call: "flowlib:wait_for_file", args: ["%s"]}
  - {id: end, type: end}
edges:
  - {from: start, to: gate}
  - {from: gate, to: end}
"""


def _gate_running(rows: list[str]) -> bool:
    return any(line.split()[:3] == ["gate", "python", "running"] for line in rows)


def _display_children(parent: int) -> list[int]:
    """The pids of ``parent``'s event display processes (python -m goflow.cli.run_display)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = fh.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"goflow.cli.run_display" in command:
            found.append(int(entry))
    return found


def test_ctrl_c_on_a_terminal_cancels_the_run_and_the_view_shows_it_to_its_end(write_flow, tmp_path):
    """The view is drawn by a child process that ignores Ctrl-C: the parent cancels the run,
    and the view still shows the cancelled node and the run's end before the summary."""
    run = PtyRun("run", str(write_flow(GATED_FLOW % (tmp_path / "never"))), "--workers", "1", "--no-history")
    try:
        run.wait_for(_gate_running, "the gate node running")
        assert len(_display_children(run.proc.pid)) == 1
        os.killpg(run.proc.pid, signal.SIGINT)
        code, rows = run.finish()
    finally:
        _kill_group(run.proc.pid)
    assert code == 130, "\n".join(rows)
    assert row_of(rows, "gate")[1:3] == ["python", "cancelled"], "\n".join(rows)
    assert any(line.startswith("■ gated: cancelled") for line in rows), "\n".join(rows)


def test_the_view_process_ends_when_goflow_run_is_killed(write_flow, tmp_path):
    run = PtyRun("run", str(write_flow(GATED_FLOW % (tmp_path / "never"))), "--workers", "1", "--no-history")
    try:
        run.wait_for(_gate_running, "the gate node running")
        (display,) = _display_children(run.proc.pid)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(30)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{display}") and _state(display) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{display}") or _state(display) == "Z", "the display outlived goflow run"
    finally:
        _kill_group(run.proc.pid)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass

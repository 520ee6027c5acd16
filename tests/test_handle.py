"""goflow.start / RunHandle: the same contract embedded and against a goflow-coordinator
daemon (real worker processes, real sockets, the daemon as a real process)."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

import goflow
from goflow.events.types import NODE_ATTEMPT_END_TYPES
from goflow.history.store import Store, default_db_path
from tests.test_daemon import Daemon, WorkerGroup
from tests.test_node_attempts import assert_one_end_per_start

pytestmark = pytest.mark.timeout(120)

FLOW = """
name: handled
variables:
  - {name: items, type: array, default: [1, 2, 3]}
nodes:
  - {id: start, type: start}
  - {id: each, type: loop, collection: items, item: x, body: [double]}
  - {id: double, type: python, call: "flowlib:add", args: ["${x}", "${x}"], output: d}
  - {id: end, type: end, return: "${d}"}
edges:
  - {from: start, to: each}
  - {from: each, to: end}
"""

SLOW = """
name: slow
nodes:
  - {id: start, type: start}
  - {id: spin, type: python, call: "flowlib:spin", args: [60]}
  - {id: end, type: end}
edges:
  - {from: start, to: spin}
  - {from: spin, to: end}
"""


@pytest.fixture(params=["embedded", "daemon"])
def where(request, tmp_path):
    """Options for goflow.start: nothing (embedded) or a daemon with one worker process."""
    if request.param == "embedded":
        yield {"workers": 2}
        return
    daemon = Daemon(tmp_path, "--db", str(tmp_path / "daemon.db")).start()
    group = WorkerGroup(tmp_path, daemon.workers, "--concurrency", "2")
    try:
        yield {"coordinator": daemon.control, "events": daemon.events}
    finally:
        group.stop()
        daemon.stop(signal.SIGKILL)


def check_stream(events: list, execution_id: str) -> None:
    """One execution's whole stream: eseq 1..N without a gap, node attempts all ended."""
    assert [e.eseq for e in events] == list(range(1, len(events) + 1))
    assert {e.execution_id for e in events} == {execution_id}
    assert events[0].type == "execution.started" and events[-1].is_terminal
    assert_one_end_per_start([e.model_dump() for e in events])


def test_handle_streams_from_the_first_event_and_returns_the_result(where, write_flow):
    path = write_flow(FLOW)
    with goflow.start(path, timeout=60, **where) as handle:
        assert len(handle.execution_id) == 32
        events = list(handle.events())
        result = handle.result()
        again = list(handle.events(goflow.EventFilter(nodes=["double"])))   # replay after the end
    check_stream(events, handle.execution_id)
    assert result.status == "completed" and result.result == 6 and result.execution_id == handle.execution_id
    doubles = [e for e in again if e.node_id == "double"]
    assert len([e for e in doubles if e.type == "node.completed"]) == 3
    assert again[-1].type == "execution.completed"   # the end is never filtered out


def test_async_events_and_result(where, write_flow):
    path = write_flow(FLOW)

    async def main():
        async with await goflow.astart(path, **where) as handle:
            seen = [event async for event in handle.aevents()]
            return handle.execution_id, seen, await handle.aresult()

    execution_id, events, result = asyncio.run(main())
    check_stream(events, execution_id)
    assert result.ok and result.result == 6


def test_callback_sees_every_event_before_result_returns(where, write_flow):
    path = write_flow(FLOW)
    seen: list = []
    threads: set[str] = set()

    def on_event(event):
        seen.append(event)
        threads.add(threading.current_thread().name)

    result = goflow.run(path, on_event=on_event, **where)
    assert result.ok
    check_stream(seen, result.execution_id)
    assert threading.current_thread().name not in threads


def test_cancel_ends_running_nodes_with_node_cancelled(where, write_flow):
    path = write_flow(SLOW)
    with goflow.start(path, **where) as handle:
        stream = handle.events()
        for event in stream:
            if event.type == "node.started" and event.node_id == "spin":
                handle.cancel("enough")
                break
        rest = list(stream)
        result = handle.result()
    assert result.status == "cancelled" and result.exit_code == 130
    cancelled = [e for e in rest if e.type == "node.cancelled"]
    assert [e.node_id for e in cancelled] == ["spin"]
    assert cancelled[0].meta["reason"] == "the execution was cancelled"
    assert rest[-1].type == "execution.cancelled" and rest[-1].error["message"] == "enough"


def test_embedded_runs_are_recorded_like_the_cli(write_flow):
    path = write_flow(FLOW)
    result = goflow.run(path, workers=1)
    skipped = goflow.run(path, workers=1, history=False)
    with Store(default_db_path()) as store:
        ids = [row["id"] for row in store.list_executions()]
        recorded = store.get_execution(result.execution_id)
    assert result.execution_id in ids and skipped.execution_id not in ids
    assert recorded["status"] == "completed" and "flowlib:add" in (recorded.get("workflow_text") or "")
    attempts = [n for n in recorded["nodes"] if n["node_id"] == "double"]
    assert len(attempts) == 3


def test_invalid_input_fails_before_anything_starts(write_flow):
    with pytest.raises(goflow.WorkflowError):
        goflow.start(write_flow("name: x\nnodes: [{id: a, type: nope}]\n"))
    with pytest.raises(ValueError, match="required"):
        goflow.start(write_flow("""
            name: needs
            variables: [{name: n, type: number, required: true}]
            nodes: [{id: start, type: start}, {id: end, type: end}]
            edges: [{from: start, to: end}]
        """))


def test_node_filter_until_terminal_does_not_hang(write_flow):
    path = write_flow(FLOW)
    with goflow.start(path, workers=1) as handle:
        monitor = goflow.Monitor(handle.events_endpoint, handle.control_endpoint)
        got = list(monitor.subscribe(goflow.EventFilter(executions=[handle.execution_id], nodes=["double"]),
                                     since="start", until=lambda ev: ev.is_terminal))
        monitor.close()
    assert got[-1].type == "execution.completed"
    assert {e.node_id for e in got[:-1]} == {"double"}
    assert len([e for e in got if e.type in NODE_ATTEMPT_END_TYPES]) == 3

"""The HTTP gateway (goflow/web): SSE exactness across reconnects and gateway restarts, the
JSON API, submit/cancel, and the guard (token, Host, Origin). Real coordinator, workers,
gateway processes and HTTP; the browser tests are in test_web_page.py."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid

import pytest

from goflow.events.filter import EventFilter
from goflow.events.monitor import Monitor
from goflow.events.types import Event
from goflow.language.loader import load
from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.web.hub import Hub, event_id, gap_frame
from goflow.web.server import AddressError, GatewayProcess
from webtools import gateways, get_json, published_runtime, read_sse, wait_for  # noqa: F401 (gateways: a fixture)

pytestmark = pytest.mark.timeout(120)

LOOP_FLOW = """
name: web-loop
variables:
  - {name: items, type: array, default: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}
nodes:
  - {id: start, type: start}
  - id: each
    type: loop
    collection: items
    item: n
    body: [step]
    output: outs
  - {id: step, type: python, call: "flowlib:timed", args: [0.05, "${n}"], output: s}
  - {id: end, type: end}
edges:
  - {from: start, to: each}
  - {from: each, to: end}
"""

#: A loop, then a node that holds the run open until the test creates the file ``gate``.
GATED_FLOW = """
name: web-gated
variables:
  - {name: gate, type: string}
  - {name: items, type: array, default: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}
nodes:
  - {id: start, type: start}
  - id: each
    type: loop
    collection: items
    item: n
    body: [step]
  - {id: step, type: python, call: "flowlib:timed", args: [0.05, "${n}"], output: s}
  - {id: hold, type: python, call: "flowlib:wait_for_file", args: ["${gate}"]}
  - {id: end, type: end}
edges:
  - {from: start, to: each}
  - {from: each, to: hold}
  - {from: hold, to: end}
"""


@pytest.fixture
def runtime(tmp_path, free_ports):
    yield from published_runtime(free_ports, db=tmp_path / "history.db")



def _replayed_seqs(runtime, execution_id: str) -> list[int]:
    with Monitor(runtime.events_tcp, runtime.control_tcp) as mon:
        return [ev.seq for ev in mon.replay(execution_id)]


def test_sse_resumes_exactly_after_a_dropped_connection_and_a_gateway_kill(runtime, gateways, free_ports, write_flow,
                                                                          tmp_path):
    (port,) = free_ports(1)
    gateway = gateways(port, runtime.events_tcp, runtime.control_tcp)
    gate = tmp_path / "gate"
    eid = uuid.uuid4().hex
    _, future = runtime.coordinator.submit(load(write_flow(GATED_FLOW)), {"gate": str(gate)}, execution_id=eid)
    url = f"http://127.0.0.1:{port}/api/events?execution={eid}"

    first, _ = read_sse(url, until=lambda evs: len(evs) >= 10)          # connection 1: dropped by us
    second, _ = read_sse(url, headers={"Last-Event-ID": first[-1].id}, until=lambda evs: len(evs) >= 10)
    assert not future.done()                                            # held open by the gate:
    gateway.process.kill()                                              # the gateway dies mid-run
    gateway.process.wait()
    gateways(port, runtime.events_tcp, runtime.control_tcp)              # and is started again (its ring
    gate.touch()                                                        # refills while the client resumes)
    rest, _ = read_sse(url, headers={"Last-Event-ID": second[-1].id},
                       until=lambda evs: bool(evs) and evs[-1].data["type"] == "execution.completed")
    assert future.result(timeout=60)["status"] == "completed"

    seen = [e.data["seq"] for e in first + second + rest]
    assert seen == _replayed_seqs(runtime, eid)              # no gap, no duplicate, in order
    assert all(e.id == event_id(e.data["epoch"], e.data["seq"]) for e in first + second + rest)
    assert {e.data["execution_id"] for e in first + second + rest} == {eid}


def test_sse_filters_and_query_resume(runtime, gateways, free_ports, write_flow):
    (port,) = free_ports(1)
    gateways(port, runtime.events_tcp, runtime.control_tcp)
    eid = uuid.uuid4().hex
    _, future = runtime.coordinator.submit(load(write_flow(LOOP_FLOW)), {}, execution_id=eid)
    assert future.result(timeout=60)["status"] == "completed"
    base = f"http://127.0.0.1:{port}/api/events?execution={eid}"
    done = lambda evs: bool(evs) and evs[-1].data["type"] == "node.completed" and evs[-1].data["node_id"] == "end"
    nodes, _ = read_sse(base + "&types=node.completed&nodes=step,end", until=done)
    assert [e.data["node_id"] for e in nodes] == ["step"] * 12 + ["end"]
    # a fresh EventSource cannot send Last-Event-ID: the page passes last_event_id= instead
    tail, _ = read_sse(base + f"&types=node.completed&nodes=step,end&last_event_id={nodes[5].id}", until=done)
    assert [e.data["seq"] for e in tail] == [e.data["seq"] for e in nodes[6:]]
    status, body = get_json(base.replace("/api/events?execution=", "/api/events?types=") + "nope")
    assert status == 400 and "nope" in body["error"]["message"]


def test_json_api_executions_detail_events_workers(runtime, gateways, free_ports, write_flow):
    (port,) = free_ports(1)
    gateways(port, runtime.events_tcp, runtime.control_tcp, db=str(runtime.store.path))
    ids = []
    for _ in range(3):
        eid, future = runtime.coordinator.submit(load(write_flow(LOOP_FLOW)), {"items": [1, 2]})
        assert future.result(timeout=60)["status"] == "completed"
        ids.append(eid)
    api = f"http://127.0.0.1:{port}/api"
    wait_for(lambda: get_json(f"{api}/executions")[1]["total"] == 3, what="three executions listed")
    status, page1 = get_json(f"{api}/executions?limit=2")
    _, page2 = get_json(f"{api}/executions?limit=2&offset=2")
    assert status == 200 and len(page1["executions"]) == 2 and len(page2["executions"]) == 1
    assert {e["execution_id"] for e in page1["executions"] + page2["executions"]} == set(ids)
    assert get_json(f"{api}/executions?status=failed")[1]["executions"] == []

    status, detail = get_json(f"{api}/executions/{ids[0]}")
    assert status == 200 and detail["status"] == "completed"
    assert {n["id"] for n in detail["graph"]["nodes"]} == {"start", "each", "step", "end"}
    assert {(e["source"], e["target"], e["kind"]) for e in detail["graph"]["edges"]} == {
        ("start", "each", "edge"), ("each", "end", "edge")}
    assert [n["container"] for n in detail["graph"]["nodes"] if n["id"] == "step"] == ["each"]
    assert [out["value"] for out in detail["variables"]["outs"]] == [1, 2]
    assert [r["node_id"] for r in detail["records"]].count("step") == 2

    _, events = get_json(f"{api}/executions/{ids[0]}/events?types=loop.iteration")
    assert [e["type"] for e in events["events"]] == ["loop.iteration"] * 2 + ["execution.completed"]
    assert [e["meta"]["index"] for e in events["events"][:2]] == [0, 1]   # the end is never filtered out
    assert get_json(f"{api}/executions/nope-nope/events")[0] == 404
    _, workers = get_json(f"{api}/workers")
    assert len(workers["workers"]) == 2
    _, metrics = get_json(f"{api}/metrics")
    assert metrics["executions"] == {"completed": 3} and metrics["subscriber"]["lost"] == 0
    # submit is off unless the gateway fronts a daemon
    assert get_json(f"{api}/executions", method="POST", body={"workflow": LOOP_FLOW})[0] == 403


def test_history_serves_executions_the_coordinator_no_longer_holds(tmp_path, gateways, free_ports, write_flow):
    db = tmp_path / "history.db"
    with EmbeddedRuntime(workers=1, db=db) as rt:
        eid = uuid.uuid4().hex
        rt.store.record_submission(eid, "web-loop", LOOP_FLOW, {"items": [7]})   # as goflow run does
        _, future = rt.coordinator.submit(load(write_flow(LOOP_FLOW)), {"items": [7]}, execution_id=eid)
        assert future.result(timeout=60)["status"] == "completed"
    events_port, control_port, port = free_ports(3)
    with EmbeddedRuntime(workers=1, publish=[f"tcp://127.0.0.1:{events_port}"],
                         control=[f"tcp://127.0.0.1:{control_port}"]):
        gateways(port, f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{control_port}", db=str(db))
        api = f"http://127.0.0.1:{port}/api"
        status, detail = get_json(f"{api}/executions/{eid}")
        assert status == 200 and detail["source"] == "history" and detail["status"] == "completed"
        assert {n["id"] for n in detail["graph"]["nodes"]} == {"start", "each", "step", "end"}
        _, events = get_json(f"{api}/executions/{eid}/events")
        assert events["source"] == "history" and events["events"][-1]["type"] == "execution.completed"
        assert [e["eseq"] for e in events["events"]] == list(range(1, len(events["events"]) + 1))
        assert [e["execution_id"] for e in get_json(f"{api}/executions")[1]["executions"]] == [eid]


def test_token_is_required_off_loopback_and_checked_on_every_request(runtime, gateways, free_ports):
    (port,) = free_ports(1)
    with pytest.raises(AddressError, match="without authentication: give --http-token"):
        GatewayProcess(f"0.0.0.0:{port}", runtime.events_tcp, runtime.control_tcp)
    refused = subprocess.run([sys.executable, "-m", "goflow", "dashboard", runtime.events_tcp, "--http",
                              f"0.0.0.0:{port}"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--http-token" in refused.stderr

    token = "t0ken-" + uuid.uuid4().hex
    gateway = GatewayProcess(f"0.0.0.0:{port}", runtime.events_tcp, runtime.control_tcp, token=token)
    gateway.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for path in ("/", "/api/executions", "/api/metrics", "/static/app.js", "/api/events"):
            assert get_json(base + path)[0] == 401, path
            assert get_json(base + path, headers={"Authorization": "Bearer wrong" + token})[0] == 401, path
        assert get_json(base + "/api/executions", headers={"Authorization": f"Bearer {token}"})[0] == 200
        events, _ = read_sse(base + f"/api/events?token={token}&since=now", until=lambda evs: True)
        assert events == []   # the stream opened (200) with the query token
        cookie = get_json(base + f"/?token={token}")
        assert cookie[0] == 303   # the token moves into an HttpOnly cookie, out of the address bar
    finally:
        gateway.stop()


def test_loopback_gateway_refuses_foreign_hosts_and_cross_origin_posts(runtime, gateways, free_ports):
    (port,) = free_ports(1)
    gateways(port, runtime.events_tcp, runtime.control_tcp, allow_control=True)
    base = f"http://127.0.0.1:{port}"
    assert get_json(base + "/api/executions", headers={"Host": "attacker.example:80"})[0] == 403
    assert get_json(base + "/api/executions", method="POST", body={"workflow": LOOP_FLOW},
                    headers={"Origin": "http://attacker.example"})[0] == 403
    status, _ = get_json(base + "/api/executions", method="POST", body=None,
                         headers={"Content-Type": "text/plain"})
    assert status == 415   # a simple cross-site form post cannot reach submit


def test_daemon_http_submit_and_cancel(tmp_path, free_ports, write_flow):
    control, events, workers, port = free_ports(4)
    command = [sys.executable, "-m", "goflow.coordinator.daemon", "--control-endpoint", f"tcp://127.0.0.1:{control}",
               "--events-endpoint", f"tcp://127.0.0.1:{events}", "--workers-endpoint", f"tcp://127.0.0.1:{workers}",
               "--local-workers", "1", "--http", f"127.0.0.1:{port}"]
    log = open(tmp_path / "daemon.log", "w+")
    daemon = subprocess.Popen(command, stderr=log, stdout=log)
    api = f"http://127.0.0.1:{port}/api"
    try:
        def up() -> bool:
            try:
                return get_json(f"{api}/workers")[1].get("workers", []) != []
            except OSError:
                return False
        wait_for(up, 60, "the daemon's dashboard and a worker")
        slow = LOOP_FLOW.replace("[0.05,", "[5,")
        status, reply = get_json(f"{api}/executions", method="POST", body={"workflow": slow, "name": "slow.yaml"})
        assert status == 201 and reply["workflow"] == "web-loop"
        eid = reply["execution_id"]
        status, cancelled = get_json(f"{api}/executions/{eid}/cancel", method="POST", body={"reason": "enough"})
        assert status == 200
        wait_for(lambda: get_json(f"{api}/executions/{eid}")[1]["status"] == "cancelled", what="cancelled")
        bad = get_json(f"{api}/executions", method="POST", body={"workflow": "name: x\nnodes: [{id: a}]"})
        assert bad[0] == 400 and bad[1]["error"]["type"] == "invalid_workflow"
    finally:
        daemon.terminate()
        assert daemon.wait(60) == 0
        log.seek(0)
        assert "dashboard: http://127.0.0.1" in log.read()


def _event(seq: int, etype: str = "node.completed", epoch: str = "e1", execution: str = "x") -> Event:
    return Event.from_wire({"type": etype, "ts": 0.0, "epoch": epoch, "seq": seq, "eseq": seq,
                            "execution_id": execution, "node_id": "n", "meta": {}})


def test_hub_cuts_off_an_overtaken_reader_and_resumes_it_by_id():
    """The ring's bounds: a reader whose position the ring overwrote is cut off (never
    buffered); its last id resumes it exactly, or says how much it missed; a coordinator
    restart (new epoch) starts over."""
    hub = Hub("ipc:///nonexistent", None, capacity=50)

    async def scenario() -> None:
        hub._loop = asyncio.get_running_loop()
        hub._changed = asyncio.Event()
        for seq in range(1, 31):
            hub.append(_event(seq))
        reader = hub.follow(EventFilter(), hub.position_after(("e1", 5)))
        first = await reader.__anext__()          # one batch, then the ring moves on past it
        assert _ids(first) == list(range(6, 31))
        for seq in range(31, 91):
            hub.append(_event(seq))
        assert [chunk async for chunk in reader] == [] and hub.stats["cut_off"] == 1
        start = hub.position_after(("e1", 30))    # overwritten: resumes at the oldest held, and says so
        assert start == hub.oldest_pos == 40
        chunk = await reader_once(hub, start, ("e1", 30))
        assert chunk.startswith(gap_frame(10)) and _ids(chunk) == list(range(41, 91))
        chunk = await reader_once(hub, hub.position_after(("e1", 75)), ("e1", 75))
        assert b"event: gap" not in chunk and _ids(chunk) == list(range(76, 91))
        for seq in range(1, 4):
            hub.append(_event(seq, epoch="e2"))
        assert hub.position_after(("e1", 90)) == 90          # the next event after e1:90 is e2:1
        assert hub.position_after(("gone", 7)) == 90        # an unknown epoch: the current one's start
        assert hub.entry(hub.oldest_pos - 1) is None
        idle = hub.follow(EventFilter(), hub.next_pos, heartbeat_s=0.01)   # nothing new: a comment, no event
        assert await idle.__anext__() == b": heartbeat\n\n"
        await idle.aclose()

    asyncio.run(scenario())


async def reader_once(hub: Hub, start: int, after: tuple[str, int] | None = None) -> bytes:
    gen = hub.follow(EventFilter(), start, after=after)
    chunk = await gen.__anext__()
    await gen.aclose()
    return chunk


def test_hub_resumes_by_id_while_its_ring_is_still_filling():
    """A restarted gateway serves before its ring holds the coordinator's replay: a client
    resuming from e1:7 then must get e1:8 on, not the replay from e1:1 (the duplicates a
    loaded machine showed), whether it came before any event or halfway through the refill;
    a replay that no longer starts at its successor is announced as a gap."""
    hub = Hub("ipc:///nonexistent", None, capacity=50)

    async def scenario() -> None:
        hub._loop = asyncio.get_running_loop()
        hub._changed = asyncio.Event()
        early = hub.follow(EventFilter(), hub.position_after(("e1", 7)), after=("e1", 7))   # empty ring
        for seq in range(1, 5):
            hub.append(_event(seq))
        halfway = hub.follow(EventFilter(), hub.position_after(("e1", 7)), after=("e1", 7))
        for seq in range(5, 13):
            hub.append(_event(seq))
        for reader in (early, halfway):
            chunk = await reader.__anext__()
            assert b"event: gap" not in chunk and _ids(chunk) == list(range(8, 13))
            await reader.aclose()
        assert _ids(await reader_once(hub, hub.position_after(("e0", 99)), ("e0", 99))) == list(range(1, 13))

        evicted = Hub("ipc:///nonexistent", None, capacity=50)   # the coordinator retained only e1:20 on
        evicted._loop, evicted._changed = hub._loop, asyncio.Event()
        reader = evicted.follow(EventFilter(), evicted.position_after(("e1", 7)), after=("e1", 7))
        for seq in range(20, 26):
            evicted.append(_event(seq))
        chunk = await reader.__anext__()
        assert chunk.startswith(gap_frame(12)) and _ids(chunk) == list(range(20, 26))
        await reader.aclose()

    asyncio.run(scenario())


def _ids(frames: bytes) -> list[int]:
    return [int(line.rsplit(":", 1)[1]) for line in frames.decode().splitlines() if line.startswith("id:")]


def _fan_out_of_big_outputs(count: int, size: int) -> str:
    nodes = "\n".join(f"  - {{id: n{i}, type: python, call: 'flowlib:big_text', args: [{size}], output: o{i}}}"
                      for i in range(count))
    edges = "\n".join(f"  - {{from: start, to: n{i}}}\n  - {{from: n{i}, to: end}}" for i in range(count))
    return (f"name: bulky\nnodes:\n  - {{id: start, type: start}}\n  - {{id: end, type: end}}\n{nodes}\n"
            f"edges:\n{edges}\n")


def test_a_stalled_browser_is_cut_off_and_the_others_are_served_in_full(runtime, gateways, free_ports, write_flow,
                                                                       capfd):
    """A client that stops reading (a tiny receive window, nothing read) is cut off once its
    socket accepts nothing for the stall timeout: its connection is closed after what was
    already buffered, and a reading client of the same gateway gets the whole run meanwhile."""
    (port,) = free_ports(1)
    gateway = gateways(port, runtime.events_tcp, runtime.control_tcp, stall_timeout=1.0)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(f"GET /api/events?since=now HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    # ~8 MB of events (each output 2 KB, in node.completed and in variable.changed): far more
    # than the two sockets' buffers hold
    wait_for(lambda: get_json(gateway.url + "api/metrics")[1]["gateway"]["clients"] >= 1, what="the client")
    execution_id = f"bulky-{uuid.uuid4().hex[:8]}"
    future = runtime.submit(load(write_flow(_fan_out_of_big_outputs(1000, 2000))), execution_id=execution_id)
    events, _ = read_sse(gateway.url + f"api/events?execution={execution_id}&since=start",
                         until=lambda got: bool(got) and got[-1].data["type"] == "execution.completed", timeout=60)
    assert future.result(timeout=60)["status"] == "completed"
    eseqs = [event.data["eseq"] for event in events]
    assert eseqs == list(range(1, len(eseqs) + 1)) and len(eseqs) > 3000
    wait_for(lambda: get_json(gateway.url + "api/metrics")[1]["gateway"]["cut_off"] >= 1, timeout=60,
             what="the stalled client cut off")
    stalled.settimeout(30)
    received = b""
    while chunk := stalled.recv(65536):   # what the sockets held, then the end of the connection
        received += chunk
    stalled.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert 0 < received.count(b"event: goflow\n") < len(eseqs)
    wait_for(lambda: get_json(gateway.url + "api/metrics")[1]["gateway"]["clients"] == 0, what="no client left")
    assert "ASGI callable" not in capfd.readouterr().err   # a deliberate cut-off is not an error

"""Execution ids are generated or validated wherever they enter (goflow/events/ids.py)."""

from __future__ import annotations

import pytest
import zmq

import goflow
from goflow.control.framing import ControlClient, ControlError
from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.events import ids

pytestmark = pytest.mark.timeout(60)

FLOW = """\
name: tiny
nodes:
  - {id: start, type: start}
  - {id: end, type: end}
edges:
  - {from: start, to: end}
"""
BAD = ["victim/evil", 42, "", "a" * 65, "sp ace", "dots.no", "ünï"]


@pytest.mark.parametrize("value", ["3f2a9c", "nightly-2026_12_01", "a" * 64])
def test_valid_ids_pass(value):
    assert ids.checked(value) == value


@pytest.mark.parametrize("value", [v for v in BAD if v != ""] + [None, b"bytes"])
def test_invalid_ids_are_refused_with_the_rule(value):
    with pytest.raises(ValueError, match="execution id"):
        ids.checked(value)


def test_generated_ids_are_valid_and_distinct():
    made = {ids.new_execution_id() for _ in range(100)}
    assert len(made) == 100 and all(ids.problem(value) is None for value in made)


@pytest.fixture
def runtime():
    with EmbeddedRuntime(workers=1) as rt:
        yield rt


def test_control_submit_refuses_a_bad_id_and_a_slash_cannot_leak_into_another_topic(runtime):
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.connect(runtime.events_endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"node.completed/victim/")
    with ControlClient(runtime.control_endpoint, timeout=10) as client:
        for value in BAD[:2] + BAD[3:]:
            with pytest.raises(ControlError) as refused:
                client.request("submit", workflow=FLOW, name="tiny.yaml", execution_id=value)
            assert refused.value.type == "bad_request" and "execution id" in str(refused.value)
        accepted = client.request("submit", workflow=FLOW, name="tiny.yaml", execution_id="victim")
        assert accepted["execution_id"] == "victim"
        generated = client.request("submit", workflow=FLOW, name="tiny.yaml")["execution_id"]
        assert ids.problem(generated) is None
        for execution_id in ("victim", generated):
            while client.request("status", execution_id=execution_id)["status"] != "completed":
                pass
    topics = []
    while sub.poll(500):
        topics.append(sub.recv_multipart()[0])
    sub.close(0)
    # Only the victim's own events: nothing of "victim/evil" (refused) reached its prefix.
    assert topics and all(t.startswith(b"node.completed/victim/") and t.count(b"/") == 3 for t in topics), topics
    with ControlClient(runtime.control_endpoint, timeout=10) as client:
        listed = [e["execution_id"] for e in client.request("executions")["executions"]]
    assert sorted(listed) == sorted(["victim", generated])


def test_python_api_and_embedded_runtime_refuse_a_bad_id(runtime, write_flow):
    flow = write_flow(FLOW)
    with pytest.raises(ValueError, match="execution id"):
        goflow.start(flow, execution_id="a/b", history=False)
    from goflow.language.loader import load

    with pytest.raises(ValueError, match="execution id"):
        runtime.submit(load(flow), execution_id=7)

"""Memory a busy coordinator releases: finished executions it forgot and refused submissions.

While any execution runs, the coordinator keeps the cyclic garbage collector's long-lived
objects frozen (``goflow.coordinator.coordinator._running_changed``). These tests keep one
execution running throughout, as on a daemon that is never idle, and count what stays alive."""

from __future__ import annotations

import gc
import weakref

import pytest

from goflow.control.framing import ControlClient
from goflow.coordinator.coordinator import FORGOTTEN_PER_COLLECTION
from goflow.coordinator.embedded import EmbeddedRuntime
from goflow.language.loader import load

pytestmark = pytest.mark.timeout(180)

HOLD = """
name: hold
variables:
  - {name: gate, type: string}
nodes:
  - {id: start, type: start}
  - {id: wait, type: python, call: "flowlib:wait_for_file", args: ["${gate}", 0]}
  - {id: end, type: end}
edges:
  - {from: start, to: wait}
  - {from: wait, to: end}
"""

SMALL = """
name: small
nodes:
  - {id: start, type: start}
  - {id: one, type: python, call: "flowlib:echo", args: [1], output: a}
  - {id: two, type: passthrough}
  - {id: end, type: end, return: "${a}"}
edges:
  - {from: start, to: one}
  - {from: one, to: two}
  - {from: two, to: end}
"""


def _invalid(problems: int) -> str:
    nodes = "".join(f"  - {{id: t{i}, type: transform, timeout: 5 parsecs}}\n" for i in range(problems))
    return f"name: bad\nnodes:\n  - {{id: start, type: start}}\n{nodes}"


def test_a_coordinator_that_is_never_idle_frees_what_it_forgets_and_refuses(tmp_path):
    executions = 2 * FORGOTTEN_PER_COLLECTION + 50
    keep = 5
    gate = tmp_path / "gate"
    with EmbeddedRuntime(workers=2) as rt:
        assert rt.wait_for_workers(2)
        rt.coordinator.keep_finished = keep
        held = rt.submit(load("hold.yaml", text=HOLD), {"gate": str(gate)})
        small = load("small.yaml", text=SMALL)
        alive: list[weakref.ref] = []
        for _ in range(executions):
            eid, future = rt.coordinator.submit(small, {})
            alive.append(rt.coordinator.call(lambda eid=eid: weakref.ref(rt.coordinator.executions[eid])))
            assert future.result(timeout=60)["status"] == "completed"
        # Each forgotten execution is garbage; at most one collection's worth may wait.
        assert sum(ref() is not None for ref in alive) <= keep + FORGOTTEN_PER_COLLECTION

        frozen = gc.get_freeze_count()
        client = ControlClient(rt.control_endpoint, timeout=30.0)
        try:
            for _ in range(20):
                with pytest.raises(Exception, match="problem"):
                    client.request("submit", workflow=_invalid(200), name="bad.yaml")
        finally:
            client.close()
        # A refusal's parsed text is not moved among the frozen objects, where no collection looks.
        assert gc.get_freeze_count() - frozen < 1000
        gate.touch()
        assert held.result(timeout=60)["status"] == "completed"

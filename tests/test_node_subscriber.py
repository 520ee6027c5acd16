"""examples/subscribers/subscriber.js (Node.js, npm zeromq + @msgpack/msgpack, written from
docs/events.md) against a real ``goflow run --publish --control``: it ends with exactly the
coordinator's stream of the execution, same count, same order."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, pick_free_ports

pytestmark = pytest.mark.timeout(180)

EXAMPLE = REPO_ROOT / "examples" / "subscribers"

FLOW = """
name: node-subscriber
variables:
  - {name: items, type: array, default: %s}
nodes:
  - {id: start, type: start}
  - {id: each, type: loop, collection: items, item: x, body: [mark], max_parallel: 4}
  - {id: mark, type: passthrough}
  - {id: add, type: python, call: "flowlib:add", args: [1, 2], output: three}
  - {id: end, type: end, return: "${three}"}
edges:
  - {from: start, to: each}
  - {from: each, to: add}
  - {from: add, to: end}
"""


@pytest.fixture(scope="module")
def node_example():
    """The example's pinned packages (npm ci from its package-lock.json, once)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("the Node.js subscriber test needs node and npm on PATH")
    if not (EXAMPLE / "node_modules" / "zeromq").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=EXAMPLE, check=True,
                       timeout=170)
    return EXAMPLE / "subscriber.js"


def test_node_subscriber_ends_with_the_exact_stream(node_example, write_flow):
    path = write_flow(FLOW % list(range(500)))
    events_port, control_port = pick_free_ports(2)
    events, control = f"tcp://127.0.0.1:{events_port}", f"tcp://127.0.0.1:{control_port}"
    execution_id = "node-sub-1"
    run = subprocess.Popen([sys.executable, "-m", "goflow", "run", str(path), "--json", "--workers", "1",
                            "--publish", events, "--control", control, "--execution-id", execution_id,
                            "--await-subscribers", "1", "--sndhwm", "20", "--linger", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node = subprocess.run(["node", str(node_example), events, control, execution_id, "--rcvhwm", "10"],
                          capture_output=True, text=True, timeout=150)
    out, err = run.communicate(timeout=60)   # the subscriber closed: the run stops lingering
    assert run.returncode == 0, err
    assert json.loads(out)["status"] == "completed"
    assert node.returncode == 0, node.stderr
    lines = [json.loads(line) for line in node.stdout.splitlines()]
    done = lines.pop()
    assert done["done"] is True and done["lost"] == 0 and done["last_type"] == "execution.completed"
    logged = subprocess.run([sys.executable, "-m", "goflow", "logs", execution_id, "--json"],
                            capture_output=True, text=True, timeout=60)
    assert logged.returncode == 0, logged.stderr
    coordinator = [json.loads(line) for line in logged.stdout.splitlines()]
    assert len(coordinator) > 2000
    key = ("eseq", "seq", "type", "node_id", "attempt")
    assert [tuple(e[k] for k in key) for e in lines] == [tuple(e[k] for k in key) for e in coordinator]
    assert done["count"] == len(coordinator)
    print("node subscriber:", done)

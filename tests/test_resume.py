"""Resuming an execution a previous coordinator left unfinished (engine level)."""

from __future__ import annotations

import pytest

from goflow.language.loader import load
from goflow.coordinator.embedded import EmbeddedRuntime

pytestmark = pytest.mark.timeout(60)


def test_completed_nodes_are_not_run_again(write_flow, tmp_path):
    marker = tmp_path / "ran"
    workflow = load(write_flow(f"""
        name: resumable
        nodes:
          - {{id: start, type: start}}
          - {{id: first, type: python, call: "flowlib:write_file", args: ["{marker}", first], output: a}}
          - {{id: check, type: condition, condition: "a != ''"}}
          - {{id: second, type: python, call: "flowlib:add", args: ["${{a}}", "-done"], output: b}}
          - {{id: never, type: passthrough}}
          - {{id: end, type: end, return: "${{b}}"}}
        edges:
          - {{from: start, to: first}}
          - {{from: first, to: check}}
          - {{from: check, to: second, condition: "true"}}
          - {{from: check, to: never, condition: "false"}}
          - {{from: second, to: end}}
          - {{from: never, to: end}}
    """))
    with EmbeddedRuntime(workers=1) as runtime:
        future = runtime.coordinator.resume("resumed-1", workflow, {}, {"start": None, "first": "from-before",
                                                                       "check": True})
        summary = future.result(30)
    assert summary["status"] == "completed", summary["error"]
    assert summary["result"] == "from-before-done"
    assert not marker.exists(), "a completed node ran again"
    ran = [r["node_id"] for r in summary["records"] if r["status"] == "completed"]
    assert ran.count("first") == 1 and "never" not in ran

"""Scalar mcp_tool parameters converted to the tool's input-schema types (issue 13 item 8):
GoFlow sends every argument as text, goflow keeps YAML types; both kinds of server work."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import goflow
from goflow.language.parameters import coerce_arguments

pytestmark = pytest.mark.timeout(120)

TEST_SERVER = Path(__file__).resolve().parent / "mcp_test_server.py"

SCHEMA = {"type": "object", "properties": {
    "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
    "b": {"type": "boolean"}, "either": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    "free": {}}}


@pytest.mark.parametrize("arguments, expected", [
    ({"s": 9}, {"s": "9"}), ({"s": True}, {"s": "true"}), ({"s": 2.5}, {"s": "2.5"}),
    ({"i": "40"}, {"i": 40}), ({"i": " -3 "}, {"i": -3}), ({"n": "2.5"}, {"n": 2.5}),
    ({"n": "7"}, {"n": 7}), ({"b": "true"}, {"b": True}), ({"either": "5"}, {"either": 5}),
])
def test_scalars_are_converted_to_the_schema_type(arguments, expected):
    assert coerce_arguments(SCHEMA, arguments) == expected


@pytest.mark.parametrize("arguments", [
    {"s": "text"}, {"i": 4}, {"n": 4}, {"i": "forty"}, {"i": "2.5"}, {"b": "yes"},
    {"s": [1]}, {"s": {"a": 1}}, {"s": None}, {"free": 5}, {"unknown": 5}, {"n": "nan"},
])
def test_values_that_fit_or_cannot_be_read_are_left_alone(arguments):
    assert coerce_arguments(SCHEMA, arguments) == arguments


def test_no_schema_no_conversion():
    assert coerce_arguments({}, {"s": 9}) == {"s": 9}
    assert coerce_arguments(None, {"s": 9}) == {"s": 9}


def test_goflow_style_text_and_yaml_types_both_reach_the_tool(write_flow):
    # echo(message: str) gets a YAML number; add(a: int, b: int) gets GoFlow's text, one of
    # them only known at run time (a transform's output).
    path = write_flow(f"""
        name: scalars
        variables:
          - {{name: a, type: string, default: "40"}}
        servers:
          - id: test
            command: {sys.executable}
            args: ["{TEST_SERVER}"]
        nodes:
          - {{id: start, type: start}}
          - {{id: echo, type: mcp_tool, server: test, tool: echo, parameters: {{message: 9}}, output: echoed}}
          - {{id: two, type: transform, input: a, expression: "'2'", output: b_text}}
          - {{id: add, type: mcp_tool, server: test, tool: add, parameters: {{a: "${{a}}", b: "${{b_text}}"}},
              output: sum}}
          - {{id: end, type: end, return: "${{sum}}"}}
        edges:
          - {{from: start, to: echo}}
          - {{from: echo, to: two}}
          - {{from: two, to: add}}
          - {{from: add, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "completed", result.error
    assert result.variables["echoed"] == "9"
    assert result.variables["sum"] == 42


def test_text_that_is_not_a_number_still_fails_the_preflight(write_flow):
    path = write_flow(f"""
        name: badscalar
        servers:
          - id: test
            command: {sys.executable}
            args: ["{TEST_SERVER}"]
        nodes:
          - {{id: start, type: start}}
          - {{id: add, type: mcp_tool, server: test, tool: add, parameters: {{a: forty, b: 2}}}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: add}}
          - {{from: add, to: end}}
    """)
    result = goflow.run(path, workers=1)
    assert result.status == "failed"
    assert result.error["type"] == "invalid_arguments"
    assert "add" in result.error["message"]

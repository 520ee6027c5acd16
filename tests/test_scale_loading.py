"""Loading at scale and the limits on what a submission may be (real files, real daemon)."""

from __future__ import annotations

import re

import goflow
import msgpack
import pytest
import zmq

from goflow import protocol
from goflow.coordinator.plan import compile_plan
from goflow.language import limits, loader
from goflow.language.expr import conditions, transforms
from goflow.language.loader import check, parse, read

pytestmark = pytest.mark.timeout(300)

LAUGHS = "name: laughs\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9 if prev else ['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
) + "nodes: *i\nedges: []\n"


def errors_of(text: str, file: str = "flow.yaml") -> list[str]:
    return [str(problem) for problem in check(parse(text, file)).errors]


def test_a_billion_laughs_file_is_refused_naming_the_limit():
    assert 300 < len(LAUGHS.encode()) < 800  # about 10**9 values once expanded
    found = errors_of(LAUGHS, "laughs.yaml")
    assert len(found) == 1
    assert re.match(r"laughs\.yaml:([3-9]|10):\d+: error: ", found[0])  # at an alias, the one crossing the limit
    assert f"YAML aliases expand to more than {limits.MAX_ALIAS_VALUES:,} values" in found[0]


def test_aliases_within_the_limit_still_load():
    text = """
name: shared
x-retry: &retry {max_attempts: 2, initial_delay: 0}
nodes:
  - {id: start, type: start}
  - {id: a, type: python, call: "flowlib:noop", retry: *retry}
  - {id: end, type: end}
edges:
  - {from: start, to: a}
  - {from: a, to: end}
"""
    loaded = check(parse(text, "shared.yaml"))
    assert [p.message for p in loaded.errors] == ["unknown key 'x-retry' at the top level; known keys: "
                                                  "description, edges, metadata, name, nodes, servers, "
                                                  "variables, version"]
    assert loaded.workflow.node("a").retry.max_attempts == 2


def test_nesting_deeper_than_the_limit_is_refused_with_its_position():
    deep = "[" * (limits.MAX_DEPTH + 5) + "]" * (limits.MAX_DEPTH + 5)
    found = errors_of(f"name: deep\nnodes: []\nedges: []\nmetadata:\n  x: {deep}\n", "deep.yaml")
    assert len(found) == 1
    assert found[0].startswith("deep.yaml:5:")
    assert f"nests deeper than {limits.MAX_DEPTH} levels" in found[0]


def test_a_file_over_the_byte_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as out:
        out.truncate(limits.MAX_BYTES + 1)  # sparse: costs no disk
    found = [str(p) for p in read(path).errors]
    assert found == [f"{path}:1:1: error: the file is {(limits.MAX_BYTES + 1) / 2**20:.1f} MiB; the limit is "
                     f"{limits.MAX_BYTES / 2**20:g} MiB per workflow file"]
    text_errors = errors_of("#" * (limits.MAX_BYTES + 1), "text.yaml")
    assert len(text_errors) == 1 and "the limit is" in text_errors[0]


def test_more_nodes_than_the_limit_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(loader, "MAX_NODES", 3)  # the rule, not the size: 250k nodes would take a while
    text = "name: many\nnodes:\n" + "".join(f"  - {{id: n{i}, type: passthrough}}\n" for i in range(4))
    found = errors_of(text + "edges: []\n", "many.yaml")
    assert found == ["many.yaml:2:1: error: the workflow has 4 nodes; the limit is 3 nodes per workflow "
                     "(split it, or use a loop over a collection)"]


def test_loading_100k_nodes_compiles_each_distinct_expression_once():
    n = 100_000
    lines = ["name: big", "variables:", "  - {name: d, default: {a: 1}}", "nodes:", "  - {id: start, type: start}",
             "  - {id: end, type: end}"]
    lines += [f"  - {{id: t{i}, type: transform, input: \"${{d}}\", expression: 'jq(\".a\")', output: o{i}, "
              f"condition: \"d.a > 0\"}}" for i in range(n)]
    lines.append("edges:")
    for i in range(n):
        lines += [f"  - {{from: start, to: t{i}}}", f"  - {{from: t{i}, to: end}}"]
    transforms._compile_expression_text.cache_clear()
    conditions._parse_condition_cached.cache_clear()
    loaded = check(parse("\n".join(lines) + "\n", "big.yaml"))
    assert not loaded.errors, loaded.errors[:3]
    assert len(loaded.workflow.nodes) == n + 2
    plan = compile_plan(loaded.workflow)
    assert len(plan.main.nodes) == n + 2
    for i in range(0, n, 997):  # the coordinator's guard lookups share the compiled condition too
        plan.condition(f"t{i}", "condition", "d.a > 0")
    assert transforms._compile_expression_text.cache_info().misses == 1
    assert conditions._parse_condition_cached.cache_info().misses == 1


def test_a_result_over_the_message_limit_fails_its_node_naming_the_limit(write_flow):
    size = 300 * 1024 * 1024
    assert size > protocol.MAX_MESSAGE_BYTES
    path = write_flow(f"""
        name: huge-result
        nodes:
          - {{id: start, type: start}}
          - {{id: big, type: python, call: "flowlib:big_text", args: [{size}], output: text}}
          - {{id: after, type: python, call: "flowlib:noop"}}
          - {{id: end, type: end}}
        edges:
          - {{from: start, to: big}}
          - {{from: big, to: after}}
          - {{from: after, to: end}}
    """)
    result = goflow.run(path, workers=1, timeout=240)
    assert result.status == "failed"
    assert result.error["type"] == "result_too_large"
    assert result.error["node_id"] == "big"
    assert f"{protocol.MAX_RESULT_BYTES:,}-byte limit" in result.error["message"]
    assert "MAXMSGSIZE" in result.error["message"]


def test_the_daemon_answers_other_requests_while_it_loads_a_big_submission(tmp_path):
    from tests.test_daemon import Daemon

    n = 60_000
    lines = ["name: big", "nodes:", "  - {id: start, type: start}", "  - {id: end, type: end}"]
    lines += [f"  - {{id: p{i}, type: passthrough}}" for i in range(n)]
    lines.append("edges:")
    for i in range(n):
        lines += [f"  - {{from: start, to: p{i}}}", f"  - {{from: p{i}, to: end}}"]
    text = "\n".join(lines) + "\n"
    daemon = Daemon(tmp_path).start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.connect(daemon.control)
        sock.send(msgpack.packb({"op": "submit", "id": "big", "workflow": text, "name": "big.yaml"}))
        sock.send(msgpack.packb({"op": "workers", "id": "small"}))
        replies = []
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while len(replies) < 2 and poller.poll(240_000):
            replies.append(msgpack.unpackb(sock.recv(), raw=False))
        # Loading runs off the reactor: the small request, sent second, is answered first.
        assert [reply["id"] for reply in replies] == ["small", "big"]
        assert all(reply["ok"] for reply in replies), replies
        assert replies[1]["workflow"] == "big"
    finally:
        sock.close(0)
        context.term()
        daemon.stop()


def test_an_invalid_submission_is_still_refused_with_its_problems(tmp_path):
    from tests.test_daemon import Daemon

    daemon = Daemon(tmp_path).start()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        sock.connect(daemon.control)
        sock.send(msgpack.packb({"op": "submit", "id": 1, "workflow": LAUGHS, "name": "laughs.yaml"}))
        assert sock.poll(60_000)
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert reply["ok"] is False and reply["error"]["type"] == "invalid_workflow"
        (problem,) = reply["error"]["details"]["problems"]
        assert problem["file"] == "laughs.yaml"
        assert "YAML aliases expand to more than" in problem["message"]
    finally:
        sock.close(0)
        context.term()
        daemon.stop()


SHAPES = [
    "",
    "a: 1\nb: [1, 2.5, true, null, ~, '3', \"x\"]\nc: {d: on, e: 2026-01-02}\n",
    "base: &b {x: 1, y: [1, 2]}\nuse: *b\nlist: [*b, *b]\n",
    "base: &b {x: 1}\nmerged: {<<: *b, y: 2}\n",  # a merge key: the composing path
    "? [1, 2]\n: complex key\n",  # a collection as a key: the composing path
    "a: 1\na: 2\n",  # a duplicate key
    "1: int key\ntrue: bool key\n",
    "null: a null key\n0: zero\n010: octal\n1_000: underscores\n-7: negative\n0x1F: hex\n"
    "12345678901234567890: big\n",
    "plain: [007, 08, 0, 10, +3, 1:20, .5, 1e3, 1.0e+3, .inf, 2026-01-02 10:00:00, '10', \"0\", !!str 5, =x]\n",
    "tagged: !!str 123\nset: !!set {a, b}\n",
]


def test_a_recursive_alias_is_refused():
    from goflow.language.yaml_source import YamlLimitError, load_yaml

    with pytest.raises(YamlLimitError, match=r"alias '\*r' is inside the value it names"):
        load_yaml("a: &r [1, *r]\n")


@pytest.mark.parametrize("text", SHAPES)
def test_the_streaming_loader_gives_what_the_composing_one_gives(text):
    from goflow.language import yaml_source

    loader = yaml_source._Loader(text)
    try:
        expected, expected_duplicates = yaml_source._compose(loader, text)
    finally:
        loader.dispose()
    data, source = yaml_source.load_yaml(text)
    assert repr(data) == repr(expected)
    assert bool(source.duplicate_keys) == expected_duplicates


def test_yaml_errors_keep_their_positions():
    from goflow.language.yaml_source import YamlSyntaxError, load_yaml

    for text, position, message in [("a: *nowhere\n", (1, 4), "found undefined alias"),
                                    ("a: 1\n---\nb: 2\n", (2, 1), "expected a single document in the stream"),
                                    ("a: [1,\nb: 2\n", (3, 1), "did not find expected ',' or ']'")]:
        with pytest.raises(YamlSyntaxError) as caught:
            load_yaml(text)
        assert (caught.value.line, caught.value.column) == position, text
        assert message in caught.value.message


def test_loaded_models_with_the_same_keys_share_one_fields_set_until_assigned():
    # Memory: every node and edge loaded with the same keys holds the same fields-set object
    # (a distinct set per model cost ~90 MB at 100k nodes); assigning to one model gives it
    # its own copy first, so no other model sees the change.
    lines = ["name: shared-sets", "nodes:", "  - {id: start, type: start}", "  - {id: end, type: end}"]
    lines += [f"  - {{id: n{i}, type: python, call: 'operator:add', args: [{i}, 1], output: o{i}}}"
              for i in range(1000)]
    lines += ["edges:"] + [f"  - {{from: start, to: n{i}}}" for i in range(1000)]
    lines += [f"  - {{from: n{i}, to: end}}" for i in range(1000)]
    loaded = check(parse("\n".join(lines) + "\n", "shared.yaml"))
    assert not loaded.errors, loaded.errors[:3]
    workflow = loaded.workflow
    python_nodes = [node for node in workflow.nodes if node.type == "python"]
    assert len({id(node.model_fields_set) for node in python_nodes}) == 1
    assert len({id(edge.model_fields_set) for edge in workflow.edges}) == 1
    # and each distinct string is one object: an edge's ends are its nodes' own ids
    ids = {node.id: node.id for node in workflow.nodes}
    assert all(edge.source is ids[edge.source] and edge.target is ids[edge.target] for edge in workflow.edges)
    assert len({id(node.call) for node in python_nodes}) == 1
    first, second = python_nodes[0], python_nodes[1]
    assert first.model_fields_set == {"id", "type", "call", "args", "output"}
    first.timeout = 5.0
    assert first.model_fields_set == {"id", "type", "call", "args", "output", "timeout"}
    assert second.model_fields_set == {"id", "type", "call", "args", "output"}
    assert second.model_dump(exclude_unset=True) == {"id": "n1", "type": "python", "call": "operator:add",
                                                     "args": [1, 1], "output": "o1"}

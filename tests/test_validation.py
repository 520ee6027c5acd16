"""Every validation rule, each with a workflow that breaks it, and both GoFlow dialects."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from goflow.errors import WorkflowError
from goflow.language.loader import check, load, parse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

HEAD = """
name: t
variables:
  - {name: items, type: array, default: [1, 2]}
  - {name: count, type: number, default: 3}
"""


def problems(text: str) -> list:
    return check(parse(textwrap.dedent(text).lstrip(), "flow.yaml")).problems


def errors(text: str) -> list[str]:
    return [str(p) for p in problems(text) if p.severity == "error"]


def one_error(text: str, fragment: str) -> str:
    found = [e for e in errors(text) if fragment in e]
    assert found, f"no error containing {fragment!r} in {errors(text)}"
    return found[0]


def _items(text: str) -> str:
    """One flow-style item per line, however the pieces were indented."""
    return "\n".join("  " + line.strip() for line in text.splitlines() if line.strip())


def flow(nodes: str, edges: str, head: str = HEAD) -> str:
    edge_text = "edges: []\n" if edges.strip() == "[]" else "edges:\n" + _items(edges) + "\n"
    return textwrap.dedent(head).lstrip() + "nodes:\n" + _items(nodes) + "\n" + edge_text


SIMPLE_EDGES = "- {from: start, to: end}"
BASE_NODES = """
- {id: start, type: start}
- {id: end, type: end}
"""


def test_examples_are_valid():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        loaded = check(parse(path.read_text(), str(path)))
        assert not loaded.errors, [str(p) for p in loaded.errors]


def test_unknown_key_names_it_and_suggests_the_nearest():
    text = flow(BASE_NODES + "- {id: p, type: parallel, merge_strateg: wait_all, branches: [[a], [b]]}\n"
                             "- {id: a, type: passthrough}\n- {id: b, type: passthrough}",
                SIMPLE_EDGES + "\n- {from: start, to: p}")
    message = one_error(text, "merge_strateg")
    assert "unknown key 'merge_strateg' in node 'p'; did you mean 'merge_strategy'?" in message
    assert message.startswith("flow.yaml:8:")


def test_unknown_keys_at_every_level():
    text = flow("""
        - {id: start, type: start, descripton: x}
        - {id: n, type: python, call: "m:f", retry: {max_atempts: 2}}
        - {id: end, type: end}
    """, "- {from: start, to: n}\n- {from: n, to: end, lable: x}", head=HEAD + "nmae: x\n")
    found = errors(text)
    for key, suggestion in (("descripton", "description"), ("max_atempts", "max_attempts"),
                            ("lable", "label"), ("nmae", "name")):
        assert any(f"unknown key '{key}'" in e and f"did you mean '{suggestion}'" in e for e in found), key


def test_unknown_node_type_suggests_known_types():
    assert "did you mean 'transform'" in one_error(flow(BASE_NODES + "- {id: x, type: transfrom}", SIMPLE_EDGES),
                                                    "unknown node type 'transfrom'")


def test_duplicate_and_malformed_ids():
    text = flow(BASE_NODES + "- {id: a, type: passthrough}\n- {id: a, type: passthrough}\n"
                             "- {id: 'bad id/x', type: passthrough}",
                SIMPLE_EDGES + "\n- {from: start, to: a}\n- {from: start, to: 'bad id/x'}")
    one_error(text, "duplicate node id 'a'")
    one_error(text, "invalid node id 'bad id/x'")


def test_exactly_one_start_and_at_least_one_end():
    one_error(flow("- {id: s1, type: start}\n- {id: s2, type: start}\n- {id: end, type: end}",
                   "- {from: s1, to: end}\n- {from: s2, to: end}"), "exactly one start node, found 2")
    one_error(flow("- {id: end, type: end}", "[]"), "exactly one start node, found 0")
    one_error(flow("- {id: start, type: start}\n- {id: x, type: passthrough}", "- {from: start, to: x}"),
              "at least one end node")


def test_edges_to_missing_nodes_self_loops_and_duplicates():
    text = flow(BASE_NODES + "- {id: mid, type: passthrough}", """
        - {from: start, to: mdi}
        - {from: start, to: mid}
        - {from: mid, to: mid}
        - {from: mid, to: end}
        - {from: mid, to: end}
        - {from: ghost, to: end}
    """)
    assert "did you mean 'mid'" in one_error(text, "no node 'mdi'")
    one_error(text, "no node 'ghost'")
    one_error(text, "self-loop")
    one_error(text, "duplicate edge mid -> end")


def test_cycles_are_reported_including_through_loop_bodies():
    text = flow(BASE_NODES + "- {id: a, type: passthrough}\n- {id: b, type: passthrough}",
                "- {from: start, to: a}\n- {from: a, to: b}\n- {from: b, to: a}\n- {from: b, to: end}")
    one_error(text, "cycle through nodes a -> b -> a")
    text = flow(BASE_NODES + """
        - {id: outer, type: loop, collection: items, item: i, body: [inner]}
        - {id: inner, type: loop, collection: items, item: j, body: [outer]}
    """, SIMPLE_EDGES + "\n- {from: start, to: outer}")
    one_error(text, "cycle through nodes outer -> inner -> outer")


def test_every_unreachable_node_is_reported():
    text = flow(BASE_NODES + "- {id: o1, type: passthrough}\n- {id: o2, type: passthrough}\n"
                             "- {id: o3, type: passthrough}", SIMPLE_EDGES + "\n- {from: o1, to: o2}")
    found = [e for e in errors(text) if "unreachable" in e]
    assert len(found) == 3


def test_condition_nodes_need_one_true_and_one_false_edge():
    text = flow(BASE_NODES + "- {id: c, type: condition, condition: 'count > 1'}\n- {id: x, type: passthrough}",
                "- {from: start, to: c}\n- {from: c, to: x, condition: 'true'}\n- {from: c, to: end, condition: 'yes'}"
                "\n- {from: x, to: end}")
    one_error(text, "must have condition \"true\" or \"false\"")
    one_error(text, "needs exactly one \"false\" edge, found 0")


def test_unquoted_true_false_edge_conditions_are_accepted():
    text = flow(BASE_NODES + "- {id: c, type: condition, condition: 'count > 1'}\n- {id: x, type: passthrough}",
                "- {from: start, to: c}\n- {from: c, to: x, condition: true}\n- {from: c, to: end, condition: false}"
                "\n- {from: x, to: end}")
    assert errors(text) == []


def test_loop_bodies_and_branches():
    text = flow(BASE_NODES + """
        - {id: l, type: loop, collection: items, item: i, body: [missing, shared]}
        - {id: p, type: parallel, branches: [[shared], [inmain]]}
        - {id: shared, type: passthrough}
        - {id: inmain, type: passthrough}
    """, SIMPLE_EDGES + "\n- {from: start, to: l}\n- {from: start, to: p}\n- {from: start, to: inmain}")
    one_error(text, "names missing node 'missing'")
    one_error(text, "is in both 'l' and 'p'")
    one_error(text, "must not also have edges in the main graph")


def test_undefined_variables_are_scope_aware():
    text = flow(BASE_NODES + """
        - {id: l, type: loop, collection: items, item: it, body: [use], break_condition: "it_index > 5"}
        - {id: use, type: python, call: "m:f", args: ["${it}", "${it_index}", "${count}"], output: r}
        - {id: after, type: python, call: "m:f", args: ["${it}"]}
        - {id: c, type: transform, expression: "${cuont} + 1", output: o}
    """, SIMPLE_EDGES + "\n- {from: start, to: l}\n- {from: l, to: after}\n- {from: after, to: c}\n- {from: c, to: end}")
    found = errors(text)
    assert not any("node 'use'" in e for e in found), found
    assert not any("node 'l'" in e for e in found), found
    one_error(text, "node 'after': args refers to undefined variable 'it'")
    assert "did you mean 'count'" in one_error(text, "undefined variable 'cuont'")


def test_loop_outputs_and_node_outputs_are_defined():
    text = flow(BASE_NODES.replace("{id: end, type: end}", "{id: end, type: end, return: '${all}'}") + """
        - {id: l, type: loop, collection: items, item: it, body: [use], output: all}
        - {id: use, type: transform, expression: "it * 2", output: doubled}
    """, "- {from: start, to: l}\n- {from: l, to: end}")
    assert errors(text) == []


def test_undeclared_server(monkeypatch, tmp_path):
    monkeypatch.setenv("GOFLOW_HOME", str(tmp_path))
    text = flow(BASE_NODES + "- {id: call, type: mcp_tool, server: fs, tool: read_file}",
                SIMPLE_EDGES + "\n- {from: start, to: call}")
    one_error(text, "uses server 'fs', which is neither declared")


def test_expressions_that_do_not_parse():
    text = flow(BASE_NODES + """
        - {id: c, type: condition, condition: "count >"}
        - {id: t, type: transform, expression: "jq(.[ )", output: o}
        - {id: u, type: transform, template: "${unclosed", output: o2}
        - {id: p, type: python, call: "m:f", args: ["${}"]}
    """, "- {from: start, to: c}\n- {from: c, to: t, condition: 'true'}\n- {from: c, to: end, condition: 'false'}"
         "\n- {from: t, to: u}\n- {from: u, to: p}\n- {from: p, to: end}")
    for node in ("'c'", "'t'", "'u'", "'p'"):
        assert any(f"node {node}: invalid" in e for e in errors(text)), (node, errors(text))


def test_expression_in_goflow_template_form_validates_its_references():
    ok = flow(BASE_NODES + "- {id: t, type: transform, expression: 'Total: ${count} items', output: o}",
              SIMPLE_EDGES + "\n- {from: start, to: t}")
    assert errors(ok) == []
    bad = flow(BASE_NODES + "- {id: t, type: transform, expression: 'Total: ${nope} items', output: o}",
               SIMPLE_EDGES + "\n- {from: start, to: t}")
    assert "nope" in one_error(bad, "node 't'")


def test_format_number_with_one_argument_fails_validation():
    text = flow(BASE_NODES + "- {id: t, type: transform, expression: '${formatNumber(count)}', output: o}",
                SIMPLE_EDGES + "\n- {from: start, to: t}")
    assert "requires 2 arguments" in one_error(text, "node 't'")


def test_pattern_re2_rejects_fails_validation():
    # RE2 has no lookahead or backreferences; GoFlow's expr-lang refuses them too.
    text = flow(BASE_NODES + "- {id: c, type: condition, condition: \"count > 1 && 'ab' matches 'a(?=b)'\"}",
                "- {from: start, to: c}\n- {from: c, to: end, condition: 'true'}"
                "\n- {from: c, to: end2, condition: 'false'}").replace(
        "- {id: end, type: end}", "- {id: end, type: end}\n  - {id: end2, type: end}")
    assert "RE2" in one_error(text, "node 'c'")


def test_literal_type_mismatch_fails_validation():
    text = flow(BASE_NODES + "- {id: t, type: transform, expression: '\"5\" == 5', output: o}",
                SIMPLE_EDGES + "\n- {from: start, to: t}")
    assert "mismatched types" in one_error(text, "node 't'")


def test_metadata_is_free_form():
    text = flow(BASE_NODES, SIMPLE_EDGES, head=HEAD + """
metadata: {author: me, phase: beta, status: future-implementation, tags: [a]}
""")
    assert errors(text) == []


def test_metadata_documented_keys_are_typed_and_located():
    text = flow(BASE_NODES, SIMPLE_EDGES, head=HEAD + "metadata: {tags: 5}\n")
    message = one_error(text, "tags")
    assert "in 'metadata'" in message and "top level" not in message


def test_goflow_retry_class_names_map_onto_goflow_classes():
    from goflow.coordinator.retry import retry_delay
    from goflow.language.model import RetryPolicy

    def retries(policy, kind):
        return retry_delay(policy, {"type": kind}, 1) is not None

    policy = RetryPolicy(on=["connection_error", "timeout"], initial_delay=0)
    assert [retries(policy, c) for c in ("connection", "server_lost", "timeout", "python_error")] == \
        [True, True, True, False]
    assert retries(RetryPolicy(on=["execution_error"]), "python_error")
    assert not retries(RetryPolicy(non_retryable_errors=["data"]), "transform_error")


def test_bad_durations_merge_strategies_and_retry_policies():
    text = flow(BASE_NODES + """
        - {id: a, type: python, call: "m:f", timeout: 10 parsecs}
        - {id: b, type: parallel, merge_strategy: race, branches: [[x], [y]]}
        - {id: x, type: passthrough}
        - {id: y, type: passthrough}
        - {id: c, type: python, call: "m:f", retry: {max_attempts: 0, backoff: linear}}
        - {id: d, type: python, call: "not a call"}
    """, SIMPLE_EDGES + "\n- {from: start, to: a}\n- {from: start, to: b}\n- {from: start, to: c}"
                        "\n- {from: start, to: d}")
    one_error(text, "invalid duration")
    one_error(text, "merge_strategy")
    one_error(text, "max_attempts")
    one_error(text, "backoff")
    one_error(text, "must look like 'package.module:function'")


def test_variables_rules():
    text = flow(BASE_NODES, SIMPLE_EDGES, head="""
        name: t
        variables:
          - {name: n, type: number, default: abc}
          - {name: n, type: string}
          - {name: 9bad}
          - {name: t, type: tuple}
    """)
    one_error(text, "default of variable 'n' is a str, not a number")
    one_error(text, "duplicate variable 'n'")
    one_error(text, "invalid variable name '9bad'")
    one_error(text, "invalid value for 'type'")


def test_duplicate_yaml_keys_are_errors():
    one_error("name: a\nname: b\nnodes: []\nedges: []\n", "duplicate key 'name'")


def test_yaml_12_booleans_keep_on_as_a_key():
    workflow = load("flow.yaml", text=flow(BASE_NODES + "- {id: p, type: python, call: 'm:f', "
                                                        "retry: {on: [timeout], max_attempts: 2}}",
                                           SIMPLE_EDGES + "\n- {from: start, to: p}"))
    assert workflow.node("p").retry.on == ["timeout"]


def test_both_goflow_dialects_load():
    parser_dialect = flow(BASE_NODES + """
        - {id: t, type: transform, input: items, expression: "jq(length)", output: n}
        - {id: l, type: loop, collection: items, item: x, body: [b]}
        - {id: b, type: passthrough}
        - {id: c, type: condition, condition: "count > 10 && n >= 2"}
        - {id: p, type: parallel, merge_strategy: wait_any, branches: [[p1], [p2]]}
        - {id: p1, type: passthrough}
        - {id: p2, type: passthrough}
    """, "- {from: start, to: t}\n- {from: t, to: l}\n- {from: l, to: c}\n- {from: c, to: p, condition: 'true'}"
         "\n- {from: c, to: end, condition: 'false'}\n- {from: p, to: end}")
    docs_dialect = flow("""
        - {id: start, type: start}
        - {id: t, type: transform, input: "${items}", expression: "jq(length)", output: n}
        - {id: l, type: loop, collection: "${items}", item: x, body: [b]}
        - {id: b, type: passthrough}
        - {id: c, type: condition, condition: "${n} > ${threshold}"}
        - {id: p, type: parallel, merge: wait_first, branches: [[p1], [p2]]}
        - {id: p1, type: passthrough}
        - {id: p2, type: passthrough}
        - {id: end, type: end, return_value: "${n}"}
    """, "- {from: start, to: t}\n- {from: t, to: l}\n- {from: l, to: c}\n- {from: c, to: p, condition: 'true'}"
         "\n- {from: c, to: end, condition: 'false'}\n- {from: p, to: end}",
        head="name: t\nvariables:\n  - {name: items, type: array, default_value: [1]}\n"
             "  - {name: threshold, type: number, default: 1}\n")
    assert errors(parser_dialect) == []
    assert errors(docs_dialect) == []
    workflow = load("flow.yaml", text=docs_dialect)
    assert workflow.node("p").merge_strategy == "wait_first"
    assert workflow.variables[0].default == [1]
    assert workflow.node("end").return_ == "${n}"


def test_harmless_names_are_not_rejected():
    # GoFlow's substring denylist rejects names like these; we do not.
    text = flow(BASE_NODES + """
        - {id: t, type: transform, expression: "photos.x + subnet.y + command_id", output: budget}
    """, SIMPLE_EDGES + "\n- {from: start, to: t}", head="""
        name: t
        variables:
          - {name: photos, type: object, default: {x: 1}}
          - {name: subnet, type: object, default: {y: 2}}
          - {name: command_id, type: number, default: 3}
    """)
    assert errors(text) == []


def test_load_raises_with_every_problem():
    with pytest.raises(WorkflowError) as info:
        load("flow.yaml", text=flow("- {id: start, type: start}", "[]"))
    assert any("end node" in str(p) for p in info.value.problems)


def test_servers_need_command_or_url():
    text = flow(BASE_NODES, SIMPLE_EDGES, head=HEAD + """
servers:
  - {id: a}
  - {id: b, transport: http}
  - {id: c, transport: carrier-pigeon, command: x}
""")
    one_error(text, "server 'a' uses the stdio transport and needs 'command'")
    one_error(text, "server 'b' uses the http transport and needs 'url'")
    one_error(text, "invalid value for 'transport'")

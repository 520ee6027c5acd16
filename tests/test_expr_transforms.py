"""Transforms: jq, JSONPath, expressions and templates."""

from __future__ import annotations

import json

import pytest

from goflow.language.expr import ExpressionError, Transform, UndefinedVariableError, compile_transform

DATA = {
    "store": {
        "books": [
            {"title": "A", "price": 8, "tags": ["new"]},
            {"title": "B", "price": 12, "tags": []},
            {"title": "C", "price": 25, "tags": ["sale", "new"]},
        ],
        "owner": {"name": "Kim"},
    },
    "orders": [{"items": [{"sku": "x1"}, {"sku": "x2"}]}, {"items": [{"sku": "y1"}]}],
}
VARS = {"factor": 3, "min_price": 10, "label": "books", "data": DATA, "n": 4}


def run(expression=None, template=None, input_value=DATA, variables=VARS):
    return compile_transform(expression=expression, template=template).apply(input_value, variables)


# ---------------------------------------------------------------- kinds and names

@pytest.mark.parametrize("kwargs, kind, names", [
    ({"expression": "jq(.store.books | length)"}, "jq", set()),
    ({"expression": "jq(.store.books | map(.price * ${factor}))"}, "jq", {"factor"}),
    ({"expression": "  jq( [.[] | select(. > ${min_price})] )  "}, "jq", {"min_price"}),
    ({"expression": "$.store.books[*].title"}, "jsonpath", set()),
    ({"expression": "$"}, "jsonpath", set()),
    ({"expression": "$[0]"}, "jsonpath", set()),
    ({"expression": "input.store.owner.name + label"}, "expression", {"label"}),
    ({"expression": "${factor} * 3"}, "template", {"factor"}),   # GoFlow's template form
    ({"expression": "${factor}"}, "expression", {"factor"}),
    ({"expression": "len(data.orders) > n"}, "expression", {"data", "n"}),
    ({"template": "Hello ${input.store.owner.name}, ${label}"}, "template", {"label"}),
])
def test_kind_and_names(kwargs, kind, names):
    t = compile_transform(**kwargs)
    assert isinstance(t, Transform)
    assert t.kind == kind
    assert t.names == frozenset(names)


# ---------------------------------------------------------------- jq

@pytest.mark.parametrize("program, expected", [
    ("jq(.store.owner.name)", "Kim"),
    ("jq(.store.books | length)", 3),
    ("jq(.store.books | map(.price * ${factor}))", [24, 36, 75]),
    ("jq([.store.books[] | select(.price > ${min_price}) | .title])", ["B", "C"]),
    ("jq(.store.books[].title)", ["A", "B", "C"]),          # several outputs -> list
    ("jq(.store.books[] | select(.price > 100))", None),    # no output -> None
    ("jq(.missing)", None),
    ('jq("${label}")', "${label}"),                          # inside a jq string: literal
    ('jq(${label} + "!")', "books!"),
    ("jq(env)", {}),
    ("jq($ENV)", {}),
    ("jq(.orders | [.[].items[].sku])", ["x1", "x2", "y1"]),
    ("jq(def double: . * 2; .store.books[0].price | double)", 16),
    ("jq(${data}.store.owner)", {"name": "Kim"}),
])
def test_jq(program, expected):
    assert run(program) == expected


def test_jq_values_are_not_spliced():
    evil = {"label": '") | env | ("', "factor": 1}
    assert run('jq(${label})', variables=evil) == evil["label"]


def test_jq_json_text_input():
    assert run("jq(.a)", input_value='  {"a": [1, 2]}') == [1, 2]
    assert run("jq(.)", input_value="plain text") == "plain text"


def test_jq_errors():
    with pytest.raises(ExpressionError, match="invalid jq program"):
        compile_transform(expression="jq(.a | )")
    with pytest.raises(ExpressionError, match="invalid jq program"):
        compile_transform(expression="jq(undefined_fn)")
    with pytest.raises(ExpressionError, match="jq error"):
        run('jq(error("boom"))')
    with pytest.raises(ExpressionError, match="jq error"):
        run("jq(input)")
    with pytest.raises(UndefinedVariableError) as ei:
        run("jq(. + ${ghost})")
    assert ei.value.name == "ghost"
    with pytest.raises(ExpressionError, match="unclosed"):
        compile_transform(expression="jq(. + ${x)")


# ---------------------------------------------------------------- JSONPath

@pytest.mark.parametrize("path, expected", [
    ("$", DATA),
    ("$.store.owner.name", "Kim"),
    ("$.store.books[0].title", "A"),
    ("$.store.books[-1].title", "C"),
    ("$.store.missing", None),                      # singular, not found -> None
    ("$.store.books[9]", None),
    ("$.store.books[*].title", ["A", "B", "C"]),   # wildcard -> list
    ("$.orders[*].items[*].sku", ["x1", "x2", "y1"]),
    ("$..sku", ["x1", "x2", "y1"]),
    ("$.store.books[?(@.price > 10)].title", ["B", "C"]),   # GoFlow filter syntax
    ("$.store.books[?@.price > 10].title", ["B", "C"]),     # RFC 9535 filter syntax
    ("$.store.books[?(@.price > 5 && @.price < 20)].title", ["A", "B"]),
    ("$.store.books[0:2].title", ["A", "B"]),
    ("$.store.books[*].nothing", []),
    ("$.store.books.length()", 3),
    ("$.store.books[*].tags.length()", 3),
    ("$.store.missing.length()", 0),
    ("$.store.owner.name.length()", 3),
    ("$['store']['owner']['name']", "Kim"),
])
def test_jsonpath(path, expected):
    assert run(path) == expected


def test_jsonpath_json_text_input():
    assert run("$.store.owner.name", input_value=json.dumps(DATA)) == "Kim"
    assert run("$[1]", input_value="[1, 2]") == 2
    assert run("$", input_value="plain") == "plain"
    assert run("$.a", input_value="plain") is None
    with pytest.raises(ExpressionError, match="looks like JSON"):
        run("$.a", input_value="{not json")


def test_jsonpath_errors():
    with pytest.raises(ExpressionError, match="invalid JSONPath"):
        compile_transform(expression="$.a[?(@.x >")
    with pytest.raises(ExpressionError, match="invalid JSONPath"):
        compile_transform(expression="$.a[")


# ---------------------------------------------------------------- expressions and templates

def test_expressions():
    assert run("factor * 3") == 9
    assert run("${factor}") == 3
    assert run("input.store.books[1].price * factor") == 36
    assert run("len(input.store.books) > 2") is True
    assert run("input.store.owner", variables={}) == {"name": "Kim"}
    # a real variable named input wins over the input value
    assert run("input + 1", input_value=100, variables={"input": 1}) == 2
    assert run("n > 3 ? 'many' : 'few'") == "many"


def test_templates():
    assert run(template="Owner: ${input.store.owner.name} (${label}, ${factor * 2})") == \
        "Owner: Kim (books, 6)"
    assert run(template="${factor}") == "3"


def test_expression_that_is_text_renders_as_a_template():
    t = compile_transform(expression="Total: ${sum}")
    assert (t.kind, t.names, t.apply(None, {"sum": 36.0})) == ("template", {"sum"}, "Total: 36.0")


def test_expression_that_is_really_a_jsonpath():
    with pytest.raises(ExpressionError, match="must start with '\\$'"):
        compile_transform(expression="store.books[*].title")


@pytest.mark.parametrize("kwargs", [{}, {"expression": "1", "template": "x"}, {"expression": ""},
                                    {"expression": "1 +"}, {"template": "${"}, {"expression": 5}])
def test_compile_errors(kwargs):
    with pytest.raises(ExpressionError):
        compile_transform(**kwargs)


def test_undefined_variable_in_expression():
    with pytest.raises(UndefinedVariableError) as ei:
        run("ghost * 2")
    assert ei.value.name == "ghost"

"""Interpolation, to_text and templates."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goflow.language.expr import (ExpressionError, UndefinedVariableError, check_interpolation,
                         interpolate, interpolation_references, render_text, to_text)
from goflow.language.expr.templates import compile_template, render_template

VARS = {
    "name": "ann",
    "n": 5,
    "f": 36.0,
    "flag": False,
    "none": None,
    "lst": ["a", 1, None],
    "user": {"name": "ann", "tags": ["x", "y"], "address": {"city": "Oslo"}},
    "orders": [{"id": 7}],
    "ts": "2024-03-05T14:07:09Z",
    "count": 7,
    "price": 2.5,
}


# ---------------------------------------------------------------- to_text

@pytest.mark.parametrize("value, text", [
    ("s", "s"), (None, ""), (True, "true"), (False, "false"), (5, "5"), (-3, "-3"),
    (36.0, "36.0"), (2.5, "2.5"), (1e20, "1e+20"), (float("nan"), "NaN"),
    (float("inf"), "Infinity"), ({"a": 1, "b": [1, 2]}, '{"a":1,"b":[1,2]}'),
    ([1, "x", None, True], '[1,"x",null,true]'), ((1, 2), "[1,2]"), ({"é": "ü"}, '{"é":"ü"}'),
    (dt.datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05"), (b"bytes", "bytes"),
    ({1: "int key"}, '{"1":"int key"}'),
])
def test_to_text(value, text):
    assert to_text(value) == text


# ---------------------------------------------------------------- interpolate

def test_exact_reference_keeps_type():
    assert interpolate("${n}", VARS) == 5
    assert interpolate("${f}", VARS) == 36.0
    assert interpolate("${flag}", VARS) is False
    assert interpolate("${none}", VARS) is None
    assert interpolate("${user}", VARS) == VARS["user"]
    assert interpolate("${user.tags}", VARS) == ["x", "y"]
    assert interpolate("${orders[0].id}", VARS) == 7
    assert interpolate("${ user.name }", VARS) == "ann"  # whitespace inside the braces is fine


def test_surrounding_whitespace_renders_text():
    assert interpolate(" ${n}", VARS) == " 5"
    assert interpolate("${n} ", VARS) == "5 "
    assert interpolate("${n}${n}", VARS) == "55"


def test_embedded_references_render_text():
    out = interpolate("n=${n} f=${f} b=${flag} none=[${none}] l=${lst} u=${user.address}", VARS)
    assert out == 'n=5 f=36.0 b=false none=[] l=["a",1,null] u={"city":"Oslo"}'


def test_deep_interpolation_leaves_keys_alone():
    value = {"${n}": ["${name}", {"deep": "x ${n}"}, 3, None, True], "t": ("${n}",)}
    assert interpolate(value, VARS) == {"${n}": ["ann", {"deep": "x 5"}, 3, None, True],
                                        "t": [5]}


def test_escape():
    assert interpolate("\\${n}", VARS) == "${n}"
    assert interpolate("cost: \\${n} is ${n}", VARS) == "cost: ${n} is 5"
    assert interpolate("a \\$ b $5 {x}", VARS) == "a \\$ b $5 {x}"
    assert render_text("\\${x}", {}) == "${x}"


def test_missing_variable_errors():
    with pytest.raises(UndefinedVariableError) as ei:
        interpolate("hi ${ghost}", VARS)
    assert ei.value.name == "ghost"
    assert ei.value.position == 3
    with pytest.raises(UndefinedVariableError, match="'user' has no key 'zip'"):
        interpolate({"a": ["${user.zip}"]}, VARS)
    with pytest.raises(UndefinedVariableError, match=r"out of range \(orders has 1 items\)"):
        interpolate("${orders[3]}", VARS)


@pytest.mark.parametrize("text, fragment, position", [
    ("abc ${name", "unclosed '${' at position 4", 4),
    ("abc ${}", "empty reference '${}' at position 4", 4),
    ("${  }", "empty reference", 0),
    ("x ${a..b}", "invalid reference", 2),
    ("${a + b}", "use a template for expressions", 0),
    ("${1abc}", "invalid reference", 0),
])
def test_check_interpolation_errors(text, fragment, position):
    with pytest.raises(ExpressionError) as ei:
        check_interpolation(text)
    assert fragment in str(ei.value)
    assert ei.value.position == position
    with pytest.raises(ExpressionError):
        interpolate(text, VARS)


def test_check_interpolation_ok():
    for text in ["plain", "${a}", "x ${a.b[0]['c d']} y", "\\${not a ref", "${a[\"}\"]}"]:
        check_interpolation(text)


def test_references():
    assert interpolation_references("${a} and ${b.c[0]}") == {"a", "b"}
    assert interpolation_references({"${k}": ["${x}", {"y": "${y.z}"}], "n": 3}) == {"x", "y"}
    assert interpolation_references("\\${a}") == set()
    assert interpolation_references(42) == set()


def test_render_text():
    assert render_text("${n}", VARS) == "5"
    assert render_text("${user.tags}", VARS) == '["x","y"]'
    assert render_text("${none}", VARS) == ""
    assert render_text("plain", VARS) == "plain"


def test_injection_values_not_reinterpreted():
    variables = {"evil": "${secret}", "secret": "TOP", "q": '") or true or ("'}
    assert interpolate("${evil}", variables) == "${secret}"
    assert interpolate("say ${evil}", variables) == "say ${secret}"
    assert interpolate(["${evil}", {"k": "${q}"}], variables) == ["${secret}", {"k": variables["q"]}]


# ---------------------------------------------------------------- hypothesis

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_prop_exact_reference_roundtrips(v):
    assert interpolate("${x}", {"x": v}) == v


@settings(max_examples=150, deadline=None)
@given(json_values, st.text(max_size=10).filter(lambda s: "${" not in s and not s.endswith("\\")),
       st.text(max_size=10).filter(lambda s: "${" not in s and not s.startswith("{")))
def test_prop_embedded_reference_renders_to_text(v, before, after):
    if not before and not after:
        before = "<"
    out = interpolate(before + "${x}" + after, {"x": v})
    assert out == before + to_text(v) + after


@settings(max_examples=150, deadline=None)
@given(st.text().filter(lambda s: "${" not in s))
def test_prop_text_without_reference_unchanged(s):
    assert interpolate(s, {}) == s
    assert render_text(s, {}) == s
    check_interpolation(s)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=30))
def test_prop_values_never_reinterpolated(s):
    payload = "${y}" + s + "${x}"
    variables = {"x": payload, "y": "should not appear"}
    assert interpolate("${x}", variables) == payload
    assert interpolate("[${x}]", variables) == "[" + payload + "]"


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_prop_to_text_of_containers_is_json(v):
    if isinstance(v, (list, dict)):
        assert json.loads(to_text(v)) == v


# ---------------------------------------------------------------- templates

@pytest.mark.parametrize("template, expected", [
    ("Hello ${name}!", "Hello ann!"),
    ("${n}", "5"),
    ("${f}", "36.0"),
    ("${user.address.city}", "Oslo"),
    ("${upper(name)} ${lower('ABC')} ${capitalize(name)} [${trim('  x  ')}]", "ANN abc Ann [x]"),
    ("${upper(n)}", "5"),
    ("${length(user.tags)} ${length(name)} ${length(user)} ${length(none)}", "2 3 3 0"),
    ("${default(none, 'fb')} ${default('', 'e')} ${default(name, 'fb')} ${default(ghost, 'g')}",
     "fb e ann g"),
    ("${join(user.tags, ', ')} ${join(lst, '|')} ${join(user.tags)}", "x, y a|1| x,y"),
    ("${formatNumber(price, 2)} ${formatNumber(3, 0)} ${formatNumber('1.005', 1)}",
     "2.50 3 1.0"),
    ("${if(count > 5, 'many', 'few')}", "many"),
    ("${if(count > 50, 'many', ghost)}", None),  # chosen branch is undefined
    ("${price * 2} ${n + 1} ${name + '!'}", "5.0 6 ann!"),
    ("${user.tags}", '["x","y"]'),
    ("${none}", ""),
    ("\\${name} ${name}", "${name} ann"),
    ("${n > 3 ? 'big' : 'small'}", "big"),
    ("${ {a: n}.a }", "5"),
])
def test_templates(template, expected):
    if expected is None:
        with pytest.raises(UndefinedVariableError):
            render_template(template, VARS)
        return
    assert render_template(template, VARS) == expected


@pytest.mark.parametrize("value, layout, expected", [
    ("2024-03-05T14:07:09Z", "2006-01-02", "2024-03-05"),
    ("2024-03-05T14:07:09Z", "%Y-%m-%d %H:%M", "2024-03-05 14:07"),
    ("2024-03-05T14:07:09Z", "2006-01-02T15:04:05Z07:00", "2024-03-05T14:07:09Z"),
    ("2024-03-05T14:07:09+02:00", "2006-01-02T15:04:05-07:00", "2024-03-05T14:07:09+02:00"),
    ("2024-03-05T14:07:09.123456Z", "15:04:05.000", "14:07:09.123"),
    ("2024-03-05T14:07:09Z", "Jan 2, 2006 at 3:04PM", "Mar 5, 2024 at 2:07PM"),
    ("2024-03-05T14:07:09Z", "Monday, January 02 06", "Tuesday, March 05 24"),
    ("2024-03-05", "02/01/2006", "05/03/2024"),
    (0, "2006-01-02 15:04:05 MST", "1970-01-01 00:00:00 UTC"),
    (1709647629000, "2006-01-02", "2024-03-05"),
    ("1709647629", "2006-01-02", "2024-03-05"),
    (dt.datetime(2024, 12, 31, 23, 0), "_2 Jan 06 3pm", "31 Dec 24 11pm"),
])
def test_format_date(value, layout, expected):
    assert render_template("${formatDate(v, l)}", {"v": value, "l": layout}) == expected


def test_template_names_and_errors():
    t = compile_template("${upper(a.b)} ${if(c > 1, d, 'x')} ${default(e, f)} ${'lit'}")
    assert t.names == frozenset({"a", "c", "d", "e", "f"})
    with pytest.raises(ExpressionError) as ei:
        compile_template("x ${shout(name)}")
    assert "unknown template function 'shout'; known: " in str(ei.value)
    assert "formatDate" in str(ei.value)
    assert ei.value.position == 4
    with pytest.raises(ExpressionError, match="unclosed"):
        compile_template("${name")
    with pytest.raises(ExpressionError, match="empty reference"):
        compile_template("${}")
    with pytest.raises(ExpressionError, match="if\\(\\): the condition must be a boolean"):
        render_template("${if(n, 'a', 'b')}", VARS)
    with pytest.raises(ExpressionError, match="precision"):
        render_template("${formatNumber(price, 'x')}", VARS)
    with pytest.raises(ExpressionError, match="cannot read"):
        render_template("${formatDate('not a date', '2006')}", VARS)
    with pytest.raises(UndefinedVariableError):
        render_template("${ghost}", VARS)


def test_template_hyphenated_path_is_a_reference():
    variables = {"step-1": {"out": "ok"}, "a": 5, "b": 2}
    assert render_template("${step-1.out}", variables) == "ok"
    assert render_template("${a - b}", variables) == "3"
    assert compile_template("${step-1.out} ${true}").names == frozenset({"step-1"})
    assert render_template("${true}", {}) == "true"

"""The condition language: parsing, evaluation, names, errors."""

from __future__ import annotations

import pytest

from goflow.language.expr import Condition, ExpressionError, UndefinedVariableError, parse_condition
from goflow.language.expr.paths import parse_path, resolve_path

VARS = {
    "n": 5,
    "f": 2.5,
    "s": "hello",
    "empty": "",
    "flag": True,
    "nothing": None,
    "lst": [1, 2, 3],
    "user": {"name": "ann", "email": "ann@example.com", "roles": ["admin", "dev"],
             "address": {"city": "Oslo"}},
    "orders": [{"id": 1, "items": [{"sku": "A"}, {"sku": "B"}]}, {"id": 2, "items": []}],
    "value": 10,
    "threshold": 3,
    "status": "active",
}


def ev(text, variables=VARS):
    return parse_condition(text).evaluate(variables)


@pytest.mark.parametrize("text, expected", [
    # literals
    ("42", 42), ("4.5", 4.5), ("1e3", 1000.0), ("'single'", "single"), ('"double"', "double"),
    ("`raw\\n`", "raw\\n"), ("'a\\nb'", "a\nb"), ("'\\u00e9'", "é"),
    ("true", True), ("false", False), ("nil", None), ("null", None),
    ("[1, 'a', true]", [1, "a", True]), ("[]", []), ("{a: 1, 'b c': n}", {"a": 1, "b c": 5}),
    # arithmetic
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("10 / 4", 2.5), ("7 % 3", 1), ("-7 % 3", -1),
    ("2 ** 10", 1024.0), ("2 ^ 3", 8.0), ("2 ** 3 ** 2", 512.0), ("-2 ** 2", -4.0), ("-n", -5),
    ("+n", 5), ("10 - 2 - 3", 5), ("f * 2", 5.0), ("2 ** -1", 0.5),
    ("'a' + 'b'", "ab"), ("lst + [4]", [1, 2, 3, 4]),
    # comparisons
    ("n == 5", True), ("n != 5", False), ("n > 3", True), ("n >= 5", True), ("n < 5", False),
    ("n <= 5", True), ("1 == 1.0", True), ("'a' < 'b'", True),
    ("nil == null", True), ("nothing == nil", True), ("[1, 2] == [1, 2]", True),
    ("{a: 1} == {a: 1}", True), ("user.name == 5", False),
    # logic
    ("n > 3 && s == 'hello'", True), ("n > 3 and s == 'x'", False), ("n > 9 || flag", True),
    ("n > 9 or false", False), ("!flag", False), ("not flag", False), ("not (n > 3)", False),
    ("!!flag", True),
    # membership and string operators
    ("2 in lst", True), ("9 in lst", False), ("9 not in lst", True), ("'name' in user", True),
    ("'zip' in user", False), ("'ell' in s", True), ("'admin' in user.roles", True),
    ("s contains 'll'", True), ("user.roles contains 'dev'", True),
    ("s matches '^h.*o$'", True), ("s matches '^x'", False),
    ("s startsWith 'he'", True), ("s endsWith 'lo'", True), ("s startsWith 'lo'", False),
    # ternary, coalescing
    ("n > 3 ? 'big' : 'small'", "big"), ("n > 9 ? 'big' : n > 4 ? 'mid' : 'small'", "mid"),
    ("nothing ?? 'fallback'", "fallback"), ("n ?? 0", 5),
    # functions
    ("len(lst)", 3), ("length(s)", 5), ("len(user)", 4), ("lower('AbC')", "abc"),
    ("upper(s)", "HELLO"), ("trim('  x ')", "x"), ("abs(-3)", 3), ("int('42')", 42),
    ("int(3.9)", 3), ("int('3.5')", 3), ("float('2.5')", 2.5), ("string(n)", "5"),
    ("string(f)", "2.5"), ("string(flag)", "true"), ("string(lst)", "[1,2,3]"),
    ("min(3, 1, 2)", 1), ("max(lst)", 3), ("round(2.567, 2)", 2.57), ("keys({a: 1})", ["a"]),
    # member access and indexing
    ("user.name", "ann"), ("user.address.city", "Oslo"), ("user['name']", "ann"),
    ('user["address"]["city"]', "Oslo"), ("lst[0]", 1), ("lst[-1]", 3), ("s[1:3]", "el"),
    ("orders[0].items[1].sku", "B"), ("lst[1:]", [2, 3]), ("lst[:2]", [1, 2]),
    ("user?.name", "ann"),
    # a missing key is nil; '?.' stops at nil
    ("user.phone", None), ("user.phone == nil", True), ("user.phone?.number", None),
    ("nothing?.x", None), ("nothing?.x.y", None),
    # ${...} references and $.name
    ("${value} > ${threshold}", True), ("${user.name} == 'ann'", True),
    ("${orders[0].items[0].sku}", "A"), ("${user.phone}", None), ("$.status == 'active'", True),
    ("$.n + 1", 6),
])
def test_evaluates(text, expected):
    result = ev(text)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize("text, names", [
    ("n > 3 && s == 'x'", {"n", "s"}),
    ("${value} > ${threshold}", {"value", "threshold"}),
    ("${user.address.city} == 'Oslo'", {"user"}),
    ("$.status == 'active'", {"status"}),
    ("len(items) > 0 and 'x' in tags", {"items", "tags"}),
    ("user.name.first", {"user"}),
    ("a[b].c", {"a", "b"}),
    ("true or nil == null", set()),
    ("'len' + \"n\"", set()),
    ("{k: v}", {"v"}),
])
def test_names(text, names):
    cond = parse_condition(text)
    assert isinstance(cond, Condition)
    assert cond.names == frozenset(names)
    assert cond.source == text


def test_evaluate_bool():
    assert parse_condition("n > 3").evaluate_bool(VARS) is True
    with pytest.raises(ExpressionError, match="condition must evaluate to a boolean, got int"):
        parse_condition("n + 1").evaluate_bool(VARS)
    with pytest.raises(ExpressionError, match="got string"):
        parse_condition("s").evaluate_bool(VARS)
    with pytest.raises(ExpressionError, match="got null"):
        parse_condition("nothing").evaluate_bool(VARS)


def test_missing_root_variable_is_an_error():
    with pytest.raises(UndefinedVariableError) as ei:
        ev("missing > 3")
    assert ei.value.name == "missing"
    assert "undefined variable 'missing'" in str(ei.value)
    assert ei.value.position == 0
    with pytest.raises(UndefinedVariableError) as ei:
        ev("n > 1 && ${ghost.x} == 1")
    assert ei.value.name == "ghost"
    with pytest.raises(UndefinedVariableError):
        ev("$.ghost == 1")


def test_short_circuit_skips_undefined():
    assert ev("false && missing") is False
    assert ev("true || missing") is True
    assert ev("true ? 1 : missing") == 1


@pytest.mark.parametrize("text, position, fragment", [
    ("1 +", 3, "end of expression"),
    ("(1 + 2", 6, "expected ')'"),
    ("n > > 3", 4, "unexpected '>'"),
    ("'unterminated", 0, "unterminated string"),
    ("n @ 3", 2, "unexpected character '@'"),
    ("a ? b", 5, "expected ':'"),
    ("${}", 0, "empty reference"),
    ("${a", 0, "unclosed"),
    ("${a..b} > 1", 0, "invalid reference"),
    ("$ > 1", 0, "unexpected '$'"),
    ("foo(1)", 0, "unknown function 'foo'"),
    ("len(1, 2)", 0, "requires 1 argument"),
    ("", 0, "empty expression"),
    ("3abc", 0, "invalid number"),
    ("in", 0, "unexpected keyword"),
])
def test_syntax_errors_have_positions(text, position, fragment):
    with pytest.raises(ExpressionError) as ei:
        parse_condition(text)
    assert fragment in str(ei.value)
    assert ei.value.position == position
    assert ei.value.source == text


@pytest.mark.parametrize("text, fragment", [
    ("'a' + 1", "mismatched types string and number"), ("user.roles + 1", "cannot combine"),
    ("n > 'a'", "mismatched types number and string"), ("user.name > 1", "cannot compare"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "modulo by zero"),
    ("5.5 % 2", "needs integers"),
    ("n && true", "mismatched types number and bool"), ("user.name && true", "needs a boolean, got string"),
    ("!n", "needs a boolean"),
    ("nothing ? 1 : 2", "needs a boolean, got null"),
    ("-s", "needs a number"),
    ("n.x", "cannot fetch 'x' from a int value"),
    ("lst['x']", "can only be selected with an integer"),
    ("len(n)", "len(): needs a string, list or map"),
    ("upper(n)", "upper(): needs a string"),
    ("int('abc')", "cannot convert"),
    ("s startsWith 1", "mismatched types any and number"), ("user.roles startsWith 'a'", "needs strings"),
    ("1 in 2", "mismatched types number and number"), ("1 in user.name", "on a string needs a string"), ("1 in user.address.city.x", "cannot fetch"),
    ("s matches '('", "invalid regular expression"),
])
def test_runtime_errors(text, fragment):
    with pytest.raises(ExpressionError) as ei:
        ev(text)
    assert fragment in str(ei.value)
    assert ei.value.position is not None


def test_condition_is_reusable_and_cached():
    c = parse_condition("x * 2")
    assert c.evaluate({"x": 2}) == 4
    assert c.evaluate({"x": 2.5}) == 5.0
    assert parse_condition("x * 2") is c


def test_non_string_source_rejected():
    with pytest.raises(ExpressionError):
        parse_condition(42)  # type: ignore[arg-type]


def test_variables_must_be_mapping():
    with pytest.raises(ExpressionError):
        parse_condition("1").evaluate([1])  # type: ignore[arg-type]


# ---------------------------------------------------------------- paths

@pytest.mark.parametrize("text, segments", [
    ("x", ("x",)),
    ("orders[0].items[1].sku", ("orders", 0, "items", 1, "sku")),
    ("m['odd key'].v", ("m", "odd key", "v")),
    ('m["q\\"uote"]', ("m", 'q"uote')),
    ("a[-1]", ("a", -1)),
    ("step-1.out_put", ("step-1", "out_put")),
])
def test_parse_path(text, segments):
    assert parse_path(text) == segments


@pytest.mark.parametrize("text", ["", "1abc", "a.", "a[", "a[x]", "a[0", "a..b", "a b", "a['x"])
def test_parse_path_errors(text):
    with pytest.raises(ExpressionError):
        parse_path(text)


def test_resolve_path():
    assert resolve_path(VARS, "orders[0].items[1].sku") == "B"
    assert resolve_path(VARS, "lst[-1]") == 3
    assert resolve_path(VARS, ("user", "address", "city")) == "Oslo"
    assert resolve_path({"a": {"b": None}}, "a.b") is None


@pytest.mark.parametrize("path, message, name", [
    ("x", "undefined variable 'x'", "x"),
    ("orders[5]", "'orders[5]' is out of range (orders has 2 items)", "orders[5]"),
    ("user.zip", "'user.zip' not found: 'user' has no key 'zip'", "user.zip"),
    ("user.address.zip.code", "'user.address.zip.code' not found: 'user.address' has no key 'zip'",
     "user.address.zip"),
    ("n.x", "'n.x' not found: 'n' is int, not a map or list", "n.x"),
    ("lst.x", "'lst' is a list, not a map", "lst.x"),
])
def test_resolve_path_errors(path, message, name):
    with pytest.raises(UndefinedVariableError) as ei:
        resolve_path(VARS, path)
    assert message in str(ei.value)
    assert ei.value.name == name

"""Injection attempts and resource limits: nothing is eval'd, everything is bounded."""

from __future__ import annotations


import pytest

from goflow.language.expr import (ExpressionError, UndefinedVariableError, compile_transform, interpolate,
                         parse_condition, render_text)
from goflow.language.expr.templates import render_template

VARS = {"x": {"a": 1}, "s": "abc", "n": 5, "lst": [1, 2]}


def ev(text, variables=VARS):
    return parse_condition(text).evaluate(variables)


@pytest.mark.parametrize("text", [
    "__import__('os')",
    "__import__('os').system('echo pwned')",
    "eval('1+1')",
    "exec('x=1')",
    "open('/etc/passwd')",
    "getattr(x, '__class__')",
    "().__class__",
    "x.__class__.__mro__[1].__subclasses__()",
    "lambda: 1",
    "1; import os",
    "x if True else 2",
    "s.upper()",
    "{}.get('a')",
])
def test_python_syntax_and_builtins_are_rejected_at_parse_time(text):
    with pytest.raises(ExpressionError):
        parse_condition(text)


@pytest.mark.parametrize("text", [
    "x.__class__", "x.__class__.__mro__", "x.__dict__", "x['__class__']", "s.__len__",
    "lst.__class__", "[].__class__.__base__", "x.a.__class__.__init__.__globals__", "x.keys", "x.items",
])
def test_dunder_and_method_names_are_just_missing_keys(text):
    # Member access only looks at dict keys / list indexes, never Python attributes.
    # A missing key is nil; going further into nil or into a string is GoFlow's error.
    try:
        result = ev(text)
    except ExpressionError as e:
        assert any(m in str(e) for m in ("cannot fetch", "cannot index a string",
                                         "can only be selected with an integer"))
    else:
        assert result is None


def test_python_names_are_plain_undefined_variables():
    for name in ["__builtins__", "os", "sys", "globals", "__import__"]:
        with pytest.raises(UndefinedVariableError) as ei:
            ev(name)
        assert ei.value.name == name


def test_values_are_data_not_code():
    evil = {"q": '") or true or ("', "r": "${secret}", "secret": "TOP",
            "code": "__import__('os').system('x')"}
    assert ev("q == 'x'", evil) is False
    assert ev("${q} + ''", evil) == evil["q"]
    assert ev("r", evil) == "${secret}"
    assert ev("code", evil) == evil["code"]
    assert interpolate("${r}", evil) == "${secret}"
    assert interpolate("a ${r} b ${q}", evil) == f"a ${{secret}} b {evil['q']}"
    assert render_text("${code}", evil) == evil["code"]
    assert render_template("${r} ${upper(q)}", evil) == "${secret} " + evil["q"].upper()
    t = compile_transform(expression="jq(${q})")
    assert t.apply(None, evil) == evil["q"]


@pytest.mark.parametrize("text", [
    "9**9**9", "2**100000", "10**5000", "(2**1000)**(2**1000)", "99999**1000",
    "2.0**1e6",
])
@pytest.mark.timeout(10)  # bounded: a runaway would take minutes
def test_huge_exponents_are_refused(text):
    with pytest.raises(ExpressionError, match="too large|overflow"):
        ev(text)


def test_reasonable_powers_still_work():
    assert ev("2**1000") == 2 ** 1000
    assert ev("1**1000") == 1
    assert ev("1.5**2") == 2.25


def test_integer_growth_by_multiplication_is_capped():
    text = "*".join(["n"] * 6)  # 2**6000: refused rather than grown
    with pytest.raises(ExpressionError, match="too large"):
        ev(text, {"n": 2 ** 1000})
    with pytest.raises(ExpressionError, match="overflow"):
        ev("2 ** 100000")  # '**' is a float, as in expr-lang


def test_deep_nesting_refused_quickly():
    for depth in (65, 1000, 4000):
        text = "(" * depth + "1" + ")" * depth
        with pytest.raises(ExpressionError, match="nested too deeply"):
            parse_condition(text)
    for opener, closer in (("[", "]"), ("len(", ")")):
        text = opener * 1000 + "1" + closer * 1000
        with pytest.raises(ExpressionError, match="nested too deeply"):
            parse_condition(text)
    for prefix in ("!", "-", "not "):
        with pytest.raises(ExpressionError, match="nested too deeply"):
            parse_condition(prefix * 2000 + "true")
    with pytest.raises(ExpressionError, match="nested too deeply"):
        parse_condition("2" + "**2" * 2000)
    with pytest.raises(ExpressionError, match="nested too deeply"):
        parse_condition("true ? 1 : " * 500 + "2")
    assert ev("(" * 60 + "1" + ")" * 60) == 1


def test_ten_thousand_deep_parentheses_refused():
    text = "(" * 10_000 + "1" + ")" * 10_000
    with pytest.raises(ExpressionError, match="too long|nested too deeply"):
        parse_condition(text)
    # just under the source limit still gives a clean error, not a RecursionError
    text = "(" * 4999 + "1" + ")" * 4999
    with pytest.raises(ExpressionError, match="nested too deeply"):
        parse_condition(text)


def test_long_flat_chains_evaluate_without_recursion_error():
    assert ev("+".join(["1"] * 4000)) == 4000
    assert ev(" && ".join(["true"] * 1200)) is True
    assert ev("x" + "?.a" * 3000, {"x": {"a": {"b": 1}}}) is None
    deep: list = []
    for _ in range(3000):
        deep = [deep]
    assert ev("lst" + "[0]" * 3000, {"lst": deep}) == []
    assert ev("s" + " + s" * 2400, {"s": "ab"}) == "ab" * 2401


def test_source_length_capped():
    with pytest.raises(ExpressionError, match="too long"):
        parse_condition("1+" * 6000 + "1")
    with pytest.raises(ExpressionError, match="too long"):
        parse_condition("'" + "a" * 20_000 + "'")


def test_string_and_list_growth_capped():
    big = {"s": "a" * 600_000, "l": list(range(60_000))}
    with pytest.raises(ExpressionError, match="string result too long"):
        ev("s + s", big)
    with pytest.raises(ExpressionError, match="list result too long"):
        ev("l + l", big)
    with pytest.raises(ExpressionError, match="mismatched types string and number"):
        ev("s * 1000000", big)  # no string repetition at all


@pytest.mark.parametrize("pattern,found", [("(a+)+$", False), ("(a*)*b", False),
                                           ("(a|aa)+$", False), ("(\\w+\\s?)*$", True),
                                           ("(.*a){20}", True)])
@pytest.mark.timeout(10)  # bounded: a backtracking engine would take minutes
def test_catastrophic_regexes_run_in_linear_time(pattern, found):
    # RE2 (Go's engine, as in expr-lang) never backtracks: these patterns just run.
    assert ev("s matches p", {"s": "a" * 5000 + "!", "p": pattern}) is found


@pytest.mark.parametrize("pattern", ["(a)\\1", "a(?=b)", "(?<=a)b", "a++"])
def test_patterns_re2_rejects_are_errors(pattern):
    with pytest.raises(ExpressionError, match="RE2"):
        ev("s matches p", {"s": "ab", "p": pattern})


def test_regex_size_limits():
    with pytest.raises(ExpressionError, match="regular expression too long"):
        ev("s matches p", {"s": "a", "p": "a" * 2000})
    with pytest.raises(ExpressionError, match="text too long"):
        ev("s matches 'a'", {"s": "a" * 200_000})
    assert ev("s matches '^[a-z]+@[a-z]+\\\\.com$'", {"s": "kim@example.com"}) is True


def test_interpolation_inside_condition_is_a_reference_not_splicing():
    variables = {"value": "1) or (1", "threshold": 3}
    with pytest.raises(ExpressionError, match="mismatched types string and number"):
        ev("${value} > ${threshold}", variables)


def test_jq_cannot_read_environment_or_files():
    assert compile_transform(expression="jq(env)").apply({}, {}) == {}
    assert compile_transform(expression="jq($ENV.PATH)").apply({}, {}) is None
    with pytest.raises(ExpressionError):
        compile_transform(expression='jq(import "x" as x; .)')
    with pytest.raises(ExpressionError):
        compile_transform(expression="jq(input)").apply({}, {})


def test_jq_result_count_capped():
    with pytest.raises(ExpressionError, match="more than"):
        compile_transform(expression="jq(range(200000))").apply(None, {})


def test_template_functions_cannot_reach_python():
    for text in ["${__import__('os')}", "${getattr(x, 'a')}", "${x.__class__}"]:
        try:
            out = render_template(text, VARS)
        except ExpressionError:
            continue
        assert out == ""


@pytest.mark.parametrize("pattern, text", [
    ("^(\\d{1,3}\\.){3}\\d{1,3}$", "10.0.0.1"),
    ("^(foo|bar)-\\d+$", "bar-12"),
    ("^[a-z]+(-[a-z]+)?$", "kebab-case"),
])
def test_ordinary_regexes_still_work(pattern, text):
    assert ev("s matches p", {"s": text, "p": pattern}) is True

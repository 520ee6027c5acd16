"""GoFlow's expression semantics (issue 13): every expected value here is what GoFlow's own
engine (expr-lang v1.17.6) produced for the same transform on the same variables."""

from __future__ import annotations

import pytest

from goflow.errors import ExpressionError
from goflow.language.expr import compile_transform, parse_condition

VARS = {"n": 5, "f": 3.14159, "s": "hello", "text": "  hi  ", "xs": [1, 2, 3],
        "user": {"name": "Ann", "age": 20},
        "us": [{"name": "a", "age": 20}, {"name": "b", "age": 40}]}


def run(expression: str, variables: dict = VARS):
    return compile_transform(expression=expression).apply(None, variables)


# 1. ${...} text in a transform expression is GoFlow's template form -----------------------

@pytest.mark.parametrize("expression, expected", [
    ("Hello ${user.name}", "Hello Ann"),
    ("'${trim(text)}'", "'hi'"),                       # the whole text renders, quotes too
    ('{"name": "${user.name}"}', '{"name": "Ann"}'),
    ("Total: ${n} items", "Total: 5 items"),
    ("${upper(user.name)} and ${lower('X')}", "ANN and x"),
    ("${formatNumber(f, 2)}", "3.14"),
])
def test_template_form_in_expression(expression, expected):
    t = compile_transform(expression=expression)
    assert t.kind == "template"
    assert t.apply(None, VARS) == expected


def test_template_form_reports_the_variables_it_reads():
    assert compile_transform(expression="Hi ${user.name}, ${greeting}").names == {"user", "greeting"}


@pytest.mark.parametrize("expression, expected", [
    ("${n} * 3", "5 * 3"), ("${s} and ${text}", "hello and   hi  "), ("${n}/${f}", "5/3.14159")])
def test_any_placeholder_makes_an_expression_a_template(expression, expected):
    assert run(expression) == expected


def test_a_lone_reference_stays_typed():
    # goflow's divergence (docs/compatibility.md): exactly one ${path} is the value itself.
    t = compile_transform(expression="${xs}")
    assert (t.kind, t.apply(None, VARS)) == ("expression", [1, 2, 3])


# 2. expr-lang built-ins ----------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("toJSON(user)", '{\n  "age": 20,\n  "name": "Ann"\n}'),
    ("toJSON(xs)", "[\n  1,\n  2,\n  3\n]"),
    ('toJSON({"b": [1, 2.5], "a": "x<y"})',
     '{\n  "a": "x\\u003cy",\n  "b": [\n    1,\n    2.5\n  ]\n}'),
    ("toJSON(36.0)", "36"),
    ("toJSON([])", "[]"),
    ("fromJSON('{\"a\": [1, \"x\", null, true]}')", {"a": [1, "x", None, True]}),
    ('split("a,b,c", ",")', ["a", "b", "c"]),
    ('split("a,b,c", ",", 2)', ["a", "b,c"]),
    ('splitAfter("a,b", ",")', ["a,", "b"]),
    ('join(["a", "b"], "-")', "a-b"),
    ('join(["a", "b"])', "ab"),
    ('join(split("a b c", " "), "+")', "a+b+c"),
    ("sum(xs)", 6),
    ("sum(us, .age)", 60),
    ("map(xs, {# * 2})", [2, 4, 6]),
    ("map(xs, # * 2)", [2, 4, 6]),
    ("map(us, .name)", ["a", "b"]),
    ("map(us, {#.name})", ["a", "b"]),
    ("map(xs, #index)", [0, 1, 2]),
    ("filter(xs, # > 1)", [2, 3]),
    ("filter(us, .age > 30)", [{"name": "b", "age": 40}]),
    ("all(xs, # > 0)", True),
    ("any(xs, # > 2)", True),
    ("none(xs, # > 2)", False),
    ("one(xs, # > 2)", True),
    ("count(xs, # > 1)", 2),
    ("find(xs, # > 1)", 2),
    ("findIndex(xs, # > 1)", 1),
    ("findLast(xs, # > 1)", 3),
    ("findLastIndex(xs, # > 1)", 2),
    ("find(xs, # > 9)", None),
    ("reduce(xs, #acc + #, 10)", 16),
    ("reduce(xs, #acc + #)", 6),
    ('sortBy(us, .age, "desc")', [{"name": "b", "age": 40}, {"name": "a", "age": 20}]),
    ("groupBy(xs, # > 1)", {"false": [1], "true": [2, 3]}),
    ("xs | map(# + 1) | sum()", 9),
    ("mean(xs)", 2), ("median(xs)", 2),
    ('sort(xs, "desc")', [3, 2, 1]), ("reverse(xs)", [3, 2, 1]), ("uniq([1, 1, 2])", [1, 2]),
    ("first(xs)", 1), ("last(xs)", 3), ("take(xs, 2)", [1, 2]),
    ("concat(xs, [4])", [1, 2, 3, 4]), ("flatten([[1], [2, [3]]])", [1, 2, 3]),
    ('replace("aaa", "a", "b")', "bbb"), ('repeat("ab", 3)', "ababab"),
    ('indexOf("abc", "c")', 2), ('lastIndexOf("abca", "a")', 3),
    ('hasPrefix("abc", "a")', True), ('hasSuffix("abc", "c")', True),
    ('trimPrefix("abc", "a")', "bc"), ('trimSuffix("abc", "c")', "ab"),
    ('trim("xax", "x")', "a"),
    ('toBase64("hi")', "aGk="), ('fromBase64("aGk=")', "hi"),
    ('toPairs({"a": 1})', [["a", 1]]), ('fromPairs([["a", 1]])', {"a": 1}),
    ("type(1)", "int"), ("type(1.5)", "float"), ("type(xs)", "array"),
    ("type(user)", "map"), ("type(nil)", "nil"),
    ("bitand(6, 3)", 2),
])
def test_expr_lang_builtins(expression, expected):
    assert run(expression) == expected


def test_closures_nest():
    assert run("map(us, {filter(xs, # < 3)})") == [[1, 2], [1, 2]]
    assert run("all(us, {any(xs, # == 2)})") is True


def test_pointer_outside_a_closure_is_an_error():
    with pytest.raises(ExpressionError, match="only defined inside a closure"):
        run("# + 1")


def test_predicates_must_be_booleans():
    with pytest.raises(ExpressionError, match="needs a boolean"):
        run("filter(xs, # + 1)")


# 3. comparing different types is an error ----------------------------------------------------

@pytest.mark.parametrize("expression", ['"5" == 5', 'n == "5"', "true == 1", "s != 5",
                                        'xs == "x"', "n == true"])
def test_mismatched_comparisons_are_errors(expression):
    with pytest.raises(ExpressionError, match="mismatched types"):
        run(expression)


def test_literal_mismatches_fail_at_parse_time():
    with pytest.raises(ExpressionError, match="mismatched types string and number"):
        parse_condition('"5" == 5')


@pytest.mark.parametrize("expression, expected", [
    ("n == 5.0", True), ('user.age == "20"', False),   # a map value has no static type
    ("s == nil", False), ("nil == n", False), ("xs == [1, 2, 3]", True)])
def test_comparisons_GoFlow_allows(expression, expected):
    assert run(expression) is expected


def test_conditions_refuse_mismatches_too():
    with pytest.raises(ExpressionError, match="mismatched types"):
        parse_condition('count == "5"').evaluate({"count": 5})


# 4. round half away from zero ------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("round(2.5)", 3), ("round(-2.5)", -3), ("round(0.5)", 1), ("round(1.49)", 1),
    ("round(3.5)", 4), ("round(0.49999999999999994)", 0)])
def test_round_half_away_from_zero(expression, expected):
    assert run(expression) == expected


# 5. out-of-range and wrong-type indexing are errors -----------------------------------------

@pytest.mark.parametrize("expression, fragment", [
    ("xs[5]", "index out of range: 5"), ("xs[-4]", "index out of range: -4"),
    ("s[0]", "cannot index a string"), ("user.missing.deeper", "from nil"),
    ('xs["1"]', "only be selected with an integer"), ("user[1]", "cannot use int")])
def test_bad_indexing_is_an_error(expression, fragment):
    with pytest.raises(ExpressionError, match=fragment):
        run(expression)


def test_indexing_GoFlow_allows():
    assert run("xs[-1]") == 3
    assert run("user.missing") is None
    assert run("user.missing?.deeper") is None
    assert run("s[1:3]") == "el"


def test_jsonpath_index_on_a_string_is_an_error():
    t = compile_transform(expression="$.name[0]")
    with pytest.raises(ExpressionError, match="type mismatch in JSONPath"):
        t.apply({"name": "abc"}, {})
    assert compile_transform(expression="$.users[5]").apply({"users": [1]}, {}) is None


# 6. JSONPath contains in a filter --------------------------------------------------------------

def test_jsonpath_contains_filter():
    data = {"users": [{"email": "a@x", "roles": ["admin", "dev"]},
                      {"email": "b@x", "roles": ["dev"]}]}
    t = compile_transform(expression="$.users[?(@.roles[*] contains 'admin')].email")
    assert t.apply(data, {}) == ["a@x"]
    t = compile_transform(expression="$.users[?(@.roles[*] contains 'dev')].email")
    assert t.apply(data, {}) == ["a@x", "b@x"]


# 10. formatNumber needs both arguments ---------------------------------------------------------

def test_format_number_with_one_argument_is_an_error():
    with pytest.raises(ExpressionError, match="formatNumber\\(\\) requires 2 arguments"):
        compile_transform(expression="${formatNumber(f)}")
    with pytest.raises(ExpressionError, match="requires 2 arguments"):
        compile_transform(template="${formatNumber(f)}")


# 11. matches uses RE2 ----------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ('"abc" matches "^a"', True), ('"abc" matches "(?i)A"', True),
    ('"a.b" matches "a\\\\.b"', True), ('"é" matches "^.$"', True),
    ('"aaa" matches "(a+)+$"', True), ('"x" matches "\\\\pL"', True)])
def test_matches_is_re2(expression, expected):
    assert run(expression) is expected


def test_pattern_re2_rejects_fails_at_parse_time():
    with pytest.raises(ExpressionError, match="RE2") as ei:
        parse_condition("s matches 'a(?=b)'")
    assert ei.value.position == 2


# expr-lang's static type check, precedence and syntax --------------------------------------

@pytest.mark.parametrize("expression", ["n > 3 ? 1 : s - 1", "false && n", "true || s", "!n", "-s",
                                        "true ? 1 : n ** 'a'"])
def test_type_errors_are_found_before_evaluation(expression):
    # expr-lang type-checks the whole expression against the variables first, so a branch
    # that would never run is still an error.
    with pytest.raises(ExpressionError, match="invalid operation"):
        run(expression)


@pytest.mark.parametrize("expression, expected", [
    ("1 < 2 < 3", True), ("3 > 2 > 2", False), ("1 < 2 >= 3", False),   # chained comparisons
    ("1 + 2 ?? 3", 3), ("(nothing ?? 1) + 1", 2), ("nothing ?? 1", 1),    # ?? binds tightest
    ("let y = n * 2; y + 1", 11), ("let a = 1; let b = 2; a + b", 3),
    ("type(round(2))", "float"), ("type(floor(2.5))", "float"), ("type(2 ** 2)", "float"),
    ("type(abs(-2))", "int"), ("type(10 / 5)", "float"), ("max([])", None),
])
def test_expr_lang_syntax_and_result_types(expression, expected):
    assert run(expression, {**VARS, "nothing": None}) == expected


def test_coalesce_cannot_be_the_left_operand_of_another_operator():
    with pytest.raises(ExpressionError, match="cannot be mixed"):
        parse_condition("nothing ?? 2 + 3")


def test_int_of_a_bool_is_an_error():
    with pytest.raises(ExpressionError, match="cannot convert bool to int"):
        run("int(true)")


def test_let_names_are_not_variables():
    assert parse_condition("let y = n; y + 1").names == {"n"}


def test_jsonpath_on_null_input_is_an_error():
    with pytest.raises(ExpressionError, match="cannot query null data"):
        compile_transform(expression="$.name").apply(None, {})


def test_type_check_follows_the_variables_types_on_every_evaluation():
    c = parse_condition("x == 5")
    assert c.evaluate({"x": 5}) is True
    with pytest.raises(ExpressionError, match="mismatched types string and number"):
        c.evaluate({"x": "5"})
    assert c.evaluate({"x": 6}) is False


@pytest.mark.parametrize("expression", ["false ? (2.5 ? 1 : 2) : 0", "b ? 1 : true contains 1"])
def test_ternary_conditions_and_contains_are_type_checked(expression):
    with pytest.raises(ExpressionError, match="invalid operation"):
        run(expression, {**VARS, "b": True})


@pytest.mark.parametrize("expression", ["!5", "2.5 ? 1 : 2", "-'a'", "'a' ** 2", "true && 1"])
def test_literal_type_errors_fail_at_parse_time(expression):
    with pytest.raises(ExpressionError, match="invalid operation"):
        parse_condition(expression)


# properties -----------------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

INTS = st.lists(st.integers(min_value=-1000, max_value=1000), max_size=20)


@settings(max_examples=60, deadline=None)
@given(xs=INTS, k=st.integers(min_value=-5, max_value=5))
def test_closures_agree_with_their_definitions(xs, k):
    v = {"xs": xs, "k": k}
    assert run("map(xs, # * k)", v) == [x * k for x in xs]
    assert run("filter(xs, # > k)", v) == [x for x in xs if x > k]
    assert run("count(xs, # > k)", v) == sum(1 for x in xs if x > k)
    assert run("all(xs, # > k)", v) is all(x > k for x in xs)
    assert run("any(xs, # > k)", v) is any(x > k for x in xs)
    assert run("none(xs, # > k)", v) is (not any(x > k for x in xs))
    assert run("one(xs, # > k)", v) is (sum(1 for x in xs if x > k) == 1)
    assert run("sum(xs)", v) == sum(xs)
    assert run("reduce(xs, #acc + #, 0)", v) == sum(xs)
    assert run("findIndex(xs, # == k)", v) == (xs.index(k) if k in xs else -1)
    assert run("findLastIndex(xs, # == k)", v) == (len(xs) - 1 - xs[::-1].index(k) if k in xs else -1)
    assert run("sortBy(map(xs, {{'v': #}}), .v)", v) == [{"v": x} for x in sorted(xs)]
    assert run("xs | filter(# % 2 == 0) | map(# + 1)", v) == [x + 1 for x in xs if x % 2 == 0]


@settings(max_examples=200, deadline=None)
@given(x=st.floats(min_value=-1e15, max_value=1e15, allow_nan=False))
def test_round_is_half_away_from_zero(x):
    from decimal import ROUND_HALF_UP, Decimal
    # Decimal(x) is the float's exact value; ROUND_HALF_UP rounds halves away from zero.
    assert run("round(x)", {"x": x}) == float(Decimal(x).to_integral_value(rounding=ROUND_HALF_UP))

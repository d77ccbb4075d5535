"""The benchmarks' scoring rules, case by case: option letter vs option text, units, precision, lists, several
accepted answers, and We-Math's four-dimensional metrics. Each table row is (answer, expected verdict)."""

import pytest

from calibrl.bench import BENCHMARKS
from calibrl.bench.base import judge
from calibrl.bench.data import Item
from calibrl.bench.scoring import (choice_of, extract_final, gold_list, match_expression, match_list, match_mmmu_open,
                                   match_numeric, parse_number)
from calibrl.bench.wemath import four_dimensional, options_from_string
from calibrl.bench.mathverse import options_from_text


def item(kind, gold, options=(), **meta):
    return Item(id="x", segments=["q"], gold=gold, kind=kind, options=list(options), meta=meta)


# ---------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("<think>2+2</think><answer>4</answer>", "4"),
    ("<think>...</think><answer> (B) </answer>", "(B)"),
    ("so the area is \\boxed{\\frac{3}{2}}.", "\\frac{3}{2}"),
    ("<answer>1</answer> no, <answer>2</answer>", "2"),
    ("Reasoning...\nThe answer is 42.", "42"),
    ("Reasoning...\nFinal answer: C", "C"),
    ("no conclusion at all", None),
    ("The answer is\n\nsomething later without a marker", None),
])
def test_extract_final(text, expected):
    assert extract_final(text) == expected


# ---------------------------------------------------------------------------------------------------------
# Multiple choice (MathVista, MathVerse, MATH-Vision, MMMU, We-Math, ScienceQA)
# ---------------------------------------------------------------------------------------------------------
FRACTIONS = ["3/11", "8/11", "6/11", "3/5"]


@pytest.mark.parametrize("answer, picked", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("B: 8/11", "B"), ("(B) 8/11", "B"), ("\\boxed{B}", "B"),
    ("The answer is B", "B"), ("Option B", "B"), ("(b)", "B"),
    ("8/11", "B"),                # option text
    ("\\frac{8}{11}", "B"),       # option text written in LaTeX
    ("$\\dfrac{6}{11}$", "C"),    # another option's text
    ("E", None),                  # a letter with no option behind it
    ("0.7272", None),             # close to an option's value but not equal
    ("A or B", None),             # no single pick
    ("(A), (C)", None), ("B/D", None),
    ("", None),
])
def test_choice_of_letter_or_text(answer, picked):
    assert choice_of(answer, FRACTIONS) == picked


def test_choice_text_options_and_duplicates():
    opts = ["larger than", "equal to", "smaller than"]
    assert choice_of("equal to", opts) == "B" and choice_of("Equal to.", opts) == "B"
    assert choice_of("equal", opts) is None  # no fuzzy matching (MathVista's release picks the closest option)
    assert choice_of("5", ["5", "5", "6"]) is None  # an answer matching two options picks none
    # with units and numbers as options (We-Math)
    assert choice_of("4 cm", ["4cm", "6cm", "8cm"]) == "A"
    assert choice_of("6", ["4cm", "6cm", "8cm"]) == "B"


def test_choice_letter_bounds_when_options_are_in_the_image():
    # MathVerse Vision Only: no option texts, any letter counts; a letter can still be right or wrong
    assert judge(item("choice", "C", n_options=None), "C")
    assert not judge(item("choice", "C"), "D")
    assert not judge(item("choice", "C"), "\\sqrt{3}")  # option text cannot be checked without the options


@pytest.mark.parametrize("answer, ok", [("A", True), ("B", True), ("(C)", False), ("f", True), ("neither", False)])
def test_choice_with_several_golds(answer, ok):
    assert judge(item("choice", "['A', 'B']", ["f", "g", "neither"]), answer) is ok


# ---------------------------------------------------------------------------------------------------------
# MathVista free-form: integers, floats at a precision, units, lists
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, gold, kw, ok", [
    ("14", "14", {"integer": True}, True),
    ("14.0", "14", {"integer": True}, True),          # an integer written as a float
    ("14.7", "14", {"integer": True}, True),          # MathVista's int(float(x)) truncates
    ("15", "14", {"integer": True}, False),
    ("1,400", "1400", {"integer": True}, True),
    ("$1.45", "1.45", {"precision": 2}, True),
    ("1.449", "1.45", {"precision": 2}, True),        # rounded to the benchmark's precision
    ("1.44", "1.45", {"precision": 2}, False),
    ("1.5", "1.45", {"precision": 2}, False),
    ("0.60", "0.6", {"precision": 1}, True),
    ("60%", "60", {"integer": True}, True),           # percentages
    ("0.6", "60", {"integer": True}, False),
    ("3/5", "0.6", {"precision": 1}, True),           # fractions
    ("\\frac{3}{5}", "0.6", {"precision": 1}, True),
    ("12 cm^2", "12", {"integer": True, "unit": "cm^2"}, True),  # the row's unit
    ("12 dollars", "12", {"integer": True}, True),
    ("twelve", "12", {"integer": True}, False),
])
def test_match_numeric(answer, gold, kw, ok):
    assert match_numeric(answer, gold, **kw) is ok


@pytest.mark.parametrize("answer, ok", [
    ("[2007, 2008]", True), ("2007, 2008", True), ("2007 and 2008", True), ("(2007, 2008)", True),
    ("[2007.0, 2008]", True), ("[2008, 2007]", False), ("[2007]", False), ("2007", False),
])
def test_match_list(answer, ok):
    assert match_list(answer, "[2007, 2008]") is ok


# ---------------------------------------------------------------------------------------------------------
# Expressions (Geometry3K, GeoQA, MathVerse / MATH-Vision free-form)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, gold, ok", [
    ("140", "140°", True), ("140^\\circ", "140°", True), ("140 degrees", "140°", True), ("40", "140°", False),
    ("3", "3cm", True), ("3 cm", "3cm", True), ("9", "9米", True), ("9 m", "9米", True), ("90", "9米", False),
    ("2\\sqrt{221}", "2\\sqrt{221}", True), ("\\sqrt{884}", "2\\sqrt{221}", True), ("29.7", "2\\sqrt{221}", False),
    ("40/3", "\\frac{40}{3}", True), ("13.33", "\\frac{40}{3}", False), ("13.3333333333", "\\frac{40}{3}", True),
    ("7.50", "7.5", True),
    ("x = 4", "4", True), ("0.5", "\\frac{1}{2}", True),
])
def test_match_expression(answer, gold, ok):
    assert match_expression(answer, gold) is ok


# ---------------------------------------------------------------------------------------------------------
# GeoEval: the option (letter or text), else the value within the release's 1e-3, else math-verify
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, gold, ok", [
    ("2.31", "2.31", True), ("2.3094", "2.31", True), ("2.3109", "2.31", True),  # |d| < 1e-3, on both sides
    ("2.3085", "2.31", False), ("2.32", "2.31", False), ("2.3115", "2.31", False),
    ("50°", "50", True), ("50 cm", "50", True), ("\\frac{15}{2}", "7.5", True),
])
def test_match_numeric_within_an_absolute_tolerance(answer, gold, ok):
    assert match_numeric(answer, gold, abs_tol=1e-3) is ok


def geoeval_item(gold, options=(), letter=None):
    kind = "numeric" if parse_number(gold) is not None else "expression"
    return Item(id="x", segments=["q"], gold=gold, kind=kind, options=list(options), meta={"gold_letter": letter})


@pytest.mark.parametrize("answer, ok", [
    ("50", True), ("50°", True), ("50^\\circ", True), ("50.0004", True), ("B", True), ("(B)", True),
    ("(B) 50°", True), ("The answer is B", True),
    ("A", False), ("40°", False), ("51", False), ("B or C", False), ("", False), (None, False),
])
def test_geoeval_multiple_choice_by_letter_or_value(answer, ok):
    it = geoeval_item("50", ["40°", "50°", "60°", "70°"], "B")
    assert BENCHMARKS["geoeval"].judge(it, answer) is ok


@pytest.mark.parametrize("answer, gold, ok", [
    ("4\\sqrt{2}", "4\\sqrt{2}", True), ("\\sqrt{32}", "4\\sqrt{2}", True), ("5.66", "4\\sqrt{2}", False),
    ("5", "5", True), ("x = 5", "5", True), ("5.0", "5", True), ("6", "5", False),
    ("4/\\sqrt{3}", "2.31", False),  # a symbolic answer to a decimal gold: float() fails in the release too
])
def test_geoeval_free_form_values_and_expressions(answer, gold, ok):
    assert BENCHMARKS["geoeval"].judge(geoeval_item(gold), answer) is ok


def test_geometry3k_accepts_the_option_letter_too():
    it = item("expression", "7.5", ["5", "7.5", "10", "12.5"], gold_letter="B")
    assert judge(it, "7.5") and judge(it, "B") and judge(it, "(B)")
    assert not judge(it, "A") and not judge(it, "10")


# ---------------------------------------------------------------------------------------------------------
# MMMU open questions
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, gold, ok", [
    ("3.14", "3.14", True), ("3.14159", "3.14", True), ("about 3.141", "3.14", True), ("3.2", "3.14", False),
    ("1.50", "['1.5', '3/2']", True), ("3/2", "['1.5', '3/2']", True), ("2", "['1.5', '3/2']", False),
    ("the mitochondria", "mitochondria", True), ("Mitochondria.", "mitochondria", True),
    ("nucleus", "mitochondria", False),
    ("a", "a", True), ("banana", "a", False),  # one-letter text golds must stand alone (the release pads them)
])
def test_match_mmmu_open(answer, gold, ok):
    assert match_mmmu_open(answer, gold) is ok


def test_gold_list():
    assert gold_list("['1.5', '3/2']") == ["1.5", "3/2"]
    assert gold_list("[2007, 2008]") == ["2007", "2008"]  # ambiguity noted: MathVista lists use match_list instead
    assert gold_list("7") == ["7"] and gold_list(["a", "b"]) == ["a", "b"]
    assert gold_list("[unbalanced") == ["[unbalanced"]


def test_parse_number_edge_cases():
    assert parse_number("-3.5") == -3.5 and parse_number("1e3") == 1000.0 and parse_number("nan") is None
    assert parse_number("5 米") == 5.0 and parse_number("") is None and parse_number(None) is None


# ---------------------------------------------------------------------------------------------------------
# Options written inside the question or in one string
# ---------------------------------------------------------------------------------------------------------
def test_mathverse_options_from_the_question_text():
    q = "Find BC.\nChoices:\nA:2\nB:2\\sqrt{3}\nC:\\sqrt{3}\nD:2\\sqrt{2}"
    assert options_from_text(q) == ["2", "2\\sqrt{3}", "\\sqrt{3}", "2\\sqrt{2}"]
    assert options_from_text("Find BC.\nChoices:\nA. 5 cm\nB. 5 m") == ["5 cm", "5 m"]
    assert options_from_text("Find BC.") == []


def test_wemath_options_from_the_option_string():
    assert options_from_string("A. 4cm; B. 6cm; C. 8cm; D. 10cm; E. No correct answer") == [
        "4cm", "6cm", "8cm", "10cm", "No correct answer"]
    assert options_from_string("A. 1; 2; B. 3") == ["1; 2", "3"]  # a ';' inside an option does not split it
    assert options_from_string("no options here") == []


# ---------------------------------------------------------------------------------------------------------
# We-Math's four dimensions (IK, IG, CM, RM) on hand-made problems
# ---------------------------------------------------------------------------------------------------------
def test_four_dimensional_metrics_by_hand():
    problems = [
        ([True, True], True),            # CM strict and loose
        ([True, True], False),           # IG
        ([True, False], True),           # RM strict, CM loose
        ([False, False, False], True),   # RM strict and loose
        ([False, True, True], False),    # IK
    ]
    m = four_dimensional(problems)
    assert m["problems"] == 5
    assert m["IK"] == pytest.approx(1 / 5) and m["IG"] == pytest.approx(1 / 5)
    assert m["CM_strict"] == pytest.approx(1 / 5) and m["CM_loose"] == pytest.approx(2 / 5)
    assert m["RM_strict"] == pytest.approx(2 / 3)  # RM / (CM + RM) = 2 / (1 + 2)
    assert m["RM_loose"] == pytest.approx(1 / 3)   # 1 / (2 + 1)
    assert m["score_strict"] == pytest.approx((5 - 0.5 * 1 - 2 - 1) / 5)
    assert m["score_loose"] == pytest.approx((5 - 0.5 * 1 - 1 - 1) / 5)


def test_four_dimensional_all_right_and_empty():
    assert four_dimensional([([True, True], True)] * 3)["score_strict"] == 1.0
    assert four_dimensional([]) == {"problems": 0}

"""Rule-based answer scoring shared by the benchmarks: extraction, options, numbers, lists, expressions.

No LLM judge anywhere: every rule is a deterministic function of (completion, gold), documented in
docs/EVALUATION.md. The pieces reuse `calibrl.rewards` (answer extraction, normalisation, the choice-letter
parser, number parsing, math-verify equality) and add what benchmarks need beyond the training reward:

- `extract_final`: the `<answer>` tag, else the last `\\boxed{}`, else the last "answer is X" / "Answer: X";
- `choice_of`: the option an answer picks, by letter (`B`, `(B)`, `B. text`) or by option text;
- `match_numeric`: a number at the benchmark's precision (MathVista's integer / float answers) and unit, or
  within an absolute tolerance (GeoEval's);
- `match_list`: lists compared element by element;
- `match_expression`: units dropped, then `calibrl.rewards.is_correct` (string, number, math-verify);
- `match_mmmu_open`: MMMU's open-question rule (numbers to 2 decimals, else the gold text as a substring).
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from calibrl.rewards import answer_number, choice_letter, extract_answer, is_correct, normalize_answer, symbolic_equal

__all__ = ["LETTERS", "choice_of", "extract_final", "gold_list", "match_choice", "match_expression", "match_list",
           "match_mmmu_open", "match_numeric", "numbers_in", "parse_number", "strip_units"]

LETTERS = "ABCDEFGHIJK"
_REL_TOL = 1e-6

_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*\**\s*(.+?)\s*\**\s*\.?\s*$", re.IGNORECASE)
# Units written in Chinese (GeoQA's golds: "9米", "5厘米"), and a few English ones rewards does not strip.
_CJK_UNIT = re.compile(r"\s*(?:平方|立方)?(?:千米|厘米|毫米|分米|米|公里)$|\s*(?:度|元|个|人|秒|分钟|小时|千克|克|吨|升|毫升)$")
_EN_UNIT = re.compile(r"\s*(?:dollars?|cents?|percent|years?|days?|hours?|minutes?|seconds?|kg|g|ml|l|mph|km/h)\.?$",
                      re.IGNORECASE)
# "A or B", "(A), (C)", "B/D": a hedge between letters picks no option.
_HEDGE = re.compile(r"^\W*\(?[A-K]\)?\s*(?:,|/|&|\bor\b|\band\b)\s*\(?[A-K]\)?\W*$", re.IGNORECASE)
_NUMBER_IN = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------
def extract_final(text: str) -> str | None:
    """The final answer of a completion: `<answer>...</answer>`, else `\\boxed{...}`, else 'answer is X'."""
    found = extract_answer(text)
    if found is not None or not isinstance(text, str):
        return found
    for line in reversed(text.strip().splitlines()[-5:]):  # only the tail: the conclusion, not the question
        m = _ANSWER_IS.search(line)
        if m and m.group(1).strip():
            return m.group(1).strip()
    return None


# ----------------------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------------------
def _norm_text(s: str) -> str:
    return normalize_answer(str(s)).lower()


def choice_of(pred: str | None, options: list[str], n_options: int | None = None) -> str | None:
    """The letter of the option `pred` picks, or None.

    A letter (`B`, `(B)`, `B.`, `B) text`, `\\boxed{B}`, `The answer is B`) wins when it names one of the
    options; otherwise the answer is compared with every option text (normalised string, then number, then
    math-verify). An answer matching several different options, or hedging between letters
    ('A or B'), picks none. `n_options` bounds the letters
    when the option texts are not known (MathVerse's vision-only versions draw them in the image).
    """
    if pred is None or not str(pred).strip():
        return None
    n = len(options) if options else (n_options or len(LETTERS))
    if _HEDGE.match(str(pred).strip()):
        return None
    letter = choice_letter(pred)
    if letter is not None and LETTERS.index(letter) < n:
        return letter
    if not options:
        return None
    p = _norm_text(pred)
    p_num = answer_number(pred)
    hits = set()
    for i, option in enumerate(options):
        o = _norm_text(option)
        if not o:
            continue
        if p == o:
            hits.add(LETTERS[i])
            continue
        o_num = answer_number(option)
        if p_num is not None and o_num is not None:
            if math.isclose(p_num, o_num, rel_tol=_REL_TOL, abs_tol=1e-12):
                hits.add(LETTERS[i])
        elif len(o) > 1 and any(c in o for c in "\\^√()") and symbolic_equal(p, o):
            hits.add(LETTERS[i])
    return hits.pop() if len(hits) == 1 else None


def match_choice(pred: str | None, options: list[str], gold_letter: str, n_options: int | None = None) -> bool:
    return choice_of(pred, options, n_options) == str(gold_letter).strip().upper()


# ----------------------------------------------------------------------------------------------------------
# Numbers and lists
# ----------------------------------------------------------------------------------------------------------
def strip_units(s: str, unit: str | None = None) -> str:
    """`s` without a trailing unit: the benchmark's own `unit`, Chinese length/count units, common English ones."""
    s = str(s).strip()
    if unit and s.lower().endswith(unit.strip().lower()) and len(s) > len(unit.strip()):
        s = s[: -len(unit.strip())].strip()
    for pattern in (_CJK_UNIT, _EN_UNIT):
        stripped = pattern.sub("", s)
        if stripped and stripped != s and re.search(r"\d", stripped):
            s = stripped.strip()
    return s


def parse_number(s: Any, unit: str | None = None) -> float | None:
    """A number from an answer: `1,234`, `$1.45`, `50%`, `3 cm`, `\\frac{3}{2}`, `7/2`, `12 dollars`; else None."""
    if s is None:
        return None
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s) if math.isfinite(s) else None
    value = answer_number(strip_units(str(s), unit))
    return value if value is not None and math.isfinite(value) else None


def numbers_in(s: str) -> list[float]:
    """Every number written in `s` (thousands separators allowed), in order."""
    out = []
    for m in _NUMBER_IN.finditer(str(s)):
        try:
            out.append(float(m.group().replace(",", "")))
        except ValueError:
            continue
    return out


def match_numeric(pred: str | None, gold: Any, precision: float | None = None, integer: bool = False,
                  unit: str | None = None, abs_tol: float | None = None) -> bool:
    """A numeric answer: integers compared after `int()` (MathVista's rule), floats after rounding both to
    `precision` decimals, within `abs_tol` when given (GeoEval's rule), otherwise within a relative tolerance
    of 1e-6."""
    p, g = parse_number(pred, unit), parse_number(gold, unit)
    if p is None or g is None:
        return False
    if abs_tol is not None:
        return abs(p - g) < abs_tol
    if integer:
        return int(p) == int(g)
    if precision is not None and not (isinstance(precision, float) and math.isnan(precision)):
        return round(p, int(precision)) == round(g, int(precision))
    return math.isclose(p, g, rel_tol=_REL_TOL, abs_tol=1e-12)


def _list_items(s: str) -> list[str]:
    s = str(s).strip().strip("$").strip()
    s = re.sub(r"^\\left|\\right", "", s)
    if s[:1] in "[(" and s[-1:] in "])":
        s = s[1:-1]
    parts = re.split(r"\s*,\s*|\s*;\s*|\s+and\s+", s)
    return [p.strip().strip("'\"") for p in parts if p.strip()]


def match_list(pred: str | None, gold: str) -> bool:
    """Two lists equal element by element (numbers within tolerance, text case-insensitively), order kept."""
    if pred is None:
        return False
    p, g = _list_items(pred), _list_items(gold)
    if not p or len(p) != len(g):
        return False
    for a, b in zip(p, g):
        a_num, b_num = parse_number(a), parse_number(b)
        if a_num is not None and b_num is not None:
            if not math.isclose(a_num, b_num, rel_tol=_REL_TOL, abs_tol=1e-12):
                return False
        elif _norm_text(a) != _norm_text(b):
            return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Expressions and open answers
# ----------------------------------------------------------------------------------------------------------
def gold_list(gold: Any) -> list[str]:
    """Several accepted answers: a list, or a string holding a Python list (`"['1.5', '3/2']"`), or one answer."""
    if isinstance(gold, (list, tuple)):
        return [str(g) for g in gold]
    s = str(gold).strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return [s]
        if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
    return [s]


def match_expression(pred: str | None, golds: Any) -> bool:
    """Any accepted answer equal to `pred` by `calibrl.rewards.is_correct`, units dropped on both sides."""
    if pred is None:
        return False
    p = strip_units(pred)
    return any(is_correct(p, strip_units(g)) or is_correct(pred, g) for g in gold_list(golds))


def match_mmmu_open(pred: str | None, golds: Any) -> bool:
    """MMMU's open-question rule on the extracted answer: a numeric gold matches any number in the answer
    when both round to the same 2 decimals; a text gold matches when it appears, lower-cased, in the
    answer. `match_expression` is tried last (a symbolic answer such as `\\frac{1}{2}`)."""
    if pred is None or not str(pred).strip():
        return False
    text = str(pred).lower()
    for gold in gold_list(golds):
        g_num = parse_number(gold)
        if g_num is not None:
            candidates = numbers_in(pred)
            p_num = parse_number(pred)
            if p_num is not None:
                candidates.append(p_num)
            if any(round(c, 2) == round(g_num, 2) for c in candidates):
                return True
        else:
            g = str(gold).strip().lower()
            padded = f" {text} "
            if g and (f" {g} " in padded if len(g) == 1 else g in text):
                return True
    return match_expression(pred, golds)

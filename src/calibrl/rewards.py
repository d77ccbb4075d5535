"""Verifiable rewards: answer accuracy, strict format, and CalibRL's official combination.

The official CalibRL reward is `accuracy + 0.1 * format` (METHOD.md section 2):

- accuracy: 1.0 when the answer (the last `<answer>...</answer>`, else the last `\\boxed{...}`) equals the
  gold answer, else 0.0. Equality is tried in order: multiple choice (gold is one letter A-K), exact string
  after normalisation, numeric (integers, decimals, fractions) within a relative tolerance, and finally
  symbolic equality through math-verify.
- format: 1.0 iff the completion is exactly `<think>...</think><answer>...</answer>`.

The three reward functions take TRL's reward-function signature `f(completions, answer=None, **kwargs)`:
`completions` are strings or conversational message lists, `answer` is the dataset's gold column and any
other dataset column arrives as a keyword and is ignored. They never raise on a completion: any error
scores 0.0.

Threads: math-verify's own timeouts use `signal.alarm`, which only works on the main thread. We call it
with its timeouts disabled and bound the time ourselves: the symbolic path only sees short answers
without huge powers, factorials or big operators (those can hold the GIL for minutes, which no thread
deadline can interrupt), and runs in a daemon thread we wait on for at most `SYMBOLIC_TIMEOUT_S`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from fractions import Fraction
from typing import Any

FORMAT_WEIGHT = 0.1
SYMBOLIC_MAX_CHARS = 200  # longer answers skip the symbolic path
SYMBOLIC_TIMEOUT_S = 5.0  # deadline for one math-verify comparison
REL_TOL = 1e-6
_MAX_TEXT_CHARS = 1_000_000  # completions longer than this are not searched (they score 0)

__all__ = [
    "FORMAT_WEIGHT",
    "accuracy_reward",
    "calibrl_reward",
    "completion_text",
    "extract_answer",
    "format_reward",
    "is_correct",
    "is_strict_format",
    "normalize_answer",
    "answer_number",
    "choice_letter",
    "symbolic_equal",
]


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------
def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The answer in `text`: the last `<answer>...</answer>`, else the last `\\boxed{...}`; None if absent or empty.

    Scans with `rfind`, not a regex, so adversarial inputs (many unclosed tags) stay linear in time.
    """
    if not isinstance(text, str) or len(text) > _MAX_TEXT_CHARS:
        return None
    close = text.rfind("</answer>")
    if close >= 0:
        open_ = text.rfind("<answer>", 0, close)
        if open_ >= 0:
            # nested tags ("<answer><answer>5</answer></answer>"): keep the innermost content
            content = text[open_ + len("<answer>") : close].split("</answer>")[0].strip()
            return content or None
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return None


# ----------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------
_UNITS = (
    r"square\s+units|sq\.?\s*units|units\^2|units\^\{2\}|units?|"
    r"square\s+(?:centi)?met(?:er|re)s?|(?:centi)?met(?:er|re)s?|"
    r"cm\^\{?[23]\}?|cm²|cm³|cm|mm\^\{?2\}?|mm|m\^\{?2\}?|m²|m|km|"
    r"inch(?:es)?|in|feet|foot|ft|"
    r"degrees?|deg|°|\\degree"
)
_TRAILING_UNIT = re.compile(rf"^(.*?[\d}}.])\s*(?:{_UNITS})\.?$", re.IGNORECASE | re.DOTALL)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")


def _unwrap_boxed(s: str) -> str:
    while s.startswith(("\\boxed{", "\\fbox{")) and s.endswith("}"):
        inner = _last_boxed(s)
        if inner is None or len(inner) != len(s) - s.index("{") - 2:
            break
        s = inner.strip()
    return s


def normalize_answer(s: str) -> str:
    """Canonical string form of an answer: strips `$`, `\\boxed{}`, `\\text{}`, units, `%`, degrees, spaces.

    `\\dfrac`/`\\tfrac` become `\\frac`, a trailing period and a leading `x =` are dropped, thousands
    separators in plain numbers are removed. Never raises on a string.
    """
    s = str(s).strip()
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = _unwrap_boxed(s.strip())
    for _ in range(3):  # nested wrappers such as \text{\mathrm{cm}}
        s = _TEXT_WRAPPER.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    for _ in range(2):  # e.g. "6 square units." or "5 cm^2"
        m = _TRAILING_UNIT.match(s)
        if m:
            s = m.group(1).strip()
    s = _ASSIGNMENT.sub("", s)
    s = re.sub(r"\s+", "", s)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.rstrip(".")


# ----------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_FRAC = re.compile(r"([-+]?)\\frac\{([-+]?[\d.]+)\}\{([-+]?[\d.]+)\}")
_FRAC_SHORT = re.compile(r"([-+]?)\\frac(\d)(\d)")
_SLASH = re.compile(r"([-+]?[\d.]+)/([-+]?[\d.]+)")


def _to_number(s: str) -> float | None:
    """A normalised answer as a number (integer, decimal, `a/b`, `\\frac{a}{b}`), or None."""
    if len(s) > 60:
        return None
    try:
        if _NUMBER.fullmatch(s):
            return float(Fraction(s)) if "e" not in s.lower() else float(s)
        for pattern in (_FRAC, _FRAC_SHORT):
            m = pattern.fullmatch(s)
            if m:
                value = Fraction(m.group(2)) / Fraction(m.group(3))
                return float(-value if m.group(1) == "-" else value)
        m = _SLASH.fullmatch(s)
        if m:
            return float(Fraction(m.group(1)) / Fraction(m.group(2)))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


_CHOICE_PREFIX = re.compile(
    r"^(?:the\s+)?(?:final\s+|correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*(?:option\s+|choice\s+)?",
    re.IGNORECASE,
)
_CHOICE = re.compile(r"^[(\[]?([A-K])[)\]]?(?=$|[\s.:),\]])")
_CHOICE_LOWER = re.compile(r"^[(\[]([a-k])[)\]]")


def _choice_letter(pred: str) -> str | None:
    """The option letter a prediction picks: `B`, `(B)`, `B.`, `B)`, `B: text`, `The answer is B`, ..."""
    s = pred.strip().replace("$", "")
    s = _unwrap_boxed(s)
    s = _TEXT_WRAPPER.sub(r"\1", s).strip()
    s = _CHOICE_PREFIX.sub("", s, count=1).strip()
    s = _unwrap_boxed(_TEXT_WRAPPER.sub(r"\1", s).strip())
    if len(s) == 1 and s.upper() in "ABCDEFGHIJK":
        return s.upper()
    m = _CHOICE.match(s) or _CHOICE_LOWER.match(s)
    return m.group(1).upper() if m else None


_SYMBOLIC_BLOCKERS = re.compile(r"!|\\(?:sum|prod|int|lim|binom|choose|iint|oint)|\d{16,}")
_POWER_OP = re.compile(r"\^|\*\*")
_SMALL_EXPONENT = re.compile(r"-?\d{1,2}|-?[a-zA-Z]|\\[a-zA-Z]+")


def _exponents(s: str):
    """Yield (exponent text, text right after it) for every `^` / `**` in `s`; braces and parentheses matched."""
    for m in _POWER_OP.finditer(s):
        j = m.end()
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] in "{(":
            close = "}" if s[j] == "{" else ")"
            depth, k = 0, j
            while k < len(s):
                depth += s[k] == s[j]
                depth -= s[k] == close
                if depth == 0:
                    break
                k += 1
            yield s[j + 1 : k], s[k + 1 :]
        else:
            token = re.match(r"\\[a-zA-Z]+|[\w.]+|.?", s[j:]).group()
            yield token, s[j + len(token) :]


def _safe_for_symbolic(s: str) -> bool:
    """Only short answers with small, un-nested exponents go to sympy: `9^{9^{9^9}}` or `2^{99999999}` would
    make it build a gigantic integer with the GIL held, which no thread deadline can interrupt."""
    if not s or len(s) > SYMBOLIC_MAX_CHARS or _SYMBOLIC_BLOCKERS.search(s):
        return False
    powers = list(_exponents(s))
    if len(powers) > 3:
        return False
    magnitude = 1  # product of the numeric exponents: bounds the digits of a nested (a^b)^c
    for exponent, after in powers:
        exponent = exponent.strip()
        if not _SMALL_EXPONENT.fullmatch(exponent) or after.lstrip().startswith(("^", "**")):
            return False  # a big or composite exponent, or a tower a^b^c
        if exponent.lstrip("-").isdigit():
            magnitude *= max(1, abs(int(exponent)))
    return magnitude <= 10_000


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; we disable it on purpose and bound time ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


@functools.lru_cache(maxsize=4096)
def _mv_parse(s: str) -> tuple:
    from math_verify import parse

    return tuple(parse("\\boxed{" + s + "}", parsing_timeout=None))


def _symbolic_equal_unbounded(pred: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed, pred_parsed = _mv_parse(gold), _mv_parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None))


def symbolic_equal(pred: str, gold: str, timeout_s: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """math-verify equality, safe off the main thread: screened inputs, a daemon thread, a deadline.

    A comparison that misses the deadline counts as unequal; its thread finishes in the background.
    """
    if not (_safe_for_symbolic(pred) and _safe_for_symbolic(gold)):
        return False
    import math_verify  # noqa: F401 - the first import (~1 s) happens here, outside the deadline

    result: list[bool] = []

    def work() -> None:
        try:
            result.append(_symbolic_equal_unbounded(pred, gold))
        except BaseException:  # noqa: BLE001 - a failed comparison is simply "not equal"
            result.append(False)

    worker = threading.Thread(target=work, name="calibrl-math-verify", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(result and result[0])


def choice_letter(pred: str) -> str | None:
    """The option letter (A-K) an answer picks (`B`, `(B)`, `B.`, `B: text`, `The answer is B`), or None."""
    return _choice_letter(str(pred))


def answer_number(s: str) -> float | None:
    """An answer as a number after `normalize_answer` (`$1,234`, `50%`, `3 cm`, `\\frac{3}{2}`, `7/2`), or None."""
    return _to_number(normalize_answer(str(s)))


def is_correct(pred: str | None, gold: Any) -> bool:
    """Whether answer `pred` matches `gold`: choice letter, normalised string, number, then symbolic."""
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold).strip()
        if not pred.strip() or not gold or len(pred) > 10_000:
            return False
        if len(gold) == 1 and gold.upper() in "ABCDEFGHIJK":
            return _choice_letter(pred) == gold.upper()
        p, g = normalize_answer(pred), normalize_answer(gold)
        if not p or not g:
            return False
        if p.isalpha() and g.isalpha():  # plain words ("left"): case-insensitive, never symbolic
            return p.lower() == g.lower()
        if p == g:
            return True
        p_num, g_num = _to_number(p), _to_number(g)
        if p_num is not None and g_num is not None:
            return math.isclose(p_num, g_num, rel_tol=REL_TOL, abs_tol=1e-12)
        return symbolic_equal(p, g)
    except Exception:  # noqa: BLE001 - a reward never raises
        return False


# ----------------------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------------------
_STRICT = re.compile(r"\s*<think>.*</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)


def is_strict_format(text: str) -> bool:
    """True iff `text` is `<think>...</think><answer>...</answer>` (whitespace around and between allowed),
    with exactly one of each tag and a non-empty answer."""
    if not isinstance(text, str) or len(text) > _MAX_TEXT_CHARS:
        return False
    if any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    m = _STRICT.fullmatch(text)
    return bool(m and m.group(1).strip())


# ----------------------------------------------------------------------------------------------------------
# TRL reward functions
# ----------------------------------------------------------------------------------------------------------
def completion_text(completion: Any) -> str:
    """The text of one completion: a string, a message dict, or a list of messages (the last one's content,
    whose content may be a string or a list of `{"type": "text", "text": ...}` blocks)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion:
        message = completion[-1]
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            return "".join(
                block.get("text") or "" if isinstance(block, dict) else str(block) for block in content
            )
    return ""


def _golds(answer: Any, n: int, name: str) -> list:
    if answer is None:
        raise ValueError(f"{name} needs the gold answers: pass answer=[...] (a dataset column named 'answer')")
    if isinstance(answer, (str, int, float)):
        answer = [answer] * n
    answer = list(answer)
    if len(answer) != n:
        raise ValueError(f"{name}: {len(answer)} gold answers for {n} completions")
    return answer


def _accuracy_one(completion: Any, gold: Any) -> float:
    try:
        return 1.0 if is_correct(extract_answer(completion_text(completion)), gold) else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


def _format_one(completion: Any) -> float:
    try:
        return 1.0 if is_strict_format(completion_text(completion)) else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


def accuracy_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """1.0 per completion whose extracted answer matches the gold `answer`, else 0.0 (TRL signature).

    Raises only on a missing or mis-sized `answer` column (a wiring error that would silently zero
    every reward); any problem with a single completion scores 0.0.
    """
    golds = _golds(answer, len(completions), "accuracy_reward")
    return [_accuracy_one(c, g) for c, g in zip(completions, golds)]


def format_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """1.0 per completion in strict `<think>...</think><answer>...</answer>` form, else 0.0 (TRL signature)."""
    return [_format_one(c) for c in completions]


def calibrl_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """The official CalibRL reward: accuracy + FORMAT_WEIGHT * format, per completion (TRL signature)."""
    golds = _golds(answer, len(completions), "calibrl_reward")
    return [_accuracy_one(c, g) + FORMAT_WEIGHT * _format_one(c) for c, g in zip(completions, golds)]


accuracy_reward.__name__ = "accuracy_reward"
format_reward.__name__ = "format_reward"
calibrl_reward.__name__ = "calibrl_reward"


# ----------------------------------------------------------------------------------------------------------
# Registry: the reward functions a config may name
# ----------------------------------------------------------------------------------------------------------
REWARD_FUNCS = {f.__name__: f for f in (accuracy_reward, format_reward, calibrl_reward)}


def reward_functions(names: list[str]) -> list:
    """The reward callables named in `names`: ours by name, a user's as `module:function` (an importable module,
    or a `path/to/file.py`); an empty list or an unknown name is a `UsageError`."""
    from calibrl.errors import UsageError

    if not names:
        raise UsageError("reward_funcs is empty: give at least one reward function")
    for name in names:
        if name not in REWARD_FUNCS and ":" not in name:
            raise UsageError(f"unknown reward function {name!r}, expected one of {list(REWARD_FUNCS)} or "
                             "module:function")
    return [REWARD_FUNCS[name] if name in REWARD_FUNCS else import_function(name) for name in names]


def import_function(spec: str):
    """`module:function` or `path/to/file.py:function` -> the function; any failure is one UsageError line."""
    import importlib
    import importlib.util
    import os
    import sys

    from calibrl.errors import UsageError

    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise UsageError(f"reward function {spec!r}: expected module:function")
    try:
        if source.endswith(".py"):
            if not os.path.isfile(source):
                raise UsageError(f"reward function {spec!r}: file {source} not found")
            name = "calibrl_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.abspath(source))[0])
            module_spec = importlib.util.spec_from_file_location(name, source)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a module next to the config, as `python -m` would find it
                sys.path.append(os.getcwd())
            module = importlib.import_module(source)
    except UsageError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise UsageError(f"reward function {spec!r}: cannot import {source} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise UsageError(f"reward function {spec!r}: {source} has no function {attr!r}")
    return func


def default_reward_weights(names: list[str], weights: list[float] | None) -> list[float] | None:
    """The official acc + 0.1 * fmt when the default pair is used without explicit weights."""
    from calibrl.errors import UsageError

    if weights is None and list(names) == ["accuracy_reward", "format_reward"]:
        return [1.0, FORMAT_WEIGHT]
    if weights is not None and len(weights) != len(names):
        raise UsageError(f"reward_weights has {len(weights)} values for {len(names)} reward_funcs")
    return weights

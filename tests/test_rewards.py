"""Verifiable rewards: answer matching table, strict format, TRL signature, threads, pathological inputs."""

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from calibrl import rewards
from calibrl.rewards import FORMAT_WEIGHT, accuracy_reward, calibrl_reward, extract_answer, format_reward
from calibrl.rewards import is_correct, is_strict_format, normalize_answer


def tagged(answer: str) -> str:
    return f"<think>Some reasoning.</think><answer>{answer}</answer>"


# (completion, gold, expected accuracy)
ACCURACY_CASES = [
    # integers, decimals, signs
    (tagged("8"), "8", 1.0),
    (tagged(" 8 "), "8", 1.0),
    (tagged("9"), "8", 0.0),
    (tagged("-3"), "-3", 1.0),
    (tagged("3"), "-3", 0.0),
    (tagged("8."), "8", 1.0),
    (tagged("8.0"), "8", 1.0),
    (tagged("0.5"), "0.50", 1.0),
    (tagged("0.51"), "0.5", 0.0),
    (tagged("1,000"), "1000", 1.0),
    (tagged("$12$"), "12", 1.0),
    # fractions
    (tagged("3/4"), "0.75", 1.0),
    (tagged("\\frac{3}{4}"), "3/4", 1.0),
    (tagged("\\dfrac{3}{4}"), "\\frac{3}{4}", 1.0),
    (tagged("\\tfrac{1}{3}"), "0.3333333", 1.0),
    (tagged("\\frac{1}{3}"), "0.33", 0.0),
    (tagged("\\frac{2}{4}"), "\\frac{1}{2}", 1.0),
    # units, percent, degrees, text wrappers
    (tagged("12 square units"), "12", 1.0),
    (tagged("7 units"), "7", 1.0),
    (tagged("5 cm"), "5", 1.0),
    (tagged("5 cm^2"), "5", 1.0),
    (tagged("6\\text{ cm}^2"), "6", 1.0),
    (tagged("25\\%"), "25", 1.0),
    (tagged("25%"), "25%", 1.0),
    (tagged("45^\\circ"), "45", 1.0),
    (tagged("45^{\\circ}"), "45^\\circ", 1.0),
    (tagged("45°"), "45", 1.0),
    (tagged("45 degrees"), "45", 1.0),
    (tagged("46 degrees"), "45", 0.0),
    (tagged("\\text{left}"), "left", 1.0),
    (tagged("Left"), "left", 1.0),
    (tagged("right"), "left", 0.0),
    (tagged("\\mathrm{6}"), "6", 1.0),
    (tagged("x = 5"), "5", 1.0),
    # boxed, inside or instead of the tags
    (tagged("\\boxed{7}"), "7", 1.0),
    ("The sum is \\boxed{7}.", "7", 1.0),
    ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("first \\boxed{3} then \\boxed{4}", "3", 0.0),
    # symbolic (math-verify)
    (tagged("2\\sqrt{2}"), "\\sqrt{8}", 1.0),
    (tagged("\\frac{\\pi}{2}"), "\\frac{1}{2}\\pi", 1.0),
    (tagged("\\sqrt{3}"), "\\sqrt{2}", 0.0),
    # multiple choice
    (tagged("B"), "B", 1.0),
    (tagged("(B)"), "B", 1.0),
    (tagged("B."), "B", 1.0),
    (tagged("B)"), "B", 1.0),
    (tagged("B: 14 square units"), "B", 1.0),
    (tagged("The answer is B"), "B", 1.0),
    (tagged("Answer: (B)"), "B", 1.0),
    (tagged("\\boxed{B}"), "B", 1.0),
    (tagged("\\text{(D)}"), "D", 1.0),
    (tagged("C"), "B", 0.0),
    (tagged("(C) 14"), "B", 0.0),
    (tagged("Because 14"), "B", 0.0),
    (tagged("14"), "B", 0.0),
    # missing, empty, nested, repeated, garbage
    (tagged(""), "8", 0.0),
    ("<think>8</think>", "8", 0.0),
    ("8", "8", 0.0),
    ("", "8", 0.0),
    ("<answer><answer>8</answer></answer>", "8", 1.0),
    ("<answer>3</answer> wait, no: <answer>8</answer>", "8", 1.0),
    ("<answer>8</answer> wait, no: <answer>3</answer>", "8", 0.0),
    ("<answer>8", "8", 0.0),
    (tagged("}{\\frac{{{ ^^ \\sqrt"), "8", 0.0),
    (tagged("\x00\xff<>&"), "8", 0.0),
    (tagged("8"), "", 0.0),
    (tagged("1/0"), "1", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", ACCURACY_CASES)
def test_accuracy_table(completion, gold, expected):
    assert accuracy_reward([completion], answer=[gold]) == [expected]


def test_table_is_large_and_balanced():
    assert len(ACCURACY_CASES) >= 40
    assert 10 <= sum(e == 0.0 for *_, e in ACCURACY_CASES) <= len(ACCURACY_CASES) - 10


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>x</think><answer>4</answer>", "4"),
        ("<answer> 4 </answer>", "4"),
        ("<answer></answer>", None),
        ("no answer here", None),
        ("\\boxed{\\frac{1}{2}} and text", "\\frac{1}{2}"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed{unclosed", None),
        ("<answer>1</answer><answer>2</answer>", "2"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "raw,expected",
    [("$\\boxed{\\dfrac{1}{2}}$", "\\frac{1}{2}"), ("12 square units.", "12"), ("30^{\\circ}", "30"),
     ("\\text{ 5 }", "5"), ("1,234", "1234"), ("y = 2x + 1", "2x+1"), ("50\\%", "50")],
)  # fmt: skip
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>a</think><answer>1</answer>", 1.0),
        ("  \n<think>\nmulti\nline\n</think>\n<answer> 1 </answer>\n", 1.0),
        ("<think></think><answer>1</answer>", 1.0),
        ("<think>a</think><answer> </answer>", 0.0),
        ("<think>a</think>", 0.0),
        ("<answer>1</answer>", 0.0),
        ("<answer>1</answer><think>a</think>", 0.0),
        ("<think>a</think><answer>1</answer>trailing text", 0.0),
        ("preamble <think>a</think><answer>1</answer>", 0.0),
        ("<think>a</think>middle<answer>1</answer>", 0.0),
        ("<think>a<think>b</think><answer>1</answer>", 0.0),
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think>a</think><answer>1", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert is_strict_format(completion) == (expected == 1.0)


def test_trl_signature_strings_and_conversations():
    texts = [tagged("8"), "\\boxed{8}", tagged("9"), "garbage"]
    gold = ["8", "8", "8", "8"]
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    blocks = [[{"role": "assistant", "content": [{"type": "text", "text": t}]}] for t in texts]
    extra = {"prompts": [[{"role": "user", "content": "q"}]] * 4, "solution": ["s"] * 4, "task": ["digits/sum"] * 4,
             "images": [[None]] * 4, "completion_ids": [[1, 2]] * 4, "trainer_state": object()}  # fmt: skip
    for completions in (texts, conversational, blocks):
        acc = accuracy_reward(completions, answer=gold, **extra)
        fmt = format_reward(completions, answer=gold, **extra)
        total = calibrl_reward(completions=completions, answer=gold, **extra)
        assert acc == [1.0, 1.0, 0.0, 0.0] and fmt == [1.0, 0.0, 1.0, 0.0]
        assert total == pytest.approx([a + FORMAT_WEIGHT * f for a, f in zip(acc, fmt)])
        assert all(isinstance(x, float) for x in acc + fmt + total)
    assert FORMAT_WEIGHT == 0.1 and calibrl_reward([tagged("8")], answer=["8"]) == [1.1]
    names = [f.__name__ for f in (accuracy_reward, format_reward, calibrl_reward)]
    assert names == ["accuracy_reward", "format_reward", "calibrl_reward"]


def test_reward_inputs_that_are_not_text_score_zero():
    weird = [None, 42, {"role": "assistant"}, [], [{"content": None}], [{"role": "assistant", "content": [None, 3]}]]
    assert accuracy_reward(weird, answer=["42"] * len(weird)) == [0.0] * len(weird)
    assert format_reward(weird) == [0.0] * len(weird)
    assert accuracy_reward([tagged("8")], answer=[None]) == [0.0]
    assert accuracy_reward([tagged("8")], answer=[8]) == [1.0]  # a non-string gold is compared as text


def test_missing_gold_column_is_a_clear_error():
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward([tagged("8")])
    with pytest.raises(ValueError, match="2 gold answers for 1 completions"):
        calibrl_reward([tagged("8")], answer=["8", "9"])


THREAD_CASES = [
    (tagged("2\\sqrt{2}"), "\\sqrt{8}"),  # only the symbolic path can accept these two
    (tagged("\\sqrt{8}"), "2\\sqrt{2}"),
    (tagged("(x+1)^2"), "x^2+2x+1"),
    (tagged("\\frac{1}{2}"), "0.5"),
    (tagged("\\sqrt{3}"), "\\sqrt{2}"),
    (tagged("B"), "B"),
    (tagged("7"), "8"),
]


def test_rewards_off_the_main_thread_match_the_main_thread():
    completions, gold = [c for c, _ in THREAD_CASES], [g for _, g in THREAD_CASES]
    rewards._mv_parse.cache_clear()  # so the worker threads really call math-verify's parser
    box: list = []
    worker = threading.Thread(target=lambda: box.append(calibrl_reward(completions, answer=gold)))
    worker.start()
    worker.join(60)
    with ThreadPoolExecutor(max_workers=4) as pool:
        pooled = list(pool.map(lambda cg: is_correct(extract_answer(cg[0]), cg[1]), THREAD_CASES))
    main = calibrl_reward(completions, answer=gold)
    assert main == [1.1, 1.1, 1.1, 1.1, 0.1, 1.1, 0.1]
    assert box == [main]
    assert pooled == [m > 1.0 for m in main]


def test_pathological_inputs_are_bounded_and_never_raise():
    huge = [
        "<answer>" * 200_000 + "8",
        "\\boxed{" * 200_000,
        tagged("1" * 100_000),
        tagged("(" * 5_000 + "1" + ")" * 5_000),
        tagged("x" * 50_000),
        "<think>" + "a" * 3_000_000 + "</think><answer>8</answer>",
    ]
    start = time.perf_counter()
    assert accuracy_reward(huge, answer=["8"] * len(huge)) == [0.0] * len(huge)
    assert format_reward(huge) == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]  # the last one is over the 1M-character cap
    assert time.perf_counter() - start < 10


def test_huge_powers_never_reach_sympy():
    """`9^{9^{9^9}}` would make sympy compute a 370-million-digit integer with the GIL held, which no thread
    deadline can interrupt: it must be screened out. Run in a subprocess so a regression fails, not hangs."""
    code = (
        "from calibrl.rewards import calibrl_reward as r\n"
        "c = ['<think>t</think><answer>' + a + '</answer>' for a in "
        "['9^{9^{9^9}}', '9**9**9**9', '10^{10^{10}}', '100000!', '\\\\sum_{i=1}^{10^{12}} i', '2^{99999999}',"
        " '((99^{99})^{99})^{99}', '2^10^10', '(10^{10})^{10^{10}}']]\n"
        "print(r(c, answer=['3'] * len(c)))\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([0.1] * 9)
    assert time.perf_counter() - start < 30

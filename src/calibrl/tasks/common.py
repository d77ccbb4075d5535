"""Shared pieces of the offline tasks: the paper's instruction, the prompt, and the expert solution styles.

A task generator returns a `Problem`: the question, its images, the gold answer, and two renderers of the
reasoning (`native`: the short wording a warm-start SFT uses; `verbose`: a longer wording of the same
steps, standing in for a GPT-4o CoT written for another model). Each renderer takes the final value it
should reach, so the `noisy` expert is the verbose renderer driven to `problem.wrong`: the last reasoning
step goes wrong and the wrong value becomes the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in <answer> </answer> tags."
)
SPLITS = ("train", "test", "ood")
STYLES = ("native", "mismatched", "noisy")
DIFFICULTIES = (1, 2, 3)
LETTERS = "ABCD"

OPENERS = ("Looking at the image,", "Examining the image,", "In the image,")
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass
class Problem:
    """One generated question before it is turned into a dataset row."""

    task: str  # e.g. "digits/sum"
    difficulty: int
    question: str
    images: list[Image.Image]
    answer: str
    native: Callable[[str], str]  # think text that ends at the given final value (short wording)
    verbose: Callable[[str], str]  # the same reasoning in the verbose, mismatched wording
    wrong: str  # a wrong final value, reached by the noisy expert
    meta: dict = field(default_factory=dict)  # what the answer was computed from (labels, shape params)


def solution_text(think: str, answer: str) -> str:
    """An expert trajectory in the strict format the format reward checks."""
    return f"<think>{think}</think><answer>{answer}</answer>"


def make_prompt(question: str, n_images: int) -> list[dict]:
    """The conversational prompt: one `{"type": "image"}` block per image, then question + instruction."""
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": question + "\n" + INSTRUCTION})
    return [{"role": "user", "content": content}]


def verbose_think(problem: Problem, final: str) -> str:
    """Verbose reasoning plus the closing sentence that announces `final`."""
    return f"{problem.verbose(final)} Therefore, the final answer is {final}."


def join_items(items: list) -> str:
    """'3', '3 and 5', '3, 5 and 2'."""
    items = [str(x) for x in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def number_word(k: int) -> str:
    return _NUMBER_WORDS[k] if 0 <= k < len(_NUMBER_WORDS) else str(k)


def plural(k: int | str, noun: str) -> str:
    """'1 circle', '2 circles', '0 times'."""
    return f"{k} {noun}" if str(k) == "1" else f"{k} {noun}s"


Step = tuple[int, str, int, int]  # (left, op, right, result)


def chain_native(steps: list[Step], final: str) -> str:
    """'3 + 5 = 8. 8 * 2 = 16.' with the last result replaced by `final`."""
    parts = [f"{x} {op} {y} = {final if i == len(steps) - 1 else r}." for i, (x, op, y, r) in enumerate(steps)]
    return " ".join(parts)


def chain_verbose(steps: list[Step], final: str) -> str:
    """'3 plus 5 gives 8, and then 8 times 2 gives 16' with the last result replaced by `final`."""
    parts = [
        f"{x} {_OP_WORDS[op]} {y} gives {final if i == len(steps) - 1 else r}" for i, (x, op, y, r) in enumerate(steps)
    ]
    return ", and then ".join(parts)


def wrong_number(rng: random.Random, value: int, allow_negative: bool = False) -> int:
    """A nearby wrong value (a slip of 1 or 2), never equal to `value`."""
    delta = rng.choice((-2, -1, 1, 2))
    if not allow_negative and value + delta < 0:
        delta = -delta
    return value + delta


def noisy_count(n: int, rate: float) -> int:
    """How many of `n` rows get a wrong expert: `rate * n` rounded half up."""
    return int(rate * n + 0.5)


def as_multiple_choice(problem: Problem, rng: random.Random, task: str) -> Problem:
    """Turn a numeric problem into a 4-option question (A-D) whose answer is the correct letter.

    The noisy expert's wrong value is always one of the distractors, so the noisy solution reaches a
    wrong letter through the same wrong step as the open-ended version.
    """
    correct, wrong = int(problem.answer), int(problem.wrong)
    pool = [v for v in range(max(0, correct - 4), correct + 5) if v not in (correct, wrong)]
    options = [correct, wrong, *rng.sample(pool, 2)]
    rng.shuffle(options)
    letter_of = {v: LETTERS[i] for i, v in enumerate(options)}
    listing = "\n".join(f"({LETTERS[i]}) {v}" for i, v in enumerate(options))
    question = f"{problem.question}\nChoices:\n{listing}\nAnswer with the letter of the correct option."
    value_of = {letter: str(v) for v, letter in letter_of.items()}

    def native(final_letter: str) -> str:
        value = value_of[final_letter]
        return f"{problem.native(value)} {value} is option {final_letter}."

    def verbose(final_letter: str) -> str:
        value = value_of[final_letter]
        return f"{problem.verbose(value)} Among the choices, that is option {final_letter}."

    meta = {**problem.meta, "options": options, "value": correct}
    return Problem(
        task=task,
        difficulty=problem.difficulty,
        question=question,
        images=problem.images,
        answer=letter_of[correct],
        native=native,
        verbose=verbose,
        wrong=letter_of[wrong],
        meta=meta,
    )

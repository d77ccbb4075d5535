"""Handwritten-digit arithmetic on REAL digits (scikit-learn's 1,797 8x8 scans), offline.

Each image is 2-4 digits side by side, each upscaled to 28x28 (dark ink on white, RGB), so an image is
28 px tall and 28 px per digit wide. The question needs perception (read the digits) and 1-2 reasoning
steps.

Splits:
- `train`: digit images from a fixed 2/3 of the 1,797 scans; operations sum, difference, larger, smaller
  (difficulty 1, two digits), sum of three and count of a digit among three (difficulty 2), add-then-
  subtract and count among four (difficulty 3).
- `test`: the same operations on the other 1/3 of the scans (disjoint images).
- `ood`: held-out operations, all involving multiplication, which never appears in train or test:
  product of two digits (difficulty 1), multiply-then-add (2), add-then-multiply (3); test-split images.

The split of the scans is fixed (independent of the dataset seed); see `split_indices`.
"""

from __future__ import annotations

import functools
import random

import numpy as np
from PIL import Image

from calibrl.tasks.common import OPENERS, Problem, Step, chain_native, chain_verbose, join_items, number_word
from calibrl.tasks.common import plural, wrong_number

DIGIT_PX = 28
_SPLIT_SEED = 20260226  # fixes which scans are train and which are test, for every dataset seed
TRAIN_FRACTION = 2 / 3

OPS: dict[str, dict[int, tuple[str, ...]]] = {
    "train": {1: ("sum", "difference", "larger", "smaller"), 2: ("sum3", "count3"), 3: ("add_subtract", "count4")},
    "ood": {1: ("product",), 2: ("multiply_add",), 3: ("add_multiply",)},
}
OPS["test"] = OPS["train"]

_N_DIGITS = {"sum": 2, "difference": 2, "larger": 2, "smaller": 2, "product": 2, "sum3": 3, "count3": 3,
             "add_subtract": 3, "multiply_add": 3, "add_multiply": 3, "count4": 4}  # fmt: skip
_QUESTIONS = {
    "sum": "What is the sum of the two digits?",
    "difference": "What is the larger digit minus the smaller digit?",
    "larger": "What is the larger of the two digits?",
    "smaller": "What is the smaller of the two digits?",
    "product": "What is the product of the two digits?",
    "sum3": "What is the sum of the three digits?",
    "add_subtract": "Add the first two digits, then subtract the third digit. What is the result?",
    "multiply_add": "Multiply the first two digits, then add the third digit. What is the result?",
    "add_multiply": "Add the first two digits, then multiply the sum by the third digit. What is the result?",
}
_GOALS = {
    "sum": "add the two digits",
    "difference": "subtract the smaller digit from the larger one",
    "product": "multiply the two digits",
    "sum3": "add all three digits",
    "add_subtract": "add the first two digits and subtract the third",
    "multiply_add": "multiply the first two digits and add the third",
    "add_multiply": "add the first two digits and multiply by the third",
}


@functools.lru_cache(maxsize=1)
def digit_bank() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scans as 28x28 uint8 images (dark ink on white) and their labels; loaded once per process."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.zeros((len(data.images), DIGIT_PX, DIGIT_PX), dtype=np.uint8)
    for i, img in enumerate(data.images):
        ink = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8), mode="L")
        pixels[i] = 255 - np.asarray(ink.resize((DIGIT_PX, DIGIT_PX), Image.Resampling.BILINEAR))
    return pixels, data.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def split_indices() -> dict[str, np.ndarray]:
    """Scan indices per split: a fixed permutation, first 2/3 `train`, the rest `test` (`ood` reuses `test`)."""
    _, labels = digit_bank()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    cut = int(round(len(labels) * TRAIN_FRACTION))
    train, test = np.sort(order[:cut]), np.sort(order[cut:])
    return {"train": train, "test": test, "ood": test}


@functools.lru_cache(maxsize=None)
def _pool(split: str) -> tuple[list[int], dict[int, list[int]]]:
    _, labels = digit_bank()
    indices = [int(i) for i in split_indices()[split]]
    by_label = {d: [i for i in indices if labels[i] == d] for d in range(10)}
    return indices, by_label


def render(indices: list[int]) -> Image.Image:
    """The scans side by side as one RGB image, 28 px tall and 28 px per digit."""
    pixels, _ = digit_bank()
    return Image.fromarray(np.concatenate([pixels[i] for i in indices], axis=1), mode="L").convert("RGB")


def _steps(op: str, d: list[int]) -> list[Step]:
    """The arithmetic an operation performs on the digits `d`, step by step."""
    if op == "sum":
        return [(d[0], "+", d[1], d[0] + d[1])]
    if op == "difference":
        hi, lo = max(d), min(d)
        return [(hi, "-", lo, hi - lo)]
    if op == "product":
        return [(d[0], "*", d[1], d[0] * d[1])]
    s = d[0] + d[1]
    if op == "sum3":
        return [(d[0], "+", d[1], s), (s, "+", d[2], s + d[2])]
    if op == "add_subtract":
        return [(d[0], "+", d[1], s), (s, "-", d[2], s - d[2])]
    if op == "add_multiply":
        return [(d[0], "+", d[1], s), (s, "*", d[2], s * d[2])]
    if op == "multiply_add":
        p = d[0] * d[1]
        return [(d[0], "*", d[1], p), (p, "+", d[2], p + d[2])]
    raise ValueError(f"op={op!r} is not an arithmetic operation")


def sample(rng: random.Random, split: str, difficulty: int) -> Problem:
    """One digits problem of the given split and difficulty."""
    op = rng.choice(OPS[split][difficulty])
    n_digits = _N_DIGITS[op]
    pool, by_label = _pool(split)
    _, all_labels = digit_bank()
    target = None
    if op.startswith("count"):
        target = rng.randrange(10)
        labels = [target if rng.random() < 0.4 else rng.randrange(10) for _ in range(n_digits)]
        indices = [rng.choice(by_label[d]) for d in labels]
    else:
        indices = [rng.choice(pool) for _ in range(n_digits)]
        labels = [int(all_labels[i]) for i in indices]

    if n_digits == 2:
        native_reading = f"The left digit is {labels[0]}. The right digit is {labels[1]}."
    else:
        native_reading = f"The digits are {join_items(labels)}."
    verbose_reading = (
        f"{rng.choice(OPENERS)} I see {number_word(n_digits)} handwritten digits. "
        f"From left to right, they read {join_items(labels)}."
    )

    if op in ("larger", "smaller"):
        answer = max(labels) if op == "larger" else min(labels)
        a, b = labels
        wrong = (a if answer == b else b) if a != b else (answer + 1 if answer < 9 else answer - 1)
        question = _QUESTIONS[op]

        def native_step(final: str) -> str:
            return f"The {op} digit is {final}."

        def verbose_step(final: str) -> str:
            return f"The question asks for the {op} digit, and comparing them, {final} is the {op} one."

    elif target is not None:
        answer = labels.count(target)
        wrong = wrong_number(rng, answer)
        question = f"How many times does the digit {target} appear in the image?"

        def native_step(final: str) -> str:
            return f"The digit {target} appears {plural(final, 'time')}."

        def verbose_step(final: str) -> str:
            return f"The question asks how often the digit {target} occurs, and counting the matches gives {final}."

    else:
        steps = _steps(op, labels)
        answer = steps[-1][3]
        wrong = wrong_number(rng, answer, allow_negative=op == "add_subtract")
        question = _QUESTIONS[op]

        def native_step(final: str) -> str:
            return chain_native(steps, final)

        def verbose_step(final: str) -> str:
            return f"The question asks me to {_GOALS[op]}, so {chain_verbose(steps, final)}."

    difficulty_of_op = next(d for d, ops in OPS[split].items() if op in ops)
    return Problem(
        task=f"digits/{op}",
        difficulty=difficulty_of_op,
        question=question,
        images=[render(indices)],
        answer=str(answer),
        native=lambda final: f"{native_reading} {native_step(final)}",
        verbose=lambda final: f"{verbose_reading} {verbose_step(final)}",
        wrong=str(wrong),
        meta={"op": op, "indices": indices, "labels": labels, "target": target},
    )

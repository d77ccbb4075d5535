"""Geometry-lite: rendered shapes (PIL drawing), image sides multiples of 28 px.

Operations:
- `count` (84x56 image, a 3x2 layout of 28 px cells): how many shapes in total (difficulty 1, 1-3 shapes),
  or how many of one kind (difficulty 2: 2-4 shapes; 3: 4-6 shapes).
- `compare` (112x56): two shapes of one kind side by side; which is larger, `left` or `right`. The size gap
  shrinks with difficulty (16-24 px, 8-12 px, 3-6 px).
- `area` / `perimeter` (84x84, a 6x6 grid of 14 px unit squares): a filled rectangle aligned to the grid;
  sides 1-3 (difficulty 1), 2-4 (2), 3-6 (3) units.
- `mc_count` / `mc_area`: the multiple-choice variants (options (A)-(D) listed in the question, the
  answer is a letter).

Splits: `train` and `test` use count, compare and area (same distribution, independent random streams;
the parameter space is small, so a test image can coincide with a train image). `ood` holds out the
perimeter question and the multiple-choice format: perimeter, mc_count, mc_area.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from calibrl.tasks.common import OPENERS, Problem, as_multiple_choice, chain_native, chain_verbose, join_items
from calibrl.tasks.common import plural, wrong_number

KINDS = ("circle", "square", "triangle")
PALETTE = ((220, 50, 47), (38, 139, 210), (133, 153, 0), (203, 75, 22), (108, 113, 196))
BACKGROUND = (255, 255, 255)
CELL = 28  # count layout cell
GRID_UNIT, GRID_CELLS = 14, 6  # area/perimeter grid: 6x6 unit squares of 14 px = 84 px

OPS = {"train": ("count", "compare", "area"), "test": ("count", "compare", "area"),
       "ood": ("perimeter", "mc_count", "mc_area")}  # fmt: skip
_COMPARE_GAP = {1: (16, 24), 2: (8, 12), 3: (3, 6)}
_RECT_SIDES = {1: (1, 3), 2: (2, 4), 3: (3, 6)}


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, size: int, color: tuple) -> None:
    """A filled shape of width/height `size` centred at (cx, cy)."""
    h = size / 2
    box = (cx - h, cy - h, cx + h, cy + h)
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=color)
    else:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")


def _count(rng: random.Random, difficulty: int) -> Problem:
    n_shapes = {1: rng.randint(1, 3), 2: rng.randint(2, 4), 3: rng.randint(4, 6)}[difficulty]
    cells = sorted(rng.sample(range(6), n_shapes))  # row-major order = reading order
    image = Image.new("RGB", (3 * CELL, 2 * CELL), BACKGROUND)
    draw = ImageDraw.Draw(image)
    shapes = []
    for cell in cells:
        kind, size, color = rng.choice(KINDS), rng.randint(14, 22), rng.choice(PALETTE)
        cx = (cell % 3) * CELL + CELL / 2 + rng.randint(-2, 2)
        cy = (cell // 3) * CELL + CELL / 2 + rng.randint(-2, 2)
        draw_shape(draw, kind, cx, cy, size, color)
        shapes.append({"kind": kind, "cx": cx, "cy": cy, "size": size, "color": list(color)})
    kinds = [s["kind"] for s in shapes]
    asked = None if difficulty == 1 else (rng.choice(kinds) if rng.random() < 0.8 else rng.choice(KINDS))
    answer = len(kinds) if asked is None else kinds.count(asked)
    noun = "shape" if asked is None else asked
    listing = join_items(kinds)
    opener = rng.choice(OPENERS)

    def native(final: str) -> str:
        verb = "is" if final == "1" else "are"
        return f"The shapes are {listing}. There {verb} {plural(final, noun)}."

    def verbose(final: str) -> str:
        what = "how many shapes there are" if asked is None else f"how many {noun}s there are"
        return (
            f"{opener} I see some shapes on a white background. Row by row, they are "
            f"{join_items(['a ' + k for k in kinds])}. The question asks {what}, and counting them gives {final}."
        )

    question = "How many shapes are in the image?" if asked is None else f"How many {asked}s are in the image?"
    return Problem("shapes/count", difficulty, question, [image], str(answer), native, verbose,
                   str(wrong_number(rng, answer)), {"op": "count", "shapes": shapes, "asked": asked})  # fmt: skip


def _compare(rng: random.Random, difficulty: int) -> Problem:
    kind, color = rng.choice(KINDS), rng.choice(PALETTE)
    lo_gap, hi_gap = _COMPARE_GAP[difficulty]
    big = rng.randint(36, 48)
    small = big - rng.randint(lo_gap, hi_gap)
    answer = rng.choice(("left", "right"))
    sizes = [big, small] if answer == "left" else [small, big]
    image = Image.new("RGB", (4 * CELL, 2 * CELL), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for side, size in enumerate(sizes):
        slack = (2 * CELL - size) // 2 - 1
        cx = side * 2 * CELL + CELL + rng.randint(-slack, slack)
        cy = CELL + rng.randint(-slack, slack)
        draw_shape(draw, kind, cx, cy, size, color)
    wrong = "right" if answer == "left" else "left"
    opener = rng.choice(OPENERS)

    def seen(final: str) -> tuple[int, int]:
        """The sizes as the expert perceives them: swapped when it reaches the wrong side."""
        return (sizes[0], sizes[1]) if final == answer else (sizes[1], sizes[0])

    def native(final: str) -> str:
        left, right = seen(final)
        return (
            f"The left {kind} is {left} pixels wide. The right {kind} is {right} pixels wide. "
            f"The {final} {kind} is larger."
        )

    def verbose(final: str) -> str:
        left, right = seen(final)
        return (
            f"{opener} I see two {kind}s side by side. The left one is about {left} pixels wide and the right "
            f"one about {right}. Since {max(left, right)} is greater than {min(left, right)}, the {final} {kind} "
            f"is larger."
        )

    question = f"Which {kind} is larger, the left one or the right one?"
    return Problem("shapes/compare", difficulty, question, [image], answer, native, verbose, wrong,
                   {"op": "compare", "kind": kind, "sizes": sizes})  # fmt: skip


def _rectangle(rng: random.Random, difficulty: int, op: str) -> Problem:
    lo, hi = _RECT_SIDES[difficulty]
    w, h = rng.randint(lo, hi), rng.randint(lo, hi)
    x0, y0 = rng.randint(0, GRID_CELLS - w), rng.randint(0, GRID_CELLS - h)
    side = GRID_UNIT * GRID_CELLS
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle(
        (x0 * GRID_UNIT, y0 * GRID_UNIT, (x0 + w) * GRID_UNIT, (y0 + h) * GRID_UNIT), fill=rng.choice(PALETTE)
    )
    for k in range(GRID_CELLS + 1):  # grid lines over the fill, so the units stay countable
        p = min(k * GRID_UNIT, side - 1)
        draw.line((p, 0, p, side - 1), fill=(150, 150, 150))
        draw.line((0, p, side - 1, p), fill=(150, 150, 150))
    if op == "area":
        steps = [(w, "*", h, w * h)]
        rule = "Area is width times height, so"
        question = "The image shows a rectangle on a grid of unit squares. What is its area in square units?"
    else:
        steps = [(w, "+", h, w + h), (2, "*", w + h, 2 * (w + h))]
        rule = "Perimeter is twice width plus height, so"
        question = "The image shows a rectangle on a grid of unit squares. What is its perimeter in units?"
    answer = steps[-1][3]
    opener = rng.choice(OPENERS)

    def native(final: str) -> str:
        return f"The rectangle is {w} units wide and {h} units tall. {chain_native(steps, final)}"

    def verbose(final: str) -> str:
        return (
            f"{opener} I see a shaded rectangle on a grid of unit squares. Counting cells, it is {w} units "
            f"wide and {h} units tall. {rule} {chain_verbose(steps, final)}."
        )

    return Problem(f"shapes/{op}", difficulty, question, [image], str(answer), native, verbose,
                   str(wrong_number(rng, answer)), {"op": op, "w": w, "h": h, "x0": x0, "y0": y0})  # fmt: skip


def sample(rng: random.Random, split: str, difficulty: int) -> Problem:
    """One shapes problem of the given split and difficulty."""
    op = rng.choice(OPS[split])
    if op == "count":
        return _count(rng, difficulty)
    if op == "compare":
        return _compare(rng, difficulty)
    if op in ("area", "perimeter"):
        return _rectangle(rng, difficulty, op)
    if op == "mc_count":
        return as_multiple_choice(_count(rng, difficulty), rng, "shapes/mc_count")
    if op == "mc_area":
        return as_multiple_choice(_rectangle(rng, difficulty, "area"), rng, "shapes/mc_area")
    raise ValueError(f"op={op!r} is not a shapes operation")

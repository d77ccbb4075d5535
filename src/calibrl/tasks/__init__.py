"""Offline multimodal reasoning tasks with verifiable answers and expert trajectories.

Tasks (see each module's docstring for its operations and its train / test / ood splits):
- `digits`: arithmetic on real handwritten digits (scikit-learn); `ood` = multiplication, never trained on.
- `shapes`: counting, size comparison, rectangle area on a grid; `ood` = perimeter and multiple choice.
- `mixed`: half digits, half shapes, shuffled.

Each row is a dict with `prompt` (conversational, one `{"type": "image"}` block per image, the question
followed by the paper's INSTRUCTION), `images` (PIL RGB), `answer` (str), `solution` (the expert
trajectory `<think>...</think><answer>...</answer>`), `task` (e.g. "digits/sum"), `difficulty` (1-3),
`split`, and `meta` (what the answer was computed from: digit scan indices and labels, shape parameters,
the native solution, whether this row's expert is wrong).

Expert styles: `native` (the short wording used for the SFT warm start), `mismatched` (a longer, differently
worded trajectory to the same answer, like a GPT-4o CoT written for another model), `noisy` (exactly
round(noise_rate * n) rows, chosen from the seed, reach a wrong answer through a wrong last step; the
other rows are `mismatched`).
"""

from __future__ import annotations

import json
import random

from calibrl.errors import UsageError
from calibrl.multimodal import png_dict
from calibrl.tasks import digits, shapes
from calibrl.tasks.common import DIFFICULTIES, INSTRUCTION, LETTERS, SPLITS, STYLES, Problem, make_prompt
from calibrl.tasks.common import noisy_count, solution_text, verbose_think

TASKS = ("digits", "shapes", "mixed")
TASK_PREFIX = "task:"  # how a config names a generated dataset: task:digits
# Seed offsets of the row streams drawn from one `task_seed`, so that training rows, SFT validation rows, the
# held-out curve during training and the final before/after evaluation never share a draw.
SEED_STREAMS = {"train": 0, "sft_select": 1, "heldout": 1000, "final_eval": 2000}
_SAMPLERS = {"digits": digits.sample, "shapes": shapes.sample}

__all__ = [
    "DIFFICULTIES",
    "INSTRUCTION",
    "SPLITS",
    "STYLES",
    "TASKS",
    "SEED_STREAMS",
    "TASK_PREFIX",
    "make_dataset",
    "native_solution",
    "task_corpus",
    "task_name",
    "task_rows",
    "to_hf_dataset",
]


def _levels(difficulty: int | list[int] | None) -> list[int]:
    if difficulty is None:
        return list(DIFFICULTIES)
    levels = [difficulty] if isinstance(difficulty, int) and not isinstance(difficulty, bool) else difficulty
    try:
        levels = list(levels)
    except TypeError:
        raise ValueError(f"difficulty={difficulty!r} must be an int in {DIFFICULTIES}, a list of them, or None")
    if not levels or any(isinstance(d, bool) or d not in DIFFICULTIES for d in levels):
        raise ValueError(f"difficulty={difficulty!r} must be an int in {DIFFICULTIES}, a list of them, or None")
    return sorted(set(levels))


def _row(problem: Problem, split: str, style: str, wrong_expert: bool) -> dict:
    native = solution_text(problem.native(problem.answer), problem.answer)
    if style == "native":
        solution = native
    elif wrong_expert:
        solution = solution_text(verbose_think(problem, problem.wrong), problem.wrong)
    else:
        solution = solution_text(verbose_think(problem, problem.answer), problem.answer)
    return {
        "prompt": make_prompt(problem.question, len(problem.images)),
        "images": problem.images,
        "answer": problem.answer,
        "solution": solution,
        "task": problem.task,
        "difficulty": problem.difficulty,
        "split": split,
        "meta": {**problem.meta, "native": native, "wrong_expert": wrong_expert},
    }


def make_dataset(
    task: str = "digits",
    split: str = "train",
    n: int = 1000,
    seed: int = 0,
    expert_style: str = "native",
    noise_rate: float = 0.3,
    difficulty: int | list[int] | None = None,
) -> list[dict]:
    """`n` rows of `task` from `split`, deterministic in `seed`.

    Problems do not depend on `expert_style` or `noise_rate` (only the `solution` column does), so the
    same seed gives the same questions and images in every style. `difficulty` picks the level(s) 1-3,
    each row drawing one uniformly (None: all levels).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if expert_style not in STYLES:
        raise ValueError(f"expert_style={expert_style!r} is not one of {STYLES}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n={n!r} must be a positive int")
    if isinstance(noise_rate, bool) or not isinstance(noise_rate, (int, float)) or not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate={noise_rate!r} must be a number in [0, 1]")
    levels = _levels(difficulty)

    rng = random.Random(f"calibrl/{task}/{split}/{seed}")
    if task == "mixed":
        kinds = ["digits"] * (n - n // 2) + ["shapes"] * (n // 2)
        rng.shuffle(kinds)
    else:
        kinds = [task] * n
    problems = [_SAMPLERS[kind](rng, split, rng.choice(levels)) for kind in kinds]

    wrong_rows: set[int] = set()
    if expert_style == "noisy":
        noise_rng = random.Random(f"calibrl/noise/{task}/{split}/{seed}")
        wrong_rows = set(noise_rng.sample(range(n), noisy_count(n, noise_rate)))
    return [_row(p, split, expert_style, i in wrong_rows) for i, p in enumerate(problems)]


def native_solution(row: dict) -> str:
    """The SFT target of a row: its native-style expert solution, whatever style the row was made with."""
    meta = row["meta"]
    if isinstance(meta, str):  # a row read back from `to_hf_dataset`
        meta = json.loads(meta)
    return meta["native"]


def task_name(spec: str) -> str | None:
    """'task:digits' -> 'digits'; None for a file source. Unknown task names are a `UsageError`."""
    if not spec.startswith(TASK_PREFIX):
        return None
    name = spec[len(TASK_PREFIX):]
    if name not in TASKS:
        raise UsageError(f"dataset {spec!r}: unknown task {name!r}, expected one of {list(TASKS)}")
    return name


def task_rows(spec: str, split: str, n: int, seed: int, expert_style: str = "native", noise_rate: float = 0.3,
              difficulty: list[int] | None = None, task_types: list[str] | None = None) -> list[dict]:
    """`n` rows of a `task:` dataset (dicts with PIL images); bad settings are a `UsageError`.

    `task_types` (e.g. `["digits/sum"]`) keeps only those problem types in the `train` and `test` splits:
    rows are generated in growing batches (deterministic in `seed`) until `n` match. The `ood` split is
    never filtered, since its problem types are held out by design. The noisy experts are drawn over the
    generated rows, before the filter, so the kept rows hold about `noise_rate` of them, not exactly.
    """
    def make(size: int) -> list[dict]:
        try:
            return make_dataset(task_name(spec), split, n=size, seed=seed, expert_style=expert_style,
                                noise_rate=noise_rate, difficulty=difficulty)
        except ValueError as e:
            raise UsageError(f"dataset {spec!r}: {e}") from None

    if not task_types or split == "ood":
        return make(n)
    wanted, size = set(task_types), 2 * n
    while True:
        rows = make(size)
        kept = [r for r in rows if r["task"] in wanted]
        if len(kept) >= n:
            return kept[:n]
        if not kept or size >= 64 * n:
            found = sorted({r["task"] for r in rows})
            raise UsageError(f"dataset {spec!r}: too few rows of task_types {sorted(wanted)} in split {split!r} "
                             f"(types there: {found})")
        size *= 2


def to_hf_dataset(rows: list[dict]):
    """A `datasets.Dataset` in the TRL-ready format: `images` as a list of Image features (PIL on access),
    `prompt` as chat messages, `meta` as a JSON string.

    Built from an arrow table of PNG bytes with a random fingerprint: `Dataset.from_list` would hash every
    image for a cache key an in-memory dataset never uses (about 4x slower).
    """
    import datasets
    import pyarrow as pa
    from datasets.fingerprint import generate_random_fingerprint

    if not rows:
        raise ValueError("rows is empty: nothing to convert")
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "prompt": datasets.List({"role": text, "content": datasets.List({"type": text, "text": text})}),
            "images": datasets.List(datasets.Image()),
            "answer": text,
            "solution": text,
            "task": text,
            "difficulty": datasets.Value("int64"),
            "split": text,
            "meta": text,
        }
    )
    records = []
    for i, row in enumerate(rows):
        missing = [k for k in features if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks columns {missing}")
        record = {k: row[k] for k in features}
        record["prompt"] = [
            {"role": m["role"], "content": [{"type": b["type"], "text": b.get("text")} for b in m["content"]]}
            for m in row["prompt"]
        ]
        record["images"] = [png_dict(image, compress_level=1) for image in row["images"]]  # level 1: faster, no bigger here
        record["meta"] = row["meta"] if isinstance(row["meta"], str) else json.dumps(row["meta"])
        records.append(record)
    table = pa.Table.from_pylist(records, schema=features.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=generate_random_fingerprint())


def task_corpus() -> list[str]:
    """Text covering every word the tasks can produce (questions with the instruction, all expert styles,
    answers, option letters), to train the tiny models' tokenizer. A few thousand unique strings."""
    texts: set[str] = set()
    for task in ("digits", "shapes"):
        for split in SPLITS:
            for style in STYLES:
                for row in make_dataset(task, split, n=80, seed=1, expert_style=style, noise_rate=0.5):
                    texts.add(row["prompt"][0]["content"][-1]["text"])
                    texts.add(row["solution"])
                    texts.add(row["answer"])
    texts.update(LETTERS)
    texts.update(str(k) for k in range(-20, 200))
    return sorted(texts)


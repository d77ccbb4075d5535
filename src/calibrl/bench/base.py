"""What every benchmark shares: where its copy lives, how an item is judged, how images are interleaved.

A benchmark family subclasses `Benchmark` and fills in `load` (published rows -> `Item`s), and optionally
`groups` (the breakdowns it reports) and `extra_metrics` (aggregates beyond accuracy, e.g. WeMath's).
The prompt is the benchmark's own rendering of the question followed by the paper's reasoning
instruction (`calibrl.tasks.common.INSTRUCTION`: `<think>` / `<answer>` tags).
"""

from __future__ import annotations

import os
import re
from typing import Any

from calibrl.bench.data import BenchDataError, ImageRef, Item
from calibrl.bench.scoring import (LETTERS, choice_of, gold_list, match_expression, match_list, match_mmmu_open,
                                   match_numeric)
from calibrl.tasks.common import INSTRUCTION

__all__ = ["Benchmark", "interleave", "judge", "options_block", "with_instruction"]


class Benchmark:
    """One benchmark: its name, the folder and hub release it is read from, its default split, its rules."""

    name: str = ""
    title: str = ""
    folders: tuple[str, ...] = ()  # folder names tried under --bench-dir (the hub repo's name first)
    source: str = ""  # the hub release whose layout is read
    split: str = "test"
    headline: str = "accuracy"  # the number of the summary table

    def locate(self, bench_dir: str) -> str:
        for folder in self.folders + (self.name,):
            path = os.path.join(bench_dir, folder)
            if os.path.isdir(path):
                return path
        raise BenchDataError(f"{self.name}: no folder {self.folders[0]} in {bench_dir} (download {self.source} "
                             f"there: huggingface-cli download {self.source} --repo-type dataset "
                             f"--local-dir {os.path.join(bench_dir, self.folders[0])})")

    def load(self, root: str, split: str) -> list[Item]:
        raise NotImplementedError

    def groups(self, item: Item) -> dict[str, list[str]]:
        """Breakdown name -> the group keys this item belongs to (several for MathVista's skills)."""
        return {}

    def extra_metrics(self, items: list[Item], correct: dict[str, bool]) -> dict[str, float]:
        """Benchmark-specific aggregates computed from per-item correctness (empty for plain accuracy)."""
        return {}

    def judge(self, item: Item, answer: str | None) -> bool:
        return judge(item, answer)


def judge(item: Item, answer: str | None) -> bool:
    """Whether an extracted answer is right for `item`, by the item's kind (see docs/EVALUATION.md)."""
    if answer is None or not str(answer).strip():
        return False
    kind, meta = item.kind, item.meta
    if kind == "choice":
        picked = choice_of(answer, item.options, meta.get("n_options"))
        return picked is not None and picked in {g.strip().upper() for g in gold_list(item.gold)}
    if kind == "numeric":
        return match_numeric(answer, item.gold, precision=meta.get("precision"), integer=meta.get("integer", False),
                             unit=meta.get("unit"))
    if kind == "list":
        return match_list(answer, item.gold)
    if kind == "mmmu_open":
        return match_mmmu_open(answer, item.gold)
    if kind == "expression":
        if match_expression(answer, item.gold):
            return True
        letter = meta.get("gold_letter")  # a free-form benchmark that also lists choices (Geometry3K)
        return bool(letter and item.options and choice_of(answer, item.options) == letter)
    raise ValueError(f"unknown item kind {kind!r}")


def options_block(options: list[str], style: str = "({letter}) {text}") -> str:
    """'Choices:\\n(A) 1\\n(B) 2' (empty when there are no options)."""
    if not options:
        return ""
    return "Choices:\n" + "\n".join(style.format(letter=LETTERS[i], text=o) for i, o in enumerate(options))


def interleave(text: str, images: dict[int, ImageRef], pattern: str, where: str) -> list:
    """Segments of `text` with each image placeholder (`pattern` has one group: the image's number)
    replaced by that image, in reading order; images no placeholder names go first. A placeholder naming
    an image the row does not have is an error."""
    segments: list[Any] = []
    used: set[int] = set()
    pos = 0
    for m in re.finditer(pattern, text):
        number = int(m.group(1))
        if number not in images:
            raise BenchDataError(f"{where}: the text names {m.group(0)!r} but that image is empty")
        if m.start() > pos:
            segments.append(text[pos : m.start()])
        segments.append(images[number])
        used.add(number)
        pos = m.end()
    if pos < len(text):
        segments.append(text[pos:])
    unused = [images[k] for k in sorted(images) if k not in used]
    return unused + segments


def with_instruction(segments: list) -> list:
    """The benchmark's rendering followed by the paper's reasoning instruction on its own line."""
    if segments and isinstance(segments[-1], str):
        return segments[:-1] + [segments[-1].rstrip() + "\n" + INSTRUCTION]
    return segments + ["\n" + INSTRUCTION]

"""ScienceQA-IMG: the ScienceQA questions that come with an image; accuracy per subject and grade band.

Layout read: `ScienceQA-IMG/<split>-*.parquet` (lmms-lab/ScienceQA; test: 2,017 rows), or the full
derek-thomas/ScienceQA `data/<split>-*.parquet` of which the rows with an image are kept. Columns image
(Image struct, null for text-only rows), question, choices (list of strings), answer (the index of the
right choice), hint (the context), task, grade ("grade1" ... "grade12"), subject (natural / social /
language science), topic, category, skill, lecture, solution.
"""

from __future__ import annotations

import os
import re

from calibrl.bench.base import Benchmark, options_block, with_instruction
from calibrl.bench.data import BenchDataError, Item, find_files, image_ref, read_parquet_rows
from calibrl.bench.scoring import LETTERS


class ScienceQA(Benchmark):
    name = "scienceqa"
    title = "ScienceQA-IMG"
    folders = ("ScienceQA",)
    source = "lmms-lab/ScienceQA (config ScienceQA-IMG)"
    split = "test"

    def load(self, root: str, split: str) -> list[Item]:
        paths = find_files(root, [f"ScienceQA-IMG/{split}-*.parquet", f"data/{split}-*.parquet"], self.name,
                           f"ScienceQA-IMG/{split}-*.parquet")
        items = []
        for path in paths:
            rows = read_parquet_rows(path, self.name, ["image", "question", "choices", "answer"])
            for i, row in enumerate(rows):
                if row["image"] is None:  # the full release: text-only questions are not part of -IMG
                    continue
                items.append(self._item(row, root, f"{self.name}: {path} row {i}", f"{os.path.basename(path)}:{i}"))
        return items

    def _item(self, row: dict, root: str, where: str, item_id: str) -> Item:
        image = image_ref(row["image"], root, self.name, where)
        choices = [str(c) for c in (row["choices"] or [])]
        answer = row["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise BenchDataError(f"{where}: answer {answer!r} is not the index of one of {len(choices)} choices")
        hint = str(row.get("hint") or "").strip()
        text = "\n".join(p for p in (f"Context: {hint}" if hint else "", str(row["question"]).strip(),
                                     options_block(choices)) if p)
        grade = str(row.get("grade") or "")
        m = re.search(r"\d+", grade)
        band = ("G1-6" if int(m.group()) <= 6 else "G7-12") if m else None
        return Item(id=item_id, segments=with_instruction([image, text]), gold=LETTERS[answer], kind="choice",
                    options=choices, meta={"subject": row.get("subject"), "grade": band})

    def groups(self, item: Item) -> dict[str, list[str]]:
        return {"subject": [item.meta["subject"]] if item.meta.get("subject") else [],
                "grade": [item.meta["grade"]] if item.meta.get("grade") else []}

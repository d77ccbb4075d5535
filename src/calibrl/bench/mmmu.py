"""MMMU (MMMU/MMMU): 30 subjects, up to 7 images interleaved by `<image n>` placeholders, accuracy per discipline.

Layout read: one folder per subject, `<Subject>/<split>-*.parquet` (validation: 900 rows), or a merged
`data/<split>-*.parquet` (lmms-lab/MMMU). Columns id (`validation_Art_Theory_1`), question, options (a
Python list written as a string), explanation, image_1 ... image_7 (Image structs, null when unused),
img_type, answer (the option letter; for open questions the value, sometimes a list as a string),
topic_difficulty, question_type (multiple-choice / open), subfield. Disciplines and subjects are those of
the release's eval/data_utils.py (DOMAIN_CAT2SUB_CAT).
"""

from __future__ import annotations

import ast
import re

from calibrl.bench.base import Benchmark, interleave, options_block, with_instruction
from calibrl.bench.data import BenchDataError, Item, find_files, image_ref, read_parquet_rows

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
DISCIPLINE_OF = {subject: d for d, subjects in DISCIPLINES.items() for subject in subjects}
MAX_IMAGES = 7


def subject_of(item_id: str, split: str) -> str:
    """'validation_Art_Theory_12' -> 'Art_Theory'."""
    s = item_id[len(split) + 1:] if item_id.startswith(split + "_") else item_id
    return re.sub(r"_\d+$", "", s)


class MMMU(Benchmark):
    name = "mmmu"
    title = "MMMU"
    folders = ("MMMU",)
    source = "MMMU/MMMU"
    split = "validation"

    def load(self, root: str, split: str) -> list[Item]:
        paths = find_files(root, [f"*/{split}-*.parquet", f"data/{split}-*.parquet"], self.name,
                           f"<Subject>/{split}-*.parquet")
        items = []
        for path in paths:
            rows = read_parquet_rows(path, self.name, ["id", "question", "options", "answer", "question_type",
                                                       "image_1"])
            for i, row in enumerate(rows):
                items.append(self._item(row, root, split, f"{self.name}: {path} row {i} (id {row['id']})"))
        return items

    def _item(self, row: dict, root: str, split: str, where: str) -> Item:
        images = {}
        for n in range(1, MAX_IMAGES + 1):
            value = row.get(f"image_{n}")
            if value is not None and (not isinstance(value, dict) or value.get("bytes") or value.get("path")):
                images[n] = image_ref(value, root, self.name, f"{where} image_{n}")
        try:
            options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
        except (ValueError, SyntaxError):
            raise BenchDataError(f"{where}: 'options' is not a Python list: {str(row['options'])[:60]!r}") from None
        options = [str(o) for o in options]
        text = "\n".join(p for p in (str(row["question"]).strip(), options_block(options)) if p)
        segments = interleave(text, images, r"<image (\d+)>", where)
        item_id = str(row["id"])
        subject = subject_of(item_id, split)
        meta = {"subject": subject, "discipline": DISCIPLINE_OF.get(subject, "other"),
                "difficulty": row.get("topic_difficulty"), "question_type": row["question_type"]}
        if row["question_type"] == "multiple-choice" and options:
            kind, gold = "choice", row["answer"]
        else:
            kind, gold = "mmmu_open", row["answer"]
        return Item(id=item_id, segments=with_instruction(segments), gold=gold, kind=kind, options=options,
                    meta=meta)

    def groups(self, item: Item) -> dict[str, list[str]]:
        out = {"discipline": [item.meta["discipline"]], "subject": [item.meta["subject"]]}
        if item.meta.get("difficulty"):
            out["difficulty"] = [str(item.meta["difficulty"])]
        return out

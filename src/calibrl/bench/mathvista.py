"""MathVista (AI4Math/MathVista): parquet rows with `decoded_image`, the published `query`, per-task/skill accuracy.

Layout read: `data/<split>-*.parquet` (testmini: 1,000 rows), columns pid, question, image (a path into
images.zip), decoded_image (Image struct), choices (list or null), unit, precision, answer, question_type
(multi_choice / free_form), answer_type (text / integer / float / list), metadata (struct: task, skills,
grade, context, category, source, ...), query (the question as the authors prompt it: hint, question,
choices). Scoring follows evaluation/calculate_score.py of the release, without its GPT extraction step.
"""

from __future__ import annotations

import math

from calibrl.bench.base import Benchmark, options_block, with_instruction
from calibrl.bench.data import BenchDataError, Item, decoded_image, find_files, read_parquet_rows
from calibrl.bench.scoring import LETTERS

_HINTS = {
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                    "at the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.",
    1: "Hint: Please answer the question requiring a floating-point number with one decimal place and provide "
       "the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    2: "Hint: Please answer the question requiring a floating-point number with two decimal places and provide "
       "the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, "
            "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


def _precision(value) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def build_query(row: dict) -> str:
    """The published `query` layout (hint, 'Question: ...', '(Unit: ...)', choices), for rows without one."""
    qtype, atype = row.get("question_type"), row.get("answer_type")
    key = "multi_choice" if qtype == "multi_choice" else (_precision(row.get("precision")) if atype == "float"
                                                          else atype)
    hint = _HINTS.get(key, "Hint: Please answer the question and provide the final answer at the end.")
    question = f"Question: {row['question']}"
    if row.get("unit"):
        question += f" (Unit: {row['unit']})"
    return "\n".join(p for p in (hint, question, options_block(list(row.get("choices") or []))) if p)


class MathVista(Benchmark):
    name = "mathvista"
    title = "MathVista"
    folders = ("MathVista",)
    source = "AI4Math/MathVista"
    split = "testmini"
    use_query = True  # the published `query` field; False renders question + choices with the same hints

    def load(self, root: str, split: str) -> list[Item]:
        items = []
        for path in find_files(root, [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.parquet"],
                               self.name, f"{split} parquet"):
            rows = read_parquet_rows(path, self.name, ["pid", "question", "answer", "question_type", "answer_type"])
            for i, row in enumerate(rows):
                items.append(self._item(row, root, f"{self.name}: {path} row {i} (pid {row['pid']})"))
        return items

    def _item(self, row: dict, root: str, where: str) -> Item:
        image = decoded_image(row, root, self.name, where)
        text = row.get("query") if self.use_query and row.get("query") else build_query(row)
        choices = [str(c) for c in (row.get("choices") or [])]
        meta = dict(row.get("metadata") or {})
        meta = {"task": meta.get("task"), "skills": list(meta.get("skills") or []), "grade": meta.get("grade"),
                "context": meta.get("context"), "source": meta.get("source"),
                "question_type": row["question_type"], "answer_type": row["answer_type"]}
        answer = str(row["answer"])
        if row["question_type"] == "multi_choice":
            if answer not in choices:
                raise BenchDataError(f"{where}: answer {answer!r} is not one of the choices {choices}")
            kind, gold = "choice", LETTERS[choices.index(answer)]
        elif row["answer_type"] == "integer":
            kind, gold = "numeric", answer
            meta["integer"] = True
        elif row["answer_type"] == "float":
            kind, gold = "numeric", answer
            meta["precision"] = _precision(row.get("precision"))
        elif row["answer_type"] == "list":
            kind, gold = "list", answer
        else:
            kind, gold = "expression", answer
        meta["unit"] = row.get("unit") or None
        return Item(id=str(row["pid"]), segments=with_instruction([image, text]), gold=gold, kind=kind,
                    options=choices, meta=meta)

    def groups(self, item: Item) -> dict[str, list[str]]:
        return {"task": [item.meta["task"]] if item.meta.get("task") else [],
                "skill": list(item.meta.get("skills") or []),
                "question_type": [item.meta["question_type"]]}

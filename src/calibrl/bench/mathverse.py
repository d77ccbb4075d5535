"""MathVerse (AI4Math/MathVerse): one problem in up to six versions, accuracy per version.

Layout read: `testmini.parquet` (3,940 rows: Text Dominant, Text Lite, Vision Intensive, Vision Dominant,
Vision Only) or `testmini_text_only.parquet` (`--bench-split mathverse=testmini_text_only`), else the
JSON release (`testmini.json` + the image folders). Columns sample_index, problem_index, problem_version,
question, image (Image struct; a file name in the JSON release), answer (the option letter for
multi-choice), question_type (multi-choice / free-form), metadata (split, source, subject, subfield),
query_wo, query_cot, question_for_eval. Multi-choice options are read back from the question text
("Choices:\\nA:2\\nB:..."); in Vision Only the question (and its options) are drawn in the image.
"""

from __future__ import annotations

import os
import re

from calibrl.bench.base import Benchmark, with_instruction
from calibrl.bench.data import BenchDataError, Item, find_files, image_ref, read_rows

_OPTION = re.compile(r"^\s*\(?([A-H])\)?\s*[:.：．)]\s*(.*?)\s*$")
_CHOICES_HEAD = re.compile(r"\n\s*Choices?\s*:\s*\n", re.IGNORECASE)
VISION_ONLY_TEXT = "The question and its choices, if any, are shown in the image."


def options_from_text(question: str) -> list[str]:
    """Option texts listed after 'Choices:' in a question, one per line as 'A:text' / 'A. text' / '(A) text'."""
    parts = _CHOICES_HEAD.split(question, maxsplit=1)
    if len(parts) < 2:
        return []
    options = []
    for line in parts[1].splitlines():
        m = _OPTION.match(line)
        if m and m.group(1) == "ABCDEFGH"[len(options)]:
            options.append(m.group(2))
        elif line.strip() and options:  # a wrapped option text continues the previous option
            options[-1] = (options[-1] + " " + line.strip()).strip()
    return options


class MathVerse(Benchmark):
    name = "mathverse"
    title = "MathVerse"
    folders = ("MathVerse",)
    source = "AI4Math/MathVerse"
    split = "testmini"

    def load(self, root: str, split: str) -> list[Item]:
        paths = find_files(root, [f"{split}.parquet", f"data/{split}-*.parquet", f"{split}.json"], self.name,
                           f"{split}.parquet or {split}.json")
        needed = ["sample_index", "problem_version", "question", "image", "answer", "question_type"]
        items = []
        for path in paths:
            rows = read_rows(path, self.name, needed)
            for i, row in enumerate(rows):
                items.append(self._item(row, root, f"{self.name}: {os.path.basename(path)} row {i} "
                                                   f"(sample_index {row['sample_index']})"))
        return items

    def _image(self, row: dict, root: str, where: str):
        value = row.get("image")
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            return image_ref(value, root, self.name, where)
        if isinstance(value, str) and value.strip():  # the JSON release: a file name in one of the image folders
            for folder in ("", "images", "images_version_1-4", "images_version_5", "images_version_6"):
                candidate = os.path.join(root, folder, value)
                if os.path.isfile(candidate):
                    return image_ref(candidate, root, self.name, where)
            return image_ref(value, root, self.name, where)  # raises: names the missing file
        return None

    def _item(self, row: dict, root: str, where: str) -> Item:
        version = str(row["problem_version"])
        image = self._image(row, root, where)
        if image is None and version != "Text Only":
            raise BenchDataError(f"{where}: version {version!r} needs an image but 'image' is empty")
        question = str(row["question"] or "").strip()
        text = question or VISION_ONLY_TEXT
        answer = str(row["answer"]).strip()
        meta = dict(row.get("metadata") or {})
        meta = {"version": version, "subject": meta.get("subject"), "subfield": meta.get("subfield"),
                "problem_index": str(row.get("problem_index"))}
        options: list[str] = []
        if row["question_type"] == "multi-choice":
            options = options_from_text(question)
            if len(answer) == 1 and answer.upper() in "ABCDEFGH":
                kind, gold = "choice", answer.upper()
            elif options and answer in options:
                kind, gold = "choice", "ABCDEFGH"[options.index(answer)]
            else:
                kind, gold = "expression", answer  # an option text whose options we cannot see
        else:
            kind, gold = "expression", answer
        segments = ([image] if image is not None else []) + [text]
        return Item(id=str(row["sample_index"]), segments=with_instruction(segments), gold=gold, kind=kind,
                    options=options, meta=meta)

    def groups(self, item: Item) -> dict[str, list[str]]:
        return {"version": [item.meta["version"]],
                "subfield": [item.meta["subfield"]] if item.meta.get("subfield") else []}

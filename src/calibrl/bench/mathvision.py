"""MATH-Vision (MathLLMs/MathVision): competition problems, options or free-form, accuracy per subject and level.

Layout read: `data/<split>-*.parquet` (test: 3,040 rows; testmini: 304), columns id, question (with an
`<image1>` placeholder), options (list of strings, empty for free-form), image (a path into images.zip),
decoded_image (Image struct), answer (the option letter, or the value), solution, level (int), subject.
"""

from __future__ import annotations

from calibrl.bench.base import Benchmark, interleave, options_block, with_instruction
from calibrl.bench.data import BenchDataError, Item, decoded_image, find_files, read_parquet_rows
from calibrl.bench.scoring import LETTERS


class MathVision(Benchmark):
    name = "mathvision"
    title = "MATH-Vision"
    folders = ("MathVision", "MATH-Vision")
    source = "MathLLMs/MathVision"
    split = "test"

    def load(self, root: str, split: str) -> list[Item]:
        items = []
        for path in find_files(root, [f"data/{split}-*.parquet", f"{split}-*.parquet"], self.name,
                               f"{split} parquet"):
            rows = read_parquet_rows(path, self.name, ["id", "question", "options", "answer"])
            for i, row in enumerate(rows):
                items.append(self._item(row, root, f"{self.name}: {path} row {i} (id {row['id']})"))
        return items

    def _item(self, row: dict, root: str, where: str) -> Item:
        image = decoded_image(row, root, self.name, where)
        options = [str(o) for o in (row.get("options") or [])]
        text = "\n".join(p for p in (str(row["question"]).strip(), options_block(options)) if p)
        answer = str(row["answer"]).strip()
        if options:
            if len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
                kind, gold = "choice", answer.upper()
            elif answer in options:
                kind, gold = "choice", LETTERS[options.index(answer)]
            else:
                raise BenchDataError(f"{where}: answer {answer!r} is neither an option letter nor an option")
        else:
            kind, gold = "expression", answer
        segments = interleave(text, {1: image}, r"<image(\d+)>", where)
        return Item(id=str(row["id"]), segments=with_instruction(segments), gold=gold, kind=kind, options=options,
                    meta={"subject": row.get("subject"), "level": row.get("level")})

    def groups(self, item: Item) -> dict[str, list[str]]:
        out = {"subject": [str(item.meta["subject"])] if item.meta.get("subject") else []}
        out["level"] = [f"level {item.meta['level']}"] if item.meta.get("level") is not None else []
        return out

"""We-Math (We-Math/We-Math): multi-step problems and their one-step sub-problems; IK, IG, CM, RM and the scores.

Layout read: `data/<split>-*.parquet` (image_path is an Image struct), else `<split>.json` with the
images unzipped beside it (image_path a relative path). Columns ID (shared by a problem and its
sub-problems), split, knowledge concept, question, option ("A. ...; B. ..."), answer (a letter),
image_path, key ("2steps_1", "2steps_2", "2steps_multi", "3steps_1" ... "3steps_multi"), question number,
knowledge concept description.

The four-dimensional metrics follow evaluation/four_dimensional_metrics.py of the release: for each
multi-step problem (its `<n>steps_multi` row) with all its sub-problems (`<n>steps_1..n`):
IK (insufficient knowledge): some sub-problem wrong and the problem wrong; IG (inadequate
generalisation): every sub-problem right, the problem wrong; CM (complete mastery): strict every
sub-problem right, loose at least one, and the problem right; RM (rote memorisation): strict some
sub-problem wrong, loose every sub-problem wrong, and the problem right. IK, IG, CM are shares of the
problems, RM a share of CM + RM; score = (N - 0.5 IG - RM - IK) / N. The release fixes N = 525 (the
testmini problems); here N is the number of complete problems read, the same on the full testmini.
"""

from __future__ import annotations

import os
import re

from calibrl.bench.base import Benchmark, with_instruction
from calibrl.bench.data import BenchDataError, Item, find_files, image_ref, read_rows

_KEY = re.compile(r"(\d)steps_(\d+|multi)")
_OPTION_SPLIT = re.compile(r";\s*(?=[A-H]\s*[.:．])")
_OPTION = re.compile(r"^\s*([A-H])\s*[.:．]\s*(.*?)\s*$", re.DOTALL)


def options_from_string(option: str) -> list[str]:
    """'A. 1cm; B. 2cm; C. No correct answer' -> ['1cm', '2cm', 'No correct answer']."""
    out = []
    for part in _OPTION_SPLIT.split(str(option).strip()):
        m = _OPTION.match(part)
        if not m or m.group(1) != "ABCDEFGH"[len(out)]:
            return []
        out.append(m.group(2))
    return out


def four_dimensional(problems: list[tuple[list[bool], bool]]) -> dict[str, float]:
    """IK, IG, CM, RM (strict and loose) and the two scores from (sub-problem results, problem result) pairs."""
    n = len(problems)
    counts = dict.fromkeys(("IK", "IG", "CM_strict", "CM_loose", "RM_strict", "RM_loose"), 0)
    for steps, multi in problems:
        every, some = all(steps), any(steps)
        counts["IK"] += (not every) and not multi
        counts["IG"] += every and not multi
        counts["CM_strict"] += every and multi
        counts["CM_loose"] += some and multi
        counts["RM_strict"] += (not every) and multi
        counts["RM_loose"] += (not some) and multi
    out: dict[str, float] = {"problems": n}
    if not n:
        return out
    for mode in ("strict", "loose"):
        cm, rm = counts[f"CM_{mode}"], counts[f"RM_{mode}"]
        out[f"score_{mode}"] = (n - 0.5 * counts["IG"] - rm - counts["IK"]) / n
        out[f"CM_{mode}"] = cm / n
        out[f"RM_{mode}"] = rm / (cm + rm) if cm + rm else 0.0
    out["IK"] = counts["IK"] / n
    out["IG"] = counts["IG"] / n
    return out


class WeMath(Benchmark):
    name = "wemath"
    title = "We-Math"
    folders = ("We-Math", "WeMath")
    source = "We-Math/We-Math"
    split = "testmini"
    headline = "score_strict"

    def load(self, root: str, split: str) -> list[Item]:
        paths = find_files(root, [f"data/{split}-*.parquet", f"{split}-*.parquet", f"{split}.json"], self.name,
                           f"data/{split}-*.parquet or {split}.json")
        needed = ["ID", "question", "option", "answer", "image_path", "key"]
        items, seen = [], set()
        for path in paths:
            rows = read_rows(path, self.name, needed)
            for i, row in enumerate(rows):
                item = self._item(row, root, split, f"{self.name}: {os.path.basename(path)} row {i} (ID {row['ID']}, "
                                                    f"key {row['key']})")
                if item.id in seen:
                    raise BenchDataError(f"{self.name}: {path} row {i}: ID {row['ID']} with key {row['key']} twice")
                seen.add(item.id)
                items.append(item)
        return items

    def _image(self, value, root: str, split: str, where: str):
        if isinstance(value, str):  # the JSON release: a path relative to the unzipped image folder
            for candidate in (value, os.path.join(split, value), os.path.join("images", os.path.basename(value))):
                if os.path.isfile(os.path.join(root, candidate)):
                    return image_ref(candidate, root, self.name, where)
        return image_ref(value, root, self.name, where)

    def _item(self, row: dict, root: str, split: str, where: str) -> Item:
        image = self._image(row["image_path"], root, split, where)
        options = options_from_string(row["option"])
        answer = str(row["answer"]).strip().upper()
        if not options or answer not in "ABCDEFGH"[: len(options)] or len(answer) != 1:
            raise BenchDataError(f"{where}: answer {row['answer']!r} is not the letter of an option in "
                                 f"{str(row['option'])[:80]!r}")
        text = f"{str(row['question']).strip()}\n{str(row['option']).strip()}"
        key = str(row["key"])
        m = _KEY.fullmatch(key)
        meta = {"group": str(row["ID"]), "key": key, "concept": row.get("knowledge concept"),
                "steps": int(m.group(1)) if m else None, "part": m.group(2) if m else None}
        return Item(id=f"{row['ID']}:{key}", segments=with_instruction([image, text]), gold=answer, kind="choice",
                    options=options, meta=meta)

    def groups(self, item: Item) -> dict[str, list[str]]:
        part, steps = item.meta.get("part"), item.meta.get("steps")
        if part is None:
            return {"type": ["other"]}
        return {"type": [f"S{steps} ({steps}-step problem)" if part == "multi" else "S1 (one-step sub-problem)"]}

    def extra_metrics(self, items: list[Item], correct: dict[str, bool]) -> dict[str, float]:
        problems: dict[tuple[int, str], dict[str, bool]] = {}
        for item in items:
            if item.meta.get("part") is not None and item.id in correct:
                problems.setdefault((item.meta["steps"], item.meta["group"]), {})[item.meta["part"]] = correct[item.id]
        complete = []
        for (steps, _), parts in sorted(problems.items()):
            if set(parts) == {str(i) for i in range(1, steps + 1)} | {"multi"}:
                complete.append(([parts[str(i)] for i in range(1, steps + 1)], parts["multi"]))
        out = four_dimensional(complete)
        out["problems_incomplete"] = len(problems) - len(complete)
        return out

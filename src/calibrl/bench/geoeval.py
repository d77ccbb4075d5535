"""GeoEval (Zhang et al. 2024): geometry problems from seven public datasets; accuracy per subset, per source
dataset and per input (with a diagram / text only), as the release reports its A / T numbers.

Source: GeoEval/GeoEval on GitHub. The data itself is not in the repository: its README links a download
(Baidu pan, password on request with the "GeoEval Dataset Application Form" in the repository), so the
layout below is the one the release's own code reads (tool/data_loader.py, tool/merge_key_val.py,
tool/caculate_score.py, run_llm_response.py, sh_files/*/eval*_config.yaml), not a dataset card.

Layout read: one JSON object per subset, problem id -> row, in `dataset_merge/` (the release's
`LLM_eval/dataset_merge/`; the folder itself is accepted too):

| subset (`--bench-split geoeval=...`) | file | problems the scorer expects |
|---|---|---|
| `main` (GeoEval-2000, the default) | `select.json` | 2,000 |
| `backward` (GeoEval-backward) | `backward_aug.json` | 300 (the paper says 750) |
| `aug` (GeoEval-aug) | `aug.json` | 400 (the paper says 2,000) |
| `hard` (GeoEval-hard, solid and analytic geometry) | `solid.json` | 300 |
| `all` | every subset file present | |

Fields read: `text` (dict: `Num_Exp`, the problem; `aug_problem`, its GPT-3.5 rephrasing in the aug
subset), `backward_text` and `backward_answer_value` (the backward subset: a number of the problem is
masked as x, the original answer is given), `choice_list` (list, null entries dropped), `answer_value`
(the value; in the hard subset an option letter), `diagram_name` (null for text-only problems),
`diagram_description` (null, or dict: `structure`, `semantic`, `backward_semantic` lists), and for the
breakdowns `dataset_name` (Geometry3K, PGPS9K, UniGeo, GeoQA+, GeometryQA, MathQA, MATH-Geometry, ...) and
`geometry_shape`. Where the diagram files sit is not stated anywhere public: `diagram_name` is looked up
beside the JSON, in an `images/` folder beside it, then the same under the GeoEval folder.
"""

from __future__ import annotations

import os
import re
from typing import Any

from calibrl.bench.base import Benchmark, with_instruction
from calibrl.bench.data import BenchDataError, ImageRef, Item, find_files, image_ref, read_json_keyed
from calibrl.bench.scoring import LETTERS, choice_of, match_expression, match_numeric, parse_number

SUBSET_FILES = {"main": "select.json", "backward": "backward_aug.json", "aug": "aug.json", "hard": "solid.json"}
SUBSET_TITLES = {"main": "GeoEval-2000", "backward": "GeoEval-backward", "aug": "GeoEval-aug", "hard": "GeoEval-hard"}
ABS_TOL = 1e-3  # the release's safe_equal: |prediction - answer| < 1e-3
_LETTER = re.compile(r"^\(?([A-D])\)?\.?$")  # a gold written as an option letter
# The prefixes of the release's rendering (naive_merge in tool/merge_key_val.py)
DIAGRAM_PREFIX = "Here are the basic description of the diagram: "
CHOICE_PREFIX = "The Choices are: "


class GeoEval(Benchmark):
    name = "geoeval"
    title = "GeoEval"
    folders = ("GeoEval",)
    source = "GeoEval/GeoEval (GitHub; data by application, LLM_eval/dataset_merge/*.json)"
    split = "main"
    # The release's text description of the diagram is given when there is no image to show; True: always
    with_description = False

    def locate(self, bench_dir: str) -> str:
        try:
            return super().locate(bench_dir)
        except BenchDataError:
            raise BenchDataError(f"{self.name}: no folder GeoEval in {bench_dir} (put the release's dataset_merge/ "
                                 f"there, with the diagrams its rows name; see github.com/GeoEval/GeoEval)") from None

    def load(self, root: str, split: str) -> list[Item]:
        if split == "all":
            subsets = [s for s, f in SUBSET_FILES.items()
                       if any(os.path.isfile(os.path.join(root, d, f)) for d in ("dataset_merge", ""))]
            if not subsets:
                raise BenchDataError(f"{self.name}: no subset file in {root} (looked for "
                                     f"{', '.join('dataset_merge/' + f for f in SUBSET_FILES.values())})")
        elif split in SUBSET_FILES:
            subsets = [split]
        else:
            raise BenchDataError(f"{self.name}: no split {split!r} (expected one of {', '.join(SUBSET_FILES)} or all)")
        items = []
        for subset in subsets:
            file = SUBSET_FILES[subset]
            path = find_files(root, [f"dataset_merge/{file}", file], self.name, f"dataset_merge/{file}")[0]
            for key, row in read_json_keyed(path, self.name):
                item_id = key if len(subsets) == 1 else f"{subset}/{key}"
                items.append(self._item(row, subset, item_id, root, path, f"{self.name}: {path} problem {key}"))
        return items

    def _item(self, row: dict, subset: str, item_id: str, root: str, path: str, where: str) -> Item:
        backward = subset == "backward"
        text_field, gold_field = ("backward_text", "backward_answer_value") if backward else ("text", "answer_value")
        for field in (text_field, gold_field, "diagram_name"):
            if field not in row:
                raise BenchDataError(f"{where} has no field {field!r}")
        problem = self._problem_text(row, subset, text_field, where)
        options = [str(c).strip() for c in (row.get("choice_list") or []) if c is not None] if not backward else []
        gold = _value(row[gold_field], f"{where}: {gold_field!r}")

        letter = None
        if options:
            m = _LETTER.match(gold)
            if m and LETTERS.index(m.group(1)) < len(options) and gold not in options:  # a letter (the hard subset)
                letter, gold = m.group(1), options[LETTERS.index(m.group(1))]
            else:
                letter = choice_of(gold, options)  # the option holding the value, when exactly one does

        image = self._diagram(row["diagram_name"], root, path, where)
        description = row.get("diagram_description")
        parts = []
        if description and (image is None or self.with_description):
            parts.append(DIAGRAM_PREFIX + _description(description, backward, where))
        parts.append(problem)
        if options:
            parts.append(CHOICE_PREFIX + "[" + ", ".join(options) + "]")
        segments = ([image] if image is not None else []) + ["\n".join(parts)]
        meta = {"subset": SUBSET_TITLES[subset], "source": row.get("dataset_name"),
                "input": "diagram" if image is not None else "text", "shape": row.get("geometry_shape"),
                "gold_letter": letter}
        kind = "numeric" if parse_number(gold) is not None else "expression"  # both judged by `GeoEval.judge`
        return Item(id=item_id, segments=with_instruction(segments), gold=gold, kind=kind, options=options, meta=meta)

    @staticmethod
    def _problem_text(row: dict, subset: str, text_field: str, where: str) -> str:
        """`backward_text` (a string), else `text.aug_problem` (aug) or `text.Num_Exp` (main, hard)."""
        value, name = row[text_field], text_field
        if subset != "backward":
            key = "aug_problem" if subset == "aug" else "Num_Exp"
            if not isinstance(value, dict) or key not in value:
                raise BenchDataError(f"{where}: 'text' has no {key!r}")
            value, name = value[key], f"text.{key}"
        if not isinstance(value, str) or not value.strip():
            raise BenchDataError(f"{where}: {name!r} is not a problem text (got {type(value).__name__})")
        return value.strip()

    def _diagram(self, diagram_name: Any, root: str, path: str, where: str) -> ImageRef | None:
        if diagram_name is None or diagram_name == "":
            return None
        if not isinstance(diagram_name, str):
            raise BenchDataError(f"{where}: 'diagram_name' is not a file name (got {type(diagram_name).__name__})")
        here = os.path.dirname(path)
        folders = list(dict.fromkeys((here, os.path.join(here, "images"), root, os.path.join(root, "images"))))
        found = next((os.path.join(d, diagram_name) for d in folders if os.path.isfile(os.path.join(d, diagram_name))),
                     None)
        if found is None:
            looked = ", ".join(os.path.relpath(d, root) + "/" for d in folders)
            raise BenchDataError(f"{where}: diagram {diagram_name} not found under {root} (looked in {looked})")
        return image_ref(os.path.abspath(found), root, self.name, where.removeprefix(f"{self.name}: "))

    def judge(self, item: Item, answer: str | None) -> bool:
        """The option letter (or the option's text) of the right choice; else the value within the release's
        1e-3, or math-verify equality for expressions and coordinates."""
        if answer is None or not str(answer).strip():
            return False
        letter = item.meta.get("gold_letter")
        if item.options and letter and choice_of(answer, item.options) == letter:
            return True
        if parse_number(item.gold) is not None and parse_number(answer) is not None:
            return match_numeric(answer, item.gold, abs_tol=ABS_TOL)
        return match_expression(answer, item.gold)

    def groups(self, item: Item) -> dict[str, list[str]]:
        return {key: [str(item.meta[key])] if item.meta.get(key) else [] for key in ("subset", "source", "input",
                                                                                        "shape")}


def _value(value: Any, where: str) -> str:
    """A gold as text: a string, or a number as the release stores some (an integral float without '.0')."""
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise BenchDataError(f"{where} is not an answer (got {value!r})")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if not text:
        raise BenchDataError(f"{where} is empty")
    return text


def _description(description: Any, backward: bool, where: str) -> str:
    """The release's rendering of a diagram description: the structure clauses, then the semantic ones."""
    if not isinstance(description, dict):
        raise BenchDataError(f"{where}: 'diagram_description' is not a dict (got {type(description).__name__})")
    semantic_key = "backward_semantic" if backward and "backward_semantic" in description else "semantic"
    if "structure" not in description or semantic_key not in description:
        raise BenchDataError(f"{where}: 'diagram_description' has no 'structure' / {semantic_key!r} lists")
    return ", ".join(map(str, description["structure"] or [])) + "\n" + ", ".join(
        map(str, description[semantic_key] or []))

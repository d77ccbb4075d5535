"""The in-domain geometry benchmarks: Geometry3K (hiyouga/geometry3k) and GeoQA (R1-V's test prompts).

Geometry3K: `data/<split>-*.parquet` (test: 601 rows), columns images (a list of Image structs), problem
(with an `<image>` placeholder), answer (the value), and in the release also id, choices (the four
options) and ground_truth (the option letter). Scored as an expression (math-verify), or by the option
letter when the model answers with one.

GeoQA: `geoqa_test_prompts.jsonl` (R1-V, src/eval/prompts; 754 rows), fields image_path (relative to
this folder, e.g. ./Geo170K/images/test/0.png), question, ground_truth ("140°", "3cm", "9米"). Scored
as an expression with the unit dropped, as R1-V's math-verify check does in effect.
"""

from __future__ import annotations

import os

from calibrl.bench.base import Benchmark, interleave, with_instruction
from calibrl.bench.data import BenchDataError, Item, find_files, image_ref, read_json_rows, read_parquet_rows
from calibrl.bench.scoring import LETTERS


class Geometry3K(Benchmark):
    name = "geometry3k"
    title = "Geometry3K"
    folders = ("geometry3k", "Geometry3K")
    source = "hiyouga/geometry3k"
    split = "test"

    def load(self, root: str, split: str) -> list[Item]:
        items = []
        for path in find_files(root, [f"data/{split}-*.parquet", f"{split}-*.parquet"], self.name,
                               f"{split} parquet"):
            for i, row in enumerate(read_parquet_rows(path, self.name, ["images", "problem", "answer"])):
                item_id = str(row["id"]) if row.get("id") is not None else f"{os.path.basename(path)}:{i}"
                where = f"{self.name}: {path} row {i}"
                stored = list(row["images"] or [])
                if not stored:
                    raise BenchDataError(f"{where}: 'images' is empty")
                images = [image_ref(v, root, self.name, where) for v in stored]
                # '<image>' placeholders are numbered in order of appearance, so they pick images in order
                text, k = str(row["problem"]), 0
                while "<image>" in text:
                    k += 1
                    text = text.replace("<image>", f"<image {k}>", 1)
                segments = interleave(text.strip(), {n + 1: im for n, im in enumerate(images)}, r"<image (\d+)>",
                                      where)
                options = [str(c) for c in (row.get("choices") or [])]
                letter = row.get("ground_truth")
                letter = letter if options and isinstance(letter, str) and letter in LETTERS[: len(options)] else None
                items.append(Item(id=item_id, segments=with_instruction(segments), gold=str(row["answer"]),
                                  kind="expression", options=options, meta={"gold_letter": letter}))
        return items


class GeoQA(Benchmark):
    name = "geoqa"
    title = "GeoQA"
    folders = ("GeoQA", "geoqa")
    source = "R1-V src/eval/prompts/geoqa_test_prompts.jsonl + Luckyjhg/Geo170K images"
    split = "test"

    def locate(self, bench_dir: str) -> str:
        try:
            return super().locate(bench_dir)
        except BenchDataError:
            raise BenchDataError(f"{self.name}: no folder GeoQA in {bench_dir} (put R1-V's geoqa_test_prompts.jsonl "
                                 f"there with the Geo170K images it names)") from None

    def load(self, root: str, split: str) -> list[Item]:
        items = []
        for path in find_files(root, [f"geoqa_{split}_prompts.jsonl", f"*{split}*.jsonl"], self.name,
                               f"geoqa_{split}_prompts.jsonl"):
            for i, row in enumerate(read_json_rows(path, self.name)):
                where = f"{self.name}: {os.path.basename(path)} line {i + 1}"
                missing = [c for c in ("image_path", "question", "ground_truth") if c not in row]
                if missing:
                    raise BenchDataError(f"{where} has no field {missing[0]!r}")
                image = image_ref(os.path.normpath(str(row["image_path"])), root, self.name, where)
                item_id = os.path.splitext(os.path.basename(str(row["image_path"])))[0] or str(i)
                items.append(Item(id=item_id, segments=with_instruction([image, str(row["question"]).strip()]),
                                  gold=str(row["ground_truth"]), kind="expression"))
        return items

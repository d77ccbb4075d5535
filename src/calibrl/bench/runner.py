"""Run benchmarks for one or more checkpoints: batched generation, predictions written as they come, resume.

For each (model, benchmark) the predictions live in `OUT/<model>/<benchmark>.jsonl`, one line per question:
id, prompt (the user turn, `<image>` where an image goes), completion (greedy), extracted answer, gold,
correct, and with pass@k the sampled completions and their correctness. A line is appended as soon as its
batch is generated, so an interrupted run resumes where it stopped: questions already in the file are not
generated again (a half-written last line is dropped). `<benchmark>.settings.json` beside it records the
generation settings; resuming with other settings is refused rather than mixing them. At the end every row
is scored again from its completion and the file rewritten, so each reported number is the aggregate of
the rows in the files, whatever scorer version generated them.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from calibrl.bench.base import Benchmark
from calibrl.bench.data import BenchDataError, ImageRef, Item
from calibrl.bench.registry import BENCHMARKS, resolve_names
from calibrl.bench.scoring import extract_final
from calibrl.storage import atomic_write_text

__all__ = ["BenchSettings", "evaluate_benchmarks", "hf_generator", "load_benchmark", "model_slug", "summarize",
           "vllm_generator"]

PROMPT_VERSION = 1  # bump when the rendering of questions changes: old predictions then no longer resume

# A generator takes chat rows (`prompt` + `images`, as calibrl.evaluate.generate_completions does) and
# returns `num_samples` completions per row.
Generator = Callable[[list[dict], int, float, int], list[list[str]]]


@dataclass
class BenchSettings:
    """How completions are generated; every field but `batch_size`/`limit` must match to resume a file."""

    max_new_tokens: int = 1024
    batch_size: int = 8
    k: list[int] = field(default_factory=lambda: [1])
    num_samples: int | None = None  # samples per question for pass@k (default: the largest k)
    temperature: float = 1.0  # for the pass@k samples; the accuracy is greedy
    seed: int = 0
    limit: int | None = None  # first N questions of each benchmark (None: all)
    splits: dict[str, str] = field(default_factory=dict)  # benchmark -> split, overriding its default
    backend: str = "hf"

    def __post_init__(self) -> None:
        self.k = sorted(set(int(x) for x in ([self.k] if isinstance(self.k, int) else self.k)))
        if not self.k or self.k[0] < 1:
            raise ValueError(f"k={self.k} must be positive")
        for name, value in (("max_new_tokens", self.max_new_tokens), ("batch_size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.k[-1] > 1:
            self.num_samples = self.k[-1] if self.num_samples is None else self.num_samples
            if self.num_samples < self.k[-1]:
                raise ValueError(f"num_samples={self.num_samples} is below the largest k={self.k[-1]}")
            if self.temperature <= 0:
                raise ValueError(f"temperature={self.temperature} must be > 0 to sample for pass@k")
        else:
            self.num_samples = 0
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit={self.limit} must be >= 0")

    def identity(self, model: str, bench: str, split: str) -> dict:
        """What a predictions file must have been made with to be resumed."""
        return {"model": model, "bench": bench, "split": split, "max_new_tokens": self.max_new_tokens,
                "num_samples": self.num_samples, "temperature": self.temperature if self.num_samples else None,
                "seed": self.seed, "backend": self.backend, "prompt_version": PROMPT_VERSION}


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def load_benchmark(name: str, bench_dir: str, split: str | None = None, limit: int | None = None) -> list[Item]:
    """The items of benchmark `name` from its copy under `bench_dir` (all of them, or the first `limit`)."""
    bench = BENCHMARKS[name]
    items = bench.load(bench.locate(bench_dir), split or bench.split)
    if not items:
        raise BenchDataError(f"{name}: the {split or bench.split} split under {bench.locate(bench_dir)} has no rows")
    return items[:limit] if limit else items


# ----------------------------------------------------------------------------------------------------------
# Generation backends
# ----------------------------------------------------------------------------------------------------------
def chat_row(item: Item, use_images: bool) -> dict:
    """A chat row for `generate_completions`: the user turn with image blocks where the images go."""
    if not use_images:  # a text-only model sees the text alone
        text = "".join(s for s in item.segments if isinstance(s, str))
        return {"prompt": [{"role": "user", "content": text}]}
    content = [{"type": "image"} if isinstance(s, ImageRef) else {"type": "text", "text": s} for s in item.segments]
    return {"prompt": [{"role": "user", "content": content}], "images": [ref.load() for ref in item.images]}


def hf_generator(model_spec: str, max_new_tokens: int, batch_size: int) -> tuple[Generator, bool]:
    """Generation with transformers through `calibrl.evaluate.generate_completions` (processors, batching)."""
    from calibrl.evaluate import generate_completions
    from calibrl.multimodal import is_processor
    from calibrl.models import load_model

    model, processing_class = load_model(model_spec)

    def generate(rows: list[dict], num_samples: int, temperature: float, seed: int) -> list[list[str]]:
        return generate_completions(model, processing_class, rows, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, num_samples=num_samples, temperature=temperature,
                                    seed=seed)

    return generate, is_processor(processing_class)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def vllm_generator(model_spec: str, max_new_tokens: int, batch_size: int) -> tuple[Generator, bool]:
    """Generation with vLLM (GPU): the processor's chat template, images as multi-modal data."""
    if not vllm_available():
        raise BenchDataError("--vllm needs vLLM, which is not installed (pip install 'calibrl[vllm]' on a CUDA "
                             "host); leave out --vllm to generate with transformers")
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from calibrl.models import resolve_model_path

    path = resolve_model_path(model_spec)
    processor = AutoProcessor.from_pretrained(path)
    llm = LLM(model=path, limit_mm_per_prompt={"image": 8}, max_num_seqs=max(batch_size, 1))

    def generate(rows: list[dict], num_samples: int, temperature: float, seed: int) -> list[list[str]]:
        prompts = []
        for row in rows:
            text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            prompt: dict[str, Any] = {"prompt": text}
            if row.get("images"):
                prompt["multi_modal_data"] = {"image": row["images"]}
            prompts.append(prompt)
        params = SamplingParams(n=num_samples, temperature=temperature, max_tokens=max_new_tokens, seed=seed,
                                top_p=1.0, top_k=-1)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return [[o.text for o in out.outputs] for out in outputs]

    return generate, True


# ----------------------------------------------------------------------------------------------------------
# Predictions files
# ----------------------------------------------------------------------------------------------------------
def model_slug(spec: str) -> str:
    """A folder name for a model spec: 'runs/a/model' -> 'runs_a_model', 'tiny:qwen2_5_vl:nano' -> ..."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.normpath(spec)).strip("._")
    return slug or "model"


def read_predictions(path: str) -> dict[str, dict]:
    """The rows of a predictions file by id; a half-written last line (an interrupted write) is cut off."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    rows: dict[str, dict] = {}
    good_end = 0
    for n, line in enumerate(lines, 1):
        last = n == len(lines)
        if not line.strip():
            good_end += len(line) + (0 if last else 1)
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "id" not in row or "completion" not in row:
                raise ValueError("not a predictions row")
        except ValueError:
            if last or all(not rest.strip() for rest in lines[n:]):
                break  # the interrupted tail: dropped below
            raise BenchDataError(f"{path} line {n} is not a predictions row (delete the file to start over)")
        if last:  # a complete JSON object without its newline: keep it, but end the file properly
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n")
        rows[str(row["id"])] = row
        good_end += len(line) + 1
    if good_end < len(text):
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len(text[:good_end].encode("utf-8")))
    return rows


def _check_settings(path: str, identity: dict) -> None:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                before = json.load(f)
            except json.JSONDecodeError:
                before = {}
        diff = [k for k in identity if before.get(k) != identity[k]]
        if diff:
            k = diff[0]
            raise BenchDataError(f"{os.path.splitext(path)[0].removesuffix('.settings')}.jsonl was made with "
                                 f"{k}={before.get(k)!r}, not {identity[k]!r}: use another --out, or --overwrite "
                                 f"to start over")
    else:
        _write_json(path, identity)


def _write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _score_row(bench: Benchmark, item: Item, row: dict) -> dict:
    """`row` with extracted answers and correctness computed from its completions by `bench`'s rules."""
    extracted = extract_final(row["completion"])
    row.update(extracted=extracted, gold=item.gold, correct=bool(bench.judge(item, extracted)))
    if row.get("samples") is not None:
        row["samples_extracted"] = [extract_final(s) for s in row["samples"]]
        row["samples_correct"] = [bool(bench.judge(item, a)) for a in row["samples_extracted"]]
    return row


# ----------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------
def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def summarize(bench: Benchmark, items: list[Item], rows: dict[str, dict], settings: BenchSettings) -> dict:
    """Accuracy, pass@k, the benchmark's breakdowns and its own aggregate metrics, from scored rows."""
    from calibrl.evaluate import pass_at_k
    from calibrl.rewards import is_strict_format

    correct = {it.id: bool(rows[it.id]["correct"]) for it in items}
    n = len(items)
    accuracy = sum(correct.values()) / n
    out: dict[str, Any] = {
        "n": n, "accuracy": accuracy, "stderr": _stderr(accuracy, n),
        "format_rate": sum(is_strict_format(rows[it.id]["completion"]) for it in items) / n,
        "answered_rate": sum(rows[it.id]["extracted"] is not None for it in items) / n,
    }
    if settings.num_samples:
        for k in settings.k:
            out[f"pass@{k}"] = sum(pass_at_k(len(rows[it.id]["samples_correct"]), sum(rows[it.id]["samples_correct"]),
                                             k) for it in items) / n
    breakdowns: dict[str, dict[str, list[str]]] = {}
    for it in items:
        for grouping, keys in bench.groups(it).items():
            for key in keys:
                breakdowns.setdefault(grouping, {}).setdefault(str(key), []).append(it.id)
    out["breakdowns"] = {
        grouping: {key: {"n": len(ids), "accuracy": sum(correct[i] for i in ids) / len(ids)}
                   for key, ids in sorted(groups.items())}
        for grouping, groups in breakdowns.items()}
    out["metrics"] = bench.extra_metrics(items, correct)
    out["headline"] = bench.headline
    out["score"] = out[bench.headline] if bench.headline in out else out["metrics"].get(bench.headline)
    out["_ids"] = {grouping: groups for grouping, groups in breakdowns.items()}  # for paired differences
    out["_correct"] = correct
    return out


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)


def evaluate_benchmarks(
    models: list[str] | str,
    names: list[str] | str,
    bench_dir: str,
    out_dir: str,
    settings: BenchSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    generator_factory: Callable[[str, int, int], tuple[Generator, bool]] | None = None,
) -> dict:
    """Evaluate each model on each named benchmark; returns the report (see `calibrl.bench.report`).

    Every benchmark is read (and checked) before any model loads. Predictions go to
    `out_dir/<model>/<benchmark>.jsonl`, resumed when present; `results.json` and `results.md` summarise.
    `generator_factory(model, max_new_tokens, batch_size) -> (generate, uses_images)` replaces the
    transformers backend (vLLM, or a test double).
    """
    from calibrl.bench.report import build_report, write_report

    settings = settings or BenchSettings()
    models = [models] if isinstance(models, str) else list(models)
    if not models:
        raise ValueError("no model to evaluate")
    names = resolve_names(names)
    suites = {name: load_benchmark(name, bench_dir, settings.splits.get(name), settings.limit) for name in names}
    factory = generator_factory or (vllm_generator if settings.backend == "vllm" else hf_generator)
    os.makedirs(out_dir, exist_ok=True)

    summaries: dict[str, dict[str, dict]] = {}
    files: dict[str, dict[str, str]] = {}
    for model in models:
        folder = os.path.join(out_dir, model_slug(model))
        os.makedirs(folder, exist_ok=True)
        generator: tuple[Generator, bool] | None = None
        for name in names:
            bench, items = BENCHMARKS[name], suites[name]
            path = os.path.join(folder, f"{name}.jsonl")
            settings_path = os.path.join(folder, f"{name}.settings.json")
            if overwrite:
                for p in (path, settings_path):
                    if os.path.exists(p):
                        os.remove(p)
            _check_settings(settings_path, settings.identity(model, name, settings.splits.get(name) or bench.split))
            done = read_predictions(path)
            todo = [it for it in items if it.id not in done]
            if todo:
                if generator is None:
                    generator = factory(model, settings.max_new_tokens, settings.batch_size)
                _generate_into(path, bench, todo, generator, settings, done,
                               _progress(len(items), len(items) - len(todo), f"{name}", progress))
            by_id = {it.id: it for it in items}
            for row_id, row in done.items():  # score every row afresh: the file matches the report
                if row_id in by_id:
                    _score_row(bench, by_id[row_id], row)
            _rewrite(path, done)
            summaries.setdefault(model, {})[name] = summarize(bench, items, done, settings)
            files.setdefault(model, {})[name] = path
    report = build_report(models, names, summaries, settings, files, bench_dir)
    write_report(report, out_dir)
    return report


def _generate_into(path: str, bench: Benchmark, todo: list[Item], generator: tuple[Generator, bool],
                   settings: BenchSettings, done: dict[str, dict], bar) -> None:
    generate, use_images = generator
    try:
        with open(path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), settings.batch_size):
                batch = todo[start : start + settings.batch_size]
                chat = [chat_row(it, use_images) for it in batch]
                greedy = [c[0] for c in generate(chat, 1, 0.0, settings.seed)]
                samples = (generate(chat, settings.num_samples, settings.temperature, settings.seed)
                           if settings.num_samples else [None] * len(batch))
                for it, text, sampled in zip(batch, greedy, samples):
                    row = {"id": it.id, "prompt": it.prompt_text(), "completion": text}
                    if sampled is not None:
                        row["samples"] = list(sampled)
                    row = _score_row(bench, it, row)
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[it.id] = row
                f.flush()
                bar.update(len(batch))
    finally:
        bar.close()


def _rewrite(path: str, rows: dict[str, dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows.values()))

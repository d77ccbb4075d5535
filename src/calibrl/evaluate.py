"""Held-out evaluation: batched generation, scoring with the training rewards, pass@k, a terminal table.

What is measured (per row, then averaged over groups of rows):
- `accuracy`: one greedy completion per row, correct iff `is_correct(extract_answer(text), row["answer"])`,
  the same check as `calibrl.rewards.accuracy_reward`, so held-out and training accuracy mean the same thing;
- `format_rate`: the greedy completion is in strict `<think>...</think><answer>...</answer>` form;
- `pass@k` (only when asked for a k > 1): `num_samples` completions per row sampled at
  `temperature_for_pass_k`, scored with the unbiased estimator of Chen et al. (2021). Any k in the list,
  1 included, is then reported from those samples (so `pass@1` is the sampled accuracy, `accuracy` the greedy one);
- `stderr`: the binomial standard error of the greedy accuracy, sqrt(p (1 - p) / n).

Groups: "overall", and "by_split", "by_task", "by_difficulty" from the rows' `split`, `task` and `difficulty`
columns (a row without a column is left out of that grouping only). Difficulty keys are strings ("1").

Generation mirrors what TRL's GRPOTrainer does before computing rewards: the chat template with
`add_generation_prompt=True`, the processor for images (left padding), and decoding with
`skip_special_tokens=True`. Generation never touches the global RNG and restores the model's train/eval mode.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from calibrl.multimodal import is_processor, prompt_text, row_images, tokenizer_of
from calibrl.rewards import extract_answer, is_correct, is_strict_format
from calibrl.storage import atomic_write_text

__all__ = [
    "evaluate",
    "format_table",
    "generate_completions",
    "pass_at_k",
    "save_results",
    "score_completions",
]

GROUPINGS = {"by_split": "split", "by_task": "task", "by_difficulty": "difficulty"}


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
def generate_completions(
    model,
    processing_class,
    rows: list[dict],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    num_samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[str]]:
    """`num_samples` decoded completions for each row (a list per row, in row order).

    `temperature == 0` decodes greedily (then all samples of a row are equal, so ask for one). Otherwise it
    samples at that temperature with top-k and top-p off, as TRL's defaults do. The result is a function
    of (model, rows, arguments, seed): the global RNG is saved and restored around generation. A tokenizer
    as `processing_class` means a text-only model: rows' images are ignored.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive int")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0")
    if not rows:
        return []

    use_images = is_processor(processing_class)
    tokenizer = tokenizer_of(processing_class)
    texts = [prompt_text(processing_class, row, i, use_images) for i, row in enumerate(rows)]
    # Every (row, sample) pair is one sequence; sorting by prompt length keeps padding (and time) low.
    jobs = sorted(((i, s) for i in range(len(rows)) for s in range(num_samples)), key=lambda j: (len(texts[j[0]]), j))

    gen = model.generation_config
    eos_id = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                                      num_beams=1, use_cache=True)
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
    else:
        gen_kwargs.update(do_sample=False)

    out: list[list[str | None]] = [[None] * num_samples for _ in rows]
    was_training, old_side = model.training, tokenizer.padding_side
    device = next(model.parameters()).device
    rng_devices = [device] if device.type == "cuda" else []
    model.eval()
    tokenizer.padding_side = "left"
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start : start + batch_size]
                batch_texts = [texts[i] for i, _ in batch]
                if use_images:
                    images = [img for i, _ in batch for img in row_images(rows[i])]
                    inputs = processing_class(text=batch_texts, images=images or None, padding=True,
                                              return_tensors="pt", add_special_tokens=False)
                else:
                    inputs = tokenizer(batch_texts, padding=True, return_tensors="pt", add_special_tokens=False)
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                generated = model.generate(**inputs, **gen_kwargs)
                new_tokens = generated[:, inputs["input_ids"].shape[1] :]
                for (i, s), text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    out[i][s] = text
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms huge binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name}={value!r} must be an int")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _ks(k: int | list[int]) -> list[int]:
    ks = [k] if isinstance(k, int) and not isinstance(k, bool) else list(k)
    if not ks or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ks):
        raise ValueError(f"k={k!r} must be a positive int or a non-empty list of them")
    return sorted(set(ks))


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / n) if n else 0.0


def _summary(indices: list[int], correct: list[bool], formatted: list[bool],
             sample_correct: list[int] | None, num_samples: int, ks: list[int]) -> dict:
    n = len(indices)
    acc = sum(correct[i] for i in indices) / n
    stats = {"n": n, "accuracy": acc, "format_rate": sum(formatted[i] for i in indices) / n, "stderr": _stderr(acc, n)}
    if sample_correct is not None:
        for k in ks:
            stats[f"pass@{k}"] = sum(pass_at_k(num_samples, sample_correct[i], k) for i in indices) / n
    return stats


def _group_key(row: dict, column: str) -> str | None:
    value = row.get(column)
    return None if value is None else str(value)


def _sort_key(name: str):
    return (0, float(name), name) if name.lstrip("-").replace(".", "", 1).isdigit() else (1, 0.0, name)


def score_completions(
    rows: list[dict],
    greedy: list[str],
    samples: list[list[str]] | None = None,
    k: int | list[int] = 1,
) -> dict:
    """Score given completions: one greedy completion per row, and optionally `samples` (the same number per
    row) for pass@k. Returns the groups of `evaluate` plus "correct" (per row, greedy), without "settings"."""
    if len(greedy) != len(rows):
        raise ValueError(f"greedy: {len(greedy)} completions for {len(rows)} rows")
    if not rows:
        raise ValueError("rows is empty: nothing to score")
    for i, row in enumerate(rows):
        if "answer" not in row:
            raise ValueError(f"row {i} has no 'answer' column")
    ks = _ks(k)
    correct = [is_correct(extract_answer(text), row["answer"]) for text, row in zip(greedy, rows)]
    formatted = [is_strict_format(text) for text in greedy]

    sample_correct, num_samples = None, 0
    if samples is not None:
        if len(samples) != len(rows):
            raise ValueError(f"samples: {len(samples)} lists for {len(rows)} rows")
        num_samples = len(samples[0])
        for i, s in enumerate(samples):
            if len(s) != num_samples:
                raise ValueError(f"samples: row {i} has {len(s)} samples, row 0 has {num_samples}")
        if num_samples < ks[-1]:
            raise ValueError(f"pass@{ks[-1]} needs at least {ks[-1]} samples per row, got {num_samples}")
        sample_correct = [sum(is_correct(extract_answer(t), row["answer"]) for t in s) for s, row in zip(samples, rows)]

    def summary(indices: list[int]) -> dict:
        return _summary(indices, correct, formatted, sample_correct, num_samples, ks)

    results: dict[str, Any] = {"overall": summary(list(range(len(rows))))}
    for grouping, column in GROUPINGS.items():
        members: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            key = _group_key(row, column)
            if key is not None:
                members.setdefault(key, []).append(i)
        results[grouping] = {key: summary(members[key]) for key in sorted(members, key=_sort_key)}
    results["stderr"] = results["overall"]["stderr"]
    results["correct"] = [bool(c) for c in correct]
    return results


def evaluate(
    model,
    processing_class,
    rows: list[dict],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    k: int | list[int] = 1,
    num_samples: int | None = None,
    temperature_for_pass_k: float = 1.0,
    seed: int = 0,
    keep_completions: bool = False,
) -> dict:
    """Greedy accuracy, format rate and (for k > 1) pass@k on `rows`, overall and per split/task/difficulty.

    Sampling for pass@k happens only when some k > 1: `num_samples` (default: the largest k) completions
    per row at `temperature_for_pass_k`. Returns a JSON-serialisable dict: the groups (see the module
    docstring), "stderr", "settings", and with `keep_completions` the greedy "completions".
    """
    ks = _ks(k)
    if not rows:
        raise ValueError("rows is empty: nothing to evaluate")
    greedy = [c[0] for c in generate_completions(model, processing_class, rows, max_new_tokens, batch_size, seed=seed)]
    samples = None
    if ks[-1] > 1:
        num_samples = ks[-1] if num_samples is None else num_samples
        if num_samples < ks[-1]:
            raise ValueError(f"num_samples={num_samples} is below the largest k={ks[-1]}")
        if temperature_for_pass_k <= 0:
            raise ValueError(f"temperature_for_pass_k={temperature_for_pass_k} must be > 0 to sample for pass@k")
        samples = generate_completions(model, processing_class, rows, max_new_tokens, batch_size,
                                       num_samples=num_samples, temperature=temperature_for_pass_k, seed=seed)
    results = score_completions(rows, greedy, samples, ks if samples is not None else 1)
    correct = results.pop("correct")
    results["settings"] = {
        "max_new_tokens": max_new_tokens,
        "k": ks,
        "num_samples": num_samples if samples is not None else 0,
        "temperature_for_pass_k": temperature_for_pass_k if samples is not None else None,
        "seed": seed,
    }
    if keep_completions:
        results["completions"] = [
            {"answer": str(row["answer"]), "completion": text, "correct": c}
            for row, text, c in zip(rows, greedy, correct)
        ]
    return results


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------
def format_table(results: dict) -> str:
    """A plain-text table: one line for overall, each split, each task, each difficulty."""
    lines: list[tuple[str, dict]] = [("overall", results["overall"])]
    for grouping, column in GROUPINGS.items():
        for name, stats in results.get(grouping, {}).items():
            lines.append((f"{column}={name}", stats))
    pass_keys = sorted((key for key in results["overall"] if key.startswith("pass@")), key=lambda s: int(s[5:]))
    header = ["group", "n", "accuracy", "±stderr", "format"] + pass_keys
    table = [header] + [
        [name, str(s["n"]), f"{100 * s['accuracy']:.1f}%", f"{100 * s['stderr']:.1f}", f"{100 * s['format_rate']:.1f}%"]
        + [f"{100 * s[key]:.1f}%" if key in s else "-" for key in pass_keys]
        for name, s in lines
    ]
    widths = [max(len(r[j]) for r in table) for j in range(len(header))]
    rendered = ["  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(r, widths)))
                for r in table]
    rendered.insert(1, "-" * len(rendered[0]))
    return "\n".join(rendered)


def save_results(results: dict, path: str | os.PathLike) -> None:
    """Write `results` as indented JSON (parent folders are created), atomically."""
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")  # whole or not at all

"""`calibrl eval`: held-out greedy accuracy, pass@k and format rate of a model on task rows or data files."""

from __future__ import annotations

import argparse
import os
import time

from calibrl.errors import UsageError



def add_arguments(p: argparse.ArgumentParser) -> None:
    from calibrl.bench.command import add_bench_arguments

    p.add_argument("model", nargs="+", help="a model directory (a run's model/ folder, an sft output) or "
                   "tiny:<family>:<size>; with --bench, several checkpoints side by side")
    p.add_argument("--data", nargs="+", help="task:digits / task:shapes / task:mixed, or data files")
    p.add_argument("--split", nargs="+", default=["test", "ood"], help="splits of a task: dataset (default: test ood)")
    p.add_argument("--n", type=int, default=None, help="rows per split or file (default 200; 0 = the whole file); "
                   "with --bench, the first N questions of each benchmark (default: all)")
    p.add_argument("--task_seed", type=int, default=0, help="seed of the generated rows (the held-out rows of a "
                   "run with the same task_seed)")
    p.add_argument("--difficulty", type=int, nargs="+", default=None, help="difficulty levels of a task")
    p.add_argument("--task_types", nargs="+", default=None, help="problem types kept in train/test (e.g. digits/sum)")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k values (k > 1 samples at T=1)")
    p.add_argument("--num_samples", type=int, default=None, help="samples per row for pass@k (default: max k)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 64; with --bench 1024")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", default=None, help="write the results as JSON here; with --bench, the output folder "
                   "(default runs/bench)")
    add_bench_arguments(p)


def eval_rows(data: list[str], splits: list[str], n: int, task_seed: int = 0, difficulty: list[int] | None = None,
              task_types: list[str] | None = None) -> list[dict]:
    """The rows to score: each `task:` source's held-out rows per split (the seed stream a training run with
    the same task_seed evaluates on), and the first `n` rows of each data file (`n` = 0: all of them)."""
    from calibrl.config import DataSource
    from calibrl.data import load_data_file
    from calibrl.tasks import task_name

    rows: list[dict] = []
    for source in data:
        if task_name(source) is not None:
            src = DataSource(dataset=source, task_seed=task_seed, difficulty=difficulty, task_types=task_types)
            for split in splits:
                rows += src.heldout_rows(split, n or 200)
        else:
            dataset, _ = load_data_file(source)
            file_rows = [dataset[i] for i in range(len(dataset))]
            file_rows = file_rows[:n] if n else file_rows
            stem = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
            rows += [{**r, "split": r.get("split") or stem} for r in file_rows]
    return rows


def evaluate_model(model_spec: str, rows: list[dict], max_new_tokens: int = 64, batch_size: int = 32,
                   k: list[int] = (1,), num_samples: int | None = None) -> dict:
    """Load `model_spec` and score it on `rows`; returns `calibrl.evaluate.evaluate`'s results plus timing."""
    from calibrl.evaluate import evaluate
    from calibrl.models import load_model

    model, processing_class = load_model(model_spec)
    start = time.time()
    try:
        results = evaluate(model, processing_class, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           k=list(k), num_samples=num_samples)
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    results["model"], results["seconds"] = model_spec, round(time.time() - start, 2)
    return results


def run(ns: argparse.Namespace) -> int:
    from calibrl.evaluate import format_table, save_results
    from calibrl.models import TINY_PREFIX, parse_tiny_spec, resolve_model_path
    from calibrl.storage import check_file_writable

    if ns.bench is not None:
        from calibrl.bench.command import run_bench

        return run_bench(ns)
    if not ns.data:
        raise UsageError("calibrl eval needs --data (task:digits, data files) or --bench (benchmark copies)")
    if len(ns.model) > 1:
        raise UsageError(f"--data evaluates one model, got {len(ns.model)}; several checkpoints need --bench")
    ns.model = ns.model[0]
    ns.n = 200 if ns.n is None else ns.n
    ns.max_new_tokens = ns.max_new_tokens or 64
    if ns.n < 0:
        raise UsageError(f"--n must be >= 0, got {ns.n}")
    if ns.out:
        check_file_writable(ns.out, "--out")  # before any evaluation
    if ns.model.startswith(TINY_PREFIX):
        parse_tiny_spec(ns.model)  # fail before generating any data
    elif not os.path.isdir(ns.model) and os.path.exists(ns.model):
        raise UsageError(f"model {ns.model} is not a folder")
    else:
        resolve_model_path(ns.model)  # a typo or an unreachable hub: one line, before any work
    rows = eval_rows(ns.data, ns.split, ns.n, ns.task_seed, ns.difficulty, ns.task_types)
    results = evaluate_model(ns.model, rows, ns.max_new_tokens, ns.batch_size, ns.k, ns.num_samples)
    results["data"] = ns.data
    print(format_table(results))
    print(f"({len(rows)} rows in {results['seconds']:.1f} s)")
    if ns.out:
        save_results(results, ns.out)
        print(f"results written to {ns.out}")
    return 0

"""`calibrl probe`: before training, where the expert sits for your policy (see `calibrl.probe`), so that the
choice of `gap` and λ starts from a measurement."""

from __future__ import annotations

import argparse
import json
import os

from calibrl.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory or tiny:<family>:<size>")
    p.add_argument("--data", required=True, help="task:digits / task:shapes / task:mixed, or a data file with "
                   "an expert column")
    p.add_argument("--n", type=int, default=200, help="prompts probed (default 200)")
    p.add_argument("--num_generations", type=int, default=8, help="samples per prompt, as in training (default 8)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="the completion limit (max_completion_length)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--expert_column", default="solution")
    p.add_argument("--expert_style", default="mismatched", help="expert solutions of a task: dataset")
    p.add_argument("--task_seed", type=int, default=0)
    p.add_argument("--difficulty", type=int, nargs="+", default=None)
    p.add_argument("--task_types", nargs="+", default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default=None, help="write the statistics as JSON here")


def probe_rows(data: str, n: int, expert_style: str = "mismatched", task_seed: int = 0,
               difficulty: list[int] | None = None, task_types: list[str] | None = None) -> list[dict]:
    """The first `n` training rows of a task (with the chosen expert style) or of a data file."""
    from calibrl.config import DataSource
    from calibrl.data import load_data_file
    from calibrl.tasks import task_name

    if task_name(data) is not None:
        return DataSource(dataset=data, n_train=n, task_seed=task_seed, expert_style=expert_style,
                          difficulty=difficulty, task_types=task_types).training_rows()
    dataset, _ = load_data_file(data)
    return [dataset[i] for i in range(min(n, len(dataset)))]


def run(ns: argparse.Namespace) -> int:
    from calibrl.models import load_model
    from calibrl.probe import format_report, probe
    from calibrl.storage import atomic_write_json

    for flag in ("n", "num_generations", "max_new_tokens", "batch_size"):
        if getattr(ns, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(ns, flag)}")
    if ns.out and not os.access(os.path.dirname(os.path.abspath(ns.out)) or ".", os.W_OK):
        raise UsageError(f"--out {ns.out}: its folder is not writable")
    rows = probe_rows(ns.data, ns.n, ns.expert_style, ns.task_seed, ns.difficulty, ns.task_types)
    model, processing_class = load_model(ns.model)
    try:
        stats = probe(model, processing_class, rows, ns.num_generations, ns.max_new_tokens, ns.temperature,
                      ns.batch_size, ns.expert_column, ns.seed)
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    stats["model"], stats["data"] = ns.model, ns.data
    print(format_report(stats))
    if ns.out:
        atomic_write_json(ns.out, stats)
        print(f"statistics written to {ns.out}")
    return 0

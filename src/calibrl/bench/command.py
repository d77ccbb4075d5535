"""`calibrl eval MODEL [MODEL ...] --bench NAMES --bench-dir DIR`: the arguments and the run from a Namespace."""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["add_bench_arguments", "run_bench"]

DEFAULT_OUT = os.path.join("runs", "bench")
DEFAULT_MAX_NEW_TOKENS = 1024


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark flags of `calibrl eval` (its --k, --num_samples, --max_new_tokens, --batch_size, --n and
    --out are shared with the --data path)."""
    g = p.add_argument_group("benchmarks (--bench)")
    g.add_argument("--bench", default=None, help="benchmarks to run, comma-separated: geoeval, geometry3k, geoqa, "
                   "mathvista, mathverse, mathvision, mmmu, wemath, scienceqa, or paper (all of them)")
    g.add_argument("--bench-dir", "--bench_dir", dest="bench_dir", default=None,
                   help="folder holding one local copy per benchmark, as published (e.g. DIR/MathVista/data/...)")
    g.add_argument("--bench-split", "--bench_split", dest="bench_split", nargs="+", default=[], metavar="NAME=SPLIT",
                   help="another split than the default (geoeval=main, also backward, aug, hard or all; "
                        "mathvista=testmini, mathverse=testmini, mathvision=test, mmmu=validation, "
                        "wemath=testmini, geometry3k=test, geoqa=test, scienceqa=test)")
    g.add_argument("--vllm", action="store_true", help="generate with vLLM (GPU; needs calibrl[vllm])")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the pass@k samples")
    g.add_argument("--seed", type=int, default=0, help="seed of the pass@k samples")
    g.add_argument("--overwrite", action="store_true", help="start over: delete earlier predictions in --out")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


def _splits(values: list[str]) -> dict[str, str]:
    from calibrl.bench.registry import BENCHMARKS

    out = {}
    for value in values:
        name, sep, split = value.partition("=")
        if not sep or not split or name.strip().lower() not in BENCHMARKS:
            raise ValueError(f"--bench-split {value!r}: expected NAME=SPLIT with NAME one of {', '.join(BENCHMARKS)}")
        out[name.strip().lower()] = split.strip()
    return out


def run_bench(ns: argparse.Namespace) -> int:
    """Run `calibrl eval ... --bench` from parsed arguments; input mistakes raise `UsageError` (one line)."""
    from calibrl.bench.data import BenchDataError
    from calibrl.bench.registry import resolve_names
    from calibrl.bench.report import format_table
    from calibrl.bench.runner import BenchSettings, evaluate_benchmarks, vllm_available
    from calibrl.errors import UsageError
    from calibrl.models import TINY_PREFIX, parse_tiny_spec

    if not ns.bench_dir:
        raise UsageError("--bench needs --bench-dir, the folder holding the benchmark copies")
    if not os.path.isdir(ns.bench_dir):
        raise UsageError(f"--bench-dir {ns.bench_dir} is not a folder")
    if ns.vllm and not vllm_available():
        raise UsageError("--vllm needs vLLM, which is not installed (pip install 'calibrl[vllm]' on a CUDA host); "
                         "leave out --vllm to generate with transformers")
    for model in ns.model:
        if model.startswith(TINY_PREFIX):
            parse_tiny_spec(model)
        elif not os.path.isdir(model) and os.path.exists(model):
            raise UsageError(f"model {model} is not a folder")
    try:
        names = resolve_names(ns.bench)
        settings = BenchSettings(max_new_tokens=ns.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, batch_size=ns.batch_size,
                                 k=ns.k, num_samples=ns.num_samples, temperature=ns.temperature, seed=ns.seed,
                                 limit=ns.n or None, splits=_splits(ns.bench_split),
                                 backend="vllm" if ns.vllm else "hf")
        start = time.time()
        report = evaluate_benchmarks(ns.model, names, ns.bench_dir, ns.out or DEFAULT_OUT, settings,
                                     overwrite=ns.overwrite, progress=not ns.no_progress)
    except (BenchDataError, ValueError) as e:
        raise UsageError(" ".join(str(e).split())) from None
    print(format_table(report))
    out = ns.out or DEFAULT_OUT
    print(f"({time.time() - start:.1f} s; predictions, results.json and results.md in {out})")
    return 0

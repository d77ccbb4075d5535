"""`calibrl demo`: the whole pipeline on a tiny Qwen2.5-VL, offline, on 2 CPU cores, in a few minutes.

1. Build the tiny Qwen2.5-VL (`small`: hidden 128, 4 layers, tokenizer trained on the task text).
2. Warm-start it with a short SFT on `native` expert solutions of the digits task, stopping at the first
   checkpoint whose accuracy on TRAIN-split validation rows lands in a window (default 20-50%): RL needs
   a base that sometimes succeeds and often fails. The warm start is cached under
   `$CALIBRL_CACHE/sft-<hash of its settings>/` (default `.cache/calibrl`), so a second demo skips it.
3. Evaluate the base greedily on held-out in-domain (`test`: unseen digit images) and out-of-domain
   (`ood`: multiplication, never trained on) rows.
4. Train it with CalibRL, the expert solutions written in the `mismatched` style (as in the paper: the
   expert's wording is not the policy's), with the usual run folder (metrics.jsonl, eval.jsonl, run.json).
5. Evaluate again; write `results.json` (before / after, by split, task and difficulty, with standard
   errors and the time of each phase), print the before/after table, and draw the plots.

The configuration is `DEMO_YAML` below (also at configs/demo.yaml in the repository; a test keeps the two
identical). It is written into the run folder as `demo_config.yaml`, so every run records what it ran.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from calibrl import recipes

DEMO_YAML = """\
# calibrl demo: what `calibrl demo` runs (a copy of this text ships inside the package, calibrl/demo.py).
# One section per phase; `calibrl sft configs/demo.yaml` and `calibrl train configs/demo.yaml --model <sft dir>`
# run the same phases by hand. Sized for 2 CPU cores: ~6 minutes in all.

sft:                                  # warm start on the short `native` expert solutions
  model: tiny:qwen2_5_vl:small        # hidden 128, 4 layers, ~1M parameters, built offline
  dataset: task:digits
  n_train: 4096
  task_seed: 0
  difficulty: [1]                     # two digits side by side...
  task_types: [digits/sum]            # ...and their sum (ood: their product, never trained on)
  expert_style: native
  batch_size: 32
  learning_rate: 1.0e-3
  warmup_steps: 30
  max_steps: 400                      # an upper bound: the window below stops it earlier
  select_window: [0.25, 0.45]         # keep the first checkpoint with 25-45% validation accuracy
  select_every: 10
  select_after: 150
  n_select: 200                       # validation rows: TRAIN split, another seed (never test data)
  select_max_new_tokens: 48
  seed: 0

train:                                # RL from the warm start (the model is filled in by the demo)
  dataset: task:digits
  n_train: 2048                       # 60 steps x 16 prompts = 960 prompts
  task_seed: 0
  difficulty: [1]
  task_types: [digits/sum]
  expert_style: mismatched            # the expert's wording differs from the policy's, as in the paper
  method: calibrl
  max_steps: 60                       # 80 took the whole demo to 576 s of the 10-minute budget on an idle machine
  per_device_train_batch_size: 128    # 16 prompts x 8 rollouts per step
  num_generations: 8
  max_completion_length: 48
  temperature: 1.0
  beta: 0.0
  learning_rate: 1.0e-4
  lr_scheduler_type: constant
  warmup_steps: 0
  guide_coef: 0.1
  leaky_slope: 0.5
  gap: token
  scale_rewards: none
  delta: 3.0
  activation_checkpointing: false     # TRL turns it on by default; it only costs time here
  logging_steps: 1
  save_strategy: "no"
  report_to: none
  seed: 0
  eval_every: 20                      # curve of held-out accuracy (n_eval rows per split) in eval.jsonl
  n_eval: 100
  eval_splits: [test, ood]

demo:                                 # the before / after comparison in results.json
  n_eval: 500                         # rows per split: standard error ~2 points
  eval_splits: [test, ood]
  eval_batch_size: 64
  eval_max_new_tokens: 48
"""

# Same code path, tiny sizes: what the test suite runs (`calibrl demo --smoke`).
SMOKE = {
    "sft": ["--model", "tiny:qwen2_5_vl:nano", "--n_train", "64", "--batch_size", "8", "--max_steps", "4",
            "--warmup_steps", "1", "--select_window", "0", "1", "--select_every", "2", "--select_after", "2",
            "--n_select", "8", "--select_max_new_tokens", "8"],
    "train": ["--n_train", "32", "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations",
              "4", "--max_completion_length", "16", "--eval_every", "1", "--n_eval", "4"],
    "demo": ["--n_eval", "8", "--eval_max_new_tokens", "16"],
}


@dataclass
class DemoArgs:
    """The `demo:` section: the before/after evaluation."""

    n_eval: int = field(default=500, metadata={"help": "Held-out rows per split, before and after RL."})
    eval_splits: list[str] = field(default_factory=lambda: ["test", "ood"], metadata={"help": "Splits to compare."})
    eval_batch_size: int = field(default=64, metadata={"help": "Generation batch size."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per answer."})
    eval_seed_offset: int = field(default=2000, metadata={"help": "Held-out rows use task_seed + this offset."})


def load_demo_config(path: str, smoke: bool = False, out_dir: str | None = None):
    """(SFTArgs, CalibRLConfig, RunArgs, DemoArgs) from a sectioned demo config; RL writes to `out_dir`."""
    from calibrl.cli import load_train_config
    from calibrl.sft import SFTArgs

    (sft_args,) = recipes.parse_config([SFTArgs], path, SMOKE["sft"] if smoke else [], section="sft")
    train_overrides = (SMOKE["train"] if smoke else []) + (["--output_dir", out_dir] if out_dir else [])
    config, run = load_train_config(path, train_overrides + ["--run_name", "demo"], section="train")
    (demo_args,) = recipes.parse_config([DemoArgs], path, SMOKE["demo"] if smoke else [], section="demo")
    return sft_args, config, run, demo_args


def warm_start_dir(sft_args) -> Path:
    """The cache folder of a warm start: `sft-<hash of every setting that changes the model>`."""
    from calibrl import __version__

    settings = {k: v for k, v in asdict(sft_args).items() if k not in ("output_dir", "overwrite", "disable_tqdm")}
    settings["calibrl"] = __version__
    return recipes.cache_dir() / f"sft-{recipes.settings_hash(settings)}"


def warm_start(sft_args, use_cache: bool = True, quiet: bool = False) -> tuple[str, dict, bool]:
    """The SFT warm start for `sft_args`, from the cache when present: (model dir, summary, was cached)."""
    from calibrl.sft import run_sft

    out = warm_start_dir(sft_args)
    info = out / "sft.json"
    if use_cache and info.is_file() and (out / "config.json").is_file():
        summary = json.loads(info.read_text(encoding="utf-8"))["summary"]
        return str(out), summary, True
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = run_sft(sft_args, out_dir=str(tmp), quiet=quiet)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    summary["output_dir"] = str(out)
    return str(out), summary, False


def _eval_rows(run, demo_args) -> dict[str, list[dict]]:
    return {split: recipes.task_rows(run.dataset, split, demo_args.n_eval, run.task_seed + demo_args.eval_seed_offset,
                                     "native", 0.0, run.difficulty, run.task_types) for split in demo_args.eval_splits}


def _evaluate_all(model, processing_class, sets: dict[str, list[dict]], demo_args) -> dict:
    from calibrl.evaluate import evaluate

    rows = [r for split_rows in sets.values() for r in split_rows]
    return evaluate(model, processing_class, rows, max_new_tokens=demo_args.eval_max_new_tokens,
                    batch_size=demo_args.eval_batch_size)


def comparison(before: dict, after: dict) -> dict:
    """Per split: accuracy before, after, the gain, and the gain in units of its standard error."""
    out = {}
    for split, b in before["by_split"].items():
        a = after["by_split"][split]
        gain = a["accuracy"] - b["accuracy"]
        se = (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5
        out[split] = {"n": b["n"], "before": b["accuracy"], "after": a["accuracy"], "before_stderr": b["stderr"],
                      "after_stderr": a["stderr"], "gain": gain, "gain_over_stderr": gain / se if se > 0 else None,
                      "format_before": b["format_rate"], "format_after": a["format_rate"]}
    return out


def comparison_table(comp: dict, timings: dict) -> str:
    """The before/after table printed at the end of the demo."""
    lines = [f"{'split':<8}{'n':>5}{'before':>16}{'after':>16}{'gain':>10}{'gain/se':>9}{'format b->a':>14}",
             "-" * 78]
    for split, c in comp.items():
        ratio = "-" if c["gain_over_stderr"] is None else f"{c['gain_over_stderr']:.1f}"
        lines.append(f"{split:<8}{c['n']:>5}{_pm(c['before'], c['before_stderr']):>16}"
                     f"{_pm(c['after'], c['after_stderr']):>16}{100 * c['gain']:>+9.1f}p{ratio:>9}"
                     f"{100 * c['format_before']:>7.0f}->{100 * c['format_after']:.0f}%")
    lines.append("")
    lines.append("time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timings.items()))
    return "\n".join(lines)


def fit_threads_to_load() -> str | None:
    """Use only the cores other processes leave free (unless OMP_NUM_THREADS is set); returns a note if changed.

    Measured on 2 cores: with another process busy, torch at 2 threads ran a GRPO step 5-10x slower than
    at 1 thread (the threads wait on each other), while on an idle machine 2 threads are faster.
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return None
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    free = max(1, int(cores - load + 0.5))
    if free >= torch.get_num_threads():
        return None
    torch.set_num_threads(free)
    return f"machine busy (load {load:.1f} on {cores} cores): torch uses {free} thread(s)"


def _pm(p: float, se: float) -> str:
    return f"{100 * p:.1f} ± {100 * se:.1f}%"


def run_demo(out_dir: str = os.path.join("runs", "demo"), overwrite: bool = False, config_path: str | None = None,
             smoke: bool = False, use_cache: bool = True) -> dict:
    """Run the demo into `out_dir`; returns what results.json holds."""
    from calibrl.cli import build_trainer
    from calibrl.evaluate import save_results
    from calibrl.models import load_tiny_model
    from calibrl.plots import plot_runs
    from calibrl.run_log import write_run_info

    t0 = time.time()
    out = recipes.prepare_output_dir(out_dir, overwrite)
    config_file = out / "demo_config.yaml"
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise recipes.UsageError(f"config file not found: {config_path}")
        shutil.copyfile(config_path, config_file)
    else:
        config_file.write_text(DEMO_YAML, encoding="utf-8")
    sft_args, config, run, demo_args = load_demo_config(str(config_file), smoke=smoke, out_dir=str(out))
    timings: dict[str, float] = {}
    note = fit_threads_to_load()
    if note:
        print(f"   ({note})", flush=True)

    # 1-2. warm start (cached)
    print("== 1/4 SFT warm start on native expert solutions", flush=True)
    t = time.time()
    base_dir, sft_summary, cached = warm_start(sft_args, use_cache=use_cache)
    timings["sft_s"] = round(time.time() - t, 1)
    print(f"   {'cached' if cached else 'trained'}: {base_dir} (step {sft_summary['chosen_step']}, validation "
          f"accuracy {_acc(sft_summary.get('select_accuracy'))}, {timings['sft_s']:.0f} s)", flush=True)

    # 3. before
    print(f"== 2/4 held-out evaluation of the base ({demo_args.n_eval} rows x {demo_args.eval_splits})", flush=True)
    t = time.time()
    sets = _eval_rows(run, demo_args)
    model, processing_class = load_tiny_model(base_dir)
    before = _evaluate_all(model, processing_class, sets, demo_args)
    timings["eval_before_s"] = round(time.time() - t, 1)
    print("   " + ", ".join(f"{s}: {_pm(v['accuracy'], v['stderr'])}" for s, v in before["by_split"].items()),
          flush=True)

    # 4. RL
    print(f"== 3/4 {config.method} for {config.max_steps} steps ({config.per_device_train_batch_size // config.num_generations}"
          f" prompts x {config.num_generations} rollouts, {run.expert_style} expert)", flush=True)
    t = time.time()
    run.model = base_dir
    write_run_info(out, name=config.run_name, method=config.method,
                   config=config.to_dict(), run=asdict(run), sft=sft_summary, base_model=base_dir)
    trainer, _ = build_trainer(config, run, quiet=True)
    trainer.train()
    trainer.save_model(str(out / "model"))
    timings["rl_s"] = round(time.time() - t, 1)

    # 5. after
    print("== 4/4 held-out evaluation after RL", flush=True)
    t = time.time()
    after = _evaluate_all(trainer.model, processing_class, sets, demo_args)
    timings["eval_after_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - t0, 1)

    comp = comparison(before, after)
    results = {"comparison": comp, "before": before, "after": after, "timings": timings,
               "sft": {**sft_summary, "model_dir": base_dir, "cached": cached},
               "settings": {"sft": asdict(sft_args), "demo": asdict(demo_args), "method": config.method,
                            "max_steps": config.max_steps, "smoke": smoke}}
    save_results(results, out / "results.json")
    write_run_info(out, demo=comp, timings=timings)
    pngs = plot_runs([str(out)], str(out / "plots"))
    print()
    print(comparison_table(comp, timings))
    print(f"\nrun folder: {out} (results.json, metrics.jsonl, eval.jsonl, model/, plots: "
          f"{', '.join(Path(p).name for p in pngs)})")
    return results


def _acc(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"

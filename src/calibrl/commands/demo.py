"""`calibrl demo`: the whole pipeline on a tiny Qwen2.5-VL, offline, on 2 CPU cores, in a few minutes.

1. Build the tiny Qwen2.5-VL (`small`: hidden 128, 4 layers, tokenizer trained on the task text).
2. Warm-start it with a short SFT on `native` expert solutions of the digits task, stopping at the first
   checkpoint whose accuracy on TRAIN-split validation rows lands in a window (default 25-45%): RL needs
   a base that sometimes succeeds and often fails. The warm start is cached under
   `$CALIBRL_CACHE/sft-<hash of its settings>/` (default `.cache/calibrl`), so a second demo skips it
   (`--no_cache` rebuilds it).
3. Evaluate the base greedily on held-out in-domain (`test`: unseen digit images) and out-of-domain
   (`ood`: multiplication, never trained on) rows.
4. Train it with CalibRL, the expert solutions written in the `mismatched` style (as in the paper: the
   expert's wording is not the policy's), with the usual run folder (metrics.jsonl, eval.jsonl, run.json).
5. Evaluate again; write `results.json` (before / after, by split, task and difficulty, with standard
   errors and the time of each phase), print the before/after table, and draw the plots.

The configuration is `DEMO_YAML` below (also at configs/demo.yaml in the repository; a test keeps the two
identical); `--config` runs another one (the test suite runs a tiny one). It is written into the run folder as
`demo_config.yaml`, so every run records what it ran. A new demo replaces the previous demo run in its folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from calibrl.config import DemoArgs, SFTArgs, load_train_config, parse_config
from calibrl.errors import UsageError
from calibrl.files import cache_dir, check_output_dir, settings_hash
from calibrl.storage import check_writable, publish_dir

CONFIG_FILE = "demo_config.yaml"  # marks a folder as a demo run (so a new demo may replace it)

DEMO_YAML = """\
# calibrl demo: what `calibrl demo` runs (a copy of this text ships inside the package, calibrl/commands/demo.py).
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="run folder (default runs/demo; a previous "
                   "demo run there is replaced)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder that is not a demo run")
    p.add_argument("--config", default=None, help="a demo config (default: the packaged one; see --print_config)")
    p.add_argument("--print_config", action="store_true", help="print the packaged demo config and exit")
    p.add_argument("--no_cache", action="store_true", help="redo the SFT warm start even if it is cached")


def load_demo_config(path: str, out_dir: str | None = None):
    """(SFTArgs, CalibRLConfig, RunArgs, DemoArgs) from a sectioned demo config; RL writes to `out_dir`."""
    (sft_args,) = parse_config([SFTArgs], path, section="sft")
    config, run = load_train_config(path, (["--output_dir", out_dir] if out_dir else []) + ["--run_name", "demo"])
    (demo_args,) = parse_config([DemoArgs], path, section="demo")
    return sft_args, config, run, demo_args


def warm_start_dir(sft_args: SFTArgs) -> Path:
    """The cache folder of a warm start: `sft-<hash of every setting that changes the model>`."""
    from calibrl import __version__

    settings = {k: v for k, v in asdict(sft_args).items() if k not in ("output_dir", "overwrite", "disable_tqdm")}
    if not settings["mismatched_share"]:  # a field added later counts only when set: older warm starts keep their key
        del settings["mismatched_share"]
    settings["calibrl"] = __version__
    return cache_dir() / f"sft-{settings_hash(settings)}"


def warm_start(sft_args: SFTArgs, use_cache: bool = True, quiet: bool = False) -> tuple[str, dict, bool]:
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
    publish_dir(tmp, out)
    summary["output_dir"] = str(out)
    return str(out), summary, False


def final_eval_rows(run, demo_args: DemoArgs) -> dict[str, list[dict]]:
    """The before/after evaluation rows by split: the `final_eval` seed stream, never trained or curve-evaluated on."""
    return {split: run.heldout_rows(split, demo_args.n_eval, stream="final_eval") for split in demo_args.eval_splits}


def evaluate_sets(model, processing_class, sets: dict[str, list[dict]], demo_args: DemoArgs) -> dict:
    """Greedy evaluation of every row of `sets` (grouped by split, task and difficulty in the results)."""
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


def busy_cores(window_s: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now: the share of non-idle time in /proc/stat over a short
    window, times the number of cores (this process sleeps meanwhile). None where /proc/stat is not readable."""
    def sample() -> tuple[int, int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
        fields = [int(x) for x in lines[0].split()[1:]]
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle, cores  # user..steal (guest time is already counted in user)

    try:
        total0, idle0, cores = sample()
        time.sleep(window_s)
        total1, idle1, _ = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0 or cores <= 0:
        return None
    return cores * (1.0 - (idle1 - idle0) / elapsed)


def fit_threads_to_cpus() -> str | None:
    """Use only the cores other processes leave free now (unless OMP_NUM_THREADS is set); a note if changed.

    Measured on 2 cores: with another process busy, torch at 2 threads ran a GRPO step 5-10x slower than at
    1 thread (the threads wait on each other), while on an idle machine 2 threads are faster. The load average
    lags by a minute (it still reads "busy" right after an install), so the CPUs are sampled instead.
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ:
        return None
    busy = busy_cores()
    if busy is None:
        return None
    cores = os.cpu_count() or 1
    free = max(1, min(cores, int(cores - busy + 0.5)))
    if free == torch.get_num_threads():
        return None
    torch.set_num_threads(free)
    return f"{busy:.1f} of {cores} cores busy now: torch uses {free} thread(s)"


def _pm(p: float, se: float) -> str:
    return f"{100 * p:.1f} ± {100 * se:.1f}%"


def prepare_demo_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> tuple[Path, bool]:
    """The demo's run folder, emptied: (folder, whether a previous demo run was replaced). A folder holding
    anything but a demo run is left untouched (a `UsageError`) unless `overwrite`."""
    out = Path(out_dir)
    previous = (out / CONFIG_FILE).is_file()
    check_output_dir(out, overwrite or previous)
    replaced = out.is_dir() and any(out.iterdir())
    if replaced:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, replaced and previous


def run_demo(out_dir: str = os.path.join("runs", "demo"), overwrite: bool = False, config_path: str | None = None,
             use_cache: bool = True) -> dict:
    """Run the demo into `out_dir`; returns what results.json holds."""
    from calibrl.commands.train import build_trainer
    from calibrl.evaluate import save_results
    from calibrl.models import load_tiny_model
    from calibrl.plots import plot_runs
    from calibrl.run_log import write_run_info

    t0 = time.time()
    if config_path is not None and not os.path.isfile(config_path):
        raise UsageError(f"config file not found: {config_path}")
    check_writable(out_dir, "--out")
    out, replaced = prepare_demo_dir(out_dir, overwrite)
    if replaced:
        print(f"   (replacing the previous demo run in {out})", flush=True)
    config_file = out / CONFIG_FILE
    if config_path is not None:
        shutil.copyfile(config_path, config_file)
    else:
        config_file.write_text(DEMO_YAML, encoding="utf-8")
    sft_args, config, run, demo_args = load_demo_config(str(config_file), out_dir=str(out))
    timings: dict[str, float] = {}
    note = fit_threads_to_cpus()
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
    sets = final_eval_rows(run, demo_args)
    model, processing_class = load_tiny_model(base_dir)
    before = evaluate_sets(model, processing_class, sets, demo_args)
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
    after = evaluate_sets(trainer.model, processing_class, sets, demo_args)
    timings["eval_after_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - t0, 1)

    comp = comparison(before, after)
    import torch

    results = {"comparison": comp, "before": before, "after": after, "timings": timings,
               "sft": {**sft_summary, "model_dir": base_dir, "cached": cached},
               "settings": {"sft": asdict(sft_args), "demo": asdict(demo_args), "method": config.method,
                            "max_steps": config.max_steps, "torch_threads": torch.get_num_threads()}}
    save_results(results, out / "results.json")
    write_run_info(out, demo=comp, timings=timings)
    pngs = plot_runs([str(out)], str(out / "plots"))
    print()
    print(comparison_table(comp, timings))
    print(f"\nrun folder: {out} (results.json, metrics.jsonl, eval.jsonl, model/, plots: "
          f"{', '.join(Path(p).name for p in pngs)}); warm start {'reused from the cache' if cached else 'trained and cached'}"
          f", {torch.get_num_threads()} torch thread(s)")
    return results


def _acc(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def run(ns: argparse.Namespace) -> int:
    if ns.print_config:
        print(DEMO_YAML, end="")
        return 0
    run_demo(ns.out, overwrite=ns.overwrite, config_path=ns.config, use_cache=not ns.no_cache)
    return 0

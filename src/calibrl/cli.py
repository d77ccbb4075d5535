"""The `calibrl` command line: train, sft, eval, plot, demo.

    calibrl train CONFIG.yaml [--key value ...]   RL (CalibRL or a baseline) with TRL's GRPO machinery
    calibrl sft CONFIG.yaml [--key value ...]     supervised warm start on expert solutions
    calibrl eval MODEL --data task:digits         held-out greedy accuracy, pass@k, format rate
    calibrl plot RUN_DIR [RUN_DIR ...]            training curves of run folders, overlaid
    calibrl demo                                  the whole pipeline on a tiny model, offline, on CPU

Commands are registered in `COMMANDS` (name -> `Command`); a new one (e.g. a benchmark) adds an entry
there and nothing else changes. Mistakes in the input (a missing file, an unknown key, a badly typed
value, bad data rows, an output folder that already holds a run) print one line,
`calibrl: error: ...`, on stderr and exit with status 2, without a traceback. Heavy libraries (torch,
TRL) are imported only by the command that needs them, so `calibrl --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

from calibrl.checkpoints import CheckpointError
from calibrl.recipes import UsageError
from calibrl.storage import StorageError, check_file_writable, check_writable, storage_cause

EXIT_USAGE = 2
EXIT_STORAGE = 1


@dataclass
class Command:
    """One subcommand: its one-line help, how to declare its arguments, and what it runs.

    `add_arguments(parser)` declares argparse arguments; a command whose `config_fields` is set instead
    takes `CONFIG.yaml [--key value ...]` over those dataclasses (its --help lists every field).
    """

    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    config_fields: Callable[[], list[type]] | None = None


# ----------------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------------
def _train_fields() -> list[type]:
    from calibrl.recipes import RunArgs
    from calibrl.config import CalibRLConfig

    return [CalibRLConfig, RunArgs]


def cpu_defaults() -> dict:
    """Defaults that make a plain `calibrl train` work on a machine without a GPU (config values win)."""
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}


def load_train_config(config_path: str | None, overrides: list[str], section: str = "train"):
    """(CalibRLConfig, RunArgs) from a YAML file and `--key value` overrides; nothing is built or trained."""
    from calibrl.recipes import RunArgs, default_reward_weights, parse_config
    from calibrl.config import CalibRLConfig

    def finalize(values: dict) -> None:
        if values.get("output_dir") is None:
            values["output_dir"] = os.path.join("runs", values.get("run_name") or "train")
        if values.get("run_name") is None:
            values["run_name"] = os.path.basename(os.path.normpath(values["output_dir"]))
        values["reward_weights"] = default_reward_weights(values["reward_funcs"], values.get("reward_weights"))

    config, run = parse_config([CalibRLConfig, RunArgs], config_path, overrides, section=section,
                               preset=cpu_defaults(), finalize=finalize)
    return config, run


def compact_progress_callback():
    """A TrainerCallback drawing one tqdm bar whose postfix shows reward, accuracy and entropy.

    It replaces transformers' ProgressCallback, which prints every log dict (dozens of metrics per step);
    the full logs are in the run folder's metrics.jsonl.
    """
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class CompactProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc="train", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                shown = {"reward": "reward", "acc": "rewards/accuracy_reward/mean", "entropy": "entropy"}
                self.bar.set_postfix({k: f"{logs[v]:.3f}" for k, v in shown.items()
                                      if isinstance(logs.get(v), (int, float))})

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return CompactProgress()


def build_trainer(config, run, callbacks_dir: str | None = None, quiet: bool = False):
    """The CalibRLTrainer a config describes, with MetricsLogger / HeldoutEvalCallback writing to the run folder."""
    from trl.import_utils import is_vllm_available

    from calibrl import recipes
    from calibrl.run_log import HeldoutEvalCallback, MetricsLogger
    from calibrl.trainer import CalibRLTrainer

    if config.use_vllm and not is_vllm_available():  # checked first: TRL would only fail after loading everything
        raise UsageError("use_vllm=true but vLLM is not installed (it needs a CUDA host: pip install "
                         "'calibrl[vllm]'); pass --use_vllm false to generate with transformers")
    dataset, description = recipes.train_dataset(run)
    rewards = recipes.reward_functions(run.reward_funcs)
    sets = recipes.eval_sets(run)
    model, processing_class = recipes.load_model(run.model, seed=config.seed,
                                                 model_init_kwargs=config.model_init_kwargs)
    if run.freeze_vision_tower:
        recipes.freeze_vision_tower(model)
    run_dir = callbacks_dir or config.output_dir
    callbacks = [MetricsLogger(run_dir)]
    if sets:
        max_new = run.eval_max_new_tokens or config.max_completion_length
        callbacks.append(HeldoutEvalCallback(run_dir, processing_class, sets, every_n_steps=run.eval_every,
                                             max_new_tokens=max_new, batch_size=run.eval_batch_size))
    trainer = CalibRLTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                             processing_class=processing_class, callbacks=callbacks,
                             peft_config=recipes.lora_config(run))
    trainer.calibrl_data_description = description  # for the run summary
    if not config.disable_tqdm:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(compact_progress_callback())
    if not quiet and recipes.is_main_process():
        print(f"calibrl train: {description}; model {run.model}; method {config.method}; "
              f"{config.max_steps if config.max_steps > 0 else config.num_train_epochs} "
              f"{'steps' if config.max_steps > 0 else 'epochs'}", flush=True)
    return trainer, sets


def train_summary(run_dir: str) -> str:
    """Held-out accuracy before and after, and the last training metrics, from a run folder."""
    from calibrl.run_log import read_run

    run = read_run(run_dir)
    lines = []
    evals = run["eval"]
    if evals:
        first_step, last_step = evals[0]["step"], evals[-1]["step"]
        splits = list(dict.fromkeys(e["split"] for e in evals))
        lines.append(f"{'held-out':<14}{'step ' + str(first_step):>18}{'step ' + str(last_step):>18}")
        for split in splits:
            first = next(e for e in evals if e["split"] == split)
            last = [e for e in evals if e["split"] == split][-1]
            lines.append(f"{split:<14}{_pct(first):>18}{_pct(last):>18}")
    final = run["info"].get("final_metrics", {})
    for key in ("reward", "rewards/accuracy_reward/mean", "entropy", "calibrl/guide_loss"):
        if isinstance(final.get(key), (int, float)):
            lines.append(f"{key:<36}{final[key]:.4f}")
    wall = run["info"].get("wall_time_s")
    if wall is not None:
        lines.append(f"{'training time':<36}{wall:.1f} s ({run['info'].get('global_step')} steps)")
    if run["info"].get("data"):
        lines.append(f"data: {run['info']['data']}")
    counts = run["info"].get("counts")
    if counts:
        n = lambda key: int(round(counts.get(key, 0)))  # noqa: E731
        lines.append(f"faults: rewards raised {n('reward_errors')}, non-finite {n('reward_nonfinite')}, "
                     f"timed out {n('reward_timeouts')}, None {n('reward_none')}; experts missing "
                     f"{n('expert_missing')}, truncated {n('expert_truncated')}, placeholders stripped "
                     f"{n('expert_stripped')} (of {n('expert_groups')} groups); optimizer steps skipped "
                     f"{n('skipped_steps')}")
    return "\n".join(lines)


def _pct(record: dict) -> str:
    return f"{100 * record['accuracy']:.1f} ± {100 * record['stderr']:.1f}%"


def run_train(config_path: str | None, overrides: list[str]) -> int:
    from calibrl import recipes
    from calibrl.checkpoints import save_final_model
    from calibrl.run_log import write_run_info

    from accelerate import PartialState

    config, run = load_train_config(config_path, overrides)  # (this also sets up the process group)
    state = PartialState()
    main = state.is_main_process
    run_dir = config.output_dir
    check_writable(run_dir)  # before any model or data is loaded
    if not run.model.startswith(recipes.TINY_PREFIX):
        recipes.resolve_model_path(run.model)  # a typo or an unreachable hub: one line, at once
    if config.resume_from_checkpoint is None:
        recipes.check_output_dir(run_dir, run.overwrite)  # every process, before any of them writes
        state.wait_for_everyone()
        recipes.prepare_output_dir(run_dir, overwrite=True, is_main=main)
    state.wait_for_everyone()
    trainer, _ = build_trainer(config, run)
    if main:
        write_run_info(run_dir, name=config.run_name, method=config.method, config=config.to_dict(),
                       run=asdict(run), command=["calibrl", "train"] + ([config_path] if config_path else [])
                       + list(overrides))
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    save_final_model(trainer, os.path.join(run_dir, "model"))  # never loses the weights to a full disk
    if main:
        counts = dict(trainer.run_counts, skipped_steps=trainer.all_skipped_steps)
        write_run_info(run_dir, data=trainer.calibrl_data_description, counts=counts)
        _plot_and_report(run_dir)
    return 0


def _plot_and_report(run_dir: str) -> None:
    from calibrl.plots import plot_runs

    pngs = plot_runs([run_dir], os.path.join(run_dir, "plots"))
    print(f"\nrun folder: {run_dir}")
    print(train_summary(run_dir))
    if pngs:
        print("plots: " + ", ".join(os.path.relpath(p, run_dir) for p in pngs))


# ----------------------------------------------------------------------------------------------------------
# sft
# ----------------------------------------------------------------------------------------------------------
def _sft_fields() -> list[type]:
    from calibrl.sft import SFTArgs

    return [SFTArgs]


def run_sft_command(config_path: str | None, overrides: list[str]) -> int:
    from calibrl.recipes import parse_config
    from calibrl.sft import SFTArgs, run_sft, summary_table

    (args,) = parse_config([SFTArgs], config_path, overrides, section="sft")
    check_writable(args.output_dir or os.path.join("runs", "sft"))
    summary = run_sft(args)
    print(f"\nmodel saved to {summary['output_dir']}")
    print(summary_table(summary))
    return 0


# ----------------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------------
def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model directory (a run's model/ folder, an sft output) or tiny:<family>:<size>")
    p.add_argument("--data", required=True, nargs="+", help="task:digits / task:shapes / task:mixed, or data files")
    p.add_argument("--split", nargs="+", default=["test", "ood"], help="splits of a task: dataset (default: test ood)")
    p.add_argument("--n", type=int, default=200, help="rows per split or file (default 200; 0 = the whole file)")
    p.add_argument("--task_seed", type=int, default=0, help="seed of the generated rows (the held-out rows of a "
                   "run with the same task_seed)")
    p.add_argument("--difficulty", type=int, nargs="+", default=None, help="difficulty levels of a task")
    p.add_argument("--task_types", nargs="+", default=None, help="problem types kept in train/test (e.g. digits/sum)")
    p.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k values (k > 1 samples at T=1)")
    p.add_argument("--num_samples", type=int, default=None, help="samples per row for pass@k (default: max k)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--out", default=None, help="write the results as JSON here")


def run_eval(ns: argparse.Namespace) -> int:
    from calibrl import recipes
    from calibrl.evaluate import evaluate, format_table, save_results

    if ns.n < 0:
        raise UsageError(f"--n must be >= 0, got {ns.n}")
    if ns.out:
        check_file_writable(ns.out, "--out")  # before any evaluation
    if ns.model.startswith(recipes.TINY_PREFIX):
        recipes.parse_tiny_spec(ns.model)  # fail before generating any data
    elif not os.path.isdir(ns.model) and os.path.exists(ns.model):
        raise UsageError(f"model {ns.model} is not a folder")
    else:
        recipes.resolve_model_path(ns.model)  # a typo or an unreachable hub: one line, before any work
    rows: list[dict] = []
    for source in ns.data:
        if recipes.task_name(source) is not None:
            for split in ns.split:
                rows += recipes.task_rows(source, split, ns.n or 200, ns.task_seed + 1000, "native", 0.0,
                                          ns.difficulty, ns.task_types)
        else:
            dataset, _ = recipes.load_data_file(source)
            file_rows = recipes.dataset_rows(dataset)
            file_rows = file_rows[: ns.n] if ns.n else file_rows
            stem = os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
            rows += [{**r, "split": r.get("split") or stem} for r in file_rows]
    model, processing_class = recipes.load_model(ns.model)
    start = time.time()
    try:
        results = evaluate(model, processing_class, rows, max_new_tokens=ns.max_new_tokens, batch_size=ns.batch_size,
                           k=ns.k, num_samples=ns.num_samples)
    except ValueError as e:
        raise UsageError(" ".join(str(e).split())) from None
    results["model"], results["data"], results["seconds"] = ns.model, ns.data, round(time.time() - start, 2)
    print(format_table(results))
    print(f"({len(rows)} rows in {results['seconds']:.1f} s)")
    if ns.out:
        save_results(results, ns.out)
        print(f"results written to {ns.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------------------
def _plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (with metrics.jsonl / eval.jsonl)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots for one run, else plots)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: run names)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window over steps (default 1: none)")


def run_plot(ns: argparse.Namespace) -> int:
    from calibrl.plots import plot_runs

    for d in ns.run_dirs:
        if not os.path.isdir(d):
            raise UsageError(f"run folder not found: {d}")
    if ns.labels is not None and len(ns.labels) != len(ns.run_dirs):
        raise UsageError(f"--labels has {len(ns.labels)} names for {len(ns.run_dirs)} run folders")
    if ns.smooth < 1:
        raise UsageError(f"--smooth must be >= 1, got {ns.smooth}")
    out = ns.out or (os.path.join(ns.run_dirs[0], "plots") if len(ns.run_dirs) == 1 else "plots")
    check_writable(out, "--out")
    try:
        pngs = plot_runs(list(ns.run_dirs), out, labels=ns.labels, smooth=ns.smooth)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(" ".join(str(e).split())) from None
    if not pngs:
        raise UsageError("nothing to plot: the run folders hold no metrics or evaluations")
    for path in pngs:
        print(path)
    return 0


# ----------------------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="run folder (default runs/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--config", default=None, help="a demo config (default: the packaged one; see --print_config)")
    p.add_argument("--print_config", action="store_true", help="print the packaged demo config and exit")
    p.add_argument("--no_cache", action="store_true", help="redo the SFT warm start even if it is cached")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes, same code path (tests)


def run_demo_command(ns: argparse.Namespace) -> int:
    from calibrl import demo

    if ns.print_config:
        print(demo.DEMO_YAML, end="")
        return 0
    check_writable(ns.out, "--out")
    demo.run_demo(ns.out, overwrite=ns.overwrite, config_path=ns.config, smoke=ns.smoke, use_cache=not ns.no_cache)
    return 0


# ----------------------------------------------------------------------------------------------------------
# Registry and entry point
# ----------------------------------------------------------------------------------------------------------
COMMANDS: dict[str, Command] = {
    "train": Command("RL training (CalibRL, GRPO, DAPO, LUFFY, RL-PLUS) from a YAML config",
                     run=lambda ns: run_train(ns.config, ns.overrides), config_fields=_train_fields),
    "sft": Command("supervised warm start on expert solutions",
                   run=lambda ns: run_sft_command(ns.config, ns.overrides), config_fields=_sft_fields),
    "eval": Command("held-out accuracy / pass@k / format rate of a model", run=run_eval,
                    add_arguments=_eval_arguments),
    "plot": Command("PNG training curves of one or more run folders", run=run_plot, add_arguments=_plot_arguments),
    "demo": Command("tiny Qwen2.5-VL, digits task: SFT warm start, evaluate, CalibRL, evaluate (CPU, offline)",
                    run=run_demo_command, add_arguments=_demo_arguments),
}

_DESCRIPTIONS = {
    "train": "Train with CalibRLTrainer. Keys: every CalibRLConfig (TRL GRPOConfig) field and every run field "
             "below, from CONFIG.yaml (flat, or its `train:` section) and/or --key value (which wins).",
    "sft": "Supervised warm start. Keys from CONFIG.yaml (flat, or its `sft:` section) and/or --key value.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calibrl", description="CalibRL: hybrid-policy RLVR with an expert "
                                     "calibration baseline, on TRL.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if cmd.config_fields is not None:  # parsed by the config loader; registered here for `calibrl --help`
            sp = sub.add_parser(name, help=cmd.help, add_help=False)
            sp.add_argument("config", nargs="?")
            sp.add_argument("overrides", nargs=argparse.REMAINDER)
        else:
            sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
            cmd.add_arguments(sp)
        sp.set_defaults(command=name)
    return parser


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    def error(message: str):
        raise UsageError(" ".join(message.split()))

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _one_line_errors(sp)


def _config_command(name: str, argv: list[str]) -> int:
    """`calibrl train|sft [CONFIG.yaml] [--key value ...]`."""
    cmd = COMMANDS[name]
    if "-h" in argv or "--help" in argv or "--help-all" in argv:
        from calibrl.recipes import config_help

        print(config_help(cmd.config_fields(), f"calibrl {name}", _DESCRIPTIONS.get(name, cmd.help),
                          full="--help-all" in argv))
        return 0
    config = argv[0] if argv and not argv[0].startswith("-") else None
    overrides = argv[1:] if config is not None else argv
    if config is not None and not os.path.isfile(config):  # before any slow import
        raise UsageError(f"config file not found: {config}")
    return cmd.run(argparse.Namespace(command=name, config=config, overrides=overrides))


def _quiet_library_warnings() -> None:
    """Hide deprecation noise we cannot act on: TRL's configs default `gradient_checkpointing=True`, a name
    transformers 5 deprecates, and TRL's trainers call the deprecated model methods of that name."""
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_library_warnings()
    try:
        if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].config_fields is not None:
            return _config_command(argv[0], argv[1:])
        parser = build_parser()
        _one_line_errors(parser)
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[ns.command].run(ns)
    except UsageError as e:
        print(f"calibrl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, CheckpointError) as e:  # a full or read-only disk; a checkpoint that is not whole
        print(f"calibrl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_STORAGE if isinstance(e, StorageError) else EXIT_USAGE
    except OSError as e:  # any other write that met a full or read-only disk (plots, run files)
        found = storage_cause(e)
        if found is None:
            raise
        print(f"calibrl: error: could not write {e.filename or 'an output file'}: {found[1]}", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:
        print("calibrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

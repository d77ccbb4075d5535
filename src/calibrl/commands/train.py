"""`calibrl train`: a config -> a CalibRLTrainer -> a run folder (metrics, held-out curves, model, plots) -> a summary.

    from calibrl.config import load_train_config
    from calibrl.commands.train import train
    config, run = load_train_config("configs/demo.yaml", ["--max_steps", "10"])
    train(config, run)
"""

from __future__ import annotations

import os
from dataclasses import asdict

from calibrl.config import CalibRLConfig, RunArgs, load_train_config
from calibrl.data import load_data_file
from calibrl.errors import UsageError
from calibrl.files import check_output_dir, is_main_process, prepare_output_dir
from calibrl.rewards import reward_functions
from calibrl.storage import check_writable
from calibrl.tasks import task_name, to_hf_dataset

CONFIG_TYPES = (CalibRLConfig, RunArgs)
DESCRIPTION = ("Train with CalibRLTrainer. Keys: every CalibRLConfig (TRL GRPOConfig) field and every run field "
               "below, from CONFIG.yaml (flat, or its `train:` section) and/or --key value (which wins).")


def train_dataset(run: RunArgs):
    """The training `datasets.Dataset` and a one-line description of it."""
    if task_name(run.dataset) is None:
        dataset, summary = load_data_file(run.dataset)
        return dataset, str(summary)
    rows = run.training_rows()
    return to_hf_dataset(rows), f"{run.dataset}: {len(rows)} train rows, {run.expert_style} experts"


def heldout_sets(run: RunArgs, n: int | None = None) -> dict[str, list[dict]]:
    """Held-out sets by name: the task's `eval_splits`, plus every `eval_data` file (named by its stem)."""
    n = run.n_eval if n is None else n
    sets: dict[str, list[dict]] = {}
    if n > 0 and task_name(run.dataset) is not None:
        for split in run.eval_splits:
            sets[split] = run.heldout_rows(split, n)
    for path in run.eval_data or []:
        dataset, _ = load_data_file(path)
        rows = [dataset[i] for i in range(len(dataset))]
        sets[os.path.splitext(os.path.basename(os.path.normpath(path)))[0]] = rows[:n] if n > 0 else rows
    return sets


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


def build_trainer(config: CalibRLConfig, run: RunArgs, callbacks_dir: str | None = None, quiet: bool = False):
    """(trainer, data description): the CalibRLTrainer a config describes, with MetricsLogger and
    HeldoutEvalCallback writing to the run folder (`callbacks_dir`, default `config.output_dir`)."""
    from trl.import_utils import is_vllm_available

    from calibrl.models import freeze_vision_tower, load_model, lora_config
    from calibrl.run_log import HeldoutEvalCallback, MetricsLogger
    from calibrl.trainer import CalibRLTrainer

    if config.use_vllm and not is_vllm_available():  # checked first: TRL would only fail after loading everything
        raise UsageError("use_vllm=true but vLLM is not installed (it needs a CUDA host: pip install "
                         "'calibrl[vllm]'); pass --use_vllm false to generate with transformers")
    dataset, description = train_dataset(run)
    rewards = reward_functions(run.reward_funcs)
    sets = heldout_sets(run)
    model, processing_class = load_model(run.model, seed=config.seed, model_init_kwargs=config.model_init_kwargs)
    if run.freeze_vision_tower:
        freeze_vision_tower(model)
    run_dir = callbacks_dir or config.output_dir
    callbacks = [MetricsLogger(run_dir)]
    if sets:
        max_new = run.eval_max_new_tokens or config.max_completion_length
        callbacks.append(HeldoutEvalCallback(run_dir, processing_class, sets, every_n_steps=run.eval_every,
                                             max_new_tokens=max_new, batch_size=run.eval_batch_size))
    trainer = CalibRLTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=dataset,
                             processing_class=processing_class, callbacks=callbacks, peft_config=lora_config(run))
    if not config.disable_tqdm:
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(compact_progress_callback())
    if not quiet and is_main_process():
        print(f"calibrl train: {description}; model {run.model}; method {config.method}; "
              f"{config.max_steps if config.max_steps > 0 else config.num_train_epochs} "
              f"{'steps' if config.max_steps > 0 else 'epochs'}", flush=True)
    return trainer, description


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


def train(config: CalibRLConfig, run: RunArgs, command: list[str] | None = None) -> str:
    """Train into `config.output_dir` (a fresh folder, or resume from `config.resume_from_checkpoint`), save the
    model to `<run>/model`, write run.json with the data description and run totals, plot and print the summary.
    Returns the run folder. Works under accelerate / torchrun: every process calls it."""
    from accelerate import PartialState

    from calibrl.checkpoints import save_final_model
    from calibrl.models import TINY_PREFIX, resolve_model_path
    from calibrl.run_log import write_run_info

    state = PartialState()
    main = state.is_main_process
    run_dir = config.output_dir
    check_writable(run_dir)  # before any model or data is loaded
    if not run.model.startswith(TINY_PREFIX):
        resolve_model_path(run.model)  # a typo or an unreachable hub: one line, at once
    if config.resume_from_checkpoint is None:
        check_output_dir(run_dir, run.overwrite)  # every process, before any of them writes
        state.wait_for_everyone()
        prepare_output_dir(run_dir, overwrite=True, is_main=main)
    state.wait_for_everyone()
    trainer, description = build_trainer(config, run)
    if main:
        write_run_info(run_dir, name=config.run_name, method=config.method, config=config.to_dict(),
                       run=asdict(run), command=command or ["calibrl", "train"])
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    save_final_model(trainer, os.path.join(run_dir, "model"))  # never loses the weights to a full disk
    if main:
        counts = dict(trainer.run_counts, skipped_steps=trainer.all_skipped_steps)
        write_run_info(run_dir, data=description, counts=counts)
        report(run_dir)
    if state.num_processes > 1:  # leave together, with the process group torn down before the interpreter's
        state.wait_for_everyone()  # exit (NCCL warns of a group never destroyed; gloo's threads can race it)
        state.destroy_process_group()
    return run_dir


def report(run_dir: str) -> None:
    """Draw the run's plots into `<run>/plots` and print the summary."""
    from calibrl.plots import plot_runs

    pngs = plot_runs([run_dir], os.path.join(run_dir, "plots"))
    print(f"\nrun folder: {run_dir}")
    print(train_summary(run_dir))
    if pngs:
        print("plots: " + ", ".join(os.path.relpath(p, run_dir) for p in pngs))


def run(config_path: str | None, overrides: list[str]) -> int:
    """`calibrl train [CONFIG.yaml] [--key value ...]`."""
    config, run_args = load_train_config(config_path, overrides)  # (this also sets up the process group)
    train(config, run_args, command=["calibrl", "train"] + ([config_path] if config_path else []) + list(overrides))
    return 0

"""Worker for tests/test_deepspeed.py: CalibRL under DeepSpeed ZeRO on 2 CPU processes. Not collected by pytest.

    accelerate launch --config_file configs/accelerate/ds_cpu_zero3.yaml tests/ds_worker.py MODEL_DIR OUT_DIR [opts]

Trains `calibrl` on a fixed global batch of 16 rows (4 prompts x 4 rollouts) with 2 gradient-accumulation
micro-batches, and writes per process what each row saw (prompt uid, group members, advantage, pass sign,
expert length and log-prob) to records-RANK.json; process 0 also writes the logged metrics (logs.json), the
full weights gathered from the shards (params.pt) and a summary (summary.json).
`--fake-rollouts` replaces sampling by a deterministic vLLM-like backend, so that runs with different process
counts or sharding see the same completions and can be compared number for number; `build_trainer` is
importable, so the test builds its single-process reference the same way.
"""

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from calibrl import CalibRLConfig, CalibRLTrainer  # noqa: E402
from calibrl.models import load_tiny_model  # noqa: E402
from helpers import digit_rows, hash_accuracy, hash_format  # noqa: E402
from fakes import FakeVLLM, end_worker  # noqa: E402
import dist_worker  # noqa: E402

GLOBAL_BATCH, GROUP, GRAD_ACC = 16, 4, 2


class Recording(dist_worker.Recording):
    """Records, per local row, what the expert path computed (tests/dist_worker.py), and can poison a step."""

    nan_step: int | None = None  # this optimizer step gets a NaN loss (the step must be skipped, not applied)

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        return loss * float("nan") if self.state.global_step == self.nan_step else loss


def build_trainer(model_dir: str, out_dir: str, world: int, steps: int = 2, fake_rollouts: bool = True,
                  missing_rows: tuple[int, ...] = (), **overrides) -> Recording:
    """The same run for any process count: each process takes GLOBAL_BATCH / world rows per step."""
    rows = digit_rows(GLOBAL_BATCH // GROUP * steps)
    for k, r in enumerate(rows):
        r["uid"] = k
        if k in missing_rows:
            r["solution"] = None
    model, proc = load_tiny_model(model_dir)
    cfg = CalibRLConfig(**{
        **dict(output_dir=out_dir, bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
               disable_tqdm=True, max_steps=steps, learning_rate=5e-3, lr_scheduler_type="constant",
               num_generations=GROUP, gradient_accumulation_steps=GRAD_ACC,
               per_device_train_batch_size=GLOBAL_BATCH // world // GRAD_ACC, max_completion_length=24,
               reward_weights=[1.0, 0.1], shuffle_dataset=False),
        **overrides,
    })
    tr = Recording(model=model, reward_funcs=[hash_accuracy, hash_format], args=cfg,
                   train_dataset=Dataset.from_list(rows), processing_class=proc)
    tr.records = []
    if fake_rollouts:
        digits = proc.tokenizer.convert_tokens_to_ids(list("0123456789"))
        tr.use_vllm, tr.vllm_generation, tr._last_loaded_step = True, FakeVLLM(tr.eos_token_ids[0], digits), -1
        tr.vllm_importance_sampling_correction = False
    return tr


def full_params(tr: CalibRLTrainer) -> dict[str, torch.Tensor]:
    """Every parameter in full on process 0, gathered from the ZeRO shards (a collective call)."""
    state = tr.accelerator.get_state_dict(tr.model_wrapped)
    return {k: v.detach().float().cpu().clone() for k, v in (state or {}).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sample", action="store_true", help="sample rollouts with model.generate (default: fake)")
    ap.add_argument("--nan-step", type=int, default=None, help="give this optimizer step (0-based) a NaN loss")
    ap.add_argument("--missing-rows", default="", help="comma-separated row indices whose expert is missing")
    ap.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    ap.add_argument("--resume", default=None, help="resume from this checkpoint directory")
    opts = ap.parse_args()

    if importlib.util.find_spec("deepspeed") is not None:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it finds a compiler (~90 s on
        # 2 cores, once per machine). gloo does the same job; marking the op unavailable skips the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    missing = tuple(int(k) for k in opts.missing_rows.split(",") if k)
    # use_cpu=False with ddp_backend="gloo": accelerate then counts the DeepSpeed processes on a machine without
    # GPUs (use_cpu=True would switch DeepSpeed off, and no backend makes every process believe it is alone).
    tr = build_trainer(opts.model_dir, opts.out_dir, world, opts.steps, fake_rollouts=not opts.sample,
                       missing_rows=missing, use_cpu=False, ddp_backend="gloo",
                       save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500)
    tr.nan_step = opts.nan_step
    tr.train(resume_from_checkpoint=opts.resume)
    with open(os.path.join(opts.out_dir, f"records-{rank}.json"), "w") as f:
        json.dump({"records": tr.records, "skipped_steps": tr.skipped_steps}, f)
    params = full_params(tr)
    if rank == 0:
        torch.save(params, os.path.join(opts.out_dir, "params.pt"))
        with open(os.path.join(opts.out_dir, "logs.json"), "w") as f:
            json.dump([h for h in tr.state.log_history if "loss" in h], f)
        plugin = tr.accelerator.state.deepspeed_plugin
        summary = {
            "world": tr.accelerator.num_processes, "zero_stage": plugin.zero_stage if plugin else None,
            "skipped_steps": tr.skipped_steps, "reward_faults": tr.reward_faults.totals,
            "global_step": tr.state.global_step,
        }
        with open(os.path.join(opts.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    end_worker("ds_worker", rank)


if __name__ == "__main__":
    main()

"""Per-step wall time of CalibRL against GRPO, measured side by side in one run (issue: target <= 1.10).

The only extra work CalibRL does is one no-grad forward of the expert per group. To measure exactly that,
both trainers start from the same tiny Qwen2.5-VL with the same seed and learning rate 0, so they sample the
same completions step for step and differ only in the expert forward and the guidance term. Steps of the two
methods interleave, alternating which goes first (machines are noisy); we report medians and their ratio.

    python -m benchmarks.step_time [--steps 20] [--size small] [--generations 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def make_trainer(method: str, model_dir: str, dataset, args, out: str):
    from calibrl import CalibRLConfig, CalibRLTrainer
    from calibrl.models import load_tiny_model
    from calibrl.rewards import accuracy_reward, format_reward

    model, proc = load_tiny_model(model_dir)
    cfg = CalibRLConfig(
        output_dir=out, method=method, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        disable_tqdm=True, seed=0, learning_rate=0.0, max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
        max_completion_length=args.max_new_tokens, reward_weights=[1.0, 0.1],
    )
    tr = CalibRLTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=cfg,
                        train_dataset=dataset, processing_class=proc)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1  # normally set by the training loop
    return tr


def timed_step(tr, batch: list[dict], seed: int) -> float:
    """One full training step as TRL runs it (generate, score, expert forward, loss, backward), timed.
    Learning rate 0 and the same seed: both methods sample the same completions."""
    torch.manual_seed(seed)
    t = time.perf_counter()
    tr.training_step(tr.model, batch, None)
    tr.model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default="small")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from calibrl.models import build_tiny_model, save_tiny_model
    from calibrl.tasks import make_dataset, to_hf_dataset

    tmp = tempfile.mkdtemp(prefix="calibrl-steptime-")
    model, proc = build_tiny_model("qwen2_5_vl", args.size, seed=0)
    save_tiny_model(model, proc, f"{tmp}/model")
    ds = to_hf_dataset(make_dataset("digits", "train", n=256, seed=0, expert_style="mismatched"))

    trainers = {m: make_trainer(m, f"{tmp}/model", ds, args, f"{tmp}/{m}") for m in ("grpo", "calibrl")}
    batches = iter(trainers["grpo"].get_train_dataloader())
    times: dict[str, list[float]] = {"grpo": [], "calibrl": []}
    t0 = time.time()
    # Steps interleave the two methods, alternating which goes first, so that load on a shared machine hits
    # both alike. Step 0 of each is a warm-up and is not timed.
    for step in range(args.steps + 1):
        batch = next(batches)
        order = ("grpo", "calibrl") if step % 2 == 0 else ("calibrl", "grpo")
        for m in order:
            dt = timed_step(trainers[m], batch, seed=step)
            if step > 0:
                times[m].append(dt)
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {
        "median_step_s": med,
        "ratio_calibrl_over_grpo": med["calibrl"] / med["grpo"],
        "timed_steps_per_method": len(times["grpo"]),
        "setting": {"model": f"tiny qwen2_5_vl/{args.size}", "prompts": args.prompts,
                    "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                    "threads": torch.get_num_threads()},
        "wall_s": time.time() - t0,
    }
    print(f"median step time  GRPO {med['grpo']:.3f} s   CalibRL {med['calibrl']:.3f} s   "
          f"ratio CalibRL/GRPO {result['ratio_calibrl_over_grpo']:.3f}   "
          f"({result['timed_steps_per_method']} interleaved steps each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

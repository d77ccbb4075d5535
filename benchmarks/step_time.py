"""Per-step wall time of CalibRL against GRPO, measured side by side in one run (issue: target <= 1.10).

The only extra work CalibRL does is one no-grad forward of the expert per group. To measure exactly that,
both trainers start from the same tiny Qwen2.5-VL with the same seed and learning rate 0, so they sample the
same completions step for step and differ only in the expert forward and the guidance term. Steps of the two
methods interleave, alternating which goes first (machines are noisy); we report medians and their ratio.

    python -m benchmarks.step_time [--steps 20] [--size small] [--generations 8] [--shared-prefix on|off]

`--shared-prefix compare` instead times the policy forward + backward of one generated batch in TRL's repeated
layout and in the shared-prefix layout (calibrl.prefix), side by side in this process, and reports the ratio:

    python -m benchmarks.step_time --shared-prefix compare --prompts 16 --generations 8 --max-new-tokens 80 --threads 1

and, the same way, generation (TRL's HF `generate`, `_generate_single_turn`) with each rollout prefilling its
prompt and with the shared prefill (calibrl.prefill: each distinct prompt and its images prefilled once), from
the same seed, so both sample the same completions (checked).
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
        shared_prefix=args.shared_prefix != "off",
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


def prefix_side_by_side(args, model_dir: str, dataset, out: str) -> dict:
    """Policy forward + backward (`_compute_loss`, then backward) of one generated batch, repeated layout
    against shared prefix, alternating which goes first; the first round is a warm-up."""
    tr = make_trainer("grpo", model_dir, dataset, args, out)
    torch.manual_seed(0)
    inputs = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))  # generated and scored once
    times: dict[str, list[float]] = {"repeated": [], "shared": []}
    for rep in range(args.steps + 1):
        for mode in (("repeated", "shared") if rep % 2 == 0 else ("shared", "repeated")):
            tr.args.shared_prefix = mode == "shared"
            t = time.perf_counter()
            tr._compute_loss(tr.model, inputs).backward()
            dt = time.perf_counter() - t
            tr.model.zero_grad(set_to_none=True)
            if rep > 0:
                times[mode].append(dt)
    med = {m: statistics.median(v) for m, v in times.items()}
    lens = inputs["completion_mask"].sum(1).float()
    result = {
        "median_fwd_bwd_s": med, "ratio_shared_over_repeated": med["shared"] / med["repeated"],
        "repeats": len(times["shared"]), "prompt_columns": inputs["prompt_ids"].size(1),
        "prompt_tokens_mean": inputs["prompt_mask"].sum(1).float().mean().item(),
        "completion_tokens_mean": lens.mean().item(),
        "setting": {"model": f"tiny qwen2_5_vl/{args.size}", "prompts": args.prompts,
                    "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                    "threads": torch.get_num_threads()},
    }
    print(f"median policy forward+backward  repeated {med['repeated']:.3f} s   shared prefix {med['shared']:.3f} s   "
          f"ratio shared/repeated {result['ratio_shared_over_repeated']:.3f}   ({result['repeats']} repeats each; "
          f"prompt {result['prompt_tokens_mean']:.0f} tokens, completions {result['completion_tokens_mean']:.0f})")
    return result


def generation_side_by_side(args, tr, batch: list[dict]) -> dict:
    """TRL's HF generation of one batch, plain against shared prefill, alternating which goes first, the same
    seed each time (so the same completions, checked); the first round is a warm-up."""
    from trl.data_utils import is_conversational, prepare_multimodal_messages

    from calibrl.multimodal import row_images

    prompts = [prepare_multimodal_messages(x["prompt"], images=row_images(x))
               if row_images(x) and is_conversational(x) else x["prompt"] for x in batch]
    prompt_ids, images, mm = tr._tokenize_prompts(prompts)
    times: dict[str, list[float]] = {"plain": [], "shared": []}
    outs: dict[str, list] = {}
    for rep in range(args.gen_repeats + 1):
        for mode in (("plain", "shared") if rep % 2 == 0 else ("shared", "plain")):
            tr.args.shared_prefix = mode == "shared"
            before = tr._prefill_stats["shared"]
            torch.manual_seed(rep)
            t = time.perf_counter()
            with torch.no_grad():
                completions, _ = tr._generate_single_turn(prompt_ids, images, mm, args.generations)
            dt = time.perf_counter() - t
            assert (tr._prefill_stats["shared"] > before) == (mode == "shared"), "the shared prefill did not run"
            outs.setdefault(rep, {})[mode] = completions
            if rep > 0:
                times[mode].append(dt)
    same = all(o["plain"] == o["shared"] for o in outs.values())
    med = {m: statistics.median(v) for m, v in times.items()}
    lens = [len(c) for o in outs.values() for c in o["plain"]]
    result = {"median_generate_s": med, "ratio_shared_over_plain": med["shared"] / med["plain"],
              "repeats": len(times["shared"]), "same_completions": same, "rows": len(prompt_ids),
              "prompt_tokens_mean": sum(map(len, prompt_ids)) / len(prompt_ids),
              "completion_tokens_mean": sum(lens) / len(lens)}
    print(f"median generation  plain {med['plain']:.3f} s   shared prefill {med['shared']:.3f} s   ratio shared/plain "
          f"{result['ratio_shared_over_plain']:.3f}   ({result['repeats']} repeats each; same completions: {same}; "
          f"prompt {result['prompt_tokens_mean']:.0f} tokens, completions {result['completion_tokens_mean']:.0f})")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default="small")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--shared-prefix", choices=("on", "off", "compare"), default="on",
                   help="the policy forward's layout for both methods, or 'compare': repeated vs shared prefix")
    p.add_argument("--gen-repeats", type=int, default=3, help="compare: timed generations per mode")
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
    if args.shared_prefix == "compare":
        result = prefix_side_by_side(args, f"{tmp}/model", ds, f"{tmp}/prefix")
        tr = make_trainer("grpo", f"{tmp}/model", ds, args, f"{tmp}/prefill")
        result["generation"] = generation_side_by_side(args, tr, next(iter(tr.get_train_dataloader())))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result

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
                    "threads": torch.get_num_threads(), "shared_prefix": args.shared_prefix},
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
